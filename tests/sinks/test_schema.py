from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from meterline.sinks import anomaly_ddl, billing_tables
from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.schema import (
    DAILY_ROLLUPS,
    DAILY_USAGE,
    DEAD_LETTERS,
    HOURLY_ROLLUPS,
    HOURLY_USAGE,
    LATE_EVENTS,
    LATE_EVENTS_RESTATED,
    PER_METER_FIELDS,
    RAW_EVENTS,
    RAW_EVENTS_DEDUPLICATED,
    SCHEMA_META,
    TABLES,
    VIEWS,
    RetentionPolicy,
    SchemaState,
    bootstrap_sql,
    migrate,
    plan_migration,
    read_schema_state,
    sql_string,
)

RAW_EVENTS_DDL = """\
CREATE TABLE IF NOT EXISTS meterline.raw_events
(
    event_id String COMMENT 'idempotency key; duplicates collapse',
    batch_id String COMMENT 'SDK/ingest batch the event arrived in',
    customer String,
    meter LowCardinality(String),
    quantity_nano Int128 EPHEMERAL COMMENT 'insert-only: exact quantity in 10^-9 units',
    quantity Decimal(38, 9) DEFAULT reinterpret(quantity_nano, 'Decimal128(9)'),
    timestamp_ms Int64 COMMENT 'event time, UTC milliseconds',
    event_time DateTime64(3, 'UTC') ALIAS fromUnixTimestamp64Milli(timestamp_ms, 'UTC'),
    dimensions Map(String, String),
    source LowCardinality(String) COMMENT 'topic or ingest endpoint',
    ingested_at_ms Int64 COMMENT 'write time, UTC ms',
    source_partition Int32 COMMENT 'Kafka partition of the delivery',
    source_offset Int64 COMMENT 'Kafka offset of the delivery',
    position Int32 COMMENT 'event index in the batch'
)
ENGINE = ReplacingMergeTree(ingested_at_ms)
PARTITION BY toYYYYMM(fromUnixTimestamp64Milli(timestamp_ms, 'UTC'))
PRIMARY KEY (customer, meter, timestamp_ms, event_id)
ORDER BY (customer, meter, timestamp_ms, event_id, source_partition, source_offset, position)
TTL least(toDateTime(intDiv(timestamp_ms, 1000)), toDateTime(4294967295) - toIntervalDay(35)) \
+ toIntervalDay(35)
COMMENT 'Validated usage events, one row per delivery; read through raw_events_deduplicated'"""

DEAD_LETTERS_DDL = """\
CREATE TABLE IF NOT EXISTS meterline.dead_letters
(
    received_at_ms Int64 COMMENT 'Kafka record timestamp, UTC ms',
    source LowCardinality(String) COMMENT 'topic or ingest endpoint',
    source_partition Int32 COMMENT 'Kafka partition, -1 if none',
    source_offset Int64 COMMENT 'Kafka offset, -1 if none',
    position Int32 COMMENT 'event index in the batch, -1 = whole record',
    stage LowCardinality(String) COMMENT 'raw | rollup | load: who rejected it',
    batch_id String,
    event_id String COMMENT 'empty for a whole record',
    reason String,
    payload String COMMENT 'the rejected record or event'
)
ENGINE = ReplacingMergeTree
ORDER BY (source, source_partition, source_offset, position, stage)
TTL least(toDateTime(intDiv(received_at_ms, 1000)), \
toDateTime(4294967295) - toIntervalDay(7)) + toIntervalDay(7)
COMMENT 'Records and events the pipeline could not accept, with the reason; read FINAL'"""

