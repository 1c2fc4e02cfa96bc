from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from meterline.core.envelope import decode_batch
from meterline.ingest.local_log import LocalLog, LocalLogSource, LocalLogTransport
from meterline.ingest.sources import LocalLogRecordSource
from meterline.sdk import Emitter, EmitterConfig


def test_append_read_commit_and_reopen(tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "log.db", partitions=3)
    assert log.append(1, [b"a", b"b"]) == [0, 1]
    assert log.append(1, [b"c"]) == [2]
    assert [r.payload for r in log.read(1, 1, 10)] == [b"b", b"c"]
    log.commit("g", {1: 2})
    log.close()

    reopened = LocalLog(tmp_path / "log.db", partitions=8)
    assert reopened.partitions == 3, "partition count is fixed at creation"
    assert reopened.end_offset(1) == 3
    assert reopened.committed("g", 1) == 2
    assert reopened.append(1, [b"d"]) == [3]
    with pytest.raises(ValueError):
        reopened.append(3, [b"x"])


def test_source_resumes_from_committed_offsets(tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "log.db", partitions=2)
    log.append(0, [b"0", b"1", b"2"])
    log.append(1, [b"x"])
    source = LocalLogSource(log, "loader")
    first = source.poll_records(100)
    assert len(first) == 4 and source.lag() == 4
    source.commit([r for r in first if r.partition == 0 and r.offset < 2])
    again = LocalLogSource(log, "loader")  # a restart: uncommitted records come back
    assert sorted((r.partition, r.offset) for r in again.poll_records(100)) == [(0, 2), (1, 0)]


def test_emitter_over_local_log_delivers_exactly(tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "log.db", partitions=4)
    config = EmitterConfig(topic="local", bootstrap_servers=None, spool_dir=tmp_path / "spool")
    with Emitter(config, transport=LocalLogTransport(log)) as emitter:
        for i in range(10_000):
            emitter.emit(f"c{i % 37}", "api_calls", "0.1")
        assert emitter.flush(10)
    total = 0
    per_partition_customers: dict[int, set[str]] = {}
    for p in range(4):
        for rec in log.read(p, 0, 10_000):
            batch = decode_batch(rec.payload)
            total += sum(batch.quantities)
            per_partition_customers.setdefault(p, set()).update(batch.customers)
    assert total == 10_000 * 100_000_000
    seen: set[str] = set()
    for customers in per_partition_customers.values():
        assert not customers & seen, "a customer's events must stay on one partition"
        seen |= customers


def test_records_carry_their_append_time(tmp_path: Path) -> None:
    clock = iter([1_700_000_000_123, 1_700_000_000_456])
    log = LocalLog(tmp_path / "log.db", partitions=2, clock_ms=lambda: next(clock))
    log.append(0, [b"a", b"b"])
    log.append(0, [b"c"])
    assert [(r.payload, r.timestamp_ms) for r in log.read(0, 0, 10)] == [
        (b"a", 1_700_000_000_123), (b"b", 1_700_000_000_123), (b"c", 1_700_000_000_456)]
    log.close()

    wall = LocalLog(tmp_path / "wall.db", partitions=1)  # the default clock: UTC ms now
    before = time.time_ns() // 1_000_000
    wall.append(0, [b"x"])
    after = time.time_ns() // 1_000_000
    assert before <= wall.read(0, 0, 1)[0].timestamp_ms <= after

    source = LocalLogRecordSource(wall, consumer="c", topic="t")
    [rec] = source.poll_records(10)
    assert rec.topic == "t" and rec.timestamp_ms == wall.read(0, 0, 1)[0].timestamp_ms


def test_log_without_timestamp_column_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE records (partition INTEGER NOT NULL, offset INTEGER NOT NULL, "
        "payload BLOB NOT NULL, PRIMARY KEY (partition, offset)) WITHOUT ROWID;"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('partitions', '2');"
        "INSERT INTO records VALUES (1, 0, x'6f6c64');"
    )
    db.commit()
    db.close()
    log = LocalLog(path, clock_ms=lambda: 1_700_000_000_000)
    assert log.partitions == 2 and log.end_offset(1) == 1
    log.append(1, [b"new"])
    assert [(r.payload, r.timestamp_ms) for r in log.read(1, 0, 10)] == [
        (b"old", -1), (b"new", 1_700_000_000_000)]  # -1: no timestamp, as SourceRecord says
    log.close()
    assert LocalLog(path).read(1, 0, 1)[0].timestamp_ms == -1  # reopening is a no-op


def test_source_fetch_position_seek_and_commit_are_separate(tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "log.db", partitions=2)
    log.append(0, [b"0", b"1", b"2"])
    source = LocalLogSource(log, "g")
    assert [r.offset for r in source.poll_records(2)] == [0]  # 1 per partition
    assert [r.offset for r in source.poll_records(2)] == [1], "poll advances the position"
    source.seek(0, 0)
    assert [r.offset for r in source.poll_records(100)] == [0, 1, 2]
    assert source.poll_records(100) == [] and source.lag() == 3  # nothing committed
    source.commit_offsets({0: 2})
    assert log.committed("g", 0) == 2 and source.lag() == 1
    assert [r.offset for r in LocalLogSource(log, "g").poll_records(100)] == [2]
    with pytest.raises(ValueError):
        source.seek(5, 0)
