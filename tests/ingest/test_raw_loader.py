from __future__ import annotations

from typing import Any

import orjson

from meterline.core.envelope import Batch, encode_batch
from meterline.ingest.raw_loader import RawEventLoader, build_rows
from meterline.ingest.sources import SourceRecord
from meterline.sinks.raw_events import UsageSummaryQuery

NOW = 1_790_000_000_000


def _record(offset: int, payload: bytes, partition: int = 0) -> SourceRecord:
    return SourceRecord("usage", partition, offset, payload)


def _batch(batch_id: str, customers: list[str], meters: list[str] | None = None,
           ts: int = NOW - 60_000) -> bytes:
    n = len(customers)
    return encode_batch(Batch(batch_id, NOW, customers, meters or ["api_calls"] * n,
                              [10**9] * n, [ts + i for i in range(n)]))


class ListSource:
    """In-memory RecordSource: hands out records once, remembers commits."""

    def __init__(self, records: list[SourceRecord]) -> None:
        self.pending = list(records)
        self.committed: list[SourceRecord] = []

    def poll_records(self, max_records: int, timeout_s: float) -> list[SourceRecord]:
        out, self.pending = self.pending[:max_records], self.pending[max_records:]
        return out

    def commit(self, records: Any) -> None:
        self.committed += list(records)

    def close(self) -> None:
        pass


def test_garbage_records_become_dead_letters_with_reasons() -> None:
    records = [
        _record(0, b"\x00\xffnot json"),
        _record(1, orjson.dumps({"v": 99})),
        _record(2, _batch("b1", ["acme", "", "beta"], ["api_calls", "api_calls", "Bad Meter"])),
    ]
    rows, dead, counters = build_rows(records, NOW)
    assert list(rows.customer) == ["acme"]
    assert list(rows.event_id) == ["b1-0"]
    assert counters.dead_letters == 4
    assert sorted(counters.by_reason) == [
        "envelope.malformed_json", "envelope.unsupported_version", "event.bad_meter",
        "event.missing_customer",
    ]
    assert all(r for r in dead.reason)
    assert dead.payload[0] == b"\x00\xffnot json", "the original bytes are kept for replay"
    assert list(dead.source_offset) == [0, 1, 2, 2]
    assert list(dead.position) == [-1, -1, 1, 2]
    assert list(dead.event_id) == ["", "", "b1-1", "b1-2"]
    assert set(dead.stage) == {"raw"}
    assert list(dead.received_at_ms) == [NOW] * 4  # these records have no log timestamp


def test_dead_letters_carry_the_record_timestamp_and_collapse_on_replay(
    migrated_storage: Any,
) -> None:
    now = _now_ms()
    records = [SourceRecord("usage", 0, 0, b"{", timestamp_ms=now - 5_000),
               SourceRecord("usage", 0, 1, _batch("b1", ["acme", ""], ts=now - 60_000),
                            timestamp_ms=now - 4_000)]
    for step in range(3):  # replays, each at a later loader clock
        loader = RawEventLoader(migrated_storage, ListSource(records),
                                clock_ms=lambda s=step: now + s)
        while loader.run_once().records:
            pass
    rows = migrated_storage.query_rows(
        f"SELECT source_offset, position, event_id, stage, received_at_ms "
        f"FROM {migrated_storage.database}.dead_letters FINAL ORDER BY source_offset")
    assert rows == [(0, -1, "", "raw", now - 5_000), (1, 1, "b1-1", "raw", now - 4_000)]


def test_replayed_records_are_counted_once(migrated_storage: Any) -> None:
    now = _now_ms()
    records = [_record(i, _batch(f"b{i}", ["acme", "beta"], ts=now - 60_000)) for i in range(5)]
    for _ in range(3):  # the same records delivered three times (crash before commit, replay)
        loader = RawEventLoader(migrated_storage, ListSource(records), clock_ms=lambda: now)
        while loader.run_once().records:
            pass
    summary = UsageSummaryQuery(database=migrated_storage.database).run(migrated_storage)
    assert {(r.customer, r.events, r.quantity_nano) for r in summary} == {
        ("acme", 5, 5 * 10**9), ("beta", 5, 5 * 10**9)
    }


def test_commit_happens_after_insert(migrated_storage: Any) -> None:
    now = _now_ms()
    source = ListSource([_record(0, _batch("only", ["acme"], ts=now - 1_000)), _record(1, b"{")])
    loader = RawEventLoader(migrated_storage, source, clock_ms=lambda: now)
    step = loader.run_once()
    assert step.records == 2 and step.events == 1 and step.dead_letters == 1
    assert [r.offset for r in source.committed] == [0, 1]
    (count,) = migrated_storage.query_rows(
        f"SELECT count() FROM {migrated_storage.database}.dead_letters")[0]
    assert count == 1


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000
