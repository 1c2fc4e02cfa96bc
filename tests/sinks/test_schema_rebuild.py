"""A table whose sorting key changed is rebuilt by ``migrate`` with its rows kept.

late_events was keyed by the event alone up to schema 4; schema 5 adds the delivery (log
position) to its key. ClickHouse cannot extend a key with existing columns, so migrate
copies the table into one with the new key and swaps them (sinks/ddl.py Table.rebuild_sql).
The old table here is created from the schema-4 DDL text written out in full, not from
the code under test.
"""

from __future__ import annotations

from typing import Any

from meterline.sinks.retention import RetentionPolicy
from meterline.sinks.schema import LATE_EVENTS, migrate, read_schema_state

HOUR_MS = 3_600_000
NEW_KEY = ("customer", "meter", "window_start_ms", "event_id", "source_partition",
           "source_offset", "position")

SCHEMA_4_LATE_EVENTS = """\
CREATE TABLE {db}.late_events
(
    source LowCardinality(String), source_partition Int32, source_offset Int64,
    position Int32, event_id String, customer String, meter LowCardinality(String),
    group_key String, dimensions Map(String, String),
    quantity_nano Int128 EPHEMERAL,
    quantity Decimal(38, 9) DEFAULT reinterpret(quantity_nano, 'Decimal128(9)'),
    timestamp_ms Int64, window_start_ms Int64, received_at_ms Int64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(fromUnixTimestamp64Milli(window_start_ms, 'UTC'))
ORDER BY (customer, meter, window_start_ms, event_id)"""


def _insert(storage: Any, table: str, event_id: str, offset: int, window_ms: int) -> None:
    storage.execute(
        f"INSERT INTO {storage.database}.{table} (source, source_partition, source_offset, "
        "position, event_id, customer, meter, group_key, dimensions, quantity, timestamp_ms, "
        f"window_start_ms, received_at_ms) VALUES ('usage', 0, {offset}, 0, '{event_id}', "
        f"'acme', 'api_calls', '', map(), 1.5, {window_ms + 7}, {window_ms}, "
        f"{window_ms + 3 * HOUR_MS})")


def _rows(storage: Any, table: str = "late_events") -> list[tuple[str, int]]:
    rows = storage.query_rows(f"SELECT event_id, source_offset FROM {storage.database}.{table} "
                              "ORDER BY event_id, source_offset")
    return [(str(e), int(o)) for e, o in rows]


def _old_database(storage: Any, window_ms: int) -> None:
    """A schema-4 database: every table migrate makes, but late_events with the old key
    and two deliveries of one event (separate inserts, not yet merged) plus another."""
    storage.execute(f"CREATE DATABASE IF NOT EXISTS {storage.database}")
    storage.execute(SCHEMA_4_LATE_EVENTS.format(db=storage.database))
    for event_id, offset in (("x", 10), ("x", 20), ("y", 30)):
        _insert(storage, "late_events", event_id, offset, window_ms)


def test_an_old_key_is_rebuilt_keeping_every_row_and_a_second_run_does_nothing(
    chdb_storage: Any, now_ms: int
) -> None:
    window = now_ms - now_ms % HOUR_MS - 5 * HOUR_MS
    _old_database(chdb_storage, window)
    before = _rows(chdb_storage)

    plan = migrate(chdb_storage)
    assert any(s.startswith("EXCHANGE TABLES") for s in plan.statements)
    state = read_schema_state(chdb_storage, chdb_storage.database)
    assert state.sorting_keys["late_events"] == NEW_KEY
    assert "late_events__rebuild" not in state.existing_tables
    assert sorted(set(_rows(chdb_storage))) == sorted(set(before))
    # Both deliveries of "x" survive a merge now.
    chdb_storage.execute(f"OPTIMIZE TABLE {chdb_storage.database}.late_events FINAL")
    assert _rows(chdb_storage) == [("x", 10), ("x", 20), ("y", 30)]
    assert migrate(chdb_storage).empty


def test_a_rebuild_that_crashed_after_its_swap_is_finished_with_late_writes_kept(
    chdb_storage: Any, now_ms: int
) -> None:
    window = now_ms - now_ms % HOUR_MS - 5 * HOUR_MS
    _old_database(chdb_storage, window)
    statements = LATE_EVENTS.rebuild_sql(chdb_storage.database, RetentionPolicy())
    swap = next(i for i, s in enumerate(statements) if s.startswith("EXCHANGE TABLES"))
    for sql in statements[:swap + 1]:  # ... and then the process died
        chdb_storage.execute(sql)
    # A loader still writing to the old table (now under the rebuild name) meanwhile.
    _insert(chdb_storage, "late_events__rebuild", "z", 40, window)

    plan = migrate(chdb_storage)
    assert not any(s.startswith("EXCHANGE TABLES") for s in plan.statements)
    state = read_schema_state(chdb_storage, chdb_storage.database)
    assert "late_events__rebuild" not in state.existing_tables
    chdb_storage.execute(f"OPTIMIZE TABLE {chdb_storage.database}.late_events FINAL")
    assert _rows(chdb_storage) == [("x", 10), ("x", 20), ("y", 30), ("z", 40)]
    assert migrate(chdb_storage).empty
