"""ClickHouse server driver for :class:`~meterline.sinks.storage.Storage` (clickhouse-connect).

Deliberately thin: the SQL comes from ``schema`` / ``raw_events`` unchanged, parameters use
ClickHouse's ``{name:Type}`` server-side binding, and inserts use clickhouse-connect's
column-oriented Native insert with the column types supplied (no DESCRIBE round trip).

Not run against a real ClickHouse server in this repo's tests (none can be installed
here): the unit tests inject a fake client and check the calls, and a second set runs this
class over clickhouse-connect's in-process chDB transport (``interface="chdb"``), which
exercises the same client API, parameter binding and Native insert encoding against a
real engine - only the HTTP transport differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from meterline.sinks.exceptions import (
    BackendUnavailableError,
    QueryError,
    StorageOpenError,
)
from meterline.sinks.storage import (
    DEFAULT_DATABASE,
    Params,
    StorageBase,
    check_insert_columns,
    split_qualified,
)

__all__ = ["ServerStorage", "client_kwargs_from_url"]

_INSTALL_HINT = "server storage needs clickhouse-connect: pip install 'meterline[server]'"


def client_kwargs_from_url(url: str) -> dict[str, Any]:
    """``http://user:pass@host:8123/db`` -> keyword arguments for ``clickhouse_connect.get_client``.

    The scheme picks the interface explicitly (clickhouse-connect would otherwise choose TLS
    from the port number). The database is left out on purpose: all Meterline SQL is
    qualified, and the database may not exist until ``migrate`` creates it.
    """
    parts = urlsplit(url)
    kwargs: dict[str, Any] = {
        "interface": parts.scheme,
        "host": parts.hostname,
        "port": parts.port or (8443 if parts.scheme == "https" else 8123),
    }
    if parts.username is not None:
        kwargs["username"] = unquote(parts.username)
    if parts.password is not None:
        kwargs["password"] = unquote(parts.password)
    return kwargs


class ServerStorage(StorageBase):
    """:class:`Storage` over a clickhouse-connect ``Client`` (injected, or from :meth:`connect`)."""

    def __init__(self, client: Any, database: str = DEFAULT_DATABASE) -> None:
        self._client = client
        self._database = database
        self._closed = False

    @classmethod
    def connect(cls, url: str, database: str = DEFAULT_DATABASE) -> ServerStorage:
        try:
            import clickhouse_connect
        except ImportError as exc:
            raise BackendUnavailableError(_INSTALL_HINT) from exc
        try:
            client = clickhouse_connect.get_client(**client_kwargs_from_url(url))
        except Exception as exc:  # the driver raises several unrelated types on connect
            host = urlsplit(url).hostname
            raise StorageOpenError(f"cannot connect to ClickHouse at {host}: {exc}") from exc
        return cls(client, database)

    @property
    def client(self) -> Any:
        return self._client

    def _release(self) -> None:
        self._client.close()

    def execute(self, sql: str, params: Params | None = None) -> None:
        self._check_open()
        try:
            self._client.command(sql, parameters=dict(params) if params else None)
        except Exception as exc:
            raise QueryError(f"ClickHouse: {exc}", sql) from exc

    def query_rows(self, sql: str, params: Params | None = None) -> list[tuple[Any, ...]]:
        self._check_open()
        try:
            result = self._client.query(sql, parameters=dict(params) if params else None)
        except Exception as exc:
            raise QueryError(f"ClickHouse: {exc}", sql) from exc
        return [tuple(row) for row in result.result_rows]

    def insert_columns(
        self,
        table: str,
        columns: Mapping[str, Sequence[Any]],
        column_types: Mapping[str, str],
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self._check_open()
        database, name = split_qualified(table)
        if check_insert_columns(columns, column_types) == 0:
            return
        names = list(columns)
        try:
            self._client.insert(
                table=name,
                database=database,
                data=[columns[n] for n in names],
                column_names=names,
                column_type_names=[column_types[n] for n in names],
                column_oriented=True,
                settings=dict(settings) if settings else None,
            )
        except Exception as exc:
            raise QueryError(f"ClickHouse insert: {exc}", f"INSERT INTO {table}") from exc

    def insert_arrow(
        self,
        table: str,
        data: Any,
        column_types: Mapping[str, str],
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """Through ``insert_columns``: the server takes the Map column as dicts, which the
        JSON text of each distinct value gives once (the server parses the rows itself;
        the loader's per-row cost that the Arrow form saves is chDB's)."""
        import orjson

        columns: dict[str, list[Any]] = {}
        for name in data.column_names:
            values = data.column(name).to_pylist()
            if column_types.get(name, "").startswith("Map("):
                parsed: dict[str, Any] = {}
                values = [parsed[v] if v in parsed else parsed.setdefault(v, orjson.loads(v))
                          for v in values]
            columns[name] = values
        self.insert_columns(table, columns, column_types, settings)
