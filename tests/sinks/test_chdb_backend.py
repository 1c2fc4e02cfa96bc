from __future__ import annotations

import inspect
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("chdb")

from meterline.sinks import chdb_backend  # noqa: E402
from meterline.sinks.chdb_backend import ChdbStorage, open_engine_path  # noqa: E402
from meterline.sinks.exceptions import QueryError, SinkError, StorageOpenError  # noqa: E402
from meterline.sinks.raw_events import RAW_INSERT_SETTINGS, insert_raw_events  # noqa: E402
from meterline.sinks.schema import RAW_EVENTS  # noqa: E402
from meterline.sinks.storage import Storage  # noqa: E402


def test_is_a_storage(chdb_storage: Any) -> None:
    assert isinstance(chdb_storage, Storage)


# --------------------------------------------------------------------------- engine sharing


def test_storages_on_the_same_directory_share_the_engine(chdb_engine: Any) -> None:
    # a different spelling of the same directory is the same engine
    spelled = os.path.join(chdb_engine.data_dir, ".")
    with ChdbStorage(spelled, "other") as second:
        assert second.data_dir == chdb_engine.data_dir
        assert second.query_rows("SELECT 1") == [(1,)]
    # closing the second storage leaves the shared engine running
    assert chdb_engine.query_rows("SELECT 2") == [(2,)]
    assert open_engine_path() == chdb_engine.data_dir


def test_a_second_directory_in_the_same_process_is_refused(
    chdb_engine: Any, tmp_path: Path
) -> None:
    with pytest.raises(StorageOpenError, match="one data directory per process"):
        ChdbStorage(str(tmp_path / "elsewhere"), "x")
    assert chdb_engine.query_rows("SELECT 3") == [(3,)]


def test_closed_storage_refuses_queries(chdb_engine: Any) -> None:
    storage = ChdbStorage(chdb_engine.data_dir, "x")
    storage.close()
    storage.close()  # idempotent
    with pytest.raises(SinkError, match="closed"):
        storage.query_rows("SELECT 1")


def test_rows_variable_name_matches_the_local_read_by_chdb() -> None:
    # chDB's Python() finds the data by variable name in the calling frame.
    source = inspect.getsource(ChdbStorage.insert_columns)
    assert f"{chdb_backend._ROWS_VARIABLE} = data" in source


# --------------------------------------------------------------------------- queries


def test_query_rows_returns_exact_python_types(chdb_storage: Any) -> None:
    rows = chdb_storage.query_rows(
        "SELECT toDecimal128('0.1', 9) AS q, toInt64(-5) AS i, count() AS c, "
        "map('k', 'v') AS m, {name:String} AS s, CAST(NULL, 'Nullable(Int64)') AS n "
        "FROM numbers(1)",
        {"name": "it's"},
    )
    assert rows == [(Decimal("0.100000000"), -5, 1, {"k": "v"}, "it's", None)]
    assert isinstance(rows[0][0], Decimal)


def test_query_rows_returns_bytes_for_non_utf8_strings(chdb_storage: Any) -> None:
    rows = chdb_storage.query_rows("SELECT unhex('FF00'), 'ok'")
    assert rows == [(b"\xff\x00", "ok")]


def test_query_rows_refuses_wide_integers_instead_of_returning_bytes(chdb_storage: Any) -> None:
    with pytest.raises(QueryError, match="toString"):
        chdb_storage.query_rows("SELECT toInt128(5) AS w")
    assert chdb_storage.query_rows("SELECT toFixedString('ab', 2)") == [("ab",)]


def test_query_rows_empty_result(chdb_storage: Any) -> None:
    assert chdb_storage.query_rows("SELECT 1 WHERE 0") == []


def test_errors_name_the_statement(chdb_storage: Any) -> None:
    with pytest.raises(QueryError) as info:
        chdb_storage.execute("SELECT * FROM no_such_db.no_such_table")
    assert "no_such_table" in info.value.sql


# --------------------------------------------------------------------------- inserts


def _create_probe_table(storage: Any) -> str:
    db = storage.database
    storage.execute(f"CREATE DATABASE IF NOT EXISTS {db}")
    storage.execute(
        f"CREATE TABLE {db}.probe (i Int64, w Int128, s String, lc LowCardinality(String), "
        "m Map(String, String)) ENGINE = MergeTree ORDER BY i"
    )
    return f"{db}.probe"


PROBE_TYPES = {
    "i": "Int64",
    "w": "Int128",
    "s": "String",
    "lc": "LowCardinality(String)",
    "m": "Map(String, String)",
}


def test_insert_columns_round_trips_every_supported_type(chdb_storage: Any) -> None:
    table = _create_probe_table(chdb_storage)
    chdb_storage.insert_columns(
        table,
        {
            "i": [1, 2, 3],
            "w": [10**38 - 1, -(2**63) - 1, 0],  # beyond Int64: goes as decimal text
            "s": [b"\xff\x00", "plain", b"bytes"],  # bytes column: hex on the way in
            "lc": ["a", "b", "a"],
            "m": [{"k": "v", "quote": "it's \"x\""}, {}, {"n": "1"}],
        },
        PROBE_TYPES,
    )
    rows = chdb_storage.query_rows(
        f"SELECT i, reinterpret(w, 'Decimal128(0)'), s, lc, m FROM {table} ORDER BY i"
    )
    assert rows == [
        (1, Decimal(10**38 - 1), b"\xff\x00", "a", {"k": "v", "quote": "it's \"x\""}),
        (2, Decimal(-(2**63) - 1), "plain", "b", {}),
        (3, Decimal(0), "bytes", "a", {"n": "1"}),
    ]


