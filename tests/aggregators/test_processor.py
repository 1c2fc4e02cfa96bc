"""The partition processor: replay from any checkpoint gives the same totals, bad input
becomes dead letters, nothing is counted twice."""

from __future__ import annotations

import random

import pytest

from meterline.aggregators.processor import PartitionProcessor, RollupSettings
from meterline.core.envelope import Batch, encode_batch
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import WHOLE_RECORD, Flush
from meterline.core.quantity import SCALE
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.ingest.sources import SourceRecord

DAY0 = 1_699_920_000_000  # 2023-11-14T00:00:00Z
REGISTRY = MeterRegistry.from_mapping({"meters": {
    "tokens": {"aggregation": "sum", "dimensions": ["model"]},
    "calls": {"aggregation": "count"},
    "peak": {"aggregation": "max"},
    "users": {"aggregation": "unique_count", "value_property": "user_id",
              "dimensions": ["user_id"]},
}})


class ReplacingTable:
    """ReplacingMergeTree(version) as readers see it after FINAL: the highest version
    per key wins, and two rows with one version must agree (or the design is broken)."""

    def __init__(self) -> None:
        self.rows: dict[tuple, tuple[int, int]] = {}
        self.dead: dict[tuple, str] = {}
        self.late: dict[tuple, int] = {}

    def write(self, flush: Flush) -> None:
        for r in flush.rollups:
            key = (r.window, r.customer, r.meter, r.group, r.window_start_ms, r.source,
                   r.partition)
            old = self.rows.get(key)
            if old is not None and old[0] == r.version:
                assert old[1] == r.value_nanos, f"version {r.version} of {key} changed value"
            if old is None or r.version >= old[0]:
                self.rows[key] = (r.version, r.value_nanos)
        for d in flush.dead_letters:
            self.dead[(d.source, d.partition, d.offset, d.position)] = d.reason
        for late in flush.late:
            self.late[(late.customer, late.meter, late.window_start_ms, late.event_id)] = (
                late.quantity_nanos)

    def totals(self, window: str) -> dict[tuple[str, str, int], int]:
        out: dict[tuple[str, str, int], int] = {}
        for (w, customer, meter, _g, start, _s, _p), (_v, value) in self.rows.items():
            if w == window:
                out[(customer, meter, start)] = out.get((customer, meter, start), 0) + value
        return out


def make_records(n_batches: int, seed: int = 7) -> tuple[list[SourceRecord], dict]:
    """Records of one partition with resent batches, duplicate explicit ids, and the
    expected hourly token sums."""
    rng = random.Random(seed)
    records: list[SourceRecord] = []
    expected: dict[tuple[str, str, int], int] = {}
    seen_ids: set[str] = set()
    sent: list[bytes] = []
    clock = DAY0 + 3 * HOUR_MS
    for b in range(n_batches):
        clock += rng.randrange(1, 60_000)
        if sent and rng.random() < 0.15:  # SDK retry / spool replay: the same bytes again
            payload = rng.choice(sent)
        else:
            customers, qtys, tss, ids = [], [], [], []
            for _ in range(rng.randrange(1, 40)):
                c = f"c{rng.randrange(20)}"
                q = rng.randrange(1, 10 * SCALE)
                ts = clock - rng.randrange(0, 2 * HOUR_MS)
                eid = f"k{rng.randrange(300)}" if rng.random() < 0.2 else None
                customers.append(c)
                qtys.append(q)
                tss.append(ts)
                ids.append(eid)
                if eid is None or eid not in seen_ids:
                    if eid is not None:
                        seen_ids.add(eid)
                    key = (c, "tokens", ts - ts % HOUR_MS)
                    expected[key] = expected.get(key, 0) + q
            payload = encode_batch(Batch(f"b{b:05d}", clock, customers, ["tokens"] * len(qtys),
                                         qtys, tss, ids=ids))
            sent.append(payload)
        records.append(SourceRecord("usage", 0, b, payload, clock))
    return records, expected


def run(proc: PartitionProcessor, records: list[SourceRecord], table: ReplacingTable,
        flush_every: int) -> None:
    for i, rec in enumerate(records):
        proc.process(rec)
        if i % flush_every == 0:
            table.write(proc.take_flush())
    table.write(proc.take_flush())


def test_one_pass_equals_ground_truth() -> None:
    records, expected = make_records(300)
    table = ReplacingTable()
    run(PartitionProcessor("usage", 0, REGISTRY), records, table, flush_every=7)
    assert table.totals("hourly") == expected
    daily: dict[tuple[str, str, int], int] = {}
    for (c, m, h), v in expected.items():
        daily[(c, m, h - h % DAY_MS)] = daily.get((c, m, h - h % DAY_MS), 0) + v
    assert table.totals("daily") == daily


