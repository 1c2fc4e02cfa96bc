"""The one source of Meterline's ClickHouse DDL, plus the migration that applies it.

Tables and views are data (:class:`Table`, :class:`View`); their SQL is rendered here and
nowhere else, and the same text runs on embedded chDB and on a ClickHouse server.

Adding a table (e.g. the hourly rollups): define a ``Table`` (give it a :class:`TtlRule`
naming a :class:`RetentionPolicy` field if it expires), append a :class:`Migration` that
lists it, and add a view if readers need one. :func:`migrate` creates what is missing,
records the applied TTLs in ``schema_meta``, and runs ``ALTER TABLE ... MODIFY TTL`` when the
configured retention no longer matches what was recorded.

Design notes for ``raw_events``:

* ``customer`` is plain ``String``: a SaaS can have 10^5+ customers, beyond the ~10^4
  distinct values where LowCardinality's per-part dictionaries pay off; being the first
  sorting-key column it compresses to almost nothing anyway. ``meter`` and ``source`` are
  ``LowCardinality(String)``: tens of distinct values.
* ``quantity`` is ``Decimal(38, 9)``: exact, and ``sum()`` stays Decimal(38, 9) with
  overflow checks instead of the silent wrap-around of ``sum(Int64)``. Writers insert the
  exact scaled integer into the EPHEMERAL column ``quantity_nano Int128`` (Int128: a single
  quantity may exceed Int64, see ``meterline.core.quantity``) and the server derives
  ``quantity`` with ``reinterpret(quantity_nano, 'Decimal128(9)')``: Decimal128(9) *is* an
  Int128 count of 10^-9 units, so this is a relabelling - no multiplication, no rounding,
  no float anywhere - and the same insert works for both drivers.
* Time is ``timestamp_ms Int64``. Partitioning and TTL are expressions of it (ClickHouse
  keeps a min/max index on it, so time-range filters prune partitions); ``event_time``
  is a zero-storage ALIAS for Grafana-style readers.
* ``ReplacingMergeTree(ingested_at_ms)`` ordered by ``(customer, meter, timestamp_ms,
  event_id)``: a redelivered event has the same sorting key and collapses to one row (the
  last delivery wins); per-customer time-range reads are a contiguous key range. Collapse
  happens at merge time, so readers go through ``raw_events_deduplicated`` (``FINAL``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal

from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.storage import is_identifier

if TYPE_CHECKING:
    from meterline.sinks.storage import Storage

__all__ = [
    "DEAD_LETTERS",
    "MIGRATIONS",
    "RAW_EVENTS",
    "RAW_EVENTS_DEDUPLICATED",
    "SCHEMA_META",
    "TABLES",
    "VIEWS",
    "Column",
    "Migration",
    "MigrationPlan",
    "RetentionPolicy",
    "SchemaState",
    "Table",
    "TtlRule",
    "View",
    "bootstrap_sql",
    "migrate",
    "plan_migration",
    "read_schema_state",
    "sql_string",
]

ColumnKind = Literal["DEFAULT", "MATERIALIZED", "ALIAS", "EPHEMERAL"]

# 9 decimal places: quantities travel as int nano-units (10**9 per unit) everywhere else.
QUANTITY_SCALE = 9
QUANTITY_TYPE = f"Decimal(38, {QUANTITY_SCALE})"


def sql_string(value: str) -> str:
    """A ClickHouse single-quoted string literal (for COMMENTs and other DDL text)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_identifier(name: str, what: str) -> None:
    if not is_identifier(name):
        raise SinkConfigError(what, [f"{name!r} is not a plain identifier [A-Za-z_][A-Za-z0-9_]*"])


