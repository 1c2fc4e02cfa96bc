from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.raw_events import (
    DeadLetterColumns,
    UsageQuery,
    UsageSummaryQuery,
    UsageSummaryRow,
    UsageTotals,
    insert_dead_letters,
    insert_raw_events,
    nano_from_decimal,
)

HOUR_MS = 3_600_000

# --------------------------------------------------------------------------- query objects


def test_usage_query_sql_is_exact() -> None:
    sql, params = UsageQuery("acme", "api_calls", 1_000, 2_000).to_sql()
    assert sql == (
        "SELECT sum(toDecimal256(quantity, 9)) AS quantity, count() AS events\n"
        "FROM meterline.raw_events_deduplicated\n"
        "WHERE customer = {customer:String}\n"
        "  AND meter = {meter:String}\n"
        "  AND timestamp_ms >= {start_ms:Int64}\n"
        "  AND timestamp_ms < {end_ms:Int64}"
    )
    assert params == {"customer": "acme", "meter": "api_calls", "start_ms": 1_000,
                      "end_ms": 2_000}


def test_usage_query_uses_the_given_database() -> None:
    sql, _ = UsageQuery("a", "m", 0, 1, database="billing").to_sql()
    assert "FROM billing.raw_events_deduplicated\n" in sql


def test_usage_query_values_never_reach_the_sql_text() -> None:
    sql, params = UsageQuery("x' OR 1=1 --", "m", 0, 1).to_sql()
    assert "OR 1=1" not in sql
    assert params["customer"] == "x' OR 1=1 --"


def test_usage_query_validation_collects_errors() -> None:
    with pytest.raises(SinkConfigError) as info:
        start: Any = 1.5  # as an untyped caller could pass it
        UsageQuery("a", "m", start, 1, database="no-good").to_sql()
    assert len(info.value.errors) == 2
    with pytest.raises(SinkConfigError, match="empty range"):
        UsageQuery("a", "m", 5, 5).to_sql()


def test_summary_query_without_filters() -> None:
    sql, params = UsageSummaryQuery().to_sql()
    assert sql == (
        "SELECT customer, meter, sum(toDecimal256(quantity, 9)) AS quantity, count() AS events,"
        " min(timestamp_ms) AS first_timestamp_ms, max(timestamp_ms) AS last_timestamp_ms\n"
        "FROM meterline.raw_events_deduplicated\n"
        "GROUP BY customer, meter\n"
        "ORDER BY customer, meter"
    )
    assert params == {}


def test_summary_query_with_every_filter() -> None:
    sql, params = UsageSummaryQuery(start_ms=10, end_ms=20, customer="acme").to_sql()
    assert sql == (
        "SELECT customer, meter, sum(toDecimal256(quantity, 9)) AS quantity, count() AS events,"
        " min(timestamp_ms) AS first_timestamp_ms, max(timestamp_ms) AS last_timestamp_ms\n"
        "FROM meterline.raw_events_deduplicated\n"
        "WHERE customer = {customer:String}\n"
        "  AND timestamp_ms >= {start_ms:Int64}\n"
        "  AND timestamp_ms < {end_ms:Int64}\n"
        "GROUP BY customer, meter\n"
        "ORDER BY customer, meter"
    )
    assert params == {"customer": "acme", "start_ms": 10, "end_ms": 20}


def test_summary_query_open_ended_range() -> None:
    sql, params = UsageSummaryQuery(start_ms=10).to_sql()
    assert "WHERE timestamp_ms >= {start_ms:Int64}\nGROUP BY" in sql
    assert params == {"start_ms": 10}


def test_parse_converts_decimals_exactly() -> None:
    query = UsageQuery("a", "m", 0, 1)
    assert query.parse([(Decimal("12345678901234567890.123456789"), 3)]) == UsageTotals(
        quantity_nano=12345678901234567890123456789, events=3
    )
    with pytest.raises(SinkError):
        query.parse([])


def test_nano_from_decimal_refuses_floats() -> None:
    assert nano_from_decimal(Decimal("7E-9")) == 7
    assert nano_from_decimal(Decimal("-0.100000000")) == -100_000_000
    with pytest.raises(SinkError):
        nano_from_decimal(0.1)


# --------------------------------------------------------------------------- validation


