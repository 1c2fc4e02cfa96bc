"""Memory of open rollup windows: the worker's resident set with ~1 M windows held.

    .venv/bin/python benchmarks/rollup_windows_rss.py                    # 1,000,000 windows
    .venv/bin/python benchmarks/rollup_windows_rss.py --windows 20000    # small (smoke test)

One partition's processor (``RollupWorker``, in-memory checkpoint store, no Kafka) folds
envelopes of 500 events, each event its own (customer, meter, hour) - ``sum`` meter
``tokens`` with one dimension value, so every event opens one hourly window and (per
24 hours of a customer) one daily window - and nothing is flushed or evicted: the
windows stay open. Reported: the growth of the process's resident set from before the
first record to after the last, per open window (hourly + daily, as the
``meterline_rollup_open_windows`` gauge counts them), and the time a flush of all of them
then takes (``take_flush``: what the first flush after a restart costs). Per engine
(``--engines``), each in a fresh process, so one run's garbage does not count in the
next.

Prints one JSON line per engine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOUR_MS = 3_600_000
START_MS = 1_704_067_200_000  # 2024-01-01 00:00 UTC
PER_RECORD = 500


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(windows: int, engine: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from meterline.aggregators.checkpoints import MemoryCheckpointStore
    from meterline.aggregators.runner import RollupWorker, TopicPartition
    from meterline.core.envelope import Batch, encode_batch
    from meterline.core.meters import MeterRegistry
    from meterline.core.quantity import SCALE
    from meterline.ingest.sources import SourceRecord

    registry = MeterRegistry.from_mapping({"meters": {
        "tokens": {"aggregation": "sum", "dimensions": ["model"]}}})

    class Nowhere:
        def write(self, flush: Any) -> None:
            pass

    # Hourly windows: customers x hours. 24 hours per customer, so daily windows are
    # 1/24 of the hourly ones; the target counts both.
    hours = 24
    customers = max(1, round(windows / (hours + 1)))
    payloads = []
    n = 0
    events: list[tuple[str, int]] = [(f"cust-{c:07d}", START_MS + h * HOUR_MS + 1_000)
                                     for h in range(hours) for c in range(customers)]
    for batch_no, i in enumerate(range(0, len(events), PER_RECORD), start=1):
        chunk = events[i:i + PER_RECORD]
        payloads.append(encode_batch(Batch(
            batch_id=f"b{batch_no:09d}", created_ms=START_MS + hours * HOUR_MS,
            customers=[c for c, _ in chunk], meters=["tokens"] * len(chunk),
            quantities=[3 * SCALE] * len(chunk), timestamps_ms=[t for _, t in chunk],
            dimensions=[{"model": "m1"}] * len(chunk))))
        n += len(chunk)
    # The log clock: the next day, so nothing is "too far ahead"; the watermark stays in
    # the day (its events), so nothing closes while the windows are being opened.
    records = [SourceRecord("usage", 0, off, p, START_MS + hours * HOUR_MS)
               for off, p in enumerate(payloads)]
    del payloads, events
    worker = RollupWorker(registry, Nowhere(), MemoryCheckpointStore(), group="rss",
                          flush_interval_s=1e9, checkpoint_interval_s=1e9, engine=engine)
    worker.assign([TopicPartition("usage", 0)])
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    for i in range(0, len(records), 64):
        handled, gap = worker.process_many(records[i:i + 64])
        assert gap is None and handled == len(records[i:i + 64])
    fold_s = time.perf_counter() - t0
    gc.collect()
    rss1 = _rss()
    proc = worker.processors[TopicPartition("usage", 0)]
    open_windows = len(proc.state)
    t0 = time.perf_counter()
    flush = proc.take_flush()
    flush_s = time.perf_counter() - t0
    return {"engine": engine, "events": n, "open_windows": open_windows,
            "rss_growth_mb": round((rss1 - rss0) / 2**20, 1),
            "bytes_per_open_window": round((rss1 - rss0) / open_windows),
            "peak_rss_mb": round(rss1 / 2**20), "fold_s": round(fold_s, 2),
            "take_flush_s": round(flush_s, 2), "flushed_rows": len(flush.rollup_rows()),
            "accepted": proc.counters.accepted, "loadavg": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=1_000_000)
    parser.add_argument("--engines", default="per-event,columnar")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.windows, args.child)), flush=True)
        return 0
    for engine in args.engines.split(","):
        out = subprocess.run([sys.executable, __file__, "--windows", str(args.windows),
                              "--child", engine], check=True, capture_output=True, text=True)
        print(out.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
