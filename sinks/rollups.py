"""Writing rollup-stage flushes, and the exact reads of windowed usage.

:func:`write_flush` makes one :class:`~meterline.core.outputs.Flush` durable: window totals
into ``hourly_rollups`` / ``daily_rollups``, rejected events into ``dead_letters`` and
too-late events into ``late_events``. Every row is idempotent in its table (rollups keep the
highest ``version`` of a window per source partition, dead letters and late events collapse
on their identity), so the worker may write a flush again after a crash or a retry and
readers still see each row once. Values travel as exact ``int`` nano-units into the
EPHEMERAL ``*_nano Int128`` columns, as for raw events.

Each row is checked on its own, and a row its table cannot hold, or would delete at once
(past the table's retention), is set aside as a ``load``-stage dead letter with its reason
and content, logged and counted in :class:`FlushCounts`; the rest of the flush lands. So
one bad window or event never makes a writer fail, and retry, forever.

Query objects render ``(sql, params)`` with ``{name:Type}`` placeholders and read the
``hourly_usage`` / ``daily_usage`` views (partition rows combined, duplicates collapsed),
so callers never deal with FINAL or source partitions.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from meterline.core.events import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS
from meterline.core.outputs import DeadLetterRecord, Flush, LateRecord, RollupRecord, group_key
from meterline.core.quantity import INT64_MAX, INT64_MIN, MAX_NANOS, format_nanos
from meterline.sinks.columns import (
    INT32_MAX,
    INT32_MIN,
    UINT64_MAX,
    Columns,
    bad_ints,
    month_of_ms,
    partition_groups,
    pick,
    range_errors,
    require,
    year_of_ms,
)
from meterline.sinks.exceptions import SinkConfigError
from meterline.sinks.raw_events import DeadLetterColumns, insert_dead_letters, nano_from_decimal
from meterline.sinks.retention import RETENTION_MARGIN_MS, RetentionPolicy
from meterline.sinks.schema import (
    DAILY_ROLLUPS,
    DAILY_USAGE,
    DEAD_LETTER_STAGES,
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

log = logging.getLogger(__name__)

_TABLES: Mapping[str, Table] = {"hourly": HOURLY_ROLLUPS, "daily": DAILY_ROLLUPS}
# Python twins of the tables' PARTITION BY (month / year of window_start_ms).
_PARTITION_OF: Mapping[str, Callable[[int], int]] = {"hourly": month_of_ms,
                                                     "daily": year_of_ms}
_RETENTION_FIELD = {"hourly": "hourly_rollups_days", "daily": "daily_rollups_days"}
_VIEWS: Mapping[str, View] = {"hour": HOURLY_USAGE, "day": DAILY_USAGE}
# A window start can be up to a day before the earliest accepted event time.
_MIN_WINDOW_MS = MIN_TIMESTAMP_MS - 86_400_000


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class RollupColumns(Columns):
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

    def bad_rows(self) -> dict[int, str]:
        """``{row: problem}`` for rows the table cannot hold (a total beyond Decimal(38, 9),
        a float where an int belongs, ...): each is refused on its own."""
        bad: dict[int, str] = {}
        # A float would be truncated on its way into an integer column (see columns.py).
        bad_ints("value_nanos", self.value_nano, -MAX_NANOS, MAX_NANOS, bad)
        for name in ("window_start_ms", "window_end_ms"):
            bad_ints(name, getattr(self, name), _MIN_WINDOW_MS, MAX_TIMESTAMP_MS + 86_400_000,
                     bad)
        bad_ints("updated_at_ms", self.updated_at_ms, INT64_MIN, INT64_MAX, bad)
        for name in ("events", "version"):
            bad_ints(name, getattr(self, name), 0, UINT64_MAX, bad)
        bad_ints("partition", self.source_partition, INT32_MIN, INT32_MAX, bad)
        return bad


@dataclass(frozen=True)
class LateEventColumns(Columns):
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

    def bad_rows(self) -> dict[int, str]:
        bad: dict[int, str] = {}
        bad_ints("quantity_nanos", self.quantity_nano, -MAX_NANOS, MAX_NANOS, bad)
        bad_ints("timestamp_ms", self.timestamp_ms, MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS - 1, bad)
        bad_ints("window_start_ms", self.window_start_ms, _MIN_WINDOW_MS, MAX_TIMESTAMP_MS, bad)
        for name in ("source_offset", "received_at_ms"):
            bad_ints(name, getattr(self, name), INT64_MIN, INT64_MAX, bad)
        bad_ints("partition", self.source_partition, INT32_MIN, INT32_MAX, bad)
        bad_ints("position", self.position, INT32_MIN, INT32_MAX, bad)
        return bad


_ROLLUP_TYPES = HOURLY_ROLLUPS.insert_types(f.name for f in fields(RollupColumns))
_LATE_TYPES = LATE_EVENTS.insert_types(f.name for f in fields(LateEventColumns))


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class FlushCounts:
    """Rows handed to each table by one :func:`write_flush`; ``refused`` rows went to
    ``dead_letters`` (stage ``load``) instead, by reason code."""

    hourly: int = 0
    daily: int = 0
    dead_letters: int = 0
    late: int = 0
    refused: int = 0
    refused_by_reason: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.hourly + self.daily + self.dead_letters + self.late


def _rollup_identity(r: RollupRecord) -> int:
    # A window row has no log position; its key is its identity. A stable non-negative
    # Int32 hash of it stands in for ``position`` so that refusing the same window again
    # (a later version, a replay) collapses onto one dead letter.
    key = "\x1f".join(map(str, (r.window, r.customer, r.meter, r.group, r.window_start_ms)))
    return zlib.crc32(key.encode("utf-8", "backslashreplace")) & 0x7FFF_FFFF


def _refuse_rollup(r: RollupRecord, code: str, detail: str, now_ms: int) -> DeadLetterRecord:
    return DeadLetterRecord(
        source=str(r.source), partition=_int32_or(r.partition), offset=-1,
        position=_rollup_identity(r), batch_id="", event_id="", reason=f"load.{code}: {detail}",
        payload=json.dumps(r.to_dict(), ensure_ascii=False, sort_keys=True, default=str),
        received_at_ms=now_ms)


def _refuse_late(r: LateRecord, reason: str, now_ms: int) -> DeadLetterRecord:
    doc: dict[str, Any] = {"id": r.event_id, "customer": r.customer, "meter": r.meter,
                           "quantity": _units(r.quantity_nanos), "timestamp_ms": r.timestamp_ms}
    if any(v for _, v in r.group):
        doc["dimensions"] = dict(r.group)
    return DeadLetterRecord(
        source=str(r.source), partition=_int32_or(r.partition), offset=_int64_or(r.offset),
        position=_int32_or(r.position), batch_id="", event_id=str(r.event_id), reason=reason,
        payload=json.dumps(doc, ensure_ascii=False, sort_keys=True, default=str),
        received_at_ms=_int64_or(r.received_at_ms, now_ms))


def _units(nanos: Any) -> str:
    # The same unit as every other dead letter's "quantity" (core.outputs.event_json).
    return format_nanos(nanos) if type(nanos) is int else repr(nanos)


def _int32_or(value: Any, default: int = -1) -> int:
    return value if type(value) is int and INT32_MIN <= value <= INT32_MAX else default


def _int64_or(value: Any, default: int = -1) -> int:
    return value if type(value) is int and INT64_MIN <= value <= INT64_MAX else default


def _storable_dead_letters(records: Sequence[DeadLetterRecord]) -> list[DeadLetterRecord]:
    """The dead letters dead_letters can hold. One it cannot (only a bug makes one) cannot
    be dead-lettered in turn: it is logged with its content instead of failing the flush."""
    ok = []
    for r in records:
        try:
            DeadLetterColumns.from_records([r], "rollup").validate()
        except SinkConfigError as exc:
            log.error("dropping a dead letter that dead_letters cannot hold (%s): %r", exc, r)
            continue
        ok.append(r)
    return ok


def write_flush(
    storage: Storage,
    flush: Flush,
    *,
    stage: str = "rollup",
    database: str | None = None,
    clock_ms: Callable[[], int] = _wall_clock_ms,
    retention: RetentionPolicy | None = None,
    refused: Sequence[DeadLetterRecord] = (),
) -> FlushCounts:
    """Insert ``flush`` into the rollup, dead-letter and late-event tables.

    Every row is checked on its own before anything is written. A row its table cannot
    hold, and a row the table's TTL would delete on insert (``retention``, default
    ``RetentionPolicy()``: pass the configured one), goes to ``dead_letters`` with stage
    ``load`` and a reason instead; the rest lands. Writing the same flush again is
    harmless: readers of the views and query objects see each row once. ``stage`` labels
    the flush's own dead letters; ``clock_ms`` stamps ``updated_at_ms`` (informational:
    ``version``, not the clock, decides which total wins) and is the retention clock.
    ``refused``: dead letters the caller made itself (output records it could not
    decode), stored and counted with stage ``load`` like the rows refused here.
    """
    if stage not in DEAD_LETTER_STAGES:  # a caller's bug, not data: fail loudly at once
        raise SinkConfigError("rollup flush", [f"stage must be one of "
                                               f"{', '.join(DEAD_LETTER_STAGES)}, got {stage!r}"])
    database = database or storage.database
    retention = retention or RetentionPolicy()
    now_ms = clock_ms()
    horizon_ms = now_ms + RETENTION_MARGIN_MS
    refused = list(refused)

    by_window: dict[str, list[RollupRecord]] = {name: [] for name in _TABLES}
    for record in flush.rollups:
        if record.window in by_window:
            by_window[record.window].append(record)
        else:
            refused.append(_refuse_rollup(record, "bad_window", f"window {record.window!r} "
                                          f"is not one of {', '.join(_TABLES)}", now_ms))
    rollups: dict[str, RollupColumns] = {}
    for name, records in by_window.items():
        bad = RollupColumns.from_records(records, now_ms).bad_rows()
        keep = []
        for i, r in enumerate(records):
            if i in bad:
                refused.append(_refuse_rollup(r, "out_of_range", bad[i], now_ms))
            elif retention.expires_at_ms(_RETENTION_FIELD[name], r.window_start_ms,
                                         r.meter) <= horizon_ms:
                refused.append(_refuse_rollup(r, "outside_retention",
                                              f"{_RETENTION_FIELD[name]} passed", now_ms))
            else:
                keep.append(r)
        rollups[name] = RollupColumns.from_records(keep, now_ms)

    late_bad = LateEventColumns.from_records(flush.late).bad_rows()
    late_keep = []
    for i, late_record in enumerate(flush.late):
        if i in late_bad:
            refused.append(_refuse_late(late_record, f"load.out_of_range: {late_bad[i]}",
                                        now_ms))
        elif retention.expires_at_ms("late_events_days", late_record.window_start_ms,
                                     late_record.meter) <= horizon_ms:
            refused.append(_refuse_late(late_record, "event.outside_retention", now_ms))
        else:
            late_keep.append(late_record)
    late = LateEventColumns.from_records(late_keep)

    for name, columns in rollups.items():
        _insert_partitioned(storage, _TABLES[name].qualified(database), columns.as_columns(),
                            _ROLLUP_TYPES, columns.window_start_ms, _PARTITION_OF[name])
    _insert_partitioned(storage, LATE_EVENTS.qualified(database), late.as_columns(),
                        _LATE_TYPES, late.window_start_ms, month_of_ms)
    dead = DeadLetterColumns.from_records(_storable_dead_letters(flush.dead_letters), stage)
    insert_dead_letters(storage, dead, database=database)
    by_reason: dict[str, int] = {}
    if refused:
        refused = _storable_dead_letters(refused)
        insert_dead_letters(storage, DeadLetterColumns.from_records(refused, "load"),
                            database=database)
        for refusal in refused:
            code = refusal.reason.split(":", 1)[0]
            by_reason[code] = by_reason.get(code, 0) + 1
        log.warning("rollup flush: %d row(s) refused into dead_letters (stage load): %s; "
                    "first: %s", len(refused), by_reason, refused[0].reason if refused else "")
    return FlushCounts(hourly=len(rollups["hourly"]), daily=len(rollups["daily"]),
                       dead_letters=len(dead), late=len(late), refused=len(refused),
                       refused_by_reason=by_reason)


def _insert_partitioned(storage: Storage, table: str, columns: Mapping[str, Sequence[Any]],
                        types: Mapping[str, str], times_ms: Sequence[int],
                        key_of: Callable[[int], int]) -> None:
    """Insert, in several blocks when the rows span more partitions than one INSERT may."""
    if not times_ms:
        return
    groups = partition_groups(times_ms, key_of)
    for part in [columns] if groups is None else [pick(columns, g) for g in groups]:
        storage.insert_columns(table, part, types)


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
        errors = range_errors(self.start_ms, self.end_ms)
        errors += _common_errors(self.database, self.granularity)
        require(errors, "rollup usage query")
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
        require(_common_errors(self.database, self.granularity), "rollup totals query")
        where, params = _filters([
            ("customer", "customer = {customer:String}", self.customer),
            ("meter", "meter = {meter:String}", self.meter),
        ])
        sql = (
            "SELECT customer, meter, window_start_ms, sum(toDecimal256(value, 9)) AS value\n"
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
    [start_ms, end_ms) and one customer/meter.

    Each ``(customer, meter, event_id)`` counts once, as its first copy in log order - the
    idempotency scope of the rollups and raw_events. The table's own key collapses a
    replay, but a resend with a new timestamp lands in another window (and maybe another
    month's partition), so the query dedupes before it filters by window.
    """

    customer: str | None = None
    meter: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        errors = range_errors(self.start_ms, self.end_ms) + _common_errors(self.database)
        require(errors, "late events query")
        where, params = _filters([
            ("customer", "customer = {customer:String}", self.customer),
            ("meter", "meter = {meter:String}", self.meter),
            ("start_ms", "window_start_ms >= {start_ms:Int64}", self.start_ms),
            ("end_ms", "window_start_ms < {end_ms:Int64}", self.end_ms),
        ])
        sql = (
            "SELECT customer, meter, count() AS events,\n"
            "    sum(toDecimal256(quantity, 9)) AS quantity\n"
            "FROM (\n"
            "    SELECT customer, meter, first.1 AS quantity, first.2 AS window_start_ms\n"
            "    FROM (\n"
            "        SELECT customer, meter, event_id,\n"
            "            argMin((quantity, window_start_ms),\n"
            "                   (source_partition, source_offset, position)) AS first\n"
            f"        FROM {LATE_EVENTS.qualified(self.database)}\n"
            "        GROUP BY customer, meter, event_id\n"
            "    )\n"
            ")\n"
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
        require(_common_errors(self.database), "dead letter counts query")
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