def test_raw_event_validation_collects_every_error(make_raw_events: Any) -> None:
    rows = make_raw_events(2, quantity_nano=[1, 0.5], timestamp_ms=[1, True],
                           ingested_at_ms=[2**63, 1])
    rows = type(rows)(**{**rows.as_columns(), "customer": ["only one"]})
    with pytest.raises(SinkConfigError) as info:
        rows.validate()
    errors = info.value.errors
    assert len(errors) == 4
    assert "different lengths" in errors[0]
    assert any("quantity_nano" in e and "float" in e for e in errors)
    assert any("timestamp_ms" in e and "bool" in e for e in errors)
    assert any("ingested_at_ms" in e and "outside" in e for e in errors)


def test_quantities_may_exceed_int64_but_not_decimal_38_9(make_raw_events: Any) -> None:
    make_raw_events(1, quantity_nano=10**38 - 1).validate()
    with pytest.raises(SinkConfigError):
        make_raw_events(1, quantity_nano=10**38).validate()


# --------------------------------------------------------------------------- against chDB


def test_insert_and_read_back_usage(migrated_storage: Any, make_raw_events: Any,
                                    now_ms: int) -> None:
    rows = make_raw_events(
        4,
        meter=["api_calls", "api_calls", "api_calls", "tokens"],
        quantity_nano=[100_000_000, 200_000_000, 7, 5_000_000_000],
        timestamp_ms=[now_ms, now_ms + 1, now_ms + 10, now_ms],
    )
    assert insert_raw_events(migrated_storage, rows) == 4
    db = migrated_storage.database
    totals = UsageQuery("acme", "api_calls", now_ms, now_ms + 10, database=db).run(
        migrated_storage
    )
    assert totals == UsageTotals(quantity_nano=300_000_000, events=2)  # end is exclusive

    summary = UsageSummaryQuery(database=db).run(migrated_storage)
    assert summary == [
        UsageSummaryRow("acme", "api_calls", 300_000_007, 3, now_ms, now_ms + 10),
        UsageSummaryRow("acme", "tokens", 5_000_000_000, 1, now_ms, now_ms),
    ]


def test_deliveries_count_once_as_their_first_copy_in_log_order(
    migrated_storage: Any, make_raw_events: Any, now_ms: int
) -> None:
    """Scope (customer, meter, event_id), first delivery in log order wins - the rollups'
    rule. Old code keyed on (customer, meter, timestamp_ms, event_id) with the last
    delivery winning: a retried ``emit(id=...)`` with a new timestamp counted twice."""
    db = migrated_storage.database
    month_ms = 32 * 24 * HOUR_MS

    def delivery(offset: int, batch: str, ts: list[int], qty: int) -> Any:
        return make_raw_events(3, batch_id=batch, timestamp_ms=ts, quantity_nano=qty,
                               source_partition=[0] * 3, source_offset=[offset] * 3,
                               position=[0, 1, 2], ingested_at_ms=now_ms + offset)

    # inserted newest first: the log position decides, not the insert order
    retry_ts = [now_ms + 10 * HOUR_MS + i for i in range(3)]  # a retry: new timestamps
    insert_raw_events(migrated_storage, delivery(9, "retry", retry_ts, 7))
    insert_raw_events(migrated_storage, delivery(5, "first", [now_ms - month_ms + i
                                                              for i in range(3)], 100))
    insert_raw_events(migrated_storage, delivery(5, "first", [now_ms - month_ms + i
                                                              for i in range(3)], 100))  # replay
    # the same ids under another meter and another customer are other events
    insert_raw_events(migrated_storage, make_raw_events(3, meter="tokens", quantity_nano=1))
    insert_raw_events(migrated_storage, make_raw_events(3, customer="beta", quantity_nano=2))
    totals = UsageQuery("acme", "api_calls", now_ms - 2 * month_ms, now_ms + month_ms,
                        database=db).run(migrated_storage)
    assert totals == UsageTotals(quantity_nano=300, events=3)
    # the retry's time range holds nothing: its copy is not the one that counts
    assert UsageQuery("acme", "api_calls", now_ms + HOUR_MS, now_ms + month_ms,
                      database=db).run(migrated_storage) == UsageTotals(0, 0)
    summary = UsageSummaryQuery(database=db).run(migrated_storage)
    assert [(r.customer, r.meter, r.quantity_nano, r.events) for r in summary] == [
        ("acme", "api_calls", 300, 3), ("acme", "tokens", 3, 3), ("beta", "api_calls", 6, 3)]
    rows = migrated_storage.query_rows(
        f"SELECT DISTINCT batch_id, deliveries FROM {db}.raw_events_deduplicated "
        f"WHERE meter = 'api_calls' AND customer = 'acme'")
    assert rows == [("first", 3)]
    # still exact after merges: a replay of one delivery collapses, deliveries do not
    migrated_storage.execute(f"OPTIMIZE TABLE {db}.raw_events FINAL")
    assert migrated_storage.query_rows(
        f"SELECT count() FROM {db}.raw_events WHERE customer = 'acme' AND meter = 'api_calls'"
    ) == [(6,)]
    assert UsageQuery("acme", "api_calls", now_ms - 2 * month_ms, now_ms + month_ms,
                      database=db).run(migrated_storage) == UsageTotals(300, 3)