# --------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class RetentionPolicy:
    """How many days each table keeps rows, applied as ClickHouse TTL.

    Changing a value and re-running :func:`migrate` alters the TTL in place.
    """

    raw_events_days: int = 35  # a full billing month plus a few days to re-rate it
    dead_letters_days: int = 90  # a quarter: time to notice, fix and replay
    hourly_rollups_days: int = 400  # ~13 months: compare a month with the same month last year
    daily_rollups_days: int = 2557  # ~7 years: common statutory retention for billing records

    def days_for(self, key: str) -> int:
        value = getattr(self, key, None)
        if key not in {f.name for f in fields(self)} or not isinstance(value, int):
            raise SinkError(f"RetentionPolicy has no field {key!r}")
        return value

    def validate(self) -> None:
        """Raise :class:`SinkConfigError` listing every problem found."""
        errors: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                errors.append(f"{f.name} must be an int number of days, got {value!r}")
            elif value < 1:
                errors.append(f"{f.name} must be >= 1 day, got {value}")
        if not errors:
            # Coarser data outliving finer data is the point of rollups; the reverse is
            # almost certainly a typo in the config.
            chain = ["raw_events_days", "hourly_rollups_days", "daily_rollups_days"]
            for finer, coarser in zip(chain, chain[1:], strict=False):
                if getattr(self, finer) > getattr(self, coarser):
                    errors.append(f"{finer} ({getattr(self, finer)}) exceeds {coarser} "
                                  f"({getattr(self, coarser)})")
        if errors:
            raise SinkConfigError("retention policy", errors)


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    kind: ColumnKind | None = None
    expression: str | None = None
    comment: str = ""

    @property
    def insertable(self) -> bool:
        return self.kind in (None, "DEFAULT", "EPHEMERAL")

    def ddl(self) -> str:
        parts = [self.name, self.type]
        if self.kind is not None:
            parts.append(self.kind)
            if self.expression is not None:
                parts.append(self.expression)
        if self.comment:
            parts.append("COMMENT " + sql_string(self.comment))
        return " ".join(parts)


@dataclass(frozen=True)
class TtlRule:
    """Rows expire ``RetentionPolicy.<retention_field>`` days after ``age_expression``."""

    age_expression: str
    retention_field: str

    def expression(self, retention: RetentionPolicy) -> str:
        return f"{self.age_expression} + toIntervalDay({retention.days_for(self.retention_field)})"


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    engine: str
    order_by: tuple[str, ...]
    partition_by: str | None = None
    ttl: TtlRule | None = None
    comment: str = ""

    def qualified(self, database: str) -> str:
        _check_identifier(database, "database name")
        return f"{database}.{self.name}"

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise SinkError(f"table {self.name} has no column {name!r}")

    def insert_types(self, names: Iterable[str]) -> dict[str, str]:
        """ClickHouse types for an insert of ``names`` (what ``Storage.insert_columns`` needs)."""
        types: dict[str, str] = {}
        for name in names:
            col = self.column(name)
            if not col.insertable:
                raise SinkError(f"{self.name}.{name} is {col.kind} and cannot be inserted")
            types[name] = col.type
        return types

    def create_sql(self, database: str, retention: RetentionPolicy) -> str:
        lines = [f"CREATE TABLE IF NOT EXISTS {self.qualified(database)}", "("]
        lines.append(",\n".join(f"    {col.ddl()}" for col in self.columns))
        lines.append(")")
        lines.append(f"ENGINE = {self.engine}")
        if self.partition_by:
            lines.append(f"PARTITION BY {self.partition_by}")
        lines.append(f"ORDER BY ({', '.join(self.order_by)})")
        if self.ttl is not None:
            lines.append(f"TTL {self.ttl.expression(retention)}")
        if self.comment:
            lines.append("COMMENT " + sql_string(self.comment))
        return "\n".join(lines)

    def modify_ttl_sql(self, database: str, retention: RetentionPolicy) -> str:
        if self.ttl is None:
            raise SinkError(f"table {self.name} has no TTL")
        return f"ALTER TABLE {self.qualified(database)} MODIFY TTL {self.ttl.expression(retention)}"


@dataclass(frozen=True)
class View:
    """A reader-facing view over ``source``; ``final`` collapses ReplacingMergeTree rows."""

    name: str
    source: Table
    columns: tuple[str, ...]
    final: bool = True

    def qualified(self, database: str) -> str:
        _check_identifier(database, "database name")
        return f"{database}.{self.name}"

    def create_sql(self, database: str) -> str:
        final = " FINAL" if self.final else ""
        return (
            f"CREATE OR REPLACE VIEW {self.qualified(database)} AS\n"
            f"SELECT {', '.join(self.columns)}\n"
            f"FROM {self.source.qualified(database)}{final}"
        )


# --------------------------------------------------------------------------- tables


