"""Rollup state size: checkpoint bytes and RSS of one partition under many producers and
many explicit event ids (issue: "checkpoints grow without bound").

Each scenario runs in its own subprocess (so its peak RSS is its own) through the real
``RollupWorker`` + ``PartitionProcessor`` + ``SqliteCheckpointStore``, checkpointing every
``--checkpoint-every-ms`` of log time as the worker does, and reports:

- ``main_bytes``: the partition's main checkpoint blob (compressed) at the end;
- ``store_bytes``: everything the checkpoint store holds for the partition (main blob +
  live id deltas) - what a restore reads;
- ``max_main_bytes``: the largest main blob written during the run;
- ``rss_mib``: the process's peak resident memory.

Scenarios:
- ``producers``: N emitting SDK instances, each sending small batches over 24 h of log
  time; ``--mode seq`` (envelopes carry producer/seq, today's SDK) or ``--mode batch-id``
  (no producer/seq: the batch-id set, as before).
- ``ids``: N events a day with explicit idempotency keys over 24 h of log time;
  ``--ids disk`` (SQLite scratch + deltas) or ``--ids memory``.

    python benchmarks/checkpoint_state.py            # the table in docs/benchmarks.md
    python benchmarks/checkpoint_state.py --quick    # a small run (tests use this)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DAY_MS = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def run_scenario(args: argparse.Namespace) -> dict[str, Any]:
    from meterline.aggregators.checkpoints import SqliteCheckpointStore
    from meterline.aggregators.runner import RollupWorker, TopicPartition
    from meterline.core.envelope import Batch, encode_batch
    from meterline.core.meters import MeterRegistry
    from meterline.core.quantity import SCALE
    from meterline.ingest.sources import SourceRecord

    class NullWriter:
        def write(self, flush: Any) -> None:
            pass

    registry = MeterRegistry.from_mapping({"meters": {"calls": {"aggregation": "count"}}})
    tmp = Path(tempfile.mkdtemp(prefix="ckstate-"))
    store = SqliteCheckpointStore(tmp / "ck.db")
    worker = RollupWorker(registry, NullWriter(), store, group="g",
                          id_store_dir=(tmp / "ids") if args.ids == "disk" else None)
    tp = TopicPartition("usage", 0)
    worker.assign([tp])
    key = "g/usage/0"

    if args.scenario == "producers":
        batches_each = args.batches_per_producer
        records = args.n * batches_each
        ms_per_record = DAY_MS // records
    else:
        per_batch = 1_000
        records = args.n // per_batch
        ms_per_record = DAY_MS // records
    customers = [f"cust-{i:04d}" for i in range(1_000)]
    max_main, last_checkpoint = 0, T0
    started = time.perf_counter()
    for offset in range(records):
        now = T0 + offset * ms_per_record
        if args.scenario == "producers":
            producer, seq = offset % args.n, offset // args.n
            n = 5
            batch = Batch(f"b{offset:012d}", now, [customers[(offset + i) % 1000]
                                                   for i in range(n)],
                          ["calls"] * n, [SCALE] * n, [now] * n,
                          producer=f"01J{producer:023d}" if args.mode == "seq" else None,
                          seq=seq if args.mode == "seq" else None)
        else:
            n = per_batch
            batch = Batch(f"b{offset:012d}", now, [customers[i % 1000] for i in range(n)],
                          ["calls"] * n, [SCALE] * n, [now] * n,
                          ids=[f"req-{offset:08d}-{i:04d}-{'x' * 12}" for i in range(n)],
                          producer=f"01J{offset % 50:023d}", seq=offset // 50)
        worker.process(SourceRecord("usage", 0, offset, encode_batch(batch), now))
        if now - last_checkpoint >= args.checkpoint_every_ms:
            last_checkpoint = now
            worker.flush(checkpoint=True)
            max_main = max(max_main, len(store.load([key])[key]))
    worker.flush(checkpoint=True)
    elapsed = time.perf_counter() - started
    main = store.load([key])[key]
    everything = store.load_prefixed(key)
    proc = worker.processors[tp]
    out = {
        "scenario": args.scenario, "n": args.n, "mode": args.mode, "ids": args.ids,
        "records": records, "events": records * (5 if args.scenario == "producers" else 1000),
        "main_bytes": len(main), "max_main_bytes": max(max_main, len(main)),
        "store_bytes": sum(len(v) for v in everything.values()),
        "deltas": sum(1 for k in everything if "/ids/" in k),
        "ids_held": len(proc.ids), "producers_held": len(proc.dedupers.sequences),
        "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds": round(elapsed, 1),
    }
    t = time.perf_counter()
    restored = RollupWorker(registry, NullWriter(), store, group="g",
                            id_store_dir=(tmp / "ids2") if args.ids == "disk" else None)
    restored.assign([tp])
    out["restore_seconds"] = round(time.perf_counter() - t, 1)
    return out


def spawn(*argv: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--one", *argv], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", action="store_true", help="run one scenario in-process")
    parser.add_argument("--scenario", choices=["producers", "ids"], default="producers")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--mode", choices=["seq", "batch-id"], default="seq")
    parser.add_argument("--ids", choices=["disk", "memory"], default="disk")
    parser.add_argument("--batches-per-producer", type=int, default=20)
    parser.add_argument("--checkpoint-every-ms", type=int, default=60_000,
                        help="log time between checkpoints (the worker's default is 5 s; "
                             "coarser only means fewer, larger id deltas)")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_scenario(args)))
        return 0
    producers, ids, mem_ids = (200, 20_000, 20_000) if args.quick else (10_000, 10_000_000,
                                                                         1_000_000)
    bpp = "5" if args.quick else "20"
    runs = [
        spawn("--scenario", "producers", "--n", str(producers), "--mode", "seq",
              "--batches-per-producer", bpp),
        spawn("--scenario", "producers", "--n", str(producers), "--mode", "batch-id",
              "--batches-per-producer", bpp),
        spawn("--scenario", "ids", "--n", str(ids), "--ids", "disk"),
        spawn("--scenario", "ids", "--n", str(mem_ids), "--ids", "memory"),
    ]
    print(f"{'scenario':<34}{'events':>12}{'main ckpt':>12}{'max main':>12}{'store':>12}"
          f"{'RSS MiB':>9}{'restore s':>10}{'run s':>8}")
    for r in runs:
        label = (f"{r['n']:,} producers, {r['mode']}" if r["scenario"] == "producers"
                 else f"{r['n']:,} explicit ids/day, {r['ids']}")
        print(f"{label:<34}{r['events']:>12,}{r['main_bytes']:>12,}{r['max_main_bytes']:>12,}"
              f"{r['store_bytes']:>12,}{r['rss_mib']:>9}{r['restore_seconds']:>10}"
              f"{r['seconds']:>8}")
    print(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