HOURLY_ROLLUPS_DDL = """\
CREATE TABLE IF NOT EXISTS meterline.hourly_rollups
(
    customer String,
    meter LowCardinality(String),
    group_key String COMMENT 'canonical k=v&k=v text of dimensions',
    dimensions Map(String, String) COMMENT 'the group_by dimensions',
    window_start_ms Int64 COMMENT 'UTC ms, inclusive',
    window_end_ms Int64 COMMENT 'UTC ms, exclusive',
    aggregation LowCardinality(String),
    value_nano Int128 EPHEMERAL COMMENT 'insert-only: exact window total in 10^-9 units',
    value Decimal(38, 9) DEFAULT reinterpret(value_nano, 'Decimal128(9)'),
    events UInt64 COMMENT 'events folded into value',
    version UInt64 COMMENT 'grows with every change; highest wins',
    source LowCardinality(String) COMMENT 'topic',
    source_partition Int32 COMMENT 'the one partition this row totals',
    updated_at_ms Int64 COMMENT 'write time, UTC ms'
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(fromUnixTimestamp64Milli(window_start_ms, 'UTC'))
ORDER BY (customer, meter, window_start_ms, group_key, source, source_partition)
TTL least(toDateTime(intDiv(window_start_ms, 1000)), \
toDateTime(4294967295) - toIntervalDay(400)) + toIntervalDay(400) \
DELETE WHERE meter NOT IN ('active_users', 'storage_gb'),
    least(toDateTime(intDiv(window_start_ms, 1000)), \
toDateTime(4294967295) - toIntervalDay(500)) + toIntervalDay(500) \
DELETE WHERE meter = 'active_users',
    least(toDateTime(intDiv(window_start_ms, 1000)), \
toDateTime(4294967295) - toIntervalDay(450)) + toIntervalDay(450) \
DELETE WHERE meter = 'storage_gb'
COMMENT 'hourly totals per source partition; read through hourly_usage'"""

LATE_EVENTS_DDL = """\
CREATE TABLE IF NOT EXISTS meterline.late_events
(
    source LowCardinality(String) COMMENT 'topic',
    source_partition Int32,
    source_offset Int64,
    position Int32 COMMENT 'event index in the batch',
    event_id String,
    customer String,
    meter LowCardinality(String),
    group_key String,
    dimensions Map(String, String),
    quantity_nano Int128 EPHEMERAL COMMENT 'insert-only: exact quantity in 10^-9 units',
    quantity Decimal(38, 9) DEFAULT reinterpret(quantity_nano, 'Decimal128(9)'),
    timestamp_ms Int64 COMMENT 'event time, UTC ms',
    window_start_ms Int64 COMMENT 'the hourly window it missed',
    received_at_ms Int64 COMMENT 'Kafka record timestamp, UTC ms'
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(fromUnixTimestamp64Milli(window_start_ms, 'UTC'))
ORDER BY (customer, meter, window_start_ms, event_id, source_partition, source_offset, position)
TTL least(toDateTime(intDiv(window_start_ms, 1000)), \
toDateTime(4294967295) - toIntervalDay(400)) + toIntervalDay(400)
COMMENT 'Events that arrived after their window closed, one row per delivery: in no rollup; \
read through late_events_restated'"""

# The partition-combining part of the usage views (unchanged by restatement): FINAL first,
# then one value per window key by aggregation.
HOURLY_COMBINE_SQL = """\
        toDecimal256(multiIf(aggregation = 'min', min(value),
                             aggregation = 'max', max(value),
                             aggregation = 'latest',
                             argMax(value, (source, source_partition)),
                             sum(value)), 9) AS rollup_value,
        sum(events) AS rollup_events, count() AS source_partitions,
        max(updated_at_ms) AS updated_at_ms,"""


# --------------------------------------------------------------------------- rendering


def test_raw_events_ddl_is_exact() -> None:
    assert RAW_EVENTS.create_sql("meterline", RetentionPolicy()) == RAW_EVENTS_DDL


def test_dead_letters_ddl_uses_its_own_retention() -> None:
    sql = DEAD_LETTERS.create_sql("meterline", RetentionPolicy(dead_letters_days=7))
    assert sql == DEAD_LETTERS_DDL


def test_hourly_rollups_ddl_with_per_meter_ttl_is_exact() -> None:
    policy = RetentionPolicy(meters={
        "storage_gb": {"hourly_rollups_days": 450, "raw_events_days": 90},
        "active_users": {"hourly_rollups_days": 500},
    })
    assert HOURLY_ROLLUPS.create_sql("meterline", policy) == HOURLY_ROLLUPS_DDL


