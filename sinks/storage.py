"""The storage seam: one small interface, two drivers (embedded chDB, ClickHouse server).

Everything above this module (schema migration, inserts, query objects) speaks only
:class:`Storage` and plain ClickHouse SQL, so the DDL and queries are identical for both
drivers. The drivers live in ``chdb_backend`` and ``server_backend`` and import their heavy
dependencies lazily; this module imports neither.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from meterline.sinks.exceptions import SinkConfigError, SinkError

__all__ = [
    "DEFAULT_DATABASE",
    "Params",
    "Storage",
    "StorageConfig",
    "check_insert_columns",
    "is_identifier",
    "open_storage",
    "split_qualified",
]

DEFAULT_DATABASE = "meterline"

# Database and table names are spliced into SQL (ClickHouse cannot bind identifiers), so
# only plain identifiers are accepted; that rules out quoting and injection problems.
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

Params = Mapping[str, Any]
"""Values for ``{name:Type}`` placeholders, bound server-side by both drivers."""


def is_identifier(name: str) -> bool:
    return bool(_IDENTIFIER.match(name))


def split_qualified(table: str) -> tuple[str, str]:
    """``"db.table"`` -> ``("db", "table")``; both parts must be plain identifiers."""
    database, dot, name = table.partition(".")
    if not dot or not is_identifier(database) or not is_identifier(name):
        raise SinkConfigError("table name", [f"{table!r} is not a qualified name 'database.table'"])
    return database, name


def check_insert_columns(
    columns: Mapping[str, Sequence[Any]], column_types: Mapping[str, str]
) -> int:
    """Shared argument checks of ``Storage.insert_columns``; returns the row count."""
    if not columns:
        raise SinkError("insert needs at least one column")
    if set(columns) != set(column_types):
        raise SinkError(
            f"column_types keys {sorted(column_types)} differ from columns {sorted(columns)}"
        )
    lengths = {len(values) for values in columns.values()}
    if len(lengths) != 1:
        sizes = {name: len(values) for name, values in columns.items()}
        raise SinkError(f"columns have different lengths: {sizes}")
    return lengths.pop()


@runtime_checkable
class Storage(Protocol):
    """What the sinks need from ClickHouse. SQL is fully qualified (``db.table``).

    Query parameters use ClickHouse's own ``{name:Type}`` syntax, which both chDB and the
    HTTP interface bind on the server side: values never get spliced into SQL text.
    """

    @property
    def database(self) -> str:
        """The database this storage was opened for (callers' default)."""
        ...

    def execute(self, sql: str, params: Params | None = None) -> None:
        """Run a statement that returns no rows (DDL, ALTER, INSERT ... SELECT)."""
        ...

    def query_rows(self, sql: str, params: Params | None = None) -> list[tuple[Any, ...]]:
        """Run a SELECT; Decimal columns come back as ``decimal.Decimal``, integers as
        ``int``, Map as ``dict``. Select ``*_ms`` integers rather than DateTime columns
        (the drivers disagree on timezones), ``hex(col)`` for binary strings (non-UTF-8
        values: chDB gives bytes, clickhouse-connect a hex str) and wide integers as
        Decimal or text (chDB cannot return Int128)."""
        ...

    def insert_columns(
        self,
        table: str,
        columns: Mapping[str, Sequence[Any]],
        column_types: Mapping[str, str],
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """Column-oriented insert into ``table`` (qualified: ``database.table``); the fast path.

        ``columns`` maps column name to a homogeneous list of Python values (str, int,
        bytes, dict for Map); ``column_types`` gives each column's ClickHouse type.
        """
        ...

    def insert_arrow(
        self,
        table: str,
        data: Any,
        column_types: Mapping[str, str],
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """Insert a ``pyarrow.Table`` whose columns, declared non-nullable, are named as
        ``column_types``' keys: ints, strings (plain or dictionary-encoded) and, for a Map
        column, JSON object text. The fast path of the output loader (sinks/rollup_arrow.py).
        """
        ...

    def close(self) -> None:
        """Release the engine/connection. Idempotent."""
        ...


class StorageBase:
    """Lifecycle shared by the drivers: a database name, close-once, context manager.

    Drivers implement ``_release()`` (free the engine or connection) and call
    ``_check_open()`` before touching it.
    """

    _database: str
    _closed: bool = False

    @property
    def database(self) -> str:
        return self._database

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def _release(self) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            from meterline.sinks.exceptions import SinkError

            raise SinkError("storage is closed")


@dataclass(frozen=True, repr=False)
class StorageConfig:
    """Where ClickHouse lives.

    ``url`` set (``http://user:pass@host:8123/db``): a ClickHouse server via
    clickhouse-connect; the URL path, if any, names the database. ``url`` unset: embedded
    chDB persisting into ``data_dir``. A process can host only one chDB data dir, and a
    data dir can be used by only one process at a time.
    """

    url: str | None = None
    data_dir: str | None = None
    database: str = DEFAULT_DATABASE

    def url_database(self) -> str | None:
        if not self.url:
            return None
        path = unquote(urlsplit(self.url).path).strip("/")
        return path or None

    @property
    def resolved_database(self) -> str:
        return self.url_database() or self.database

    def validate(self) -> None:
        """Raise :class:`SinkConfigError` listing every problem found."""
        errors: list[str] = []
        if self.url and self.data_dir:
            errors.append("set either url (ClickHouse server) or data_dir (embedded chDB), "
                          "not both")
        if not self.url and not self.data_dir:
            errors.append("set url (ClickHouse server) or data_dir (embedded chDB)")
        if not is_identifier(self.database):
            errors.append(f"database {self.database!r} is not a plain identifier")
        if self.url:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https"):
                errors.append(f"url scheme must be http or https, got {parts.scheme!r}")
            if not parts.hostname:
                errors.append("url has no host")
            try:
                parts.port  # noqa: B018 - raises ValueError on a malformed port
            except ValueError:
                errors.append("url has an invalid port")
            url_db = self.url_database()
            if url_db is not None:
                if not is_identifier(url_db):
                    errors.append(f"database {url_db!r} in url is not a plain identifier")
                elif self.database not in (DEFAULT_DATABASE, url_db):
                    errors.append(
                        f"database {self.database!r} conflicts with {url_db!r} in url"
                    )
        if errors:
            raise SinkConfigError("storage config", errors)

    def __repr__(self) -> str:
        # Never print the password embedded in the URL.
        url = self.url
        if url:
            parts = urlsplit(url)
            if parts.password is not None:
                netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
                url = parts._replace(netloc=netloc).geturl()
        return f"StorageConfig(url={url!r}, data_dir={self.data_dir!r}, database={self.database!r})"


def open_storage(config: StorageConfig) -> Storage:
    """Validate ``config`` and open the matching driver."""
    config.validate()
    if config.url:
        from meterline.sinks.server_backend import ServerStorage

        return ServerStorage.connect(config.url, config.resolved_database)
    from meterline.sinks.chdb_backend import ChdbStorage

    assert config.data_dir is not None  # validate() guarantees it
    return ChdbStorage(config.data_dir, config.resolved_database)