def test_insert_columns_refuses_floats_in_integer_columns(chdb_storage: Any) -> None:
    table = _create_probe_table(chdb_storage)
    columns = {"i": [1.5], "w": [1], "s": ["x"], "lc": ["x"], "m": [{}]}
    with pytest.raises(SinkError, match="needs int values"):
        chdb_storage.insert_columns(table, columns, PROBE_TYPES)
    # a float after an int is refused by chDB itself (it types a column by its first value)
    columns = {"i": [1, 2.5], "w": [1, 1], "s": ["x", "y"], "lc": ["x", "y"], "m": [{}, {}]}
    with pytest.raises(QueryError):
        chdb_storage.insert_columns(table, columns, PROBE_TYPES)
    assert chdb_storage.query_rows(f"SELECT count() FROM {table}") == [(0,)]


@pytest.mark.parametrize(
    ("columns", "types", "message"),
    [
        ({}, {}, "at least one column"),
        ({"i": [1]}, {"j": "Int64"}, "differ"),
        ({"i": [1], "s": []}, {"i": "Int64", "s": "String"}, "different lengths"),
        ({"i": [1]}, {"i": "Float64"}, "not supported"),
        ({"m": ["x"]}, {"m": "Map(String, String)"}, "dict"),
    ],
)
def test_insert_columns_argument_errors(
    chdb_storage: Any, columns: dict[str, list[Any]], types: dict[str, str], message: str
) -> None:
    with pytest.raises(SinkError, match=message):
        chdb_storage.insert_columns(f"{chdb_storage.database}.t", columns, types)


def test_insert_columns_needs_a_qualified_table(chdb_storage: Any) -> None:
    with pytest.raises(SinkError):
        chdb_storage.insert_columns("probe", {"i": [1]}, {"i": "Int64"})


def test_empty_insert_is_a_no_op(chdb_storage: Any) -> None:
    # the table does not even exist: nothing is sent
    chdb_storage.insert_columns(f"{chdb_storage.database}.missing", {"i": []}, {"i": "Int64"})


# --------------------------------------------------------------------------- exactness


def test_ten_million_tenths_sum_exactly_in_sql(migrated_storage: Any) -> None:
    """The server-side conversion used for inserts, over 10**7 rows of 0.1 (100_000_000 nano)."""
    rows = migrated_storage.query_rows(
        "SELECT sum(reinterpret(toInt128(100000000), 'Decimal128(9)')) AS total, "
        "toTypeName(total) FROM numbers(10000000)"
    )
    assert rows == [(Decimal("1000000"), "Decimal(38, 9)")]


def test_many_tenths_through_the_table_default(migrated_storage: Any, now_ms: int) -> None:
    # Exercises the EPHEMERAL quantity_nano -> DEFAULT quantity path of the real table.
    # 1,000,000 rows in make test; METERLINE_EXACTNESS_EVENTS=10000000 for the full size.
    n = int(os.environ.get("METERLINE_EXACTNESS_EVENTS", 1_000_000)) // 10 * 10
    db = migrated_storage.database
    migrated_storage.execute(
        f"INSERT INTO {db}.raw_events (event_id, batch_id, customer, meter, quantity_nano, "
        "timestamp_ms, dimensions, source, ingested_at_ms) "
        "SELECT toString(number), 'b', 'acme', 'tokens', 100000000, "
        "{now:Int64} + intDiv(number, 1000), map(), 'sql', {now:Int64} "
        "FROM numbers({n:UInt64})",
        {"now": now_ms, "n": n},
    )
    rows = migrated_storage.query_rows(
        f"SELECT sum(quantity), count() FROM {db}.raw_events_deduplicated"
    )
    assert rows == [(Decimal(n // 10), n)]


def test_one_million_python_rows_sum_exactly(migrated_storage: Any, make_raw_events: Any) -> None:
    n = 1_000_000
    rows = make_raw_events(n, customer=[f"c{i % 100}" for i in range(n)])
    assert insert_raw_events(migrated_storage, rows) == n
    db = migrated_storage.database
    total = migrated_storage.query_rows(
        f"SELECT sum(quantity), count(), toTypeName(sum(quantity)) FROM {db}.raw_events"
    )
    assert total == [(Decimal("100000"), n, "Decimal(38, 9)")]


def test_insert_settings_are_applied(
    migrated_storage: Any, make_raw_events: Any, now_ms: int
) -> None:
    # With optimize_on_insert=0 duplicates inside one insert survive until a merge;
    # FINAL (the view) still counts them once.
    rows = make_raw_events(2, event_id="same", timestamp_ms=now_ms)
    migrated_storage.insert_columns(
        RAW_EVENTS.qualified(migrated_storage.database),
        rows.as_columns(),
        RAW_EVENTS.insert_types(rows.as_columns()),
        RAW_INSERT_SETTINGS,
    )
    db = migrated_storage.database
    assert migrated_storage.query_rows(f"SELECT count() FROM {db}.raw_events") == [(2,)]
    assert migrated_storage.query_rows(
        f"SELECT count() FROM {db}.raw_events_deduplicated"
    ) == [(1,)]