def test_empty_batches_are_not_sent(chdb_storage: Any, make_raw_events: Any) -> None:
    # no tables exist in this database: an empty insert must not touch storage
    assert insert_raw_events(chdb_storage, make_raw_events(0)) == 0


def test_dead_letters_keep_payload_bytes(migrated_storage: Any, now_ms: int) -> None:
    rows = DeadLetterColumns(
        received_at_ms=[now_ms, now_ms + 1],
        source=["usage-events", "http"],
        source_partition=[3, -1],
        source_offset=[42, -1],
        position=[-1, 2],
        stage=["raw", "rollup"],
        batch_id=["b1", ""],
        event_id=["", "e2"],
        reason=["unknown meter 'x'", "not json"],
        payload=[b"\x00\xff\xfe", "{broken"],
    )
    assert insert_dead_letters(migrated_storage, rows) == 2
    db = migrated_storage.database
    got = migrated_storage.query_rows(
        f"SELECT received_at_ms, source, source_partition, source_offset, position, stage, "
        f"batch_id, event_id, reason, hex(payload) FROM {db}.dead_letters ORDER BY received_at_ms"
    )
    assert got == [
        (now_ms, "usage-events", 3, 42, -1, "raw", "b1", "", "unknown meter 'x'", "00FFFE"),
        (now_ms + 1, "http", -1, -1, 2, "rollup", "", "e2", "not json",
         b"{broken".hex().upper()),
    ]


def _dead_letters(n: int, **overrides: Any) -> DeadLetterColumns:
    columns: dict[str, Any] = {
        "received_at_ms": 1, "source": "usage", "source_partition": 0, "source_offset": 7,
        "position": -1, "stage": "raw", "batch_id": "", "event_id": "", "reason": "r",
        "payload": b"x",
    }
    columns.update(overrides)
    return DeadLetterColumns(**{k: v if isinstance(v, list) else [v] * n
                                for k, v in columns.items()})


def test_replayed_dead_letters_collapse_per_position_and_stage(
    migrated_storage: Any, now_ms: int
) -> None:
    rows = _dead_letters(3, received_at_ms=now_ms, position=[-1, 0, 1], stage="raw")
    insert_dead_letters(migrated_storage, rows)
    insert_dead_letters(migrated_storage, rows)  # a replay of the same record
    # the other stage rejecting the same record is a distinct dead letter
    insert_dead_letters(migrated_storage, _dead_letters(1, received_at_ms=now_ms,
                                                        stage="rollup"))
    db = migrated_storage.database
    got = migrated_storage.query_rows(
        f"SELECT stage, position FROM {db}.dead_letters FINAL ORDER BY stage, position")
    assert got == [("raw", -1), ("raw", 0), ("raw", 1), ("rollup", -1)]


def test_dead_letter_validation_collects_every_error() -> None:
    rows = _dead_letters(2, position=[0, 2**31], stage=["raw", "rating"],
                         source_offset=[1.5, 2], source_partition=[0, True])
    with pytest.raises(SinkConfigError) as info:
        rows.validate()
    joined = " ".join(info.value.errors)
    assert len(info.value.errors) == 4, joined
    for fragment in ("position", "stage", "'rating'", "source_offset", "source_partition"):
        assert fragment in joined


def test_totals_beyond_one_quantity_are_exact(migrated_storage: Any, make_raw_events: Any,
                                               now_ms: int) -> None:
    """Each event fits Decimal(38, 9), their total does not (nor Int128): old code summed
    in Decimal(38, 9) and refused the total (to_nanos' single-quantity range), so one big
    customer broke the summary of every customer."""
    big = 6 * 10**37  # nano-units
    insert_raw_events(migrated_storage, make_raw_events(3, quantity_nano=big))
    insert_raw_events(migrated_storage, make_raw_events(1, customer="small", quantity_nano=5))
    db = migrated_storage.database
    summary = UsageSummaryQuery(database=db).run(migrated_storage)
    assert {(r.customer, r.quantity_nano) for r in summary} == {("acme", 3 * big), ("small", 5)}
    assert nano_from_decimal(Decimal("180000000000000000000000000000.000000001")) == 3 * big + 1
