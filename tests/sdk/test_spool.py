"""SQLite spool: atomic moves between events and batches, persistence, the directory lock."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterline.sdk.batching import EncodedBatch, Item
from meterline.sdk.spool import Spool, SpoolLockedError

REPO = Path(__file__).resolve().parents[2]
TS = 1_700_000_000_000


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool")
    yield s
    s.close()


def ev(i: int, q: int | None = None, dims: dict[str, str] | None = None) -> Item:
    return (f"c{i}", "api_calls", i * 10**9 if q is None else q, TS + i, dims, f"e{i}", None)


def eb(name: str, count: int = 1, partition: int | None = 0) -> EncodedBatch:
    return EncodedBatch(partition, name, count, f"payload-{name}".encode())


def test_events_round_trip_in_order(spool: Spool) -> None:
    items = [
        ev(1),
        ev(2, q=2**80),  # beyond SQLite's 64-bit ints: stored as text, read back exact
        ev(3, q=-(2**70)),
        ev(4, dims={"region": "eu", "ü": "日本"}),
        ev(5, dims={}),
        ("c", "m", 0, TS, None, None, "svc"),
    ]
    for it in items:
        spool.append_event(it)
    assert spool.counts() == (6, 0)
    up_to, got = spool.take_events(100)
    assert up_to >= 6
    expected = list(items)
    expected[4] = ev(5, dims=None)  # an empty dimension map is stored as "none"
    assert got == expected
    assert all(type(it[2]) is int for it in got)
    # take_events does not remove anything; only seal_events does.
    assert spool.counts() == (6, 0)


def test_take_events_limit(spool: Spool) -> None:
    for i in range(10):
        spool.append_event(ev(i))
    up_to, got = spool.take_events(4)
    assert [it[5] for it in got] == ["e0", "e1", "e2", "e3"]
    spool.seal_events(up_to, [eb("b1", 4)])
    _, rest = spool.take_events(100)
    assert [it[5] for it in rest] == [f"e{i}" for i in range(4, 10)]
    assert spool.counts() == (6, 4)


def test_take_events_when_empty(spool: Spool) -> None:
    assert spool.take_events(10) == (0, [])


def test_seal_events_is_atomic(spool: Spool) -> None:
    for i in range(3):
        spool.append_event(ev(i))
    up_to, _ = spool.take_events(10)
    bad = EncodedBatch(0, "bad", 3, None)  # type: ignore[arg-type]  # violates NOT NULL
    with pytest.raises(Exception, match="NOT NULL"):
        spool.seal_events(up_to, [eb("ok", 3), bad])
    assert spool.counts() == (3, 0)  # rolled back: events still there, no batch
    spooled = spool.seal_events(up_to, [eb("ok", 3)])
    assert [s.batch.batch_id for s in spooled] == ["ok"]
    assert spool.counts() == (0, 3)


def test_batches_fifo_delete_and_replace(spool: Spool) -> None:
    spooled = spool.append_batches([eb("a", 2), eb("b", 3, None), eb("c", 5)])
    assert [s.batch.batch_id for s in spooled] == ["a", "b", "c"]
    assert spool.counts() == (0, 10)
    oldest = spool.oldest_batches(2)
    assert [s.batch for s in oldest] == [eb("a", 2), eb("b", 3, None)]
    assert type(oldest[0].batch.payload) is bytes
    assert [s.batch.batch_id for s in spool.oldest_batches(10, after_seq=oldest[0].seq)] == [
        "b",
        "c",
    ]
    spool.delete_batch(oldest[0].seq)
    parts = spool.replace_batch(oldest[1].seq, [eb("b.p0", 1, 0), eb("b.p2", 2, 2)])
    assert [p.batch.batch_id for p in parts] == ["b.p0", "b.p2"]
    assert [s.batch.batch_id for s in spool.oldest_batches(10)] == ["c", "b.p0", "b.p2"]
    assert spool.counts() == (0, 8)


def test_persists_across_reopen(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    first = Spool(directory, fsync=True)
    first.append_event(ev(1, q=2**90))
    first.append_batches([eb("kept", 7, 3)])
    first.close()
    first.close()  # idempotent
    second = Spool(directory)
    try:
        assert second.counts() == (1, 7)
        assert second.take_events(10)[1] == [ev(1, q=2**90)]
        assert [s.batch for s in second.oldest_batches(10)] == [eb("kept", 7, 3)]
    finally:
        second.close()


def test_lock_excludes_a_second_spool(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    first = Spool(directory)
    with pytest.raises(SpoolLockedError, match="in use"):
        Spool(directory)
    first.close()
    Spool(directory).close()  # free again


def test_lock_dies_with_its_process(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    code = (
        "import os, sys\n"
        "from meterline.sdk.spool import Spool\n"
        "s = Spool(sys.argv[1])\n"
        "s.append_batches([])\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "os._exit(0)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(directory)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        with pytest.raises(SpoolLockedError):
            Spool(directory)
    finally:
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(timeout=30)
    Spool(directory).close()  # the OS released the dead process's lock
