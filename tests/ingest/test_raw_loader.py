from __future__ import annotations

from typing import Any

import orjson

from meterline.config import AppConfig
from meterline.core.envelope import Batch, encode_batch
from meterline.core.meters import MeterRegistry
from meterline.ingest.raw_loader import RawEventLoader, build_rows
from meterline.ingest.sources import SourceRecord
from meterline.sinks.raw_events import UsageSummaryQuery

NOW = 1_790_000_000_000
REGISTRY = AppConfig().registry()  # the default meters, as `meterline worker` runs them


def _record(offset: int, payload: bytes, partition: int = 0) -> SourceRecord:
    return SourceRecord("usage", partition, offset, payload)


def _batch(batch_id: str, customers: list[str], meters: list[str] | None = None,
           ts: int = NOW - 60_000) -> bytes:
    n = len(customers)
    # Created when its events happened: without a log timestamp the batch's own clock
    # bounds how far ahead an event may be (as in the rollup stage).
    return encode_batch(Batch(batch_id, max(NOW, ts + n), customers,
                              meters or ["api_calls"] * n, [10**9] * n,
                              [ts + i for i in range(n)]))


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
    rows, dead, counters = build_rows(records, NOW, REGISTRY)
    assert list(rows.customer) == ["acme"]
    assert list(rows.event_id) == ["b1-0"]
    assert counters.dead_letters == 4
    assert sorted(counters.by_reason) == [
        "envelope.malformed_json", "envelope.unsupported_version", "event.missing_customer",
        "event.unknown_meter",
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
        loader = RawEventLoader(migrated_storage, ListSource(records), REGISTRY,
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
        loader = RawEventLoader(migrated_storage, ListSource(records), REGISTRY,
                                clock_ms=lambda: now)
        while loader.run_once().records:
            pass
    summary = UsageSummaryQuery(database=migrated_storage.database).run(migrated_storage)
    assert {(r.customer, r.events, r.quantity_nano) for r in summary} == {
        ("acme", 5, 5 * 10**9), ("beta", 5, 5 * 10**9)
    }


def test_commit_happens_after_insert(migrated_storage: Any) -> None:
    now = _now_ms()
    source = ListSource([_record(0, _batch("only", ["acme"], ts=now - 1_000)), _record(1, b"{")])
    loader = RawEventLoader(migrated_storage, source, REGISTRY, clock_ms=lambda: now)
    step = loader.run_once()
    assert step.records == 2 and step.events == 1 and step.dead_letters == 1
    assert [r.offset for r in source.committed] == [0, 1]
    (count,) = migrated_storage.query_rows(
        f"SELECT count() FROM {migrated_storage.database}.dead_letters")[0]
    assert count == 1


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


# ------------------------------------------------------------------- issue 8: per-event


def _envelope(batch_id: str, events: list[tuple[str, str, int | str, int]],
              created_ms: int, ids: list[str | None] | None = None) -> bytes:
    """Raw JSON, so a producer can send what the SDK would refuse (60-digit quantities)."""
    customers, meters, quantities, stamps = (list(col) for col in zip(*events, strict=True))
    doc: dict[str, Any] = {"v": 1, "batch_id": batch_id, "created_ms": created_ms,
                           "count": len(events), "customer": customers, "meter": meters,
                           "quantity": quantities, "timestamp_ms": stamps}
    if ids is not None:
        doc["id"] = ids
    return orjson.dumps(doc)


def test_one_bad_event_is_a_dead_letter_and_the_rest_of_the_poll_lands(
        migrated_storage: Any) -> None:
    """Old code: a 60-digit quantity made insert_raw_events raise for the whole poll (the
    partition stalled forever); a time past 2106 or older than the raw TTL was inserted
    and deleted unseen."""
    now = _now_ms()
    day = 86_400_000
    records = [
        SourceRecord("usage", 0, 0, _envelope("ok1", [("acme", "api_calls", 10**9, now - 5)],
                                              now), timestamp_ms=now),
        SourceRecord("usage", 0, 1, _envelope("mixed", [
            ("acme", "api_calls", "9" * 60, now - 4),  # beyond Decimal(38, 9)
            ("acme", "api_calls", 2 * 10**9, now - 3),
            ("acme", "api_calls", 10**9, 5_000_000_000_000),  # year 2128
            ("acme", "api_calls", 10**9, 900_000_000_000),  # 1998
            ("acme", "api_calls", 10**9, now + 3_600_000),  # an hour ahead of the log
            ("acme", "api_calls", 10**9, now - 40 * day),  # past raw_events' 35 days
            ("beta", "api_calls", 3 * 10**9, now - 2),
        ], now), timestamp_ms=now),
        SourceRecord("usage", 0, 2, _envelope("ok2", [("beta", "api_calls", 10**9, now - 1)],
                                              now), timestamp_ms=now),
    ]
    source = ListSource(records)
    loader = RawEventLoader(migrated_storage, source, REGISTRY, clock_ms=lambda: now)
    step = loader.run_once()
    assert [r.offset for r in source.committed] == [0, 1, 2]
    assert (step.events, step.dead_letters) == (4, 5)
    assert step.by_reason == {"event.quantity_out_of_range": 1,
                              "event.timestamp_out_of_range": 3,
                              "event.outside_retention": 1}
    summary = UsageSummaryQuery(database=migrated_storage.database).run(migrated_storage)
    assert {(r.customer, r.quantity_nano, r.events) for r in summary} == {
        ("acme", 3 * 10**9, 2), ("beta", 4 * 10**9, 2)}
    rows = migrated_storage.query_rows(
        f"SELECT position, reason, payload FROM {migrated_storage.database}.dead_letters FINAL "
        "ORDER BY position")
    assert [(p, r) for p, r, _ in rows] == [
        (0, "event.quantity_out_of_range"), (2, "event.timestamp_out_of_range"),
        (3, "event.timestamp_out_of_range"), (4, "event.timestamp_out_of_range"),
        (5, "event.outside_retention")]
    # the event itself, quantity in units as the caller wrote it
    assert orjson.loads(rows[0][2])["quantity"] == "9" * 51 + "." + "9" * 9


def test_both_stages_write_a_rejected_event_alike() -> None:
    """One dead-letter builder, one unit: old code wrote the raw stage's quantity in
    nano-units ("100000000") and the rollup stage's in units ("0.1")."""
    from meterline.aggregators.processor import PartitionProcessor
    from meterline.core.meters import MeterRegistry

    registry = MeterRegistry.from_mapping({"meters": {"api_calls": {"aggregation": "sum"}}})
    payload = encode_batch(Batch("b", NOW, [""], ["api_calls"], [100_000_000], [NOW - 5],
                                 ids=["my-id"], dimensions=[{"region": "eu"}]))
    record = SourceRecord("usage", 0, 0, payload, NOW)
    proc = PartitionProcessor("usage", 0, registry)
    proc.process(record)
    [rollup_dead] = proc.take_flush().dead_letters
    _, raw_dead, _ = build_rows([record], NOW, registry)
    assert raw_dead.reason == [rollup_dead.reason] == ["event.missing_customer"]
    assert raw_dead.payload == [rollup_dead.payload]
    assert orjson.loads(rollup_dead.payload) == {
        "id": "my-id", "customer": "", "meter": "api_calls", "quantity": "0.1",
        "timestamp_ms": NOW - 5, "dimensions": {"region": "eu"}}


# ------------------------------------------- issue 8 item 3: the raw stage's meter rules

RULES = MeterRegistry.from_mapping({"meters": {
    "tokens": {"aggregation": "sum", "dimensions": ["model"]},
    "credits": {"aggregation": "sum", "allow_negative": True},
    "users": {"aggregation": "unique_count", "value_property": "user_id",
              "dimensions": ["user_id", "region"]},
}})
HOUR = 3_600_000
# (customer, meter, nanos, timestamp_ms, dimensions, what the rules say of it)
RULE_CASES: list[tuple[str, str, int, int, dict[str, str] | None, str | None]] = [
    ("acme", "tokens", 5 * 10**9, NOW - 60_000, {"model": "m1"}, None),
    ("acme", "mystery", 10**9, NOW - 60_000, None, "unknown_meter"),
    ("acme", "tokens", -(10**9), NOW - 60_000, None, "negative_quantity"),
    ("acme", "credits", -3 * 10**9, NOW - 60_000, None, None),  # this meter allows it
    ("acme", "tokens", 10**9, NOW - 60_000, {"region": "eu"}, "dimension_not_allowed"),
    ("acme", "users", 10**9, NOW - 60_000, None, "missing_unique_value"),
    ("acme", "users", 10**9, NOW - 60_000, {"user_id": ""}, "missing_unique_value"),
    ("acme", "users", 10**9, NOW - 60_000, {"region": "eu"}, "missing_unique_value"),
    ("acme", "users", 10**9, NOW - 60_000, {"user_id": "u1", "region": "eu"}, None),
    ("acme", "users", 10**9, NOW - 60_000, {"user_id": "u2", "model": "x"},
     "dimension_not_allowed"),
    # two faults: the stage names the same one the fold does
    ("", "mystery", 10**9, NOW - 60_000, None, "unknown_meter"),
    ("", "tokens", -(10**9), NOW - 60_000, None, "missing_customer"),
    ("acme", "tokens", -(10**9), NOW + HOUR, None, "timestamp_out_of_range"),
    ("acme", "credits", -(10**48), NOW - 60_000, None, "quantity_out_of_range"),
    ("beta", "tokens", 7 * 10**9, NOW - 30_000, None, None),
]


def _rule_record() -> SourceRecord:
    customers, meters, nanos, stamps, dims, _ = (list(c) for c in zip(*RULE_CASES, strict=True))
    batch = Batch("rules", NOW, customers, meters, nanos, stamps, dimensions=dims)
    return SourceRecord("usage", 0, 0, encode_batch(batch), NOW)


def test_raw_stage_applies_each_meter_rule_with_the_folds_reason() -> None:
    """Old code had no registry: the unknown meter, the negative quantity, the undeclared
    dimensions and the unique_count events without a value all landed in raw_events while
    the fold dead-lettered them, so raw totals exceeded rollup totals."""
    from meterline.aggregators.processor import PartitionProcessor

    record = _rule_record()
    rows, dead, counters = build_rows([record], NOW, RULES)
    raw_dead = sorted(zip(dead.position, dead.reason, strict=True))
    # The truth in words (RULE_CASES' last column), not a call into either stage...
    assert raw_dead == [(i, "event." + why) for i, (*_, why) in enumerate(RULE_CASES) if why]
    assert set(dead.stage) == {"raw"}
    # ...and the fold itself, run on the same record, refuses exactly these, alike.
    proc = PartitionProcessor("usage", 0, RULES)
    proc.process(record)
    fold_dead = sorted((d.position, d.reason) for d in proc.take_flush().dead_letters)
    assert raw_dead == fold_dead
    kept = [i for i, (*_, why) in enumerate(RULE_CASES) if why is None]
    assert list(rows.position) == kept
    assert list(rows.quantity_nano) == [RULE_CASES[i][2] for i in kept]
    assert counters.events == len(kept) and counters.dead_letters == len(raw_dead)


def test_raw_and_rollup_stages_count_the_same_usage(migrated_storage: Any) -> None:
    """Raw totals per (customer, meter) equal the fold's totals for the same records."""
    from meterline.aggregators.processor import PartitionProcessor

    now = _now_ms()
    shift = now - NOW
    customers, meters, nanos, stamps, dims, _ = (list(c) for c in zip(*RULE_CASES, strict=True))
    batch = Batch("rules", now, customers, meters, nanos, [t + shift for t in stamps],
                  dimensions=dims)
    record = SourceRecord("usage", 0, 0, encode_batch(batch), now)
    loader = RawEventLoader(migrated_storage, ListSource([record]), RULES, clock_ms=lambda: now)
    loader.run_once()
    raw = {(r.customer, r.meter): (r.events, r.quantity_nano)
           for r in UsageSummaryQuery(database=migrated_storage.database).run(migrated_storage)}
    proc = PartitionProcessor("usage", 0, RULES)
    proc.process(record)
    folded: dict[tuple[str, str], tuple[int, int]] = {}
    for r in proc.take_flush().rollups:
        if r.window == "hourly":  # the events may straddle an hour: add the hours up
            events, total = folded.get((r.customer, r.meter), (0, 0))
            folded[(r.customer, r.meter)] = (events + r.events, total + r.value_nanos)
    # unique_count's value is distinct users, not a quantity: compare its event count only
    assert raw.pop(("acme", "users"))[0] == folded.pop(("acme", "users"))[0] == 1
    assert raw == folded == {("acme", "tokens"): (1, 5 * 10**9),
                             ("acme", "credits"): (1, -3 * 10**9),
                             ("beta", "tokens"): (1, 7 * 10**9)}


def test_raw_summary_does_not_list_dead_lettered_events(migrated_storage: Any) -> None:
    """issue 11: raw usage listed an unknown meter's events. (`meterline usage` now reads
    the rollups: tests/test_usage_cli.py.)"""
    from meterline.sinks.raw_events import UsageSummaryQuery

    now = _now_ms()
    payload = encode_batch(Batch("u", now, ["acme"] * 3, ["llm_tokens", "no_such_meter",
                                                          "llm_tokens"],
                                 [2 * 10**9, 10**9, -(10**9)], [now - 3, now - 2, now - 1]))
    loader = RawEventLoader(migrated_storage, ListSource([SourceRecord("usage", 0, 0, payload,
                                                                       now)]),
                            REGISTRY, clock_ms=lambda: now)
    assert loader.run_once().by_reason == {"event.unknown_meter": 1,
                                           "event.negative_quantity": 1}
    rows = UsageSummaryQuery(customer="acme", database=migrated_storage.database).run(
        migrated_storage)
    # one event, 2 tokens: the negative one and the unknown meter are out
    assert [(r.meter, r.events, r.quantity_nano) for r in rows] == [("llm_tokens", 1, 2 * 10**9)]
