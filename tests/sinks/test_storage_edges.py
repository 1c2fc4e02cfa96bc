"""Storage edges of issue 8 on chDB: what the TTL deletes, inserts across many partitions,
and upgrading a raw_events table created by the previous schema.

Ground truth here is ClickHouse itself (which rows survive ``OPTIMIZE ... FINAL``), never
the Python twin of the rule under test.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from meterline.core.events import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS
from meterline.core.outputs import Flush, LateRecord, RollupRecord
from meterline.sinks.raw_events import (
    RawEventColumns,
    UsageQuery,
    UsageTotals,
    insert_raw_events,
)
from meterline.sinks.retention import RETENTION_MARGIN_MS, RetentionPolicy
from meterline.sinks.rollups import LateEventsQuery, RollupTotalsQuery, write_flush
from meterline.sinks.schema import RAW_EVENTS, migrate

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


def _raw(ts: list[int], now_ms: int, ids: list[str] | None = None) -> RawEventColumns:
    n = len(ts)
    return RawEventColumns(
        event_id=ids or [f"e{i}" for i in range(n)], batch_id=["b"] * n, customer=["c"] * n,
        meter=["api_calls"] * n, quantity_nano=[10**9] * n, timestamp_ms=ts,
        dimensions=[{}] * n, source=[""] * n, ingested_at_ms=[now_ms] * n,
        source_partition=[0] * n, source_offset=list(range(n)), position=[0] * n)


def test_accepted_time_range_is_what_datetime_holds() -> None:
    # Independent truth: the UTC calendar. DateTime is UInt32 seconds from 1970.
    assert int(datetime(2106, 2, 7, 6, 28, 16, tzinfo=UTC).timestamp()) * 1000 == MAX_TIMESTAMP_MS
    assert int(datetime(2000, 1, 1, tzinfo=UTC).timestamp()) * 1000 == MIN_TIMESTAMP_MS


def test_ttl_keeps_what_the_loader_accepts_and_deletes_what_it_refuses(
        chdb_storage: Any, now_ms: int) -> None:
    """Old TTL ``toDateTime(intDiv(ms, 1000)) + toIntervalDay(d)`` wrapped past 2106 and
    deleted such rows at once; old MAX_TIMESTAMP_MS (2200) accepted them."""
    policy = RetentionPolicy(raw_events_days=2000, hourly_rollups_days=2000,
                             daily_rollups_days=3000, late_events_days=2000)
    migrate(chdb_storage, retention=policy)
    ts = [now_ms, MAX_TIMESTAMP_MS - 1, MAX_TIMESTAMP_MS - 100 * DAY_MS,
          now_ms - 1999 * DAY_MS, now_ms - 2001 * DAY_MS, MIN_TIMESTAMP_MS]
    insert_raw_events(chdb_storage, _raw(ts, now_ms))
    db = chdb_storage.database
    chdb_storage.execute(f"OPTIMIZE TABLE {db}.raw_events FINAL")
    kept = {str(r[0]) for r in chdb_storage.query_rows(f"SELECT event_id FROM {db}.raw_events")}
    assert kept == {"e0", "e1", "e2", "e3"}  # the far future is kept, not wrapped to 1970
    # The loader's twin of the rule agrees with ClickHouse on every row.
    horizon = now_ms + RETENTION_MARGIN_MS
    twin = {f"e{i}" for i, t in enumerate(ts)
            if policy.expires_at_ms("raw_events_days", t) > horizon}
    assert twin == kept


def test_inserts_spanning_more_partitions_than_one_insert_may_are_split(
        chdb_storage: Any, now_ms: int) -> None:
    """ClickHouse refuses an INSERT block touching > 100 partitions; old code sent one."""
    migrate(chdb_storage, retention=RetentionPolicy(
        raw_events_days=40_000, late_events_days=40_000, hourly_rollups_days=40_000,
        daily_rollups_days=40_000))
    db = chdb_storage.database
    start = datetime(2000, 1, 15, tzinfo=UTC)
    months = [int(start.replace(year=2000 + m // 12, month=m % 12 + 1).timestamp()) * 1000
              for m in range(150)]  # 150 months: raw_events/late_events partitions
    insert_raw_events(chdb_storage, _raw(months, now_ms))
    assert UsageQuery("c", "api_calls", MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS,
                      database=db).run(chdb_storage) == UsageTotals(150 * 10**9, 150)
    years = [int(datetime(2000 + y, 3, 1, tzinfo=UTC).timestamp()) * 1000
             for y in range(105)]  # 105 years: daily_rollups partitions
    rollups = [RollupRecord("daily", "c", "m", (), t, t + DAY_MS, "sum", 5, 1, 1, "usage", 0)
               for t in years]
    rollups += [RollupRecord("hourly", "c", "m", (), t, t + HOUR_MS, "sum", 5, 1, 1, "usage", 0)
                for t in months]
    late = [LateRecord("usage", 0, i, 0, f"l{i}", "c", "m", (), 3, t, t, now_ms)
            for i, t in enumerate(months)]
    counts = write_flush(chdb_storage, Flush(rollups=rollups, late=late),
                         retention=RetentionPolicy(raw_events_days=40_000,
                                                   late_events_days=40_000,
                                                   hourly_rollups_days=40_000,
                                                   daily_rollups_days=40_000))
    assert (counts.daily, counts.hourly, counts.late, counts.refused) == (105, 150, 150, 0)
    assert sum(RollupTotalsQuery("day", database=db).run(chdb_storage).values()) == 105 * 5
    assert sum(RollupTotalsQuery("hour", database=db).run(chdb_storage).values()) == 150 * 5
    late_totals = LateEventsQuery(database=db).run(chdb_storage)[("c", "m")]
    assert (late_totals.events, late_totals.quantity_nanos) == (150, 450)


def test_rows_past_retention_become_dead_letters_not_silent_deletions(
        migrated_storage: Any, now_ms: int) -> None:
    db = migrated_storage.database
    hour = now_ms - now_ms % HOUR_MS
    old_hour = hour - 500 * DAY_MS  # past hourly (400 d) and late (400 d) retention
    flush = Flush(
        rollups=[RollupRecord("hourly", "c", "m", (), old_hour, old_hour + HOUR_MS, "sum", 5,
                              1, 1, "usage", 0),
                 RollupRecord("hourly", "c", "m", (), hour, hour + HOUR_MS, "sum", 7, 1, 1,
                              "usage", 0)],
        late=[LateRecord("usage", 0, 3, 1, "old", "c", "m", (), 9, old_hour + 1, old_hour,
                         now_ms)])
    counts = write_flush(migrated_storage, flush)
    assert (counts.hourly, counts.late, counts.refused) == (1, 0, 2)
    assert counts.refused_by_reason == {"load.outside_retention": 1,
                                        "event.outside_retention": 1}
    rows = migrated_storage.query_rows(
        f"SELECT stage, source_offset, position, event_id, reason FROM {db}.dead_letters FINAL "
        "ORDER BY source_offset")
    assert [(r[0], r[1]) for r in rows] == [("load", -1), ("load", 3)]
    assert rows[1][2:4] == (1, "old") and rows[1][4] == "event.outside_retention"


OLD_RAW_EVENTS_DDL = """\
CREATE TABLE {db}.raw_events
(
    event_id String, batch_id String, customer String, meter LowCardinality(String),
    quantity_nano Int128 EPHEMERAL,
    quantity Decimal(38, 9) DEFAULT reinterpret(quantity_nano, 'Decimal128(9)'),
    timestamp_ms Int64,
    event_time DateTime64(3, 'UTC') ALIAS fromUnixTimestamp64Milli(timestamp_ms, 'UTC'),
    dimensions Map(String, String), source LowCardinality(String), ingested_at_ms Int64
)
ENGINE = ReplacingMergeTree(ingested_at_ms)
PARTITION BY toYYYYMM(fromUnixTimestamp64Milli(timestamp_ms, 'UTC'))
ORDER BY (customer, meter, timestamp_ms, event_id)
TTL toDateTime(intDiv(timestamp_ms, 1000)) + toIntervalDay(35)"""


def test_migrate_upgrades_a_raw_events_table_of_the_previous_schema(
        chdb_storage: Any, now_ms: int) -> None:
    db = chdb_storage.database
    chdb_storage.execute(f"CREATE DATABASE {db}")
    chdb_storage.execute(OLD_RAW_EVENTS_DDL.format(db=db))
    chdb_storage.execute(
        f"INSERT INTO {db}.raw_events (event_id, batch_id, customer, meter, quantity_nano, "
        f"timestamp_ms, dimensions, source, ingested_at_ms) VALUES "
        f"('old', 'b0', 'c', 'api_calls', 5, {now_ms}, map(), '', {now_ms})")
    plan = migrate(chdb_storage)
    assert RAW_EVENTS.add_columns_sql(db) in plan.statements
    (sorting_key,) = chdb_storage.query_rows(
        "SELECT sorting_key FROM system.tables WHERE database = {db:String} "
        "AND name = 'raw_events'", {"db": db})[0]
    assert sorting_key == ", ".join(RAW_EVENTS.order_by)
    assert migrate(chdb_storage).empty  # done once, and recorded
    insert_raw_events(chdb_storage, _raw([now_ms + 1], now_ms, ids=["new"]))
    assert UsageQuery("c", "api_calls", now_ms, now_ms + 2, database=db).run(
        chdb_storage) == UsageTotals(10**9 + 5, 2)
