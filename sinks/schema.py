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
  is a zero-storage ALIAS for Grafana-style readers. Accepted times end where DateTime
  does (``meterline.core.events.MAX_TIMESTAMP_MS``), and TTLs saturate at DateTime's end
  instead of wrapping around to 1970 (which would delete a row at once).
* The idempotency scope is ``(customer, meter, event_id)`` - the rollup fold's - and the
  *first* copy in log order ``(source_partition, source_offset, position)`` is the one
  that counts, as in the rollups. The table is an append log of deliveries: its sorting
  key ends with that log position, so ReplacingMergeTree collapses only a replay of the
  very same record (identical rows), never two different deliveries. A retried
  ``emit(id=...)`` without a timestamp gets a new ``timestamp_ms``, possibly in another
  month, i.e. another partition, and ClickHouse never merges across partitions, so the
  collapse cannot be left to the engine: ``raw_events_deduplicated`` groups by the scope
  and takes every column from the first copy (``argMin`` by log position). Time filters on
  the view apply to the surviving copy's time, as the rollups window it.

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
* The usage views also restate late events (``late_events_restated``: one row per
  idempotency scope, within the restatement horizon, not a resend of a counted event) into
  their windows: sum adds quantities, count events, min/max take the extreme; unique_count
  and latest report them as ``late_pending``. The view-level combine runs in
  Decimal(76, 9) (``value_exact``); ``value`` keeps its Decimal(38, 9) type for existing
  readers. See docs/rollups.md, "Late usage is restated".
* ``group_key`` (``meterline.core.outputs.group_key``) is the canonical text of the
  dimension group, used in the sorting key; ``dimensions`` is the same group as a Map for
  readers.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meterline.sinks import anomaly_ddl, billing_tables
from meterline.sinks.ddl import (
    Column,
    Table,
    TtlRule,
    View,
    check_identifier,
    exact_decimal,
    month_of,
    seconds_of,
    sql_string,
    year_of,
)
from meterline.sinks.restatement import DAY_MS, HOUR_MS, late_events_restated_view, usage_view
from meterline.sinks.retention import PER_METER_FIELDS, RetentionPolicy

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
    "LATE_EVENTS_RESTATED",
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

RAW_EVENTS = Table(
    name="raw_events",
    columns=(
        Column("event_id", "String", comment="idempotency key; duplicates collapse"),
        Column("batch_id", "String", comment="SDK/ingest batch the event arrived in"),
        Column("customer", "String"),
        Column("meter", "LowCardinality(String)"),
        *exact_decimal("quantity", "quantity"),
        Column("timestamp_ms", "Int64", comment="event time, UTC milliseconds"),
        Column("event_time", "DateTime64(3, 'UTC')", "ALIAS",
               "fromUnixTimestamp64Milli(timestamp_ms, 'UTC')"),
        Column("dimensions", "Map(String, String)"),
        Column("source", "LowCardinality(String)", comment="topic or ingest endpoint"),
        Column("ingested_at_ms", "Int64", comment="write time, UTC ms"),
        Column("source_partition", "Int32", comment="Kafka partition of the delivery"),
        Column("source_offset", "Int64", comment="Kafka offset of the delivery"),
        Column("position", "Int32", comment="event index in the batch"),
    ),
    # Collapses only replays of one delivery: see the module docstring.
    engine="ReplacingMergeTree(ingested_at_ms)",
    partition_by=month_of("timestamp_ms"),
    primary_key=("customer", "meter", "timestamp_ms", "event_id"),
    order_by=("customer", "meter", "timestamp_ms", "event_id", "source_partition",
              "source_offset", "position"),
    added_columns=("source_partition", "source_offset", "position"),
    ttl=TtlRule(seconds_of("timestamp_ms"), "raw_events_days", meter_column="meter"),
    comment="Validated usage events, one row per delivery; read through "
            "raw_events_deduplicated",
)

# raw | rollup: the stage that rejected an event or record; load: a row or output record
# the ClickHouse writer could not store (or one past its table's retention).
DEAD_LETTER_STAGES = ("raw", "rollup", "load")