def test_daily_rollups_have_the_hourly_columns_and_yearly_partitions() -> None:
    assert DAILY_ROLLUPS.columns == HOURLY_ROLLUPS.columns
    assert DAILY_ROLLUPS.order_by == HOURLY_ROLLUPS.order_by
    sql = DAILY_ROLLUPS.create_sql("meterline", RetentionPolicy())
    assert "PARTITION BY toYear(fromUnixTimestamp64Milli(window_start_ms, 'UTC'))" in sql
    assert ("TTL least(toDateTime(intDiv(window_start_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(2557)) + toIntervalDay(2557)\n") in sql


def test_rollup_sorting_key_keeps_source_partitions_apart() -> None:
    for table in (HOURLY_ROLLUPS, DAILY_ROLLUPS):
        assert table.order_by[:3] == ("customer", "meter", "window_start_ms")
        assert {"group_key", "source", "source_partition"} <= set(table.order_by)
        assert table.engine == "ReplacingMergeTree(version)"


def test_late_events_ddl_is_exact() -> None:
    assert LATE_EVENTS.create_sql("meterline", RetentionPolicy()) == LATE_EVENTS_DDL


def test_usage_views_combine_partitions_after_final() -> None:
    hourly = HOURLY_USAGE.create_sql("meterline")
    assert HOURLY_COMBINE_SQL in hourly
    assert "FROM meterline.hourly_rollups FINAL\n" in hourly
    assert "FROM meterline.late_events_restated AS l\n" in hourly
    daily = DAILY_USAGE.create_sql("meterline")
    assert daily == (hourly.replace("hourly_usage", "daily_usage")
                     .replace("hourly_rollups FINAL", "daily_rollups FINAL")
                     .replace("3600000", "86400000"))


def test_per_meter_ttl_rules_cover_every_row_once() -> None:
    policy = RetentionPolicy(meters={"storage_gb": {"raw_events_days": 90},
                                     "llm_tokens": {"hourly_rollups_days": 999}})
    assert RAW_EVENTS.ttl is not None
    assert RAW_EVENTS.ttl.expression(policy) == (
        "least(toDateTime(intDiv(timestamp_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(35)) + toIntervalDay(35) "
        "DELETE WHERE meter NOT IN ('storage_gb'),\n"
        "    least(toDateTime(intDiv(timestamp_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(90)) + toIntervalDay(90) "
        "DELETE WHERE meter = 'storage_gb'"
    )
    # other tables keep their single rule when no override names their field
    assert DEAD_LETTERS.ttl is not None and LATE_EVENTS.ttl is not None
    assert "WHERE" not in DEAD_LETTERS.ttl.expression(policy)
    assert "WHERE" not in LATE_EVENTS.ttl.expression(policy)


def test_per_meter_fields_are_the_tables_with_a_meter_column() -> None:
    with_meter = {t.ttl.retention_field for t in TABLES
                  if t.ttl is not None and any(c.name == "meter" for c in t.columns)}
    assert with_meter == set(PER_METER_FIELDS)
    for table in TABLES:
        if table.ttl is not None:
            expected = "meter" if table.ttl.retention_field in PER_METER_FIELDS else None
            assert table.ttl.meter_column == expected, table.name


def test_modify_ttl_sql() -> None:
    sql = RAW_EVENTS.modify_ttl_sql("billing", RetentionPolicy(raw_events_days=10))
    assert sql == (
        "ALTER TABLE billing.raw_events MODIFY TTL "
        "least(toDateTime(intDiv(timestamp_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(10)) + toIntervalDay(10)"
    )


def test_modify_ttl_without_ttl_is_an_error() -> None:
    with pytest.raises(SinkError):
        SCHEMA_META.modify_ttl_sql("meterline", RetentionPolicy())