@pytest.mark.parametrize("seed", range(6))
def test_crash_and_replay_from_a_checkpoint_changes_nothing(seed: int) -> None:
    """Crash at a random point after some flushes were written, restore the last
    checkpoint (possibly an old one) and replay everything after it."""
    rng = random.Random(seed)
    records, expected = make_records(250, seed)
    table = ReplacingTable()
    proc = PartitionProcessor("usage", 0, REGISTRY)
    checkpoints, deltas = [], []
    crash_at = rng.randrange(20, len(records))
    for rec in records[:crash_at]:
        proc.process(rec)
        if rng.random() < 0.3:
            table.write(proc.take_flush())
            if rng.random() < 0.5:
                checkpoints.append(proc.checkpoint())
                deltas.append(proc.take_id_delta())
    # The crash: unflushed work is lost. Resume from any saved checkpoint (a stale one
    # stands for a checkpoint written late by a worker that lost the partition), given
    # every id delta saved: those of later checkpoints must not count.
    blob = rng.choice(checkpoints) if checkpoints else None
    proc = (PartitionProcessor.from_checkpoint(blob, REGISTRY, id_deltas=deltas) if blob
            else PartitionProcessor("usage", 0, REGISTRY))
    run(proc, records, table, flush_every=rng.randrange(1, 20))  # re-reads from offset 0
    assert proc.counters.skipped_records == proc.next_offset - proc.counters.records
    assert table.totals("hourly") == expected


def test_checkpoint_round_trip_keeps_every_aggregation() -> None:
    proc = PartitionProcessor("usage", 3, REGISTRY)
    ts = DAY0 + HOUR_MS
    batch = Batch("b1", ts, ["a"] * 4, ["calls", "peak", "users", "tokens"],
                  [SCALE, 7 * SCALE, SCALE, 10**30], [ts] * 4,
                  dimensions=[None, None, {"user_id": "u1"}, {"model": "x"}])
    proc.process(SourceRecord("usage", 3, 0, encode_batch(batch), ts))
    first = proc.take_flush()
    restored = PartitionProcessor.from_checkpoint(proc.checkpoint(), REGISTRY)
    assert restored.next_offset == 1 and restored.partition == 3
    assert sorted(restored.state.window_keys()) == sorted(proc.state.window_keys())
    restored._dirty = set(restored.state.window_keys())
    assert sorted(restored.take_flush().rollups, key=repr) == sorted(first.rollups, key=repr)
    # The same batch again, after restore: a duplicate, not a second count.
    restored.process(SourceRecord("usage", 3, 1, encode_batch(batch), ts + 1000))
    assert restored.counters.duplicate == 4 and restored.counters.accepted == 0


def test_garbage_record_is_a_dead_letter_and_the_partition_moves_on() -> None:
    proc = PartitionProcessor("usage", 0, REGISTRY)
    proc.process(SourceRecord("usage", 0, 0, b"\xff not an envelope", DAY0))
    ok = Batch("b2", DAY0, ["a", ""], ["tokens", "nope"], [SCALE, SCALE], [DAY0, DAY0])
    proc.process(SourceRecord("usage", 0, 1, encode_batch(ok), DAY0))
    flush = proc.take_flush()
    assert proc.next_offset == 2
    reasons = {(d.offset, d.position): d.reason for d in flush.dead_letters}
    assert reasons[(0, WHOLE_RECORD)].startswith("envelope.")
    assert reasons[(1, 1)] in ("event.unknown_meter", "event.missing_customer")
    assert [r.value_nanos for r in flush.rollups] == [SCALE, SCALE]  # hourly + daily
    assert proc.counters.rejected == 2 and proc.counters.accepted == 1


def test_too_late_events_are_flushed_as_late_records() -> None:
    proc = PartitionProcessor("usage", 0, REGISTRY, RollupSettings(allowed_lateness_ms=0,
                                                                   watermark_delay_ms=0))
    now = DAY0 + 5 * HOUR_MS
    proc.process(SourceRecord("usage", 0, 0, encode_batch(
        Batch("b1", now, ["a"], ["tokens"], [SCALE], [now])), now))
    old = DAY0 + HOUR_MS + 5
    proc.process(SourceRecord("usage", 0, 1, encode_batch(
        Batch("b2", now, ["a"], ["tokens"], [3 * SCALE], [old],
              dimensions=[{"model": "m1"}])), now))
    flush = proc.take_flush()
    assert [(x.window_start_ms, x.quantity_nanos, x.group) for x in flush.late] == [
        (DAY0 + HOUR_MS, 3 * SCALE, (("model", "m1"),))]
    assert proc.counters.late == 1


def test_checkpoint_refuses_unflushed_changes() -> None:
    proc = PartitionProcessor("usage", 0, REGISTRY)
    proc.process(SourceRecord("usage", 0, 0, encode_batch(
        Batch("b1", DAY0, ["a"], ["calls"], [SCALE], [DAY0])), DAY0))
    with pytest.raises(RuntimeError):
        proc.checkpoint()


def test_a_failed_write_is_put_back_and_blocks_checkpoints_until_written() -> None:
    from meterline.aggregators.checkpoints import MemoryCheckpointStore
    from meterline.aggregators.runner import RollupWorker, TopicPartition

    class FlakyWriter:
        def __init__(self) -> None:
            self.fail, self.written = True, ReplacingTable()

        def write(self, flush: Flush) -> None:
            if self.fail:
                raise ConnectionError("ClickHouse away")
            self.written.write(flush)

    records, expected = make_records(60)
    writer, store = FlakyWriter(), MemoryCheckpointStore()
    worker = RollupWorker(REGISTRY, writer, store, group="g")
    worker.assign([TopicPartition("usage", 0)])
    for rec in records[:30]:
        worker.process(rec)
    with pytest.raises(ConnectionError):
        worker.flush(checkpoint=True)
    assert store.saves == 0  # nothing checkpointed past unwritten outputs
    for rec in records[30:]:
        worker.process(rec)
    writer.fail = False
    assert worker.flush(checkpoint=True) == {TopicPartition("usage", 0): 60}
    assert writer.written.totals("hourly") == expected
