"""``--inprocess`` of benchmarks/e2e_rollups.py: the worker's own code over the same
records without Kafka, optionally with a wall-time split per phase."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from rollups_common import (
    CHECKPOINT_INTERVAL_S,
    ENGINES,
    FLUSH_INTERVAL_S,
    PARTITIONS,
    _records,
)


class _JsonWriter:
    """Serializes a flush exactly as KafkaOutputWriter does (Arrow blocks for the rollup
    rows, JSON for the rest), sends nothing."""

    def __init__(self) -> None:
        from meterline.sinks.rollup_arrow import warm_up

        self.bytes = 0
        self.rows = 0  # rollup rows written: the same whichever engine folded them
        warm_up()  # as KafkaOutputWriter: the codec loaded before the first flush

    def write(self, flush: Any) -> None:
        from meterline.aggregators.outputs_io import output_records

        self.rows += len(flush.rollups) + sum(map(len, flush.rollup_blocks))
        for _, _, payload in output_records(flush):
            self.bytes += len(payload)


class _NoopWriter:
    def write(self, flush: Any) -> None:
        pass


_PHASES = (  # (module, class or None, attribute, label): timed per call, not per event
    ("meterline.aggregators.processor", None, "decode_batch", "decode_batch"),
    ("meterline.core.rollup", "RollupState", "apply_batch", "apply_batch"),
    # The columnar engine: a run's decode + fold, and of it the vectorised part.
    ("meterline.aggregators.columnar.processor", "ColumnarPartitionProcessor",
     "process_many", "columnar process_many (decode + fold)"),
    ("meterline.aggregators.columnar.native", "NativeColumns", "decode",
     "  of which native decode (compiled)"),
    ("meterline.aggregators.columnar.processor", "ColumnarPartitionProcessor", "_fold_run",
     "  of which _fold_run (columns, ordered loop, merge)"),
    ("meterline.aggregators.columnar.native", "NativeColumns", "columns",
     "    of which native columns (compiled)"),
    ("meterline.aggregators.columnar.processor", None, "merge_accepted",
     "    of which merge_accepted (group-by + merge)"),
    ("meterline.aggregators.processor", "PartitionProcessor", "_collect", "collect"),
    ("meterline.aggregators.processor", "PartitionProcessor", "take_flush",
     "take_flush (snapshot, records, evict)"),
    ("meterline.aggregators.columnar.processor", "ColumnarPartitionProcessor", "take_flush",
     "take_flush (snapshot, records, evict)"),
    ("meterline.core.rollup", "RollupState", "evict_closed", "  of which evict_closed"),
    ("meterline.aggregators.columnar.native_state", "NativeRollupState", "evict_closed",
     "  of which evict_closed"),
    ("meterline.aggregators.processor", "PartitionProcessor", "checkpoint", "checkpoint"),
    ("meterline.core.rollup", "RollupState", "export_all", "  of which export_all"),
    ("meterline.aggregators.columnar.native_state", "NativeRollupState", "cells_json",
     "  of which cells JSON (compiled store)"),
    ("zlib", None, "compress", "  of which zlib.compress"),
    ("rollups_inprocess", "_JsonWriter", "write", "output (Arrow blocks + orjson)"),
)


@contextlib.contextmanager
def _timed_phases(totals: dict[str, list[float]]) -> Any:
    """Wrap the per-record / per-flush calls above with a wall clock (cheap: ~10^4 calls)."""
    import importlib

    undo = []
    depths: dict[str, list[int]] = {}
    for module, cls, attr, label in _PHASES:
        owner = importlib.import_module(module)
        if cls is not None:
            owner = getattr(owner, cls)
        original = getattr(owner, attr)
        slot = totals.setdefault(label, [0.0, 0])
        # Per label: an override calling its parent's method is timed once, outermost.
        depth = depths.setdefault(label, [0])

        def timed(*a: Any, _f: Any = original, _slot: list[float] = slot,
                  _depth: list[int] = depth, **k: Any) -> Any:
            if _depth[0]:
                return _f(*a, **k)
            _depth[0] += 1
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                _depth[0] -= 1
                _slot[0] += time.perf_counter() - t0
                _slot[1] += 1

        setattr(owner, attr, timed)
        undo.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


def run_inprocess(events: int, writer_kind: str,
                  checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
                  phases: bool = False, engine: str = "columnar",
                  fetch_records: int = 64) -> dict[str, Any]:
    """RollupWorker over the same records, no Kafka: what the worker's own code costs.
    Records go in as the worker hands them over: fetches of ``fetch_records``, one run
    per partition (``RollupWorker.process_many``)."""
    from meterline.aggregators.checkpoints import MemoryCheckpointStore
    from meterline.aggregators.runner import RollupWorker, TopicPartition, by_partition
    from meterline.config import DEFAULT_METERS
    from meterline.core.meters import MeterRegistry
    from meterline.ingest.sources import SourceRecord

    records = _records(events)
    offsets = [0] * PARTITIONS
    now = time.time_ns() // 1_000_000
    src = []
    for i, rec in enumerate(records):  # LogAppendTime: ~now, non-decreasing
        src.append(SourceRecord("usage", rec.partition, offsets[rec.partition], rec.payload,
                                now + i // 10))
        offsets[rec.partition] += 1
    writer = _JsonWriter() if writer_kind == "json" else _NoopWriter()
    rollup_engine, native = ENGINES[engine]
    os.environ["METERLINE_NATIVE"] = native  # read as the worker builds its processors
    worker = RollupWorker(MeterRegistry.load(DEFAULT_METERS), writer, MemoryCheckpointStore(),
                          group="inprocess", flush_interval_s=FLUSH_INTERVAL_S,
                          checkpoint_interval_s=checkpoint_interval_s, engine=rollup_engine)
    worker.assign([TopicPartition("usage", p) for p in range(PARTITIONS)])
    totals: dict[str, list[float]] = {}
    with _timed_phases(totals) if phases else contextlib.nullcontext():
        t0 = time.perf_counter()
        for i in range(0, len(src), fetch_records):
            for run in by_partition(src[i:i + fetch_records]):
                n, gap = worker.process_many(run)
                assert gap is None and n == len(run)
            worker.maybe_flush()
        worker.flush(checkpoint=True)
        seconds = time.perf_counter() - t0
    t = worker.totals()
    return {"inprocess": writer_kind, "engine": engine, "fetch_records": fetch_records,
            "checkpoint_interval_s": checkpoint_interval_s,
            "events": events, "records": len(src),
            "seconds": round(seconds, 3), "events_per_s": round(events / seconds),
            "flushes": worker.flushes, "checkpoints": worker.checkpoints,
            "accepted": t.accepted, "duplicate": t.duplicate, "rejected": t.rejected,
            "output_bytes": getattr(writer, "bytes", None),
            "output_rows": getattr(writer, "rows", None),
            **({"phases_us_per_event": {k: round(v[0] / events * 1e6, 2)
                                        for k, v in totals.items() if v[1]},
                "phases_share": {k: round(v[0] / seconds, 3)
                                 for k, v in totals.items() if v[1]}} if phases else {})}