def test_deduplicated_view_keeps_the_first_delivery_per_customer_meter_and_id() -> None:
    assert RAW_EVENTS_DEDUPLICATED.create_sql("meterline") == (
        "CREATE OR REPLACE VIEW meterline.raw_events_deduplicated AS\n"
        "SELECT event_id, first.1 AS batch_id, customer, meter, first.2 AS quantity,\n"
        "    first.3 AS timestamp_ms, fromUnixTimestamp64Milli(first.3, 'UTC') AS event_time,\n"
        "    first.4 AS dimensions, first.5 AS source, first.6 AS ingested_at_ms,\n"
        "    first.7 AS source_partition, first.8 AS source_offset, first.9 AS position,\n"
        "    deliveries\n"
        "FROM (\n"
        "    SELECT customer, meter, event_id,\n"
        "        argMin((batch_id, quantity, timestamp_ms, dimensions, source, ingested_at_ms, "
        "source_partition, source_offset, position),\n"
        "               (source_partition, source_offset, position)) AS first,\n"
        "        count() AS deliveries\n"
        "    FROM meterline.raw_events\n"
        "    GROUP BY customer, meter, event_id\n"
        ")"
    )


def test_added_columns_become_one_alter_that_extends_the_sorting_key() -> None:
    assert RAW_EVENTS.add_columns_sql("meterline") == (
        "ALTER TABLE meterline.raw_events\n"
        "    ADD COLUMN source_partition Int32 COMMENT 'Kafka partition of the delivery',\n"
        "    ADD COLUMN source_offset Int64 COMMENT 'Kafka offset of the delivery',\n"
        "    ADD COLUMN position Int32 COMMENT 'event index in the batch',\n"
        "    MODIFY ORDER BY (customer, meter, timestamp_ms, event_id, source_partition, "
        "source_offset, position)"
    )
    old = frozenset(c.name for c in RAW_EVENTS.columns) - set(RAW_EVENTS.added_columns)
    state = SchemaState(existing_tables=frozenset(t.name for t in TABLES),
                        columns={"raw_events": old})
    assert RAW_EVENTS.add_columns_sql("meterline") in plan_migration(
        "meterline", RetentionPolicy(), state).statements
    state = dataclasses.replace(state, columns={"raw_events": old | set(RAW_EVENTS.added_columns)})
    assert RAW_EVENTS.add_columns_sql("meterline") not in plan_migration(
        "meterline", RetentionPolicy(), state).statements


def test_bootstrap_sql() -> None:
    statements = bootstrap_sql("meterline")
    assert statements[0] == "CREATE DATABASE IF NOT EXISTS meterline"
    assert statements[1].startswith("CREATE TABLE IF NOT EXISTS meterline.schema_meta\n")
    assert "ENGINE = ReplacingMergeTree(revision)" in statements[1]


@pytest.mark.parametrize("database", ["", "1abc", "a-b", "db; DROP TABLE x", "a.b", "`x`"])
def test_database_names_must_be_plain_identifiers(database: str) -> None:
    with pytest.raises(SinkConfigError):
        RAW_EVENTS.create_sql(database, RetentionPolicy())
    with pytest.raises(SinkConfigError):
        bootstrap_sql(database)


def test_sql_string_escapes_quotes_and_backslashes() -> None:
    assert sql_string("it's a \\ test") == "'it\\'s a \\\\ test'"


def test_insert_types_cover_ephemeral_but_refuse_derived_columns() -> None:
    assert RAW_EVENTS.insert_types(["quantity_nano", "customer"]) == {
        "quantity_nano": "Int128",
        "customer": "String",
    }
    with pytest.raises(SinkError, match="ALIAS"):
        RAW_EVENTS.insert_types(["event_time"])
    with pytest.raises(SinkError, match="no column"):
        RAW_EVENTS.insert_types(["nope"])


def test_every_ttl_names_a_retention_field() -> None:
    policy = RetentionPolicy()
    for table in TABLES:
        if table.ttl is not None:
            assert policy.days_for(table.ttl.retention_field) >= 1
    for view in VIEWS:
        assert view.source in TABLES