DEAD_LETTERS = Table(
    name="dead_letters",
    columns=(
        Column("received_at_ms", "Int64", comment="Kafka record timestamp, UTC ms"),
        Column("source", "LowCardinality(String)", comment="topic or ingest endpoint"),
        Column("source_partition", "Int32", comment="Kafka partition, -1 if none"),
        Column("source_offset", "Int64", comment="Kafka offset, -1 if none"),
        Column("position", "Int32", comment="event index in the batch, -1 = whole record"),
        Column("stage", "LowCardinality(String)", comment="raw | rollup | load: who rejected it"),
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
    ttl=TtlRule(seconds_of("received_at_ms"), "dead_letters_days"),
    comment="Records and events the pipeline could not accept, with the reason; read FINAL",
)


def _rollup_table(name: str, partition_by: str, retention_field: str, window: str) -> Table:
    value_nano, value = exact_decimal("value", "window total")
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
        ttl=TtlRule(seconds_of("window_start_ms"), retention_field, meter_column="meter"),
        comment=f"{window} totals per source partition; read through {window}_usage",
    )


HOURLY_ROLLUPS = _rollup_table("hourly_rollups", month_of("window_start_ms"),
                               "hourly_rollups_days", "hourly")
DAILY_ROLLUPS = _rollup_table("daily_rollups", year_of("window_start_ms"),
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
        *exact_decimal("quantity", "quantity"),
        Column("timestamp_ms", "Int64", comment="event time, UTC ms"),
        Column("window_start_ms", "Int64", comment="the hourly window it missed"),
        Column("received_at_ms", "Int64", comment="Kafka record timestamp, UTC ms"),
    ),
    # Keyed by the event *and* its delivery (log position): a replay of the same record
    # collapses, but an SDK resend (a new record) of the same late event is a row of its
    # own. Readers take each idempotency scope's first delivery in log order
    # (late_events_restated, LateEventsQuery). Keyed by the event alone (schema 4 and
    # before), the table kept whichever copy was inserted last; the view then found
    # raw's earlier delivery, took that for an earlier count and dropped the event from
    # the totals. window_start_ms derives from the event, so copies share a partition.
    engine="ReplacingMergeTree",
    partition_by=month_of("window_start_ms"),
    order_by=("customer", "meter", "window_start_ms", "event_id", "source_partition",
              "source_offset", "position"),
    ttl=TtlRule(seconds_of("window_start_ms"), "late_events_days", meter_column="meter"),
    comment=("Events that arrived after their window closed, one row per delivery: in no "
             "rollup; read through late_events_restated"),
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

# The first delivery of each (customer, meter, event_id) in log order (see the module
# docstring). One argMin over a tuple picks every column from the same row. GROUP BY rather
# than LIMIT 1 BY: ClickHouse pushes filters on grouping keys (customer, meter) below an
# aggregation, and keeps filters on the picked columns (timestamp_ms) above it.
_FIRST_COPY = ("batch_id", "quantity", "timestamp_ms", "dimensions", "source",
               "ingested_at_ms", "source_partition", "source_offset", "position")
_RAW_DEDUPLICATED_QUERY = (
    "SELECT event_id, first.1 AS batch_id, customer, meter, first.2 AS quantity,\n"
    "    first.3 AS timestamp_ms, fromUnixTimestamp64Milli(first.3, 'UTC') AS event_time,\n"
    "    first.4 AS dimensions, first.5 AS source, first.6 AS ingested_at_ms,\n"
    "    first.7 AS source_partition, first.8 AS source_offset, first.9 AS position,\n"
    "    deliveries\n"
    "FROM (\n"
    "    SELECT customer, meter, event_id,\n"
    f"        argMin(({', '.join(_FIRST_COPY)}),\n"
    "               (source_partition, source_offset, position)) AS first,\n"
    "        count() AS deliveries\n"
    "    FROM {source}\n"
    "    GROUP BY customer, meter, event_id\n"
    ")"
)

RAW_EVENTS_DEDUPLICATED = View(
    name="raw_events_deduplicated",
    source=RAW_EVENTS,
    query=_RAW_DEDUPLICATED_QUERY,
)

