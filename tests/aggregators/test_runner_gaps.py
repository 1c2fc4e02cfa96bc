"""Where a partition resumes is decided by its checkpoint and the log, never by the
consumer: records delivered past the checkpoint (a fetch from before a rebalance, a
committed offset ahead of the checkpoint), a lost checkpoint, records deleted by retention
and changed settings are each either repaired exactly or refused loudly.

The log is a plain in-memory list of records per partition (``ListLog``), the consumer a
cursor the test moves as a real one would after a seek; ground truth comes from
``make_records`` in test_processor, computed from the generated events, not by the code
under test.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from test_processor import (  # same folder: pytest puts it on sys.path
    DAY0,
    HOUR_MS,
    REGISTRY,
    SCALE,
    ReplacingTable,
    make_records,
)

from meterline.aggregators.checkpoints import MemoryCheckpointStore
from meterline.aggregators.processor import PartitionProcessor, RollupSettings
from meterline.aggregators.runner import (
    LogGapError,
    PartitionCountChanged,
    RollupWorker,
    TopicPartition,
)
from meterline.core.envelope import Batch, encode_batch
from meterline.ingest.sources import SourceRecord

TP = TopicPartition("usage", 0)


class ListLog:
    """A partition log as plain data: ``{offset: record}``, oldest ``start``; plus the
    group's committed offsets. Implements the runner's ``LogProbe`` port."""

    def __init__(self, records: Iterable[SourceRecord], committed: int | None = None) -> None:
        self.records = {r.offset: r for r in records}
        self.start = min(self.records, default=0)
        self.group_committed = committed
        self.probes = 0

    def delete_before(self, offset: int) -> None:  # retention
        self.records = {o: r for o, r in self.records.items() if o >= offset}
        self.start = offset

    def log_start(self, tp: TopicPartition) -> int:
        return self.start

    def first_offset(self, tp: TopicPartition, from_offset: int) -> int | None:
        self.probes += 1
        return min((o for o in self.records if o >= from_offset), default=None)

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        return self.group_committed

    def read(self, offset: int) -> list[SourceRecord]:
        return [r for o, r in sorted(self.records.items()) if o >= offset]


def consume(worker: RollupWorker, log: ListLog, deliveries: list[SourceRecord],
            max_steps: int = 100_000) -> int:
    """Feed ``deliveries`` (what the consumer already fetched), then whatever the log holds
    from each seek target; returns the number of seeks. Bounded by ``max_steps``."""
    queue = list(deliveries)
    seeks = steps = 0
    while queue:
        steps += 1
        assert steps < max_steps, "no progress"
        record = queue.pop(0)
        gap = worker.process(record)
        if gap is None:
            continue
        target = worker.resolve_gap(gap)
        if target is None:
            assert worker.process(record) is None
        else:
            seeks += 1
            queue = log.read(target)  # a seek drops the fetch buffer, reads from target
    return seeks


def worker_for(log: ListLog, store: MemoryCheckpointStore, table: ReplacingTable,
               settings: RollupSettings | None = None) -> RollupWorker:
    class Writer:
        def write(self, flush):  # type: ignore[no-untyped-def]
            table.write(flush)

    worker = RollupWorker(REGISTRY, Writer(), store, group="g", probe=log, settings=settings)
    worker.assign([TP])
    return worker


def test_a_record_past_next_offset_is_refused_not_folded() -> None:
    records, _ = make_records(10)
    proc = PartitionProcessor("usage", 0, REGISTRY)
    assert proc.process(records[0])
    assert not proc.process(records[5])  # 1..4 never seen: folding 5 would skip them
    assert proc.next_offset == 1 and proc.counters.gap_records == 1
    assert proc.counters.records == 1


def test_records_fetched_before_a_rebalance_do_not_skip_the_checkpoint() -> None:
    """The headline loss: a worker restores a checkpoint at 50 while its consumer still
    holds records 80.. from before the rebalance. They must not be folded first."""
    records, expected = make_records(120)
    log, store, table = ListLog(records), MemoryCheckpointStore(), ReplacingTable()
    first = worker_for(log, store, table)
    consume(first, log, records[:50])
    first.flush(checkpoint=True)
    consume(first, log, records[50:90])  # processed, never checkpointed: then SIGKILL
    first.flush(checkpoint=False)

    second = worker_for(log, store, table)
    assert second.processors[TP].next_offset == 50
    seeks = consume(second, log, records[80:] + records[50:])
    second.flush(checkpoint=True)
    assert seeks >= 1
    assert table.totals("hourly") == expected
    assert second.processors[TP].next_offset == 120


def test_a_burst_of_stale_records_costs_one_probe() -> None:
    records, expected = make_records(200)
    log, store, table = ListLog(records), MemoryCheckpointStore(), ReplacingTable()
    worker = worker_for(log, store, table)
    consume(worker, log, records[100:])  # everything past a gap at 0
    worker.flush(checkpoint=True)
    assert log.probes == 1
    assert table.totals("hourly") == expected


def test_offsets_the_log_does_not_hold_are_skipped() -> None:
    """Transaction markers and compaction leave offsets without records."""
    records, _ = make_records(40)
    kept = [r for r in records if r.offset not in (10, 11, 12, 30)]
    log, store, table = ListLog(kept), MemoryCheckpointStore(), ReplacingTable()
    worker = worker_for(log, store, table)
    assert consume(worker, log, kept) == 0
    worker.flush(checkpoint=True)
    proc = worker.processors[TP]
    assert proc.next_offset == 40 and proc.counters.absent_offsets == 4
    alone = PartitionProcessor("usage", 0, REGISTRY)
    alone_table = ReplacingTable()
    for r in kept:
        alone.skip_to(r.offset)
        alone.process(r)
    alone_table.write(alone.take_flush())
    assert table.totals("hourly") == alone_table.totals("hourly")


def test_committed_offset_without_checkpoint_rebuilds_from_the_log_start() -> None:
    """The Faust path used to resume such a partition with empty windows at the committed
    offset: versions restarted at 1, the older rows won, totals short, no error."""
    records, expected = make_records(100)
    log, store, table = ListLog(records, committed=60), MemoryCheckpointStore(), ReplacingTable()
    seed = worker_for(log, MemoryCheckpointStore(), table)  # an earlier run whose
    consume(seed, log, records[:60])  # checkpoints were lost afterwards
    seed.flush(checkpoint=True)
    worker = worker_for(log, store, table)
    consume(worker, log, records[60:])  # the consumer resumes at the committed offset
    worker.flush(checkpoint=True)
    assert table.totals("hourly") == expected


def test_committed_offset_without_checkpoint_and_a_truncated_log_is_refused() -> None:
    records, _ = make_records(100)
    log = ListLog(records, committed=60)
    log.delete_before(20)
    worker = worker_for(log, MemoryCheckpointStore(), ReplacingTable())
    with pytest.raises(LogGapError, match=r"committed offset 60 but there is no checkpoint"):
        consume(worker, log, log.read(60))


def test_records_deleted_before_they_were_counted_are_refused() -> None:
    records, _ = make_records(100)
    log, store, table = ListLog(records), MemoryCheckpointStore(), ReplacingTable()
    first = worker_for(log, store, table)
    consume(first, log, records[:30])
    first.flush(checkpoint=True)
    log.delete_before(50)  # the worker was down longer than the topic's retention
    second = worker_for(log, store, table)
    with pytest.raises(LogGapError, match=r"records \[30, 50\) are gone"):
        consume(second, log, log.read(50))


def test_a_fresh_group_starts_where_the_log_starts() -> None:
    records, _ = make_records(100)
    log = ListLog(records)
    log.delete_before(40)  # retention ran before Meterline was deployed
    table = ReplacingTable()
    worker = worker_for(log, MemoryCheckpointStore(), table)
    assert consume(worker, log, log.read(40)) == 0
    assert worker.processors[TP].next_offset == 100


def _batch(offset: int, ts: int, now: int, qty: int = SCALE) -> SourceRecord:
    return SourceRecord("usage", 0, offset, encode_batch(
        Batch(f"b{offset}", now, ["a"], ["tokens"], [qty], [ts])), now)


@pytest.mark.parametrize("raised", ["allowed_lateness_ms", "watermark_delay_ms"])
def test_raising_lateness_after_a_restore_does_not_reopen_evicted_windows(raised: str) -> None:
    """An evicted window must not come back at version 1 (the stored higher version would
    win and the event vanish); its events stay too late and go to the late table."""
    tight = RollupSettings(allowed_lateness_ms=0, watermark_delay_ms=0)
    proc = PartitionProcessor("usage", 0, REGISTRY, tight)
    now = DAY0 + 5 * HOUR_MS
    table = ReplacingTable()
    proc.process(_batch(0, DAY0 + HOUR_MS + 1, now, 5 * SCALE))  # hour 1: 5 units
    proc.process(_batch(1, now, now))  # moves the watermark: hour 1 closes
    table.write(proc.take_flush())
    assert (("hourly", "a", "tokens", (("model", ""),), DAY0 + HOUR_MS)
            not in {k[:5] for k in proc.state.window_keys()})
    loose = RollupSettings(**{**{"allowed_lateness_ms": 0, "watermark_delay_ms": 0},
                              raised: 3 * HOUR_MS})
    restored = PartitionProcessor.from_checkpoint(proc.checkpoint(), REGISTRY, loose)
    restored.process(_batch(2, DAY0 + HOUR_MS + 2, now, 7 * SCALE))  # for the closed hour
    flush = restored.take_flush()
    table.write(flush)
    assert [x.quantity_nanos for x in flush.late] == [7 * SCALE]
    assert table.totals("hourly")[("a", "tokens", DAY0 + HOUR_MS)] == 5 * SCALE
    # An hour that was still open under the old settings takes the new ones.
    restored.process(_batch(3, now + 1, now, 2 * SCALE))
    assert restored.take_flush().late == []


def test_format_1_checkpoints_keep_their_closed_windows_closed() -> None:
    import json
    import zlib

    tight = RollupSettings(allowed_lateness_ms=0, watermark_delay_ms=0)
    proc = PartitionProcessor("usage", 0, REGISTRY, tight)
    now = DAY0 + 5 * HOUR_MS
    proc.process(_batch(0, now, now))
    proc.take_flush()
    doc = json.loads(zlib.decompress(proc.checkpoint()))
    doc["format"] = 1
    del doc["closed_before_ms"]
    blob = zlib.compress(json.dumps(doc).encode())
    restored = PartitionProcessor.from_checkpoint(
        blob, REGISTRY, RollupSettings(allowed_lateness_ms=3 * HOUR_MS))
    assert restored.state.closed_before_ms == now


def test_a_changed_partition_count_is_refused_with_what_to_do() -> None:
    records, _ = make_records(20)
    log, store, table = ListLog(records), MemoryCheckpointStore(), ReplacingTable()
    first = worker_for(log, store, table)
    first.drop([TP])
    first.assign([TP], source_partitions=4)
    consume(first, log, records)
    first.flush(checkpoint=True)

    same = RollupWorker(REGISTRY, first.writer, store, group="g", probe=log)
    assert same.assign([TP], source_partitions=4) == {TP: 20}
    grown = RollupWorker(REGISTRY, first.writer, store, group="g", probe=log)
    with pytest.raises(PartitionCountChanged, match="has 6 partitions.*built with 4"):
        grown.assign([TP], source_partitions=6)
    assert grown.processors == {}  # all or nothing
