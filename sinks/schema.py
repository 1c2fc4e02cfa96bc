"""The one source of Meterline's ClickHouse DDL, plus the migration that applies it.

Tables and views are data (:class:`Table`, :class:`View`); their SQL is rendered here and
nowhere else, and the same text runs on embedded chDB and on a ClickHouse server.

Adding a table: define a ``Table`` (give it a :class:`TtlRule` naming a
:class:`RetentionPolicy` field if it expires), append a :class:`Migration` that lists it,
and add a view if readers need one. :func:`migrate` creates what is missing, records the
applied TTL text and view digests in ``schema_meta``, and runs ``ALTER TABLE ... MODIFY TTL``
/ ``CREATE OR REPLACE VIEW`` when the configured retention or a view definition no longer
matches what was recorded.

Retention is per table and, for tables with a ``meter`` column, per meter: an override
turns the table's TTL into several rules, ``<age> + N DELETE WHERE meter NOT IN (...)``
for the default and one ``... DELETE WHERE meter = 'm'`` per overridden meter.

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

Design notes for the rollups (``hourly_rollups``, ``daily_rollups``):

* A row is the total of ONE source partition's events for one window, written by the
  worker that owns the partition, as of ``version`` events (see ``meterline.core.rollup``).
  ``ReplacingMergeTree(version)`` keeps the highest version, so a replayed or duplicated
  flush is harmless. ``source`` and ``source_partition`` are in the sorting key: the SDK
  keys records by customer, but a foreign producer may not, and then two partitions each
  hold part of a customer's window; neither may replace the other.
* ``hourly_usage`` / ``daily_usage`` combine those partial rows per window (FINAL first,
  then GROUP BY the window key): ``sum`` for sum, count and unique_count; ``min``/``max``
  for min/max; ``argMax(value, (source, source_partition))`` for latest. unique_count and
  latest are exact only when a window's events live in one partition (what keying by
  customer guarantees): a partition total of distinct users cannot be de-duplicated against
  another partition's, and a partition row does not carry its latest event's timestamp.
  ``source_partitions`` in the views shows when that assumption did not hold.
* ``group_key`` (``meterline.core.outputs.group_key``) is the canonical text of the
  dimension group, used in the sorting key; ``dimensions`` is the same group as a Map for
  readers.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.retention import PER_METER_FIELDS, RetentionPolicy
from meterline.sinks.storage import is_identifier

if TYPE_CHECKING:
    from meterline.sinks.storage import Storage

__all__ = [
    "DAILY_ROLLUPS",
    "DAILY_USAGE",
    "DEAD_LETTERS",
    "DEAD_LETTER_STAGES",
    "HOURLY_ROLLUPS",
    "HOURLY_USAGE",
    "LATE_EVENTS",
    "MIGRATIONS",
    "PER_METER_FIELDS",
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
    """Rows expire ``RetentionPolicy.<retention_field>`` days after ``age_expression``.

    With ``meter_column`` set, per-meter overrides of that field become extra rules.
    """

    age_expression: str
    retention_field: str
    meter_column: str | None = None

    def expression(self, retention: RetentionPolicy) -> str:
        default = self._rule(retention.days_for(self.retention_field))
        overrides = retention.overrides(self.retention_field)
        if not overrides:
            return default
        if self.meter_column is None:
            raise SinkError(f"{self.retention_field} cannot be overridden per meter")
        col = self.meter_column
        names = ", ".join(sql_string(meter) for meter, _ in overrides)
        # Every row must match exactly one rule: a row matched by the default rule too
        # would expire at the earlier of the two dates.
        rules = [f"{default} DELETE WHERE {col} NOT IN ({names})"]
        rules += [f"{self._rule(days)} DELETE WHERE {col} = {sql_string(meter)}"
                  for meter, days in overrides]
        return ",\n    ".join(rules)

    def _rule(self, days: int) -> str:
        return f"{self.age_expression} + toIntervalDay({days})"


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
    """A reader-facing view over ``source``.

    Either ``columns`` (``SELECT columns FROM source [FINAL]``; ``final`` collapses
    ReplacingMergeTree rows) or a full ``query`` in which ``{source}`` stands for the
    qualified source table.
    """

    name: str
    source: Table
    columns: tuple[str, ...] = ()
    final: bool = True
    query: str | None = None

    def qualified(self, database: str) -> str:
        _check_identifier(database, "database name")
        return f"{database}.{self.name}"

    def create_sql(self, database: str) -> str:
        head = f"CREATE OR REPLACE VIEW {self.qualified(database)} AS\n"
        if self.query is not None:
            return head + self.query.replace("{source}", self.source.qualified(database))
        final = " FINAL" if self.final else ""
        return (
            f"{head}SELECT {', '.join(self.columns)}\n"
            f"FROM {self.source.qualified(database)}{final}"
        )


# --------------------------------------------------------------------------- tables


def _month_of(ms_column: str) -> str:
    return f"toYYYYMM(fromUnixTimestamp64Milli({ms_column}, 'UTC'))"


def _year_of(ms_column: str) -> str:
    return f"toYear(fromUnixTimestamp64Milli({ms_column}, 'UTC'))"


def _seconds_of(ms_column: str) -> str:
    return f"toDateTime(intDiv({ms_column}, 1000))"


def _exact_decimal(name: str, what: str) -> tuple[Column, Column]:
    """``<name>_nano Int128 EPHEMERAL`` and ``<name> Decimal(38, 9)`` derived from it exactly."""
    return (
        Column(f"{name}_nano", "Int128", "EPHEMERAL",
               comment=f"insert-only: exact {what} in 10^-9 units"),
        Column(name, QUANTITY_TYPE, "DEFAULT",
               f"reinterpret({name}_nano, 'Decimal128({QUANTITY_SCALE})')"),
    )


RAW_EVENTS = Table(
    name="raw_events",
    columns=(
        Column("event_id", "String", comment="idempotency key; duplicates collapse"),
        Column("batch_id", "String", comment="SDK/ingest batch the event arrived in"),
        Column("customer", "String"),
        Column("meter", "LowCardinality(String)"),
        *_exact_decimal("quantity", "quantity"),
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
    ttl=TtlRule(_seconds_of("timestamp_ms"), "raw_events_days", meter_column="meter"),
    comment="Validated usage events; read through raw_events_deduplicated",
)

DEAD_LETTER_STAGES = ("raw", "rollup")

DEAD_LETTERS = Table(
    name="dead_letters",
    columns=(
        Column("received_at_ms", "Int64", comment="Kafka record timestamp, UTC ms"),
        Column("source", "LowCardinality(String)", comment="topic or ingest endpoint"),
        Column("source_partition", "Int32", comment="Kafka partition, -1 if none"),
        Column("source_offset", "Int64", comment="Kafka offset, -1 if none"),
        Column("position", "Int32", comment="event index in the batch, -1 = whole record"),
        Column("stage", "LowCardinality(String)", comment="raw | rollup: who rejected it"),
        Column("batch_id", "String"),
        Column("event_id", "String", comment="empty for a whole record"),
        Column("reason", "String"),
        Column("payload", "String", comment="the rejected record or event"),
    ),
    # One row per rejected (record, event, stage): a replay of the partition rejects the
    # same things again and collapses onto them. No PARTITION BY: the raw loader stamps
    # received_at_ms with its own clock when a source has no record timestamp, so a
    # time-based partition could split a replay's duplicates (ClickHouse never merges
    # across partitions); dead letters are few, one partition costs nothing.
    engine="ReplacingMergeTree",
    order_by=("source", "source_partition", "source_offset", "position", "stage"),
    ttl=TtlRule(_seconds_of("received_at_ms"), "dead_letters_days"),
    comment="Records and events the pipeline could not accept, with the reason; read FINAL",
)


def _rollup_table(name: str, partition_by: str, retention_field: str, window: str) -> Table:
    value_nano, value = _exact_decimal("value", "window total")
    return Table(
        name=name,
        columns=(
            Column("customer", "String"),
            Column("meter", "LowCardinality(String)"),
            Column("group_key", "String", comment="canonical k=v&k=v text of dimensions"),
            Column("dimensions", "Map(String, String)", comment="the group_by dimensions"),
            Column("window_start_ms", "Int64", comment="UTC ms, inclusive"),
            Column("window_end_ms", "Int64", comment="UTC ms, exclusive"),
            Column("aggregation", "LowCardinality(String)"),
            value_nano,
            value,
            Column("events", "UInt64", comment="events folded into value"),
            Column("version", "UInt64", comment="grows with every change; highest wins"),
            Column("source", "LowCardinality(String)", comment="topic"),
            Column("source_partition", "Int32", comment="the one partition this row totals"),
            Column("updated_at_ms", "Int64", comment="write time, UTC ms"),
        ),
        engine="ReplacingMergeTree(version)",
        partition_by=partition_by,
        # customer, meter, window first: per-customer time-range reads are one key range.
        order_by=("customer", "meter", "window_start_ms", "group_key", "source",
                  "source_partition"),
        ttl=TtlRule(_seconds_of("window_start_ms"), retention_field, meter_column="meter"),
        comment=f"{window} totals per source partition; read through {window}_usage",
    )


HOURLY_ROLLUPS = _rollup_table("hourly_rollups", _month_of("window_start_ms"),
                               "hourly_rollups_days", "hourly")
DAILY_ROLLUPS = _rollup_table("daily_rollups", _year_of("window_start_ms"),
                              "daily_rollups_days", "daily")

LATE_EVENTS = Table(
    name="late_events",
    columns=(
        Column("source", "LowCardinality(String)", comment="topic"),
        Column("source_partition", "Int32"),
        Column("source_offset", "Int64"),
        Column("position", "Int32", comment="event index in the batch"),
        Column("event_id", "String"),
        Column("customer", "String"),
        Column("meter", "LowCardinality(String)"),
        Column("group_key", "String"),
        Column("dimensions", "Map(String, String)"),
        *_exact_decimal("quantity", "quantity"),
        Column("timestamp_ms", "Int64", comment="event time, UTC ms"),
        Column("window_start_ms", "Int64", comment="the hourly window it missed"),
        Column("received_at_ms", "Int64", comment="Kafka record timestamp, UTC ms"),
    ),
    # Keyed by the event, not its Kafka position: a replay and an SDK resend (a new record)
    # of the same late event both collapse. window_start_ms derives from the event, so
    # partitioning by it keeps duplicates together.
    engine="ReplacingMergeTree",
    partition_by=_month_of("window_start_ms"),
    order_by=("customer", "meter", "window_start_ms", "event_id"),
    ttl=TtlRule(_seconds_of("window_start_ms"), "late_events_days", meter_column="meter"),
    comment="Events that arrived after their window closed: in no rollup; read FINAL",
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

_WINDOW_KEY = ("customer", "meter", "group_key", "dimensions", "window_start_ms",
               "window_end_ms", "aggregation")

# See the module docstring for why each aggregation combines partitions this way. The
# tuple makes latest's pick deterministic (a total order over a window's rows).
_USAGE_QUERY = (
    f"SELECT {', '.join(_WINDOW_KEY)},\n"
    "    multiIf(aggregation = 'min', min(value),\n"
    "            aggregation = 'max', max(value),\n"
    "            aggregation = 'latest', argMax(value, (source, source_partition)),\n"
    "            sum(value)) AS value,\n"
    "    sum(events) AS events,\n"
    "    count() AS source_partitions,\n"
    "    max(updated_at_ms) AS updated_at_ms\n"
    "FROM {source} FINAL\n"
    f"GROUP BY {', '.join(_WINDOW_KEY)}"
)

HOURLY_USAGE = View(name="hourly_usage", source=HOURLY_ROLLUPS, query=_USAGE_QUERY)
DAILY_USAGE = View(name="daily_usage", source=DAILY_ROLLUPS, query=_USAGE_QUERY)


@dataclass(frozen=True)
class Migration:
    """A schema version. Tables listed here are created when missing.

    Later versions that change existing tables (ADD COLUMN, ...) should add an
    ``alter_sql`` field here rather than editing an earlier version (version 1 was edited
    in place for dead-letter dedupe only because nothing had shipped).
    """

    version: int
    description: str
    tables: tuple[Table, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "raw events and dead letters", (RAW_EVENTS, DEAD_LETTERS)),
    Migration(2, "streaming rollups and late events", (HOURLY_ROLLUPS, DAILY_ROLLUPS,
                                                       LATE_EVENTS)),
)
TABLES: tuple[Table, ...] = tuple(t for m in MIGRATIONS for t in m.tables)
VIEWS: tuple[View, ...] = (RAW_EVENTS_DEDUPLICATED, HOURLY_USAGE, DAILY_USAGE)
SCHEMA_VERSION = MIGRATIONS[-1].version

# --------------------------------------------------------------------------- migration

_VERSION_KEY = "schema_version"
_TTL_KEY = "ttl."  # the full TTL text: per-meter rules change it too
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
        ttl = table.ttl.expression(retention)
        key = _TTL_KEY + table.name
        if table.name in state.existing_tables and state.meta.get(key) != ttl:
            # Also covers a table without a record (created by a run that crashed before
            # writing meta): its TTL is unknown, so set it.
            statements.append(table.modify_ttl_sql(database, retention))
        if state.meta.get(key) != ttl:
            updates[key] = ttl
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

