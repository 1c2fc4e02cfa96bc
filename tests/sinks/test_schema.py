from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.schema import (
    DEAD_LETTERS,
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
    ingested_at_ms Int64 COMMENT 'write time, UTC ms; last delivery wins'
)
ENGINE = ReplacingMergeTree(ingested_at_ms)
PARTITION BY toYYYYMM(fromUnixTimestamp64Milli(timestamp_ms, 'UTC'))
ORDER BY (customer, meter, timestamp_ms, event_id)
TTL toDateTime(intDiv(timestamp_ms, 1000)) + toIntervalDay(35)
COMMENT 'Validated usage events; read through raw_events_deduplicated'"""

DEAD_LETTERS_DDL = """\
CREATE TABLE IF NOT EXISTS meterline.dead_letters
(
    received_at_ms Int64,
    source LowCardinality(String) COMMENT 'topic or ingest endpoint',
    source_partition Int32 COMMENT 'Kafka partition, -1 if none',
    source_offset Int64 COMMENT 'Kafka offset, -1 if none',
    batch_id String,
    reason String,
    payload String COMMENT 'the rejected record, byte for byte'
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(fromUnixTimestamp64Milli(received_at_ms, 'UTC'))
ORDER BY (received_at_ms, source)
TTL toDateTime(intDiv(received_at_ms, 1000)) + toIntervalDay(7)
COMMENT 'Records the pipeline could not accept, with the reason'"""


# --------------------------------------------------------------------------- rendering


def test_raw_events_ddl_is_exact() -> None:
    assert RAW_EVENTS.create_sql("meterline", RetentionPolicy()) == RAW_EVENTS_DDL


def test_dead_letters_ddl_uses_its_own_retention() -> None:
    sql = DEAD_LETTERS.create_sql("meterline", RetentionPolicy(dead_letters_days=7))
    assert sql == DEAD_LETTERS_DDL


def test_modify_ttl_sql() -> None:
    sql = RAW_EVENTS.modify_ttl_sql("billing", RetentionPolicy(raw_events_days=10))
    assert sql == (
        "ALTER TABLE billing.raw_events MODIFY TTL "
        "toDateTime(intDiv(timestamp_ms, 1000)) + toIntervalDay(10)"
    )


def test_modify_ttl_without_ttl_is_an_error() -> None:
    with pytest.raises(SinkError):
        SCHEMA_META.modify_ttl_sql("meterline", RetentionPolicy())


def test_deduplicated_view_sql_hides_final() -> None:
    assert RAW_EVENTS_DEDUPLICATED.create_sql("meterline") == (
        "CREATE OR REPLACE VIEW meterline.raw_events_deduplicated AS\n"
        "SELECT event_id, batch_id, customer, meter, quantity, timestamp_ms, event_time, "
        "dimensions, source, ingested_at_ms\n"
        "FROM meterline.raw_events FINAL"
    )


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


# --------------------------------------------------------------------------- retention


def test_retention_defaults() -> None:
    policy = RetentionPolicy()
    policy.validate()
    assert (policy.raw_events_days, policy.dead_letters_days) == (35, 90)
    assert (policy.hourly_rollups_days, policy.daily_rollups_days) == (400, 2557)


def _untyped(value: Any) -> Any:
    """Lets a test pass a wrongly typed value, as a config file could."""
    return value


def test_retention_validate_collects_every_error() -> None:
    policy = RetentionPolicy(
        raw_events_days=0,
        dead_letters_days=-1,
        hourly_rollups_days=_untyped(1.5),
        daily_rollups_days=_untyped(True),
    )
    with pytest.raises(SinkConfigError) as info:
        policy.validate()
    assert len(info.value.errors) == 4
    joined = " ".join(info.value.errors)
    for name in ("raw_events_days", "dead_letters_days", "hourly_rollups_days",
                 "daily_rollups_days"):
        assert name in joined


def test_retention_rejects_rollups_shorter_than_their_source() -> None:
    policy = RetentionPolicy(raw_events_days=500, hourly_rollups_days=400,
                             daily_rollups_days=300)
    with pytest.raises(SinkConfigError) as info:
        policy.validate()
    assert len(info.value.errors) == 2


def test_days_for_unknown_field() -> None:
    with pytest.raises(SinkError):
        RetentionPolicy().days_for("validate")


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
        RAW_EVENTS_DEDUPLICATED.create_sql("meterline"),
    )
    assert plan.meta_updates["ttl_days.raw_events"] == "35"
    assert plan.meta_updates["ttl_days.dead_letters"] == "90"
    assert plan.meta_updates["schema_version"] == "1"
    assert "view_sha256.raw_events_deduplicated" in plan.meta_updates


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
    assert plan.meta_updates == {"ttl_days.dead_letters": "30"}


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
    assert len(first.statements) == 3
    state = read_schema_state(chdb_storage, chdb_storage.database)
    assert {"raw_events", "dead_letters", "schema_meta", "raw_events_deduplicated"} <= set(
        state.existing_tables
    )
    assert state.meta["schema_version"] == "1"
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
    assert "TTL toDateTime(intDiv(timestamp_ms, 1000)) + toIntervalDay(10)" in show[0][0]
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
