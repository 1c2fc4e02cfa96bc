"""Embedded ClickHouse (chDB) driver for :class:`~meterline.sinks.storage.Storage`.

chDB runs one ClickHouse engine per process, bound to one data directory, and a data
directory can be opened by one process at a time (ClickHouse's ``status`` file lock).
This module therefore keeps one module-level engine: every :class:`ChdbStorage` on the same
directory shares its session (sessions are thread-safe), opening a *different* directory
while one is open raises :class:`StorageOpenError`, and the engine shuts down when the last
storage on it closes (after which another directory may be opened - chDB >= 4 allows that).

Inserts use chDB's ``Python()`` table function: the engine reads the Python lists in place
(~0.6-0.8 M raw events/s on 2 CPUs, on par with the best alternatives and simpler; see
tests/sinks/bench_chdb_insert.py). Reading the Python objects is the cost: writing the same
rows table-to-table runs at ~2.6 M rows/s. Map columns travel as one JSON string per row
(orjson) and bytes as hex, both decoded in SQL.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meterline.sinks.exceptions import (
    BackendUnavailableError,
    QueryError,
    SinkError,
    StorageOpenError,
)
from meterline.sinks.storage import (
    DEFAULT_DATABASE,
    Params,
    StorageBase,
    check_insert_columns,
    split_qualified,
)

__all__ = ["ChdbStorage", "open_engine_path"]

_INSTALL_HINT = "embedded storage needs chdb and pyarrow: pip install 'meterline[server]'"

# The name chDB's Python() table function looks up in the calling frames. Prefixed so it
# cannot collide with anything a caller has in scope.
_ROWS_VARIABLE = "_meterline_insert_rows"


@dataclass
class _Engine:
    path: str
    session: Any  # chdb.session.Session
    users: int


_engine_lock = threading.Lock()
_engine: _Engine | None = None


def open_engine_path() -> str | None:
    """The data directory the process-wide chDB engine is bound to, if one is open."""
    with _engine_lock:
        return _engine.path if _engine is not None else None


def _normalize(data_dir: str) -> str:
    # chDB compares engine paths literally: "./data", "data/" and a symlink to it must be
    # one path, or the second open would be refused as "a different directory".
    return data_dir if data_dir == ":memory:" else os.path.realpath(data_dir)


def _acquire(path: str) -> Any:
    global _engine
    with _engine_lock:
        if _engine is not None:
            if _engine.path != path:
                raise StorageOpenError(
                    f"chDB can host one data directory per process: {_engine.path!r} is open, "
                    f"so {path!r} cannot be. Close every ChdbStorage on it first, or share it "
                    "(use one database per component/test instead of one directory)."
                )
            _engine.users += 1
            return _engine.session
        try:
            from chdb import session as chdb_session
        except ImportError as exc:
            raise BackendUnavailableError(_INSTALL_HINT) from exc
        if path != ":memory:":
            os.makedirs(path, exist_ok=True)
        try:
            session = chdb_session.Session(path)
        except RuntimeError as exc:
            raise StorageOpenError(
                f"cannot open chDB data directory {path!r}: {exc}. Another process may be "
                "using it (one process per data directory), or another chDB engine is open "
                "in this process (e.g. via chdb.query())."
            ) from exc
        # FixedString as plain binary, so the only fixed-size binary columns in Arrow
        # results are wide integers / IPv6, which query_rows refuses loudly (below).
        session.query("SET output_format_arrow_fixed_string_as_fixed_byte_array = 0", "Null")
        _engine = _Engine(path, session, 1)
        return session


def _release(path: str) -> None:
    global _engine
    with _engine_lock:
        if _engine is None or _engine.path != path:
            return
        _engine.users -= 1
        if _engine.users == 0:
            session, _engine = _engine.session, None
            session.close()


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _is_wide_int(ch_type: str) -> bool:
    return any(w in ch_type for w in ("Int128", "Int256", "UInt64"))


def _type_family(ch_type: str) -> str:
    """'int', 'string', 'map:<value type>' or 'other' for a ClickHouse type name."""
    inner = ch_type.strip()
    while inner.startswith(("LowCardinality(", "Nullable(")):
        inner = inner[inner.index("(") + 1 : -1].strip()
    if inner.startswith(("Int", "UInt")):
        return "int"
    if inner in ("String",) or inner.startswith("FixedString("):
        return "string"
    if inner.startswith("Map("):
        key, _, value = inner[4:-1].partition(",")
        if key.strip() != "String":
            return "other"
        return "map:" + value.strip()
    return "other"


class ChdbStorage(StorageBase):
    """:class:`Storage` on an embedded chDB engine persisting into ``data_dir``."""

    def __init__(self, data_dir: str, database: str = DEFAULT_DATABASE) -> None:
        self._path = _normalize(data_dir)
        self._database = database
        self._session = _acquire(self._path)
        self._closed = False

    @property
    def data_dir(self) -> str:
        return self._path

    def _release(self) -> None:
        _release(self._path)

    def _run(self, sql: str, fmt: str, params: Params | None) -> Any:
        self._check_open()
        try:
            return self._session.query(sql, fmt, params=_escaped(params) if params else None)
        except RuntimeError as exc:  # chdb.ChdbError derives from RuntimeError
            raise QueryError(f"chDB: {exc}", sql) from exc

    def execute(self, sql: str, params: Params | None = None) -> None:
        self._run(sql, "Null", params)

    def query_rows(self, sql: str, params: Params | None = None) -> list[tuple[Any, ...]]:
        # Arrow keeps types exact (Decimal128 -> decimal.Decimal, Int64 -> int) and costs
        # about the same as text formats on small results. Not representable: Int128/256
        # and IPv6 (refused below), DateTime comes back tz-aware (clickhouse-connect:
        # naive) - select *_ms integers instead.
        table = self._run(sql, "ArrowTable", params)
        if table.num_rows == 0 or table.num_columns == 0:
            return []
        columns: list[list[Any]] = []
        for arrow_field, column in zip(table.schema, table.columns, strict=True):
            arrow_type = arrow_field.type
            if str(arrow_type).startswith("fixed_size_binary"):
                raise QueryError(
                    f"column {arrow_field.name!r} is a wide integer or IPv6, which chDB's "
                    "Arrow output carries as raw bytes; select it with toString() or as a "
                    "Decimal instead",
                    sql,
                )
            try:
                values = column.to_pylist()
            except UnicodeDecodeError:
                # A String holding non-UTF-8 bytes (a dead letter payload): return bytes
                # for those values rather than failing the whole query.
                values = [_decode_or_bytes(v) for v in column.cast("binary").to_pylist()]
            if str(arrow_type).startswith("map<"):
                values = [None if v is None else dict(v) for v in values]
            columns.append(values)
        return list(zip(*columns, strict=True))

    def insert_columns(
        self,
        table: str,
        columns: Mapping[str, Sequence[Any]],
        column_types: Mapping[str, str],
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        database, name = split_qualified(table)
        row_count = check_insert_columns(columns, column_types)
        if row_count == 0:
            return
        data: dict[str, list[Any]] = {}
        selects: list[str] = []
        for column, values in columns.items():
            encoded, expression = _encode_column(column, values, column_types[column])
            data[column] = encoded
            selects.append(expression)
        sql = (
            f"INSERT INTO {database}.{name} ({', '.join(columns)}) "
            f"SELECT {', '.join(selects)} FROM Python({_ROWS_VARIABLE})"
            + _settings_clause(settings)
        )
        # chDB resolves Python(<name>) by looking the name up in the calling frames, so
        # this local must be spelled exactly like _ROWS_VARIABLE.
        _meterline_insert_rows = data  # noqa: F841 - read by chDB through the frame
        self._run(sql, "Null", None)

    def insert_arrow(
        self,
        table: str,
        data: Any,
        column_types: Mapping[str, str],
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """chDB reads the Arrow table's buffers itself: no Python object per value."""
        database, name = split_qualified(table)
        selects = _arrow_selects(data, column_types)
        if data.num_rows == 0:
            return
        sql = (
            f"INSERT INTO {database}.{name} ({', '.join(data.column_names)}) "
            f"SELECT {', '.join(selects)} FROM Python({_ROWS_VARIABLE})"
            + _settings_clause(settings)
        )
        _meterline_insert_rows = data  # noqa: F841 - read by chDB through the frame
        self._run(sql, "Null", None)


