"""Writing rollup-stage flushes, and the exact reads of windowed usage.

:func:`write_flush` makes one :class:`~meterline.core.outputs.Flush` durable: window totals
into ``hourly_rollups`` / ``daily_rollups``, rejected events into ``dead_letters`` and
too-late events into ``late_events``. Every row is idempotent in its table (rollups keep the
highest ``version`` of a window per source partition, dead letters and late events collapse
on their identity), so the worker may write a flush again after a crash or a retry and
readers still see each row once. Values travel as exact ``int`` nano-units into the
EPHEMERAL ``*_nano Int128`` columns, as for raw events.

Query objects render ``(sql, params)`` with ``{name:Type}`` placeholders and read the
``hourly_usage`` / ``daily_usage`` views (partition rows combined, duplicates collapsed),
so callers never deal with FINAL or source partitions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from meterline.core.outputs import DeadLetterRecord, Flush, LateRecord, RollupRecord, group_key
from meterline.core.quantity import MAX_NANOS
from meterline.sinks.exceptions import SinkConfigError
from meterline.sinks.raw_events import (
    INT32_MAX,
    INT32_MIN,
    DeadLetterColumns,
    _check_ints,
    _check_lengths,
    _Columns,
    _range_errors,
    _require,
    insert_dead_letters,
    nano_from_decimal,
)
from meterline.sinks.schema import (
    DAILY_ROLLUPS,
    DAILY_USAGE,
    DEAD_LETTERS,
    HOURLY_ROLLUPS,
    HOURLY_USAGE,
    LATE_EVENTS,
    Table,
    View,
)
from meterline.sinks.storage import DEFAULT_DATABASE, Storage, is_identifier

__all__ = [
    "DeadLetterCountsQuery",
    "FlushCounts",
    "LateEventColumns",
    "LateEventsQuery",
    "LateTotals",
    "RollupColumns",
    "RollupTotalsQuery",
    "RollupUsageQuery",
    "RollupUsageRow",
    "write_flush",
]

Granularity = Literal["hour", "day"]

_TABLES: Mapping[str, Table] = {"hourly": HOURLY_ROLLUPS, "daily": DAILY_ROLLUPS}
_VIEWS: Mapping[str, View] = {"hour": HOURLY_USAGE, "day": DAILY_USAGE}
UINT64_MAX = 2**64 - 1


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class RollupColumns(_Columns):
    """Window totals for one rollup table, one list per column."""

    customer: Sequence[str]
    meter: Sequence[str]
    group_key: Sequence[str]
    dimensions: Sequence[Mapping[str, str]]
    window_start_ms: Sequence[int]
    window_end_ms: Sequence[int]
    aggregation: Sequence[str]
    value_nano: Sequence[int]
    events: Sequence[int]
    version: Sequence[int]
    source: Sequence[str]
    source_partition: Sequence[int]
    updated_at_ms: Sequence[int]

    @classmethod
    def from_records(cls, records: Sequence[RollupRecord], updated_at_ms: int) -> RollupColumns:
        return cls(
            customer=[r.customer for r in records],
            meter=[r.meter for r in records],
            group_key=[group_key(r.group) for r in records],
            dimensions=[dict(r.group) for r in records],
            window_start_ms=[r.window_start_ms for r in records],
            window_end_ms=[r.window_end_ms for r in records],
            aggregation=[r.aggregation for r in records],
            value_nano=[r.value_nanos for r in records],
            events=[r.events for r in records],
            version=[r.version for r in records],
            source=[r.source for r in records],
            source_partition=[r.partition for r in records],
            updated_at_ms=[updated_at_ms] * len(records),
        )

    def errors(self) -> list[str]:
        errors: list[str] = []
        _check_lengths(self.as_columns(), errors)
        # A float would be truncated on its way into an integer column (see raw_events).
        _check_ints("value_nanos", self.value_nano, errors, -MAX_NANOS, MAX_NANOS)
        for name in ("window_start_ms", "window_end_ms", "updated_at_ms"):
            _check_ints(name, getattr(self, name), errors)
        for name in ("events", "version"):
            _check_ints(name, getattr(self, name), errors, 0, UINT64_MAX)
        _check_ints("partition", self.source_partition, errors, INT32_MIN, INT32_MAX)
        return errors


@dataclass(frozen=True)
class LateEventColumns(_Columns):
    """Too-late events, one list per column."""

    source: Sequence[str]
    source_partition: Sequence[int]
    source_offset: Sequence[int]
    position: Sequence[int]
    event_id: Sequence[str]
    customer: Sequence[str]
    meter: Sequence[str]
    group_key: Sequence[str]
    dimensions: Sequence[Mapping[str, str]]
    quantity_nano: Sequence[int]
    timestamp_ms: Sequence[int]
    window_start_ms: Sequence[int]
    received_at_ms: Sequence[int]

    @classmethod
    def from_records(cls, records: Sequence[LateRecord]) -> LateEventColumns:
        return cls(
            source=[r.source for r in records],
            source_partition=[r.partition for r in records],
            source_offset=[r.offset for r in records],
            position=[r.position for r in records],
            event_id=[r.event_id for r in records],
            customer=[r.customer for r in records],
            meter=[r.meter for r in records],
            group_key=[group_key(r.group) for r in records],
            dimensions=[dict(r.group) for r in records],
            quantity_nano=[r.quantity_nanos for r in records],
            timestamp_ms=[r.timestamp_ms for r in records],
            window_start_ms=[r.window_start_ms for r in records],
            received_at_ms=[r.received_at_ms for r in records],
        )

    def errors(self) -> list[str]:
        errors: list[str] = []
        _check_lengths(self.as_columns(), errors)
        _check_ints("quantity_nanos", self.quantity_nano, errors, -MAX_NANOS, MAX_NANOS)
        for name in ("source_offset", "timestamp_ms", "window_start_ms", "received_at_ms"):
            _check_ints(name, getattr(self, name), errors)
        _check_ints("partition", self.source_partition, errors, INT32_MIN, INT32_MAX)
        _check_ints("position", self.position, errors, INT32_MIN, INT32_MAX)
        return errors


def _dead_letter_columns(records: Sequence[DeadLetterRecord], stage: str) -> DeadLetterColumns:
    return DeadLetterColumns(
        received_at_ms=[r.received_at_ms for r in records],
        source=[r.source for r in records],
        source_partition=[r.partition for r in records],
        source_offset=[r.offset for r in records],
        position=[r.position for r in records],
        stage=[stage] * len(records),
        batch_id=[r.batch_id for r in records],
        event_id=[r.event_id for r in records],
        reason=[r.reason for r in records],
        payload=[r.payload for r in records],
    )


_ROLLUP_TYPES = HOURLY_ROLLUPS.insert_types(f.name for f in fields(RollupColumns))
_LATE_TYPES = LATE_EVENTS.insert_types(f.name for f in fields(LateEventColumns))


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class FlushCounts:
    """Rows handed to each table by one :func:`write_flush`."""

    hourly: int = 0
    daily: int = 0
    dead_letters: int = 0
    late: int = 0

    @property
    def total(self) -> int:
        return self.hourly + self.daily + self.dead_letters + self.late


def write_flush(
    storage: Storage,
    flush: Flush,
    *,
    stage: str = "rollup",
    database: str | None = None,
    clock_ms: Callable[[], int] = _wall_clock_ms,
) -> FlushCounts:
    """Insert ``flush`` into the rollup, dead-letter and late-event tables.

    Everything is validated before anything is written, and every problem is reported at
    once (:class:`SinkConfigError`). Writing the same flush again is harmless: readers of
    the views and query objects see each row once. ``stage`` labels the dead letters;
    ``clock_ms`` stamps ``updated_at_ms`` (informational: ``version``, not the clock,
    decides which total wins).
    """
    database = database or storage.database
    errors: list[str] = []
    by_window: dict[str, list[RollupRecord]] = {name: [] for name in _TABLES}
    for record in flush.rollups:
        if record.window in by_window:
            by_window[record.window].append(record)
        else:
            errors.append(f"rollup window must be one of {', '.join(_TABLES)}, "
                          f"got {record.window!r}")
    updated_at_ms = clock_ms()
    rollups = {name: RollupColumns.from_records(records, updated_at_ms)
               for name, records in by_window.items()}
    for name, columns in rollups.items():
        errors += [f"{name} rollups: {e}" for e in columns.errors()]
    late = LateEventColumns.from_records(flush.late)
    errors += [f"late events: {e}" for e in late.errors()]
    dead = _dead_letter_columns(flush.dead_letters, stage)
    try:
        dead.validate()
    except SinkConfigError as exc:
        errors += [f"dead letters: {e}" for e in exc.errors]
    if errors:
        raise SinkConfigError("rollup flush", errors)

    for name, columns in rollups.items():
        if len(columns):
            storage.insert_columns(_TABLES[name].qualified(database), columns.as_columns(),
                                   _ROLLUP_TYPES)
    if len(late):
        storage.insert_columns(LATE_EVENTS.qualified(database), late.as_columns(), _LATE_TYPES)
    insert_dead_letters(storage, dead, database=database)
    return FlushCounts(hourly=len(rollups["hourly"]), daily=len(rollups["daily"]),
                       dead_letters=len(dead), late=len(late))


# --------------------------------------------------------------------------- queries


def _common_errors(database: str, granularity: str | None = None) -> list[str]:
    errors = []
    if not is_identifier(database):
        errors.append(f"database {database!r} is not a plain identifier")
    if granularity is not None and granularity not in _VIEWS:
        errors.append(f"granularity must be one of {', '.join(_VIEWS)}, got {granularity!r}")
    return errors


def _filters(conditions: Iterable[tuple[str, str, Any]]) -> tuple[str, dict[str, Any]]:
    """``(param, condition, value)`` -> WHERE clause and params; a None value is no filter."""
    where = [condition for _, condition, value in conditions if value is not None]
    params = {param: value for param, _, value in conditions if value is not None}
    clause = ("WHERE " + "\n  AND ".join(where) + "\n") if where else ""
    return clause, params


@dataclass(frozen=True)
class RollupUsageRow:
    window_start_ms: int
    group: dict[str, str]
    value_nanos: int
    events: int


@dataclass(frozen=True)
class RollupUsageQuery:
    """One customer's meter per window and group, for windows starting in [start_ms, end_ms).

    ``value_nanos`` follows the meter's aggregation (a count of 3 is ``3 * 10**9``).
    """

    customer: str
    meter: str
    start_ms: int
    end_ms: int
    granularity: Granularity = "hour"
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        errors = _range_errors(self.start_ms, self.end_ms)
        errors += _common_errors(self.database, self.granularity)
        _require(errors, "rollup usage query")
        sql = (
            "SELECT window_start_ms, dimensions, value, events\n"
            f"FROM {_VIEWS[self.granularity].qualified(self.database)}\n"
            "WHERE customer = {customer:String}\n"
            "  AND meter = {meter:String}\n"
            "  AND window_start_ms >= {start_ms:Int64}\n"
            "  AND window_start_ms < {end_ms:Int64}\n"
            "ORDER BY window_start_ms, group_key"
        )
        params = {"customer": self.customer, "meter": self.meter, "start_ms": self.start_ms,
                  "end_ms": self.end_ms}
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> list[RollupUsageRow]:
        return [
            RollupUsageRow(window_start_ms=int(start), group=dict(dims),
                           value_nanos=nano_from_decimal(value), events=int(events))
            for start, dims, value, events in rows
        ]

    def run(self, storage: Storage) -> list[RollupUsageRow]:
        return self.parse(storage.query_rows(*self.to_sql()))


@dataclass(frozen=True)
class RollupTotalsQuery:
    """``{(customer, meter, window_start_ms): value_nanos}``, summed over dimension groups.

    The sum over groups is the meter's total for additive aggregations (sum, count); for
    min, max, latest and unique_count it is only the sum of the per-group values.
    """

    granularity: Granularity = "hour"
    customer: str | None = None
    meter: str | None = None
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        _require(_common_errors(self.database, self.granularity), "rollup totals query")
        where, params = _filters([
            ("customer", "customer = {customer:String}", self.customer),
            ("meter", "meter = {meter:String}", self.meter),
        ])
        sql = (
            "SELECT customer, meter, window_start_ms, sum(value) AS value\n"
            f"FROM {_VIEWS[self.granularity].qualified(self.database)}\n"
            f"{where}"
            "GROUP BY customer, meter, window_start_ms\n"
            "ORDER BY customer, meter, window_start_ms"
        )
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> dict[tuple[str, str, int], int]:
        return {(str(customer), str(meter), int(start)): nano_from_decimal(value)
                for customer, meter, start, value in rows}

    def run(self, storage: Storage) -> dict[tuple[str, str, int], int]:
        return self.parse(storage.query_rows(*self.to_sql()))


@dataclass(frozen=True)
class LateTotals:
    events: int
    quantity_nanos: int


@dataclass(frozen=True)
class LateEventsQuery:
    """Too-late events per ``(customer, meter)``, optionally for hourly windows starting in
    [start_ms, end_ms) and one customer/meter."""

    customer: str | None = None
    meter: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        errors = _range_errors(self.start_ms, self.end_ms) + _common_errors(self.database)
        _require(errors, "late events query")
        where, params = _filters([
            ("customer", "customer = {customer:String}", self.customer),
            ("meter", "meter = {meter:String}", self.meter),
            ("start_ms", "window_start_ms >= {start_ms:Int64}", self.start_ms),
            ("end_ms", "window_start_ms < {end_ms:Int64}", self.end_ms),
        ])
        sql = (
            "SELECT customer, meter, count() AS events, sum(quantity) AS quantity\n"
            f"FROM {LATE_EVENTS.qualified(self.database)} FINAL\n"
            f"{where}"
            "GROUP BY customer, meter\n"
            "ORDER BY customer, meter"
        )
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> dict[tuple[str, str], LateTotals]:
        return {(str(customer), str(meter)): LateTotals(int(events), nano_from_decimal(qty))
                for customer, meter, events, qty in rows}

    def run(self, storage: Storage) -> dict[tuple[str, str], LateTotals]:
        return self.parse(storage.query_rows(*self.to_sql()))


@dataclass(frozen=True)
class DeadLetterCountsQuery:
    """Dead letters per reason code (the reason up to its first ':'), optionally of one
    stage ("raw" or "rollup")."""

    stage: str | None = None
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        _require(_common_errors(self.database), "dead letter counts query")
        where, params = _filters([("stage", "stage = {stage:String}", self.stage)])
        sql = (
            "SELECT splitByChar(':', reason)[1] AS code, count() AS n\n"
            f"FROM {DEAD_LETTERS.qualified(self.database)} FINAL\n"
            f"{where}"
            "GROUP BY code\n"
            "ORDER BY code"
        )
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> dict[str, int]:
        return {str(code): int(n) for code, n in rows}

    def run(self, storage: Storage) -> dict[str, int]:
        return self.parse(storage.query_rows(*self.to_sql()))