# --------------------------------------------------------------------------- planning


def _fresh_plan(retention: RetentionPolicy | None = None) -> Any:
    return plan_migration("meterline", retention or RetentionPolicy(), SchemaState())


def _state_after(plan: Any, extra_tables: tuple[str, ...] = ()) -> SchemaState:
    names = frozenset(t.name for t in TABLES) | {SCHEMA_META.name, *extra_tables}
    return SchemaState(existing_tables=frozenset(names), meta=dict(plan.meta_updates), revision=1)


def test_plan_on_an_empty_database_creates_everything() -> None:
    plan = _fresh_plan()
    assert plan.statements == (
        RAW_EVENTS.create_sql("meterline", RetentionPolicy()),
        DEAD_LETTERS.create_sql("meterline", RetentionPolicy()),
        HOURLY_ROLLUPS.create_sql("meterline", RetentionPolicy()),
        DAILY_ROLLUPS.create_sql("meterline", RetentionPolicy()),
        LATE_EVENTS.create_sql("meterline", RetentionPolicy()),
        *(t.create_sql("meterline", RetentionPolicy()) for t in billing_tables.tables()),
        *(t.create_sql("meterline", RetentionPolicy()) for t in anomaly_ddl.tables()),
        RAW_EVENTS_DEDUPLICATED.create_sql("meterline"),
        LATE_EVENTS_RESTATED.create_sql("meterline"),
        HOURLY_USAGE.create_sql("meterline"),
        DAILY_USAGE.create_sql("meterline"),
        *(v.create_sql("meterline") for v in billing_tables.views()),
        *(v.create_sql("meterline") for v in anomaly_ddl.views()),
    )
    assert [t.name for t in billing_tables.tables()] == ["billing_events", "rated_usage"]
    assert [t.name for t in anomaly_ddl.tables()] == ["anomalies"]
    # the full TTL text is recorded, so a per-meter rule change is noticed too
    assert plan.meta_updates["ttl.raw_events"] == (
        "least(toDateTime(intDiv(timestamp_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(35)) + toIntervalDay(35)")
    assert plan.meta_updates["ttl.dead_letters"].endswith("toIntervalDay(90)")
    assert plan.meta_updates["ttl.late_events"].endswith("toIntervalDay(400)")
    assert plan.meta_updates["schema_version"] == "5"
    for view in ("raw_events_deduplicated", "hourly_usage", "daily_usage"):
        assert f"view_sha256.{view}" in plan.meta_updates


def test_plan_is_empty_once_applied() -> None:
    plan = _fresh_plan()
    again = plan_migration("meterline", RetentionPolicy(), _state_after(plan))
    assert again.empty


def test_plan_alters_only_the_ttl_that_changed() -> None:
    state = _state_after(_fresh_plan())
    plan = plan_migration("meterline", RetentionPolicy(dead_letters_days=30), state)
    assert plan.statements == (
        DEAD_LETTERS.modify_ttl_sql("meterline", RetentionPolicy(dead_letters_days=30)),
    )
    assert plan.meta_updates == {
        "ttl.dead_letters": "least(toDateTime(intDiv(received_at_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(30)) + toIntervalDay(30)"
    }


def test_plan_alters_only_the_tables_a_meter_override_touches() -> None:
    state = _state_after(_fresh_plan())
    policy = RetentionPolicy(meters={"storage_gb": {"raw_events_days": 90,
                                                    "daily_rollups_days": 3650}})
    plan = plan_migration("meterline", policy, state)
    assert plan.statements == (
        RAW_EVENTS.modify_ttl_sql("meterline", policy),
        DAILY_ROLLUPS.modify_ttl_sql("meterline", policy),
    )
    assert set(plan.meta_updates) == {"ttl.raw_events", "ttl.daily_rollups"}
    # changing only the override's days is a change too
    applied = dataclasses.replace(state, meta={**state.meta, **plan.meta_updates})
    policy2 = RetentionPolicy(meters={"storage_gb": {"raw_events_days": 91,
                                                     "daily_rollups_days": 3650}})
    plan2 = plan_migration("meterline", policy2, applied)
    assert plan2.statements == (RAW_EVENTS.modify_ttl_sql("meterline", policy2),)


