"""ServerStorage tests. No ClickHouse server exists here, so:

* unit tests inject a fake client and check the exact calls (and that the keyword
  arguments exist in clickhouse-connect's real ``Client`` methods);
* parity tests run ServerStorage over clickhouse-connect's in-process chDB transport
  (``get_client(interface="chdb")``): the same client API, parameter binding and Native
  insert encoding as over HTTP, against a real engine. NOT verified against a real server.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from meterline.sinks.exceptions import QueryError, StorageOpenError
from meterline.sinks.raw_events import UsageQuery, UsageSummaryQuery, insert_raw_events
from meterline.sinks.schema import TABLES, VIEWS, migrate
from meterline.sinks.server_backend import ServerStorage, client_kwargs_from_url
from meterline.sinks.storage import Storage

clickhouse_connect = pytest.importorskip("clickhouse_connect")
from clickhouse_connect.driver.client import Client  # noqa: E402


class FakeResult:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.result_rows = rows


class FakeClient:
    """Records calls; answers every query with ``rows`` (a fresh, empty database)."""

    def __init__(self, rows: list[tuple[Any, ...]] | None = None,
                 fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.rows = rows or []
        self.fail = fail
        self.closed = 0

    def _record(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # The kwargs we use must exist in the real client API.
        inspect.signature(getattr(Client, method)).bind(None, *args, **kwargs)
        self.calls.append((method, args, kwargs))
        if self.fail is not None:
            raise self.fail

    def command(self, *args: Any, **kwargs: Any) -> str:
        self._record("command", args, kwargs)
        return ""

    def query(self, *args: Any, **kwargs: Any) -> FakeResult:
        self._record("query", args, kwargs)
        return FakeResult(self.rows)

    def insert(self, *args: Any, **kwargs: Any) -> None:
        self._record("insert", args, kwargs)

    def close(self) -> None:
        self.closed += 1

    def commands(self) -> list[str]:
        return [args[0] for method, args, _ in self.calls if method == "command"]


# --------------------------------------------------------------------------- fake client


def test_is_a_storage() -> None:
    assert isinstance(ServerStorage(FakeClient()), Storage)


def test_execute_sends_the_statement_unchanged() -> None:
    client = FakeClient()
    ServerStorage(client).execute("CREATE DATABASE IF NOT EXISTS x")
    assert client.calls == [("command", ("CREATE DATABASE IF NOT EXISTS x",),
                             {"parameters": None})]


def test_query_rows_binds_parameters_server_side_and_returns_tuples() -> None:
    client = FakeClient(rows=[["a", 1]])  # type: ignore[list-item]
    sql, params = UsageQuery("acme", "api_calls", 1, 2, database="db1").to_sql()
    rows = ServerStorage(client, "db1").query_rows(sql, params)
    assert rows == [("a", 1)]
    assert client.calls == [("query", (sql,), {"parameters": params})]


def test_insert_raw_events_is_one_column_oriented_native_insert(make_raw_events: Any) -> None:
    client = FakeClient()
    rows = make_raw_events(3)
    insert_raw_events(ServerStorage(client, "db1"), rows)
    [(method, args, kwargs)] = client.calls
    assert (method, args) == ("insert", ())
    assert kwargs == {
        "table": "raw_events",
        "database": "db1",
        "data": list(rows.as_columns().values()),
        "column_names": ["event_id", "batch_id", "customer", "meter", "quantity_nano",
                         "timestamp_ms", "dimensions", "source", "ingested_at_ms",
                         "source_partition", "source_offset", "position"],
        "column_type_names": ["String", "String", "String", "LowCardinality(String)", "Int128",
                              "Int64", "Map(String, String)", "LowCardinality(String)",
                              "Int64", "Int32", "Int64", "Int32"],
        "column_oriented": True,
        "settings": {"optimize_on_insert": 0},
    }


def test_migrate_issues_the_same_sql_as_chdb(chdb_storage: Any) -> None:
    class Recording:
        """Records what migrate() asks of the chDB storage."""

        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.database = inner.database
            self.executed: list[str] = []

        def execute(self, sql: str, params: Any = None) -> None:
            self.executed.append(sql)
            self.inner.execute(sql, params)

        def query_rows(self, sql: str, params: Any = None) -> Any:
            return self.inner.query_rows(sql, params)

        def insert_columns(self, *args: Any) -> None:
            self.inner.insert_columns(*args)

        def close(self) -> None:
            self.inner.close()

    recording = Recording(chdb_storage)
    migrate(recording, clock_ms=lambda: 1)
    client = FakeClient()
    migrate(ServerStorage(client, chdb_storage.database), clock_ms=lambda: 1)
    assert client.commands() == recording.executed
    # database, schema_meta, then every table and view
    assert len(recording.executed) == 2 + len(TABLES) + len(VIEWS)
    [insert] = [kwargs for method, _, kwargs in client.calls if method == "insert"]
    assert (insert["database"], insert["table"]) == (chdb_storage.database, "schema_meta")


def test_client_errors_become_query_errors() -> None:
    storage = ServerStorage(FakeClient(fail=RuntimeError("Code: 60. Unknown table")))
    with pytest.raises(QueryError, match="Unknown table"):
        storage.execute("DROP TABLE x.y")
    with pytest.raises(QueryError) as info:
        storage.query_rows("SELECT 1")
    assert info.value.sql == "SELECT 1"
    with pytest.raises(QueryError):
        storage.insert_columns("x.y", {"a": [1]}, {"a": "Int64"})


def test_empty_insert_sends_nothing() -> None:
    client = FakeClient()
    ServerStorage(client).insert_columns("x.y", {"a": []}, {"a": "Int64"})
    assert client.calls == []


def test_close_is_idempotent() -> None:
    client = FakeClient()
    storage = ServerStorage(client)
    storage.close()
    storage.close()
    assert client.closed == 1


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://host:8123/db", {"interface": "http", "host": "host", "port": 8123}),
        ("https://u:p%40ss@ch.example.com/db",
         {"interface": "https", "host": "ch.example.com", "port": 8443, "username": "u",
          "password": "p@ss"}),
        ("http://u@localhost", {"interface": "http", "host": "localhost", "port": 8123,
                                "username": "u"}),
    ],
)
def test_client_kwargs_from_url(url: str, expected: dict[str, Any]) -> None:
    assert client_kwargs_from_url(url) == expected


def test_connect_builds_the_client_from_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_get_client(**kwargs: Any) -> FakeClient:
        seen.update(kwargs)
        return FakeClient()

    monkeypatch.setattr(clickhouse_connect, "get_client", fake_get_client)
    storage = ServerStorage.connect("http://user:pw@db.internal:8123/billing", "billing")
    assert storage.database == "billing"
    assert seen == {"interface": "http", "host": "db.internal", "port": 8123,
                    "username": "user", "password": "pw"}


def test_connect_failure_names_the_host_not_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(**kwargs: Any) -> None:
        raise OSError("connection refused")

    monkeypatch.setattr(clickhouse_connect, "get_client", refuse)
    with pytest.raises(StorageOpenError) as info:
        ServerStorage.connect("http://user:secret@db.internal:8123", "x")
    assert "db.internal" in str(info.value)
    assert "secret" not in str(info.value)


# --------------------------------------------------------------------------- parity on chDB


@pytest.fixture
def server_over_chdb(chdb_engine: Any) -> Iterator[ServerStorage]:
    database = f"srv_{uuid.uuid4().hex[:12]}"
    client = clickhouse_connect.get_client(interface="chdb", path=chdb_engine.data_dir)
    storage = ServerStorage(client, database)
    yield storage
    storage.execute(f"DROP DATABASE IF EXISTS {database} SYNC")
    storage.close()


def test_server_storage_round_trip_matches_chdb_storage(
    server_over_chdb: ServerStorage, chdb_engine: Any, make_raw_events: Any, now_ms: int
) -> None:
    storage = server_over_chdb
    db = storage.database
    assert len(migrate(storage).statements) == len(TABLES) + len(VIEWS)
    assert migrate(storage).empty
    rows = make_raw_events(
        4,
        event_id=["a", "a", "b", "c"],  # "a" delivered twice
        quantity_nano=[100_000_000, 100_000_000, 10**38 - 10**30, 7],
        timestamp_ms=now_ms,
        dimensions=[{"k": "v"}, {"k": "v"}, {}, {"x": "y"}],
    )
    insert_raw_events(storage, rows)
    query = UsageQuery("acme", "api_calls", now_ms, now_ms + 1, database=db)
    via_server = query.run(storage)
    via_chdb = query.run(chdb_engine)
    assert via_server == via_chdb
    assert via_server.quantity_nano == 100_000_000 + 10**38 - 10**30 + 7
    assert via_server.events == 3
    summary = UsageSummaryQuery(database=db)
    assert summary.run(storage) == summary.run(chdb_engine)
    sql = f"SELECT event_id, quantity, dimensions FROM {db}.raw_events_deduplicated ORDER BY 1"
    assert storage.query_rows(sql) == chdb_engine.query_rows(sql)
