from __future__ import annotations

from pathlib import Path

import pytest

from meterline.core.envelope import decode_batch
from meterline.ingest.local_log import LocalLog, LocalLogSource, LocalLogTransport
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