def _arrow_selects(data: Any, column_types: Mapping[str, str]) -> list[str]:
    """SELECT expressions for an Arrow insert (``Storage.insert_arrow``'s rules)."""
    if sorted(data.column_names) != sorted(column_types):
        raise SinkError(f"Arrow columns {sorted(data.column_names)} differ from "
                        f"{sorted(column_types)}")
    nullable = [f.name for f in data.schema if f.nullable]
    if nullable:  # chDB would read them as Nullable(...) and refuse the casts below
        raise SinkError(f"Arrow columns must be declared non-nullable: {nullable}")
    selects = []
    for column in data.column_names:
        ch_type = column_types[column]
        family = _type_family(ch_type)
        if family.startswith("map:"):
            selects.append(f"CAST(JSONExtractKeysAndValues({column}, '{family[4:]}'), "
                           f"'{ch_type}')")
        elif family == "other":
            raise SinkError(f"column {column}: type {ch_type} is not supported by the "
                            "chDB insert path")
        else:
            selects.append(column)
    return selects


def _escaped(params: Params) -> dict[str, Any]:
    """chDB parses a query parameter's text in ClickHouse's *escaped* format: a raw
    backslash starts an escape (a backslash followed by b was bound as a backspace) and a
    raw tab or newline is refused. Escaping them binds a customer id or a dimension value
    exactly as given (found with hostile customer ids through the server's usage API)."""
    return {k: v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            if isinstance(v, str) else v for k, v in params.items()}


