"""The quixstreams peer of benchmarks/e2e_rollups.py: its own tumbling-window sum and count.

Run by ``rollups_peers.run_quix`` as a subprocess of an interpreter that has quixstreams
(``rollups_peers.quix_python``: its own venv, because quixstreams 3.x pins
confluent-kafka < 2.13 while Meterline's environment runs 2.16). It imports nothing from
Meterline, so what it measures is quixstreams alone.

Its natural mode: one JSON event per message (``{"customer", "meter", "group", "quantity",
"timestamp_ms"}``, keyed ``customer|meter|group``), event time from ``timestamp_ms``, a
1-hour tumbling window per key with ``Sum("quantity")`` and ``Count()``, RocksDB state,
at-least-once, results taken with ``.final()``. ``closing_strategy="partition"`` so that
one sentinel message per partition (event time one day ahead, written after the events)
closes every window; with the default per-key closing the last window of each key would
stay open forever. Grace is one hour (``grace_ms``): events are at most 30 minutes older
than the newest one of their partition, so none is dropped as late. quixstreams' own
default, 0, drops this workload's late events: the harness's check then fails (its smoke
test runs that too).

Prints one JSON line: events seen, first..last message seconds, the windows.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

HOUR_MS = 3_600_000
SENTINEL_KEY = "~sentinel"


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    from quixstreams import Application
    from quixstreams.dataframe.windows import Count, Sum

    expected_windows = int(cfg["windows"])
    total_messages = int(cfg["messages"])  # events + one sentinel per partition
    perf = time.perf_counter
    state: dict[str, Any] = {"seen": 0, "first": None, "last": None, "closed": None}
    windows: dict[tuple[str, int], tuple[int, int]] = {}

    def event_time(value: Any, _headers: Any, _ts: int, _ts_type: Any) -> int:
        # Called once per message by quixstreams anyway: also the clock of first..last.
        seen = state["seen"] = state["seen"] + 1
        if seen == 1:
            state["first"] = perf()
        if seen == total_messages:
            state["last"] = perf()
        return int(value["timestamp_ms"])

    app = Application(
        broker_address=cfg["bootstrap"], consumer_group=cfg["group"],
        auto_offset_reset="earliest", state_dir=cfg["state_dir"], loglevel="WARNING")
    topic = app.topic(cfg["topic"], value_deserializer="json", key_deserializer="str",
                      timestamp_extractor=event_time)
    sdf = app.dataframe(topic)
    sdf = (sdf.tumbling_window(HOUR_MS, grace_ms=int(cfg.get("grace_ms", HOUR_MS)))
           .agg(total=Sum("quantity"), events=Count())
           .final(closing_strategy="partition"))

    def collect(value: Any, key: Any, _ts: int, _headers: Any) -> None:
        if key == SENTINEL_KEY:
            return
        windows[(key, int(value["start"]))] = (int(value["total"]), int(value["events"]))
        if len(windows) >= expected_windows and state["closed"] is None:
            state["closed"] = perf()
            app.stop()

    sdf = sdf.update(collect, metadata=True)
    # Stops by itself on the last expected window; the idle timeout only ends a run whose
    # windows never all close (some dropped): its totals then fail the harness's check.
    app.run(sdf, timeout=float(cfg.get("idle_timeout_s", 20)))
    first, last, closed = state["first"], state["last"], state["closed"]
    print(json.dumps({
        "messages_seen": state["seen"],
        "seconds": None if first is None or last is None else round(last - first, 3),
        "seconds_incl_closing": None if first is None or closed is None
        else round(closed - first, 3),
        "windows": [[k, s, t, n] for (k, s), (t, n) in windows.items()],
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
