"""The partition processor: replay from any checkpoint gives the same totals, bad input
becomes dead letters, nothing is counted twice."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from meterline.aggregators.checkpoints import CheckpointStore
from meterline.aggregators.processor import PartitionProcessor, RollupSettings
from meterline.aggregators.runner import RollupWorker, TopicPartition
from meterline.core.envelope import Batch, encode_batch
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import WHOLE_RECORD, Flush
from meterline.core.quantity import SCALE
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.ingest.sources import SourceRecord
from meterline.sinks.storage import Storage

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
        for r in flush.rollup_rows():
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
    """Records of one partition with resent batches, resent explicit-id events, and the
    expected hourly token sums.

    The truth counts *logical events*, each once, however often it was sent: the generator
    knows which sends are resends. Keys follow the SDK contract (a key names one event of
    its customer and meter) and are deliberately reused across customers ("req-3" of c1
    and "req-3" of c2 are two events), so no dedupe rule is needed to compute the truth."""
    rng = random.Random(seed)
    records: list[SourceRecord] = []
    expected: dict[tuple[str, str, int], int] = {}
    keyed: list[tuple[str, int, int, str]] = []  # logical events with a key, for resends
    per_customer: dict[str, int] = {}
    sent: list[bytes] = []
    clock = DAY0 + 3 * HOUR_MS
    for b in range(n_batches):
        clock += rng.randrange(1, 60_000)
        if sent and rng.random() < 0.15:  # SDK retry / spool replay: the same bytes again
            payload = rng.choice(sent)
        else:
            customers, qtys, tss, ids = [], [], [], []
            for _ in range(rng.randrange(1, 40)):
                if keyed and rng.random() < 0.1:  # an application retry of a keyed event
                    c, q, ts, eid_or_none = rng.choice(keyed)
                    eid: str | None = eid_or_none
                else:
                    c = f"c{rng.randrange(20)}"
                    q = rng.randrange(1, 10 * SCALE)
                    ts = clock - rng.randrange(0, 2 * HOUR_MS)
                    eid = None
                    if rng.random() < 0.2:
                        per_customer[c] = per_customer.get(c, 0) + 1
                        eid = f"req-{per_customer[c]}"
                        keyed.append((c, q, ts, eid))
                    key = (c, "tokens", ts - ts % HOUR_MS)
                    expected[key] = expected.get(key, 0) + q
                customers.append(c)
                qtys.append(q)
                tss.append(ts)
                ids.append(eid)
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
    assert [r.value_nanos for r in flush.rollup_rows()] == [SCALE, SCALE]  # hourly + daily
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


# ---------------------------------------------------------------- window totals in range


def test_a_window_that_would_overflow_never_reaches_the_sink(migrated_storage: Storage) -> None:
    """Two valid events of 6 * 10**37 nano-units in one hour: the second is a dead letter,
    and the flush - the window total included - is stored as it is, with nothing refused."""
    import time

    from meterline.sinks.rollups import RollupTotalsQuery, write_flush

    now = time.time_ns() // 1_000_000
    ts = now - HOUR_MS  # recent: inside every TTL
    big = 6 * 10**37
    proc = PartitionProcessor("usage", 0, REGISTRY)
    proc.process(SourceRecord("usage", 0, 0, encode_batch(Batch(
        "b1", now, ["acme"] * 3, ["tokens"] * 3, [big, big, 5], [ts] * 3)), now))
    proc.process(SourceRecord("usage", 0, 1, encode_batch(Batch(
        "b2", now, ["acme"] * 2, ["tokens"] * 2, [big, 7], [ts] * 2)), now))
    flush = proc.take_flush()
    assert sorted((d.offset, d.position, d.reason) for d in flush.dead_letters) == [
        (0, 1, "event.window_total_out_of_range"), (1, 0, "event.window_total_out_of_range")]
    counts = write_flush(migrated_storage, flush)
    assert (counts.refused, counts.hourly, counts.daily, counts.dead_letters) == (0, 1, 1, 2)
    db = migrated_storage.database
    hourly = RollupTotalsQuery("hour", "acme", "tokens", db).run(migrated_storage)  # type: ignore[arg-type]
    assert hourly == {("acme", "tokens", ts - ts % HOUR_MS): big + 12}


# ---------------------------------------------------------------- two clocks, one horizon

HORIZON = 86_400_000


def _worker(store: CheckpointStore, table: ReplacingTable, id_dir: Path | None = None
            ) -> RollupWorker:
    w = RollupWorker(REGISTRY, table, store, group="g", id_store_dir=id_dir)
    w.assign([TopicPartition("usage", 0)])
    return w


def _record(offset: int, log_ms: int, batch: Batch) -> SourceRecord:
    return SourceRecord("usage", 0, offset, encode_batch(batch), log_ms)


@pytest.mark.parametrize("crash_after", [None, 0, 1, 2, 3])
def test_a_resend_after_the_horizon_on_a_stalled_watermark_counts_once(
        crash_after: int | None, tmp_path: Path) -> None:
    """A quiet partition: its newest event time stays at E while log time runs 2 days on.
    The resent event's hour is still open, so it must be recognised - also by a worker
    restored from a checkpoint whose id delta is older than the horizon. The crash comes
    after any record; every record is checkpointed."""
    from meterline.aggregators.checkpoints import MemoryCheckpointStore

    e = DAY0 + 10 * HOUR_MS + 600_000
    t0 = e + 60_000
    keyed = Batch("b0", t0, ["c1"], ["tokens"], [SCALE], [e], ids=["req-1"])
    records = [
        _record(0, t0, keyed),
        _record(1, t0 + 20 * HOUR_MS, Batch("b1", t0, ["c1"], ["tokens"], [2 * SCALE], [e - 1])),
        _record(2, t0 + 40 * HOUR_MS, Batch("b2", t0, ["c1"], ["tokens"], [4 * SCALE], [e])),
        _record(3, t0 + 48 * HOUR_MS, Batch("b3", t0, ["c1"], ["tokens"], [8 * SCALE], [e],
                                            ids=["req-1"])),  # the application's retry
        _record(4, t0 + 50 * HOUR_MS, keyed),  # the SDK's spool replay, same bytes
    ]
    store, table = MemoryCheckpointStore(), ReplacingTable()
    w = _worker(store, table, tmp_path / "ids")
    for rec in records:
        w.process(rec)
        w.flush(checkpoint=True)
        if rec.offset == crash_after:
            w = _worker(store, table, tmp_path / f"ids-{rec.offset}")
    assert table.totals("hourly") == {("c1", "tokens", e - e % HOUR_MS): 7 * SCALE}
    assert any("/ids/" in k for k in store.blobs)  # the id delta outlived the horizon


def test_where_the_watermark_moved_a_late_resend_goes_to_late_events_only() -> None:
    e = DAY0 + 10 * HOUR_MS
    proc = PartitionProcessor("usage", 0, REGISTRY)
    table = ReplacingTable()
    proc.process(_record(0, e, Batch("b0", e, ["c1"], ["tokens"], [SCALE], [e], ids=["k"])))
    proc.process(_record(1, e + 4 * HOUR_MS, Batch("b1", e, ["c1"], ["tokens"], [SCALE],
                                                   [e + 4 * HOUR_MS])))  # closes e's hour
    proc.process(_record(2, e + HORIZON - 1, Batch("b2", e, ["c1"], ["tokens"], [SCALE], [e],
                                                   ids=["k"])))
    proc.process(_record(3, e + HORIZON, Batch("b3", e, ["c1"], ["tokens"], [SCALE], [e],
                                               ids=["k"])))
    table.write(proc.take_flush())
    assert (proc.counters.duplicate, proc.counters.late) == (1, 1)
    assert table.totals("hourly") == {("c1", "tokens", e): SCALE,
                                      ("c1", "tokens", e + 4 * HOUR_MS): SCALE}
    assert list(table.late) == [("c1", "tokens", e, "k")]


# ---------------------------------------------------------------- upgrades

# Written by the format-3 worker (main at c2893ee, before ids were scoped; this REGISTRY)
# for: offset 0 =
# batch "b0", c1's tokens under key "req-1"; offset 1 = producer "sdk-1"'s batch 0; both at
# OLD_E, log time OLD_T0 (+1 s). The id delta is a bare list of [id, first seen, offset].
OLD_E = DAY0 + 10 * HOUR_MS + 600_000
OLD_T0 = OLD_E + 60_000
FORMAT3_DELTA = ("g/usage/0/ids/00000000000000000002", '[["req-1", 1699956660000, 0]]')
FORMAT3_BLOB = (
    '{"format": 3, "source": "usage", "partition": 0, "next_offset": 2, "clock_ms": '
    '1699956661000, "max_event_ms": 1699956600000, "closed_before_ms": 1699949340000, '
    '"source_partitions": null, "settings": [7200000, 60000, 86400000], "batches": '
    '[1699956660000, [[1699956660000, "b0"]]], "sequences": [1699956661000, {"sdk-1": '
    '[[0, 0, 1699956661000]]}], "ids_clock_ms": 1699956660000, "cells": [["hourly", "c1", '
    '"tokens", [["model", ""]], 1699956000000, "sum", 3000000000, 2], ["daily", "c1", '
    '"tokens", [["model", ""]], 1699920000000, "sum", 3000000000, 2]]}')


def test_an_upgraded_worker_recognises_resends_of_ids_from_a_format_3_checkpoint(
        tmp_path: Path) -> None:
    import zlib

    from meterline.aggregators.checkpoints import MemoryCheckpointStore

    assert (OLD_E, OLD_T0) == (1699956600000, 1699956660000)
    store, table = MemoryCheckpointStore(), ReplacingTable()
    store.blobs = {"g/usage/0": zlib.compress(FORMAT3_BLOB.encode()),
                   FORMAT3_DELTA[0]: zlib.compress(FORMAT3_DELTA[1].encode())}
    ids = tmp_path
    w = _worker(store, table, ids / "a")
    t = OLD_T0 + HOUR_MS
    w.process(_record(2, t, Batch("r1", t, ["c1", "c2", "c1"], ["tokens"] * 3,
                                  [SCALE, SCALE, 5 * SCALE], [OLD_E] * 3,
                                  ids=["req-1", "req-1", "req-2"])))
    w.process(_record(3, t, Batch("b0", OLD_T0, ["c1"], ["tokens"], [SCALE], [OLD_E],
                                  ids=["req-1"])))
    w.process(_record(4, t, Batch("b1", OLD_T0, ["c1"], ["tokens"], [2 * SCALE], [OLD_E],
                                  producer="sdk-1", seq=0)))
    w.flush(checkpoint=True)
    assert FORMAT3_DELTA[0] in store.blobs  # old ids still held: the delta stays
    # Restart two days of log time later; the watermark stalled at OLD_E meanwhile.
    w = _worker(store, table, ids / "b")
    t = OLD_T0 + 2 * HORIZON
    w.process(_record(5, t, Batch("r2", t, ["c2"], ["tokens"], [SCALE], [OLD_E],
                                  ids=["req-1"])))
    w.process(_record(6, t, Batch("b1", OLD_T0, ["c1"], ["tokens"], [2 * SCALE], [OLD_E],
                                  producer="sdk-1", seq=0)))
    w.flush(checkpoint=True)
    # Events four hours on close OLD_E's hour: the legacy ids drain, keys are scoped again.
    later = OLD_E + 4 * HOUR_MS
    w.process(_record(7, t + 1, Batch("r3", t, ["c1"], ["tokens"], [SCALE], [later])))
    w.process(_record(8, t + 2, Batch("r4", t, ["c2"], ["tokens"], [7 * SCALE], [later],
                                      ids=["req-1"])))
    w.flush(checkpoint=True)
    assert FORMAT3_DELTA[0] not in store.blobs
    hour = OLD_E - OLD_E % HOUR_MS
    assert table.totals("hourly") == {("c1", "tokens", hour): 8 * SCALE,  # 3 old + req-2
                                      ("c1", "tokens", later - later % HOUR_MS): SCALE,
                                      ("c2", "tokens", later - later % HOUR_MS): 7 * SCALE}
    proc = w.processors[TopicPartition("usage", 0)]
    assert proc.dedupers.legacy_ids is None and proc.legacy_until_ms is None


def test_bare_ids_of_a_format_2_checkpoint_survive_the_next_checkpoint() -> None:
    import json
    import zlib

    doc = json.loads(FORMAT3_BLOB)
    doc["format"] = 2
    del doc["ids_clock_ms"]
    doc["events"] = [OLD_T0, [[OLD_T0, "req-1"]]]  # formats 1-2 kept the ids in the blob
    proc = PartitionProcessor.from_checkpoint(zlib.compress(json.dumps(doc).encode()), REGISTRY)
    again = PartitionProcessor.from_checkpoint(proc.checkpoint(), REGISTRY)
    t = OLD_T0 + 2 * HORIZON  # past the horizon, but OLD_E's hour is still open
    again.process(_record(2, t, Batch("r", t, ["c9"], ["tokens"], [SCALE], [OLD_E],
                                      ids=["req-1"])))
    assert (again.counters.duplicate, again.counters.accepted) == (1, 0)