def _decode_or_bytes(value: bytes | None) -> str | bytes | None:
    if value is None:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


def _kind(value: object) -> str:
    return type(value).__name__


def _encode_column(name: str, values: Sequence[Any], ch_type: str) -> tuple[list[Any], str]:
    """(values chDB's Python() can read, SELECT expression producing ``ch_type``).

    chDB infers a column's type from its first value and rejects later values of another
    type, so checking the first value is enough to refuse floats in integer columns (a
    float would otherwise be truncated on the way into Int64).
    """
    family = _type_family(ch_type)
    first = values[0]
    if family == "int":
        if type(first) is not int:
            raise SinkError(f"column {name} ({ch_type}) needs int values, got {_kind(first)}")
        if _is_wide_int(ch_type) and (min(values) < _INT64_MIN or max(values) > _INT64_MAX):
            # Python() reads ints as Int64 only; wider values travel as decimal text.
            return [str(v) for v in values], f"CAST({name}, '{ch_type}')"
        return list(values), name
    if family == "string":
        if isinstance(first, bytes | bytearray):
            hexed = [bytes(v).hex() if isinstance(v, bytes | bytearray) else v.encode().hex()
                     for v in values]
            return hexed, f"unhex({name})"
        if not isinstance(first, str):
            raise SinkError(f"column {name} ({ch_type}) needs str or bytes, got {_kind(first)}")
        return list(values), name
    if family.startswith("map:"):
        import orjson

        if not isinstance(first, Mapping):
            raise SinkError(f"column {name} ({ch_type}) needs dict values, got {_kind(first)}")
        value_type = family[4:]
        # Rows often share one dict (RollupColumns gives every row of a group the same
        # one): each distinct object is serialised once. ``values`` holds them all, so
        # their ids cannot be reused while this runs.
        texts: dict[int, str] = {}
        try:
            encoded = []
            for v in values:
                text = texts.get(id(v))
                if text is None:
                    text = texts[id(v)] = orjson.dumps(v).decode()
                encoded.append(text)
        except TypeError as exc:
            raise SinkError(f"column {name} ({ch_type}) needs dict values: {exc}") from exc
        return encoded, (
            f"CAST(JSONExtractKeysAndValues({name}, '{value_type}'), '{ch_type}')"
        )
    raise SinkError(f"column {name}: type {ch_type} is not supported by the chDB insert path")


def _settings_clause(settings: Mapping[str, Any] | None) -> str:
    if not settings:
        return ""
    parts = []
    for key, value in settings.items():
        if not key.replace("_", "").isalnum():
            raise SinkError(f"invalid setting name {key!r}")
        if isinstance(value, bool):
            rendered = "1" if value else "0"
        elif isinstance(value, int):
            rendered = str(value)
        else:
            rendered = "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
        parts.append(f"{key} = {rendered}")
    return " SETTINGS " + ", ".join(parts)
