"""Throughput of the anomaly stage and the size of its checkpoints, whole vs delta.

    .venv/bin/python benchmarks/anomaly_stage.py --series 20000 --days 9
    .venv/bin/python benchmarks/anomaly_stage.py --quick      # a small run (tests use this)

What runs is the embedded stage (``aggregators/anomaly_embedded.py``) as the rollup runner
drives it: rollup rows of ``--series`` series spread over ``--partitions`` local-log
partitions, hour after hour for ``--days`` days, each window written ``--versions`` times
while it fills (growing versions, as the rollup flushes rewrite a window's total), one
flush per version round. Each flush goes through ``EmbeddedAnomalies.apply`` (the
``RollupFeed`` per partition: final windows only, detectors, early warnings); every
``--flushes-per-checkpoint`` flushes the checkpoint is taken. Events are produced but not
written anywhere (storage is not what is measured here).

Reported:

- ``rows_per_s``: rollup rows through the feed per second (apply only), and
  ``updates_per_s``: series-window detector updates per second (each final window of each
  series is one update), both over the timed part after the warm-up week;
- checkpoint bytes (zlib'd JSON, what the SQLite store holds) per checkpoint:
  - ``whole``: the whole feed state of every partition (the detectors' state included),
    what a checkpoint rewrote before deltas, and what ``meterline anomalies`` still
    writes per rollups partition;
  - ``delta_no_close``: the delta format when no window closed since the last save (only
    pending rows and clocks: the common case at 5 s checkpoints);
  - ``delta_close``: the delta format right after windows closed (detector state of the
    partitions that changed + their small part);
- per hour at the rollup runner's 5 s checkpoints (720 an hour, one of which follows the
  hourly close), bytes written: whole = 720 x whole; delta = 719 x no_close + 1 x close.

Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meterline.aggregators.anomaly_embedded import EmbeddedAnomalies  # noqa: E402
from meterline.core.anomaly.feed import FeedSettings  # noqa: E402
from meterline.core.anomaly.settings import AnomalySettings  # noqa: E402
from meterline.core.outputs import RollupRecord  # noqa: E402

HOUR_MS = 3_600_000
START_MS = 1_767_571_200_000  # Monday 2026-01-05 00:00 UTC
NANOS = 10**9
CHECKPOINTS_PER_HOUR = 720  # the rollup runner's default 5 s interval


class _Discard:
    """An EventWriter that keeps nothing (memory stays flat over long runs)."""

    def __init__(self) -> None:
        self.events = 0

    def write(self, events: Any) -> None:
        self.events += len(events)


def _whole(stage: EmbeddedAnomalies) -> int:
    """Bytes of the whole state, one blob per partition, as a full checkpoint writes it."""
    return sum(len(zlib.compress(orjson.dumps(feed.export_state()), 1))
               for feed in stage.feeds.values())


def run(series: int, days: int, partitions: int, versions: int, flushes_per_checkpoint: int,
        seed: int, early_warning: bool = True) -> dict[str, Any]:
    rng = random.Random(seed)
    stage = EmbeddedAnomalies(_Discard(), AnomalySettings(),
                              FeedSettings(early_warning=early_warning), group="rollups",
                              topic="local")
    customers = [f"c{i:06d}" for i in range(series)]
    part_of = {c: i % partitions for i, c in enumerate(customers)}
    level = {c: 10 ** rng.uniform(1.5, 4.5) for c in customers}
    offsets = dict.fromkeys(range(partitions), 0)
    warmup_hours = min(7 * 24, days * 24 // 2)
    rows_timed = 0
    apply_s = 0.0
    closed_timed = 0
    flushes = 0
    whole: list[int] = []
    delta_close: list[int] = []
    delta_no_close: list[int] = []
    checkpoint_s: list[float] = []
    for hour in range(days * 24):
        start = START_MS + hour * HOUR_MS
        shape = 1.0 + 0.6 * math.sin(2 * math.pi * ((hour % 24) - 9) / 24)
        totals = {c: max(0, round(level[c] * shape * rng.uniform(0.85, 1.15))) for c in customers}
        for v in range(1, versions + 1):
            # The window fills: each flush carries every series' total so far.
            rows = [RollupRecord("hourly", c, "api_calls", (), start, start + HOUR_MS,
                                 "count", totals[c] * v // versions * NANOS, v, v, "local",
                                 part_of[c]) for c in customers]
            before = stage.counters.windows_closed
            t0 = time.perf_counter()
            stage.apply(rows)
            took = time.perf_counter() - t0
            for p in offsets:
                offsets[p] += 1
            if hour >= warmup_hours:
                apply_s += took
                rows_timed += len(rows)
                closed_timed += stage.counters.windows_closed - before
            flushes += 1
            if flushes % flushes_per_checkpoint == 0:
                closing = stage.detector_state_changed
                t0 = time.perf_counter()
                blobs = stage.checkpoint_blobs(offsets)
                stage.saved(offsets, blobs)
                checkpoint_s.append(time.perf_counter() - t0)
                size = sum(len(b) for b in blobs.values())
                (delta_close if closing else delta_no_close).append(size)
                if hour >= warmup_hours and len(whole) < 5:
                    whole.append(_whole(stage))
    # Updates: every series of a partition is scored once per final window (zeros for
    # the silent ones), so windows closed x series per partition.
    per_partition = series / partitions
    updates = closed_timed * per_partition

    def mean(xs: list[int]) -> int:
        return round(sum(xs) / len(xs)) if xs else 0

    result = {
        "series": series, "days": days, "partitions": partitions, "versions": versions,
        "flushes_per_checkpoint": flushes_per_checkpoint, "early_warning": early_warning,
        "rows_timed": rows_timed, "apply_s": round(apply_s, 3),
        "rows_per_s": round(rows_timed / apply_s) if apply_s else None,
        "updates_per_s": round(updates / apply_s) if apply_s else None,
        "state_bytes_per_series": round(mean(whole) / series, 1) if whole else None,
        "whole_bytes": mean(whole),
        "delta_no_close_bytes": mean(delta_no_close),
        "delta_close_bytes": mean(delta_close),
        "checkpoint_ms_median": round(sorted(checkpoint_s)[len(checkpoint_s) // 2] * 1000, 2)
        if checkpoint_s else None,
    }
    result["per_hour_whole_bytes"] = CHECKPOINTS_PER_HOUR * result["whole_bytes"]
    result["per_hour_delta_bytes"] = ((CHECKPOINTS_PER_HOUR - 1) * result["delta_no_close_bytes"]
                                      + result["delta_close_bytes"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=5000)
    parser.add_argument("--days", type=int, default=9)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--versions", type=int, default=4)
    parser.add_argument("--flushes-per-checkpoint", type=int, default=2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--no-early-warning", action="store_true",
                        help="[stage] early_warning = false: no partial-window checks")
    parser.add_argument("--quick", action="store_true", help="200 series x 3 days")
    args = parser.parse_args(argv)
    if args.quick:
        args.series, args.days = 200, 3
    r = run(args.series, args.days, args.partitions, args.versions,
            args.flushes_per_checkpoint, args.seed, not args.no_early_warning)
    print(json.dumps(r))
    ratio = (r["per_hour_whole_bytes"] / r["per_hour_delta_bytes"]
             if r["per_hour_delta_bytes"] else float("nan"))
    print(f"""
{r['series']:,} series x {r['days']} days, {r['partitions']} partitions, \
{r['versions']} versions a window, early warnings {'on' if r['early_warning'] else 'off'}
  rollup rows through the feed   {r['rows_per_s']:>12,} rows/s
  detector updates               {r['updates_per_s']:>12,} series-windows/s
  detector state                 {r['state_bytes_per_series']:>12} bytes/series (zlib'd JSON)
  checkpoint, whole state        {r['whole_bytes']:>12,} bytes
  checkpoint delta, no close     {r['delta_no_close_bytes']:>12,} bytes
  checkpoint delta, after close  {r['delta_close_bytes']:>12,} bytes
  per hour at 5 s checkpoints    whole {r['per_hour_whole_bytes']:,} vs delta \
{r['per_hour_delta_bytes']:,} bytes ({ratio:.0f}x less)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