def test_plan_sets_ttl_of_an_existing_table_without_a_record() -> None:
    # e.g. a previous migrate crashed between CREATE and writing meta
    state = SchemaState(existing_tables=frozenset({"raw_events", "schema_meta"}))
    plan = plan_migration("meterline", RetentionPolicy(), state)
    assert RAW_EVENTS.modify_ttl_sql("meterline", RetentionPolicy()) in plan.statements
    assert RAW_EVENTS.create_sql("meterline", RetentionPolicy()) not in plan.statements
    assert DEAD_LETTERS.create_sql("meterline", RetentionPolicy()) in plan.statements


def test_plan_recreates_a_view_whose_definition_changed() -> None:
    state = _state_after(_fresh_plan())
    meta = dict(state.meta)
    meta["view_sha256.raw_events_deduplicated"] = "old"
    plan = plan_migration("meterline", RetentionPolicy(), dataclasses.replace(state, meta=meta))
    assert plan.statements == (RAW_EVENTS_DEDUPLICATED.create_sql("meterline"),)


# --------------------------------------------------------------------------- against chDB


def _create_table_query(storage: Any, table: str) -> str:
    rows = storage.query_rows(
        "SELECT create_table_query FROM system.tables "
        "WHERE database = {db:String} AND name = {name:String}",
        {"db": storage.database, "name": table},
    )
    return str(rows[0][0])


def test_migrate_creates_tables_and_is_idempotent(chdb_storage: Any) -> None:
    first = migrate(chdb_storage)
    assert len(first.statements) == len(TABLES) + len(VIEWS) == 14  # 8 tables, 6 views
    state = read_schema_state(chdb_storage, chdb_storage.database)
    assert {t.name for t in TABLES} | {v.name for v in VIEWS} | {"schema_meta"} <= set(
        state.existing_tables
    )
    assert state.meta["schema_version"] == "5"
    second = migrate(chdb_storage)
    assert second.empty


def test_migrate_with_new_retention_alters_ttl_in_place(chdb_storage: Any) -> None:
    migrate(chdb_storage)
    assert "toIntervalDay(35)" in _create_table_query(chdb_storage, "raw_events")

    plan = migrate(chdb_storage, retention=RetentionPolicy(raw_events_days=10),
                   clock_ms=lambda: 1)  # a fixed clock must not confuse the meta ordering
    assert plan.statements == (
        RAW_EVENTS.modify_ttl_sql(chdb_storage.database, RetentionPolicy(raw_events_days=10)),
    )
    assert "toIntervalDay(10)" in _create_table_query(chdb_storage, "raw_events")
    show = chdb_storage.query_rows(f"SHOW CREATE TABLE {chdb_storage.database}.raw_events")
    assert ("TTL least(toDateTime(intDiv(timestamp_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(10)) + toIntervalDay(10)") in show[0][0]
    assert "toIntervalDay(90)" in _create_table_query(chdb_storage, "dead_letters")

    # the recorded state now matches; going back to 35 days alters again
    assert migrate(chdb_storage, retention=RetentionPolicy(raw_events_days=10),
                   clock_ms=lambda: 1).empty
    migrate(chdb_storage, retention=RetentionPolicy(raw_events_days=35), clock_ms=lambda: 1)
    assert "toIntervalDay(35)" in _create_table_query(chdb_storage, "raw_events")


def test_migrate_validates_retention_before_touching_storage(chdb_storage: Any) -> None:
    with pytest.raises(SinkConfigError):
        migrate(chdb_storage, retention=RetentionPolicy(raw_events_days=0))
    rows = chdb_storage.query_rows(
        "SELECT count() FROM system.databases WHERE name = {db:String}",
        {"db": chdb_storage.database},
    )
    assert rows == [(0,)]