LATE_EVENTS_RESTATED = late_events_restated_view(LATE_EVENTS)
HOURLY_USAGE = usage_view("hourly_usage", HOURLY_ROLLUPS, HOUR_MS)
DAILY_USAGE = usage_view("daily_usage", DAILY_ROLLUPS, DAY_MS)


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
    Migration(3, "billing event log and rated usage", billing_tables.tables()),
    Migration(4, "anomaly episode events", anomaly_ddl.tables()),
    # No new table: late_events gets its delivery in the sorting key (a rebuild, planned
    # by plan_migration whenever an existing table's key differs from the code's).
    Migration(5, "late events keep every delivery", ()),
)
TABLES: tuple[Table, ...] = tuple(t for m in MIGRATIONS for t in m.tables)
# Order matters: a view is created after the views it reads.
VIEWS: tuple[View, ...] = (RAW_EVENTS_DEDUPLICATED, LATE_EVENTS_RESTATED, HOURLY_USAGE,
                          DAILY_USAGE,
                          *billing_tables.views(), *anomaly_ddl.views())
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
    # Columns of the existing tables (system.columns), to add a table's added_columns.
    columns: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Sorting keys of the existing tables (system.tables), as column-name tuples: a table
    # whose key differs from the code's is rebuilt (Table.rebuild_sql).
    sorting_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class MigrationPlan:
    statements: tuple[str, ...]
    meta_updates: Mapping[str, str]

    @property
    def empty(self) -> bool:
        return not self.statements and not self.meta_updates


def bootstrap_sql(database: str) -> list[str]:
    """Statements that must run before the state can be read: always safe to repeat."""
    check_identifier(database, "database name")
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
        elif table.added_columns and not set(table.added_columns) <= state.columns.get(
                table.name, set(table.added_columns)):
            # One statement: ADD COLUMN and MODIFY ORDER BY apply together or not at all,
            # so a crash leaves either the old or the new table, and the check above
            # plans the same statement again for the old one.
            statements.append(table.add_columns_sql(database))
        elif table.name in state.sorting_keys and state.sorting_keys[table.name] != table.order_by:
            statements.extend(table.rebuild_sql(database, retention))
        elif table.rebuild_name in state.existing_tables:
            # A rebuild that crashed after its swap: finish it.
            statements.extend(table.finish_rebuild_sql(database))
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
        sql = view.create_sql(database, retention)
        if state.meta.get(_VIEW_KEY + view.name) != _digest(sql):
            statements.append(sql)
            updates[_VIEW_KEY + view.name] = _digest(sql)
    if state.meta.get(_VERSION_KEY) != str(SCHEMA_VERSION):
        updates[_VERSION_KEY] = str(SCHEMA_VERSION)
    return MigrationPlan(tuple(statements), updates)


def read_schema_state(storage: Storage, database: str) -> SchemaState:
    tables = storage.query_rows(
        "SELECT name, sorting_key FROM system.tables WHERE database = {database:String}",
        {"database": database},
    )
    meta_rows = storage.query_rows(
        f"SELECT key, argMax(value, revision), max(revision) "
        f"FROM {SCHEMA_META.qualified(database)} GROUP BY key"
    )
    column_rows = storage.query_rows(
        "SELECT table, name FROM system.columns WHERE database = {database:String}",
        {"database": database},
    )
    columns: dict[str, set[str]] = {}
    for table, name in column_rows:
        columns.setdefault(str(table), set()).add(str(name))
    return SchemaState(
        existing_tables=frozenset(str(row[0]) for row in tables),
        sorting_keys={str(name): _key_columns(str(key)) for name, key in tables if key},
        meta={str(key): str(value) for key, value, _ in meta_rows},
        revision=max((int(rev) for _, _, rev in meta_rows), default=0),
        columns={table: frozenset(names) for table, names in columns.items()},
    )


def _key_columns(sorting_key: str) -> tuple[str, ...]:
    """``system.tables.sorting_key`` ("a, b, c", parenthesised by some versions) as names."""
    return tuple(part.strip() for part in sorting_key.strip().strip("()").split(","))


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

