"""Explicit-id dedupe on disk, checkpointed as deltas: same answers as the in-memory store,
restores ignore ids from past the checkpoint, expired deltas are deleted, and a crash
anywhere (replaying from any checkpoint with every delta ever saved) changes no total."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest
from test_processor import REGISTRY, ReplacingTable, make_records  # same folder

from meterline.aggregators.checkpoints import MemoryCheckpointStore, SqliteCheckpointStore
from meterline.aggregators.id_store import MemoryIdStore, SqliteIdStore
from meterline.aggregators.runner import RollupWorker, TopicPartition
from meterline.core.dedupe import NO_PIN, InMemoryDeduper

TP = TopicPartition("usage", 0)
HORIZON = 10_000


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_answers_like_the_reference_deduper(kind: str, tmp_path: Path) -> None:
    rng = random.Random(3)
    ref = InMemoryDeduper(HORIZON)
    store = (MemoryIdStore(HORIZON) if kind == "memory"
             else SqliteIdStore(tmp_path / "ids.db", HORIZON))
    now = closed = 0
    for i in range(20_000):
        now += rng.choice([0, 0, 1, 7, 300])  # bursts, steps, an occasional long gap
        if rng.random() < 0.01:  # the windows' close frontier moves now and then
            closed += rng.choice([0, 500, 5_000])
            store.close_before(closed)
            ref.close_before(closed)
        key = f"k{rng.randrange(2_000)}"
        until = now + rng.choice([-20_000, 0, 3_000, 30_000])  # window ends, some closed
        store.offset = i
        answer = store.seen_or_add(key, now, until)
        assert answer == ref.seen_or_add(key, now, until), (i, key, now)
        if not answer and rng.random() < 0.02:  # its event was rejected after all
            store.forget(key)
            ref.forget(key)
    assert store.take_delta()[-1][3] is not None  # deltas carry the window pin
    store.close()


def test_restore_keeps_only_ids_before_the_checkpoint_and_unexpired(tmp_path: Path) -> None:
    store = SqliteIdStore(tmp_path / "ids.db", HORIZON)
    entries = [("a", 100, 3, NO_PIN), ("b", 200, 7, NO_PIN), ("c", 300, 9, NO_PIN),
               ("old", -50_000, 1, NO_PIN)]
    assert store.load(entries, below_offset=8, now_ms=400) == 2  # a, b
    store.offset = 9
    assert store.seen_or_add("a", 500) and store.seen_or_add("b", 500)
    assert not store.seen_or_add("c", 500)  # first seen at offset 9: in the replay
    assert not store.seen_or_add("old", 500)
    store.close()
    assert not (tmp_path / "ids.db").exists()  # scratch: gone when the partition goes


def worker(store: object, table: ReplacingTable, id_dir: Path, horizon: int = 86_400_000
           ) -> RollupWorker:
    from meterline.aggregators.processor import RollupSettings

    class Writer:
        def write(self, flush):  # type: ignore[no-untyped-def]
            table.write(flush)

    w = RollupWorker(REGISTRY, Writer(), store, group="g",  # type: ignore[arg-type]
                     id_store_dir=id_dir, settings=RollupSettings(dedupe_horizon_ms=horizon))
    w.assign([TP])
    return w


@pytest.mark.parametrize("seed", range(6))
def test_crash_anywhere_with_disk_ids_changes_nothing(seed: int, tmp_path: Path) -> None:
    """Checkpoints (main blob + id delta) saved at random points; a crash at another
    random point; the restart loads the newest checkpoint and every delta in the store."""
    rng = random.Random(seed)
    records, expected = make_records(250, seed)
    store, table = SqliteCheckpointStore(tmp_path / "ck.db"), ReplacingTable()
    first = worker(store, table, tmp_path / "ids1")
    crash_at = rng.randrange(20, len(records))
    for rec in records[:crash_at]:
        first.process(rec)
        if rng.random() < 0.2:
            first.flush(checkpoint=rng.random() < 0.5)
    first.processors[TP].take_flush()  # the crash: unwritten work is gone
    second = worker(store, table, tmp_path / "ids2")
    for rec in records:  # the consumer re-reads from wherever; the processor skips
        assert second.process(rec) is None or rec.offset > second.processors[TP].next_offset
    second.flush(checkpoint=True)
    assert table.totals("hourly") == expected
    store.close()


def test_checkpoints_hold_deltas_not_every_id_and_expired_deltas_go(tmp_path: Path) -> None:
    records, _ = make_records(400, seed=9)
    store, table = MemoryCheckpointStore(), ReplacingTable()
    w = worker(store, table, tmp_path / "ids", horizon=3_600_000)  # 1 h of log time
    sizes = []
    for i, rec in enumerate(records):
        w.process(rec)
        if i % 20 == 19:
            w.flush(checkpoint=True)
            sizes.append(len(store.blobs["g/usage/0"]))
    deltas = [k for k in store.blobs if k.startswith("g/usage/0/ids/")]
    # The records span ~4 h of log time: deltas older than the horizon were deleted.
    assert 0 < len(deltas) < 400 // 20
    restored = worker(store, ReplacingTable(), tmp_path / "ids2", horizon=3_600_000)
    for proc in (w.processors[TP], restored.processors[TP]):  # expiry on disk is lazy
        proc.ids.close_before(proc.state.closed_before_ms)
        proc.ids.expire(proc.ids.now_ms)
    assert len(restored.processors[TP].ids) == len(w.processors[TP].ids)


def test_open_deltas_are_rewritten_then_sealed_and_a_failed_save_loses_no_id(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import meterline.aggregators.runner as runner_module

    monkeypatch.setattr(runner_module, "SEAL_DELTA_IDS", 60)
    records, expected = make_records(300, seed=4)

    class Flaky(MemoryCheckpointStore):
        fail_next = False

        def save(self, blobs):  # type: ignore[no-untyped-def]
            if self.fail_next:
                self.fail_next = False
                raise ConnectionError("checkpoint topic away")
            super().save(blobs)

    store, table = Flaky(), ReplacingTable()
    w = worker(store, table, tmp_path / "ids")
    for i, rec in enumerate(records):
        w.process(rec)
        if i % 10 == 9:
            store.fail_next = i % 70 == 9
            with contextlib.suppress(ConnectionError):
                w.flush(checkpoint=True)
    w.flush(checkpoint=True)
    deltas = [k for k in store.blobs if "/ids/" in k]
    ids = len(w.processors[TP].ids)
    assert 1 < len(deltas) <= ids // 60 + 1  # sealed at 60 ids, far fewer than checkpoints
    restored = worker(store, ReplacingTable(), tmp_path / "ids2")
    assert len(restored.processors[TP].ids) == ids
    assert table.totals("hourly") == expected


def test_delta_formats_round_trip_and_old_deltas_decode_as_bare_ids() -> None:
    import json
    import zlib

    from meterline.aggregators.id_store import decode_delta, encode_delta

    entries = [("3:abc6:tokensreq-1", 10, 4, 3_600_000)]
    assert decode_delta(encode_delta(entries)) == entries  # type: ignore[arg-type]
    old = zlib.compress(json.dumps([["req-1", 10, 4]]).encode())  # written by format 3
    assert decode_delta(old) == [("req-1", 10, 4, None)]