def _month_of(ms_column: str) -> str:
    return f"toYYYYMM(fromUnixTimestamp64Milli({ms_column}, 'UTC'))"


def _seconds_of(ms_column: str) -> str:
    return f"toDateTime(intDiv({ms_column}, 1000))"


RAW_EVENTS = Table(
    name="raw_events",
    columns=(
        Column("event_id", "String", comment="idempotency key; duplicates collapse"),
        Column("batch_id", "String", comment="SDK/ingest batch the event arrived in"),
        Column("customer", "String"),
        Column("meter", "LowCardinality(String)"),
        Column("quantity_nano", "Int128", "EPHEMERAL",
               comment="insert-only: exact quantity in 10^-9 units"),
        Column("quantity", QUANTITY_TYPE, "DEFAULT",
               f"reinterpret(quantity_nano, 'Decimal128({QUANTITY_SCALE})')"),
        Column("timestamp_ms", "Int64", comment="event time, UTC milliseconds"),
        Column("event_time", "DateTime64(3, 'UTC')", "ALIAS",
               "fromUnixTimestamp64Milli(timestamp_ms, 'UTC')"),
        Column("dimensions", "Map(String, String)"),
        Column("source", "LowCardinality(String)", comment="topic or ingest endpoint"),
        Column("ingested_at_ms", "Int64", comment="write time, UTC ms; last delivery wins"),
    ),
    engine="ReplacingMergeTree(ingested_at_ms)",
    partition_by=_month_of("timestamp_ms"),
    order_by=("customer", "meter", "timestamp_ms", "event_id"),
    ttl=TtlRule(_seconds_of("timestamp_ms"), "raw_events_days"),
    comment="Validated usage events; read through raw_events_deduplicated",
)

DEAD_LETTERS = Table(
    name="dead_letters",
    columns=(
        Column("received_at_ms", "Int64"),
        Column("source", "LowCardinality(String)", comment="topic or ingest endpoint"),
        Column("source_partition", "Int32", comment="Kafka partition, -1 if none"),
        Column("source_offset", "Int64", comment="Kafka offset, -1 if none"),
        Column("batch_id", "String"),
        Column("reason", "String"),
        Column("payload", "String", comment="the rejected record, byte for byte"),
    ),
    engine="MergeTree",
    partition_by=_month_of("received_at_ms"),
    order_by=("received_at_ms", "source"),
    ttl=TtlRule(_seconds_of("received_at_ms"), "dead_letters_days"),
    comment="Records the pipeline could not accept, with the reason",
)

SCHEMA_META = Table(
    name="schema_meta",
    columns=(
        Column("key", "String"),
        Column("value", "String"),
        Column("revision", "UInt64", comment="highest revision wins"),
        Column("updated_at_ms", "Int64"),
    ),
    engine="ReplacingMergeTree(revision)",
    order_by=("key",),
    comment="Applied schema version, TTLs and view digests (written by migrate)",
)

RAW_EVENTS_DEDUPLICATED = View(
    name="raw_events_deduplicated",
    source=RAW_EVENTS,
    columns=("event_id", "batch_id", "customer", "meter", "quantity", "timestamp_ms",
             "event_time", "dimensions", "source", "ingested_at_ms"),
)


@dataclass(frozen=True)
class Migration:
    """A schema version. Tables listed here are created when missing.

    Later versions that change existing tables (ADD COLUMN, ...) should add an
    ``alter_sql`` field here rather than editing version 1.
    """

    version: int
    description: str
    tables: tuple[Table, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "raw events and dead letters", (RAW_EVENTS, DEAD_LETTERS)),
)
TABLES: tuple[Table, ...] = tuple(t for m in MIGRATIONS for t in m.tables)
VIEWS: tuple[View, ...] = (RAW_EVENTS_DEDUPLICATED,)
SCHEMA_VERSION = MIGRATIONS[-1].version

# --------------------------------------------------------------------------- migration

_VERSION_KEY = "schema_version"
_TTL_KEY = "ttl_days."
_VIEW_KEY = "view_sha256."


@dataclass(frozen=True)
class SchemaState:
    """What ``schema_meta`` and ``system.tables`` say about a database."""

    existing_tables: frozenset[str] = frozenset()
    meta: Mapping[str, str] = field(default_factory=dict)
    revision: int = 0  # highest revision in schema_meta


