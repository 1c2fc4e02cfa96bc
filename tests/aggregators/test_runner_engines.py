"""``RollupWorker.process_many``: runs of records, both engines, gaps settled as for one
record.

The Faust agent and the embedded runner hand the worker a fetch at a time (one run per
partition). These replay the gap scenarios of test_runner_gaps through runs of random
length - a rebalance that leaves a fetch from before it, a worker killed after folding
past its checkpoint, offsets the log does not hold - with the columnar engine and the
per-event reference, and compare the totals with the generator's truth (``make_records``
counts logical events itself, not through the code under test) and the two engines'
checkpoints with each other.
"""

from __future__ import annotations

import random

import pytest
from test_processor import REGISTRY, ReplacingTable, make_records
from test_runner_gaps import TP, ListLog

from meterline.aggregators.checkpoints import MemoryCheckpointStore
from meterline.aggregators.columnar import ColumnarPartitionProcessor
from meterline.aggregators.processor import PartitionProcessor
from meterline.aggregators.runner import ENGINES, RollupWorker, by_partition
from meterline.core.outputs import Flush
from meterline.ingest.sources import SourceRecord


def worker_for(log: ListLog, store: MemoryCheckpointStore, table: ReplacingTable,
               engine: str) -> RollupWorker:
    class Writer:
        def write(self, flush: Flush) -> None:
            table.write(flush)

    worker = RollupWorker(REGISTRY, Writer(), store, group="g", probe=log, engine=engine)
    worker.assign([TP])
    return worker


def consume_runs(worker: RollupWorker, log: ListLog, deliveries: list[SourceRecord],
                 rng: random.Random, max_steps: int = 10_000) -> int:
    """Like test_runner_gaps.consume, but the consumer hands over fetches of 1-40 records
    (a seek drops what was fetched and reads from the target). Returns the seeks."""
    queue = list(deliveries)
    seeks = steps = 0
    while queue:
        steps += 1
        assert steps < max_steps, "no progress"
        size = rng.randrange(1, 41)
        fetch, queue = queue[:size], queue[size:]
        for run in by_partition(fetch):
            while run:
                n, gap = worker.process_many(run)
                if gap is None:
                    break
                assert run[n].offset == gap.offset
                target = worker.resolve_gap(gap)
                if target is not None:
                    seeks += 1
                    queue = log.read(target)
                    break
                run = run[n:]
    return seeks


def test_the_engine_picks_the_processor() -> None:
    log, store, table = ListLog([]), MemoryCheckpointStore(), ReplacingTable()
    assert ENGINES == ("columnar", "per-event")
    assert type(worker_for(log, store, table, "columnar").processors[TP]) is (
        ColumnarPartitionProcessor)
    assert type(worker_for(log, store, table, "per-event").processors[TP]) is (
        PartitionProcessor)
    with pytest.raises(ValueError, match="unknown rollup engine 'fast'"):
        RollupWorker(REGISTRY, None, store, group="g", engine="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_rebalance_and_a_kill_in_runs_are_exact(engine: str, seed: int) -> None:
    rng = random.Random(seed)
    records, expected = make_records(150, seed=seed)
    log, store, table = ListLog(records), MemoryCheckpointStore(), ReplacingTable()
    first = worker_for(log, store, table, engine)
    consume_runs(first, log, records[:60], rng)
    first.flush(checkpoint=True)
    consume_runs(first, log, records[60:100], rng)  # folded, never checkpointed: SIGKILL
    first.flush(checkpoint=False)

    # The next owner's consumer still holds a fetch from past the checkpoint.
    second = worker_for(log, store, table, engine)
    assert second.processors[TP].next_offset == 60
    seeks = consume_runs(second, log, records[90:] + records[60:], rng)
    second.flush(checkpoint=True)
    assert seeks >= 1
    assert table.totals("hourly") == expected
    assert second.processors[TP].next_offset == 150
    assert second.processors[TP].counters.gap_records >= 1


@pytest.mark.parametrize("engine", ENGINES)
def test_offsets_without_records_are_skipped_in_runs(engine: str) -> None:
    records, _ = make_records(60)
    kept = [r for r in records if r.offset not in (5, 6, 7, 41)]
    log, store, table = ListLog(kept), MemoryCheckpointStore(), ReplacingTable()
    worker = worker_for(log, store, table, engine)
    assert consume_runs(worker, log, kept, random.Random(4)) == 0
    worker.flush(checkpoint=True)
    proc = worker.processors[TP]
    assert proc.next_offset == 60 and proc.counters.absent_offsets == 4
    reference = ReplacingTable()
    alone = PartitionProcessor("usage", 0, REGISTRY)
    for r in kept:
        alone.skip_to(r.offset)
        alone.process(r)
    reference.write(alone.take_flush())
    assert table.totals("hourly") == reference.totals("hourly")


def test_both_engines_checkpoint_the_same_bytes_and_restore_each_other() -> None:
    records, expected = make_records(120, seed=9)
    blobs = {}
    for engine in ENGINES:
        log, store, table = ListLog(records), MemoryCheckpointStore(), ReplacingTable()
        worker = worker_for(log, store, table, engine)
        consume_runs(worker, log, records[:70], random.Random(5))
        worker.flush(checkpoint=True)
        blobs[engine] = store.load_prefixed("")
        # The other engine resumes from this checkpoint and finishes exactly.
        other = next(e for e in ENGINES if e != engine)
        resumed = worker_for(log, store, table, other)
        consume_runs(resumed, log, records[70:], random.Random(6))
        resumed.flush(checkpoint=True)
        assert table.totals("hourly") == expected
    assert blobs["columnar"] == blobs["per-event"]