# Billing records: the plan/subscription event log is the state (replayed), and rated lines
# are what invoices were built from; finance keeps both for years, not a retention window.
KEPT_FOREVER = frozenset({"billing_events", "rated_usage"})


def test_every_table_with_retention_has_its_ttl(chdb_storage: Any) -> None:
    policy = RetentionPolicy(raw_events_days=20, dead_letters_days=21, late_events_days=22,
                             hourly_rollups_days=23, daily_rollups_days=24)
    migrate(chdb_storage, retention=policy)
    for table in TABLES:
        if table.name in KEPT_FOREVER:
            assert table.ttl is None, table.name
            continue
        assert table.ttl is not None, table.name
        # ClickHouse stores the TTL as we wrote it (the saturating form included).
        assert f"TTL {table.ttl.expression(policy)}" in (
            _create_table_query(chdb_storage, table.name)), table.name


def test_migrate_applies_and_changes_per_meter_ttl_in_place(chdb_storage: Any) -> None:
    migrate(chdb_storage)
    policy = RetentionPolicy(meters={"storage_gb": {"raw_events_days": 90,
                                                    "hourly_rollups_days": 450}})
    plan = migrate(chdb_storage, retention=policy, clock_ms=lambda: 1)
    assert plan.statements == (
        RAW_EVENTS.modify_ttl_sql(chdb_storage.database, policy),
        HOURLY_ROLLUPS.modify_ttl_sql(chdb_storage.database, policy),
    )
    raw = _create_table_query(chdb_storage, "raw_events")
    # ClickHouse prints "DELETE WHERE" as "WHERE"
    assert ("least(toDateTime(intDiv(timestamp_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(35)) + toIntervalDay(35) "
            "WHERE meter NOT IN ('storage_gb')") in raw
    assert ("least(toDateTime(intDiv(timestamp_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(90)) + toIntervalDay(90) "
            "WHERE meter = 'storage_gb'") in raw
    assert "toIntervalDay(450) WHERE meter = 'storage_gb'" in (
        _create_table_query(chdb_storage, "hourly_rollups"))
    assert "WHERE" not in _create_table_query(chdb_storage, "daily_rollups").split("TTL")[1]
    assert migrate(chdb_storage, retention=policy, clock_ms=lambda: 1).empty

    # a changed override, then dropping it, alter the rules again
    policy2 = RetentionPolicy(meters={"storage_gb": {"raw_events_days": 60,
                                                     "hourly_rollups_days": 450}})
    plan = migrate(chdb_storage, retention=policy2, clock_ms=lambda: 1)
    assert plan.statements == (RAW_EVENTS.modify_ttl_sql(chdb_storage.database, policy2),)
    assert "toIntervalDay(60) WHERE meter = 'storage_gb'" in (
        _create_table_query(chdb_storage, "raw_events"))
    migrate(chdb_storage, clock_ms=lambda: 1)
    raw = _create_table_query(chdb_storage, "raw_events")
    assert ("TTL least(toDateTime(intDiv(timestamp_ms, 1000)), "
            "toDateTime(4294967295) - toIntervalDay(35)) + toIntervalDay(35) SETTINGS") in raw
    assert migrate(chdb_storage).empty


def test_per_meter_ttl_keeps_the_overridden_meter_longer(
    chdb_storage: Any, make_raw_events: Any, now_ms: int
) -> None:
    from meterline.sinks.raw_events import insert_raw_events

    migrate(chdb_storage, retention=RetentionPolicy(
        meters={"storage_gb": {"raw_events_days": 90}}))
    fifty_days_ago = now_ms - 50 * 86_400_000
    insert_raw_events(chdb_storage, make_raw_events(
        2, meter=["storage_gb", "api_calls"], timestamp_ms=fifty_days_ago))
    db = chdb_storage.database
    chdb_storage.execute(f"OPTIMIZE TABLE {db}.raw_events FINAL")
    assert chdb_storage.query_rows(f"SELECT meter FROM {db}.raw_events") == [("storage_gb",)]