@dataclass(frozen=True)
class MigrationPlan:
    statements: tuple[str, ...]
    meta_updates: Mapping[str, str]

    @property
    def empty(self) -> bool:
        return not self.statements and not self.meta_updates


def bootstrap_sql(database: str) -> list[str]:
    """Statements that must run before the state can be read: always safe to repeat."""
    _check_identifier(database, "database name")
    return [
        f"CREATE DATABASE IF NOT EXISTS {database}",
        SCHEMA_META.create_sql(database, RetentionPolicy()),
    ]


def _digest(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


def plan_migration(database: str, retention: RetentionPolicy, state: SchemaState) -> MigrationPlan:
    """Pure: the statements that bring ``database`` from ``state`` to this code's schema."""
    statements: list[str] = []
    updates: dict[str, str] = {}
    for table in TABLES:
        if table.name not in state.existing_tables:
            statements.append(table.create_sql(database, retention))
        if table.ttl is None:
            continue
        days = str(retention.days_for(table.ttl.retention_field))
        key = _TTL_KEY + table.name
        if table.name in state.existing_tables and state.meta.get(key) != days:
            # Also covers a table without a record (created by a run that crashed before
            # writing meta): its TTL is unknown, so set it.
            statements.append(table.modify_ttl_sql(database, retention))
        if state.meta.get(key) != days:
            updates[key] = days
    for view in VIEWS:
        sql = view.create_sql(database)
        if state.meta.get(_VIEW_KEY + view.name) != _digest(sql):
            statements.append(sql)
            updates[_VIEW_KEY + view.name] = _digest(sql)
    if state.meta.get(_VERSION_KEY) != str(SCHEMA_VERSION):
        updates[_VERSION_KEY] = str(SCHEMA_VERSION)
    return MigrationPlan(tuple(statements), updates)


def read_schema_state(storage: Storage, database: str) -> SchemaState:
    tables = storage.query_rows(
        "SELECT name FROM system.tables WHERE database = {database:String}",
        {"database": database},
    )
    meta_rows = storage.query_rows(
        f"SELECT key, argMax(value, revision), max(revision) "
        f"FROM {SCHEMA_META.qualified(database)} GROUP BY key"
    )
    return SchemaState(
        existing_tables=frozenset(str(row[0]) for row in tables),
        meta={str(key): str(value) for key, value, _ in meta_rows},
        revision=max((int(rev) for _, _, rev in meta_rows), default=0),
    )


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def migrate(
    storage: Storage,
    database: str | None = None,
    retention: RetentionPolicy | None = None,
    *,
    clock_ms: Callable[[], int] = _wall_clock_ms,
) -> MigrationPlan:
    """Create the database, tables and views idempotently; re-apply changed TTLs.

    1. Bootstrap: CREATE DATABASE / schema_meta IF NOT EXISTS (repeatable).
    2. Read state: which tables exist, which TTLs and view digests were recorded.
    3. Run the planned CREATE / ALTER ... MODIFY TTL / CREATE OR REPLACE VIEW statements.
       A failure here leaves meta untouched, so the next run plans the same work again;
       every statement is safe to repeat.
    4. Record the new TTLs, view digests and schema version in schema_meta.

    Run it from one process at a time (the deploy step or the embedded runner's start).
    Returns the plan that was applied (empty when nothing changed).
    """
    database = database or storage.database
    retention = retention or RetentionPolicy()
    retention.validate()
    for sql in bootstrap_sql(database):
        storage.execute(sql)
    state = read_schema_state(storage, database)
    plan = plan_migration(database, retention, state)
    for sql in plan.statements:
        storage.execute(sql)
    if plan.meta_updates:
        now_ms = clock_ms()
        keys = list(plan.meta_updates)
        # A revision counter, not the clock, orders meta writes: a fixed or skewed clock
        # must not let an old TTL record win over a new one.
        storage.insert_columns(
            SCHEMA_META.qualified(database),
            {
                "key": keys,
                "value": [plan.meta_updates[k] for k in keys],
                "revision": [state.revision + 1] * len(keys),
                "updated_at_ms": [now_ms] * len(keys),
            },
            SCHEMA_META.insert_types(["key", "value", "revision", "updated_at_ms"]),
        )
    return plan

