"""Decode + fold: the per-event rollup fold against the columnar one, in one process.

    .venv/bin/python benchmarks/columnar_fold.py [--events N] [--fetch-records K]

Both folds get the same records of the same workloads, in the same run, one processor
per partition, ``--fetch-records`` records per fetch, a flush after every fetch:

- **high**: today's workload (``meterline.testing.usage_log``, as ``e2e_rollups.py``
  produces it: 1,000 customers, the five default meters, 4 partitions, ~500 events per
  envelope, resent batches, 2 % explicit ids);
- **low**: one customer per envelope (what one app instance emits), the same meters and
  dimensions, 500 events per envelope.

Measured per phase (wall clock around each call; the folds' results are compared for
equality at the end, so a fast wrong fold cannot report a number):

- reference: ``decode_batch``, ``RollupState.apply_batch``, output records (``_collect``),
  ``take_flush`` (the flush is the same code for both);
- columnar: ``decode_batch``, ``build_columns`` (vectorised validation), the ordered loop
  (``_fold_run`` minus its parts), ``merge_accepted`` (group-by + merge), ``take_flush``;
- native: the columnar fold with the compiled decoder and column builder (``native/``):
  ``NativeColumns.decode`` and ``.columns`` in place of the first two.

"decode+fold" = everything but ``take_flush``. Prints one JSON line per workload and a
table. ``--repeat`` runs alternate the two engines and keep each one's fastest run
(decode+fold time), since the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meterline.config import DEFAULT_METERS  # noqa: E402
from meterline.core.envelope import Batch, encode_batch  # noqa: E402
from meterline.core.meters import MeterRegistry  # noqa: E402
from meterline.core.quantity import SCALE  # noqa: E402
from meterline.core.windows import HOUR_MS  # noqa: E402
from meterline.ingest.sources import SourceRecord  # noqa: E402

PARTITIONS = 4
START_MS = 1_764_547_200_000  # 2025-12-01T00:00:00Z


def high_cardinality(events: int) -> list[SourceRecord]:
    from meterline.testing.usage_log import usage_records

    batches = max(1, events // (500 * PARTITIONS))
    records = usage_records(events, 1000, PARTITIONS, start_ms=START_MS,
                            events_per_batch=500 * PARTITIONS,
                            ms_per_batch=max(1, 3 * HOUR_MS // batches))
    return _stamped((r.partition, r.payload) for r in records)


def low_cardinality(events: int) -> list[SourceRecord]:
    """One customer per envelope: 500 events of the default meters, times over ~3 h."""
    rng = random.Random(5)
    from meterline.core.partitioning import partition_for

    out = []
    n_batches = max(1, events // 500)
    for b in range(n_batches):
        customer = f"cust-{b % 1000:05d}"
        clock = START_MS + b * (3 * HOUR_MS // n_batches)
        meters, qs, ts, dims = [], [], [], []
        for _ in range(500):
            meter = rng.choice(("api_calls", "llm_tokens", "storage_gb", "compute_seconds",
                                "active_users"))
            meters.append(meter)
            qs.append(SCALE if meter in ("api_calls", "active_users")
                      else rng.randrange(1, 5_000) * SCALE)
            ts.append(clock - rng.randrange(5 * 60_000))
            dims.append({"api_calls": {"endpoint": rng.choice(("/v1/a", "/v1/b")),
                                       "region": rng.choice(("eu", "us"))},
                         "llm_tokens": {"model": rng.choice(("s", "l"))},
                         "storage_gb": {"region": rng.choice(("eu", "us"))},
                         "compute_seconds": {"tier": rng.choice(("std", "pri"))},
                         "active_users": {"user_id": f"u{rng.randrange(300)}"}}[meter])
        batch = Batch(f"low-{b:07d}", clock, [customer] * 500, meters, qs, ts,
                      dimensions=dims)
        out.append((partition_for(customer, PARTITIONS), encode_batch(batch)))
    return _stamped(out)


def _stamped(records: Iterator[tuple[int, bytes]] | list[tuple[int, bytes]]
             ) -> list[SourceRecord]:
    offsets = [0] * PARTITIONS
    src = []
    for i, (partition, payload) in enumerate(records):  # LogAppendTime: non-decreasing
        src.append(SourceRecord("usage", partition, offsets[partition], payload,
                                START_MS + 3 * HOUR_MS + i))
        offsets[partition] += 1
    return src


@contextlib.contextmanager
def timed(targets: list[tuple[str, str | None, str, str]],
          totals: dict[str, float]) -> Iterator[None]:
    """Wrap functions with a wall clock (calls are per record or per fetch: cheap)."""
    undo = []
    for module, cls, attr, label in targets:
        owner: Any = importlib.import_module(module)
        if cls is not None:
            owner = getattr(owner, cls)
        original = getattr(owner, attr)
        totals.setdefault(label, 0.0)

        def wrapper(*a: Any, _f: Any = original, _label: str = label, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                totals[_label] += time.perf_counter() - t0

        setattr(owner, attr, wrapper)
        undo.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


REFERENCE_PHASES = [
    ("meterline.aggregators.processor", None, "decode_batch", "decode"),
    ("meterline.core.rollup", "RollupState", "apply_batch", "fold (apply_batch)"),
    ("meterline.aggregators.processor", "PartitionProcessor", "_collect", "outputs (_collect)"),
]
COLUMNAR_PHASES = [
    ("meterline.aggregators.columnar.processor", None, "decode_batch", "decode"),
    ("meterline.aggregators.columnar.processor", None, "build_columns",
     "columns + validation"),
    ("meterline.aggregators.columnar.processor", None, "merge_accepted", "group-by + merge"),
    ("meterline.aggregators.processor", "PartitionProcessor", "_collect", "outputs (_collect)"),
]
NATIVE_PHASES = [
    ("meterline.aggregators.columnar.native", "NativeColumns", "decode", "decode"),
    ("meterline.aggregators.columnar.native", "NativeColumns", "columns",
     "columns + validation"),
    *COLUMNAR_PHASES[2:],
]
# engine -> (columnar processor?, METERLINE_NATIVE, phases)
ENGINES = {"reference": (False, "0", REFERENCE_PHASES),
           "columnar": (True, "0", COLUMNAR_PHASES),  # numpy column builder
           "native": (True, "1", NATIVE_PHASES)}  # compiled decoder + builder (native/)


def run(records: list[SourceRecord], fetch_records: int, engine: str,
        registry: MeterRegistry) -> dict[str, Any]:
    import os

    from meterline.aggregators.columnar import ColumnarPartitionProcessor
    from meterline.aggregators.processor import PartitionProcessor

    columnar, native_flag, phases_of = ENGINES[engine]
    before = os.environ.get("METERLINE_NATIVE")
    os.environ["METERLINE_NATIVE"] = native_flag  # read when a processor is built
    try:
        cls = ColumnarPartitionProcessor if columnar else PartitionProcessor
        procs = {p: cls("usage", p, registry) for p in range(PARTITIONS)}
    finally:
        if before is None:
            os.environ.pop("METERLINE_NATIVE")
        else:
            os.environ["METERLINE_NATIVE"] = before
    by_part: dict[int, list[SourceRecord]] = {p: [] for p in range(PARTITIONS)}
    for r in records:
        by_part[r.partition].append(r)
    fetches = []  # round robin over partitions, as a consumer's fetches arrive
    for i in range(0, max(len(v) for v in by_part.values()), fetch_records):
        fetches += [(p, by_part[p][i:i + fetch_records]) for p in range(PARTITIONS)
                    if by_part[p][i:i + fetch_records]]
    totals: dict[str, float] = {}
    fold_s = flush_s = 0.0
    rows = []
    with timed(phases_of, totals):
        for p, fetch in fetches:
            proc = procs[p]
            t0 = time.perf_counter()
            if columnar:
                proc.process_many(fetch)  # type: ignore[attr-defined]
            else:
                for record in fetch:
                    proc.process(record)
            t1 = time.perf_counter()
            flush = proc.take_flush()
            fold_s += t1 - t0
            flush_s += time.perf_counter() - t1
            rows += sorted(map(repr, flush.rollup_rows()))
            rows += map(repr, flush.dead_letters)
            rows += map(repr, flush.late)
    events = sum(proc.counters.accepted + proc.counters.duplicate + proc.counters.late
                 + proc.counters.rejected for proc in procs.values())
    named = sum(totals.values())
    phases = {**totals, "other (loop, dedupe, lateness)": fold_s - named,
              "take_flush": flush_s}
    out: dict[str, Any] = {
        "engine": engine, "events": events,
        "decode_fold_s": round(fold_s, 3),
        "decode_fold_events_per_s": round(events / fold_s),
        "with_flush_events_per_s": round(events / (fold_s + flush_s)),
        "us_per_event": {k: round(v / events * 1e6, 3) for k, v in phases.items()},
        "_outputs": rows,
    }
    if columnar:
        stats = [proc.stats for proc in procs.values()]  # type: ignore[attr-defined]
        out["slow_path_events"] = sum(s.slow_events for s in stats)
        out["slow_path_records"] = sum(s.slow_records for s in stats)
        out["ordered_events"] = sum(s.ordered_events for s in stats)
        out["windows_merged"] = sum(s.windows_merged for s in stats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--fetch-records", type=int, default=50,
                        help="records per fetch and partition (~500 events each)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per engine, alternating; the fastest of each is shown")
    args = parser.parse_args(argv)
    registry = MeterRegistry.load(DEFAULT_METERS)
    from meterline.aggregators.columnar import native

    engines = [e for e in ENGINES if e != "native" or native.available()]
    results = []
    for name, make in (("high", high_cardinality), ("low", low_cardinality)):
        records = make(args.events)
        best: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeat):  # alternating, best of: the machine is shared
            runs = {engine: run(records, args.fetch_records, engine, registry)
                    for engine in engines}
            expected = runs["reference"].pop("_outputs")
            for engine, result in runs.items():
                if engine != "reference" and result.pop("_outputs") != expected:
                    raise SystemExit(f"{name}: the {engine} fold's outputs differ from the "
                                     "reference")
                if engine not in best or result["decode_fold_s"] < best[engine]["decode_fold_s"]:
                    best[engine] = result
        ref = best["reference"]
        summary: dict[str, Any] = {"workload": name, "records": len(records),
                                   "fetch_records": args.fetch_records, "repeat": args.repeat,
                                   **best}
        for engine in engines[1:]:
            summary[f"{engine}_decode_fold_ratio"] = round(
                best[engine]["decode_fold_events_per_s"] / ref["decode_fold_events_per_s"], 2)
            summary[f"{engine}_with_flush_ratio"] = round(
                best[engine]["with_flush_events_per_s"] / ref["with_flush_events_per_s"], 2)
        print(json.dumps(summary))
        results.append(summary)
    for s in results:
        print(f"\n{s['workload']} cardinality: {s['records']} records, outputs equal")
        print(f"{'':34}" + "".join(f"{e:>12}" for e in engines))
        for label in ("decode_fold_events_per_s", "with_flush_events_per_s"):
            print(f"{label:34}" + "".join(f"{s[e][label]:>12,}" for e in engines))
        keys = list(dict.fromkeys(k for e in engines for k in s[e]["us_per_event"]))
        for k in keys:
            print(f"  us/event {k:25}"
                  + "".join(f"{s[e]['us_per_event'].get(k, '')!s:>12}" for e in engines))
        for e in engines[1:]:
            print(f"{e} / reference: decode+fold {s[f'{e}_decode_fold_ratio']}x, with flush "
                  f"{s[f'{e}_with_flush_ratio']}x; slow path {s[e]['slow_path_events']} "
                  f"events + {s[e]['slow_path_records']} records, ordered (explicit ids) "
                  f"{s[e]['ordered_events']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
