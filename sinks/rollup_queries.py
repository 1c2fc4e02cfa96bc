"""The exact reads of windowed usage: query objects over the usage views.

Query objects render ``(sql, params)`` with ``{name:Type}`` placeholders and read the
``hourly_usage`` / ``daily_usage`` views (partition rows combined, duplicates collapsed,
late events restated: docs/rollups.md), so callers never deal with FINAL, source
partitions or late_events. They sum in Decimal(76, 9) and parse into exact int
nano-units. ``meterline.sinks.rollups`` re-exports them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from meterline.sinks.columns import range_errors, require
from meterline.sinks.raw_events import nano_from_decimal
from meterline.sinks.schema import (
    DAILY_USAGE,
    DEAD_LETTERS,
    HOURLY_USAGE,
    LATE_EVENTS,
    LATE_EVENTS_RESTATED,
    View,
)
from meterline.sinks.storage import DEFAULT_DATABASE, Storage, is_identifier

__all__ = [
    "LATE_REASONS",
    "DeadLetterCountsQuery",
    "Granularity",
    "LateEventsQuery",
    "LateRestatementQuery",
    "LateTotals",
    "RollupTotalsQuery",
    "RollupUsageQuery",
    "RollupUsageRow",
]

Granularity = Literal["hour", "day"]

_VIEWS: Mapping[str, View] = {"hour": HOURLY_USAGE, "day": DAILY_USAGE}


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
    """One window of a usage view. ``value_nanos`` and ``events`` include the late events
    restated into it (``late_events`` of them); ``late_pending`` late events within the
    restatement horizon are *not* in the value (unique_count, latest: see docs/rollups.md)."""

    window_start_ms: int
    group: dict[str, str]
    value_nanos: int
    events: int
    late_events: int = 0
    late_pending: int = 0


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
            "SELECT window_start_ms, dimensions, value_exact, events, late_events,\n"
            "    late_pending\n"
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
                           value_nanos=nano_from_decimal(value), events=int(events),
                           late_events=int(late), late_pending=int(pending))
            for start, dims, value, events, late, pending in rows
        ]

    def run(self, storage: Storage) -> list[RollupUsageRow]:
        return self.parse(storage.query_rows(*self.to_sql()))


@dataclass(frozen=True)
class RollupTotalsQuery:
    """``{(customer, meter, window_start_ms): value_nanos}``, summed over dimension groups.

    The sum over groups is the meter's total for additive aggregations (sum, count); for
    min, max, latest and unique_count it is only the sum of the per-group values. Late
    events within the restatement horizon are included, as in the views.
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
            "SELECT customer, meter, window_start_ms, sum(value_exact) AS value\n"
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


# Why a late event is not in the restated totals ('' = it is); see LATE_EVENTS_RESTATED.
LATE_REASONS = ("", "beyond_restatement_horizon", "counted_before")


@dataclass(frozen=True)
class LateRestatementQuery:
    """``{(customer, meter, reason): LateTotals}`` of late events, each counted once: reason
    ``''`` = restated into hourly_usage/daily_usage, otherwise why it stays out."""

    customer: str | None = None
    meter: str | None = None
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        require(_common_errors(self.database), "late restatement query")
        where, params = _filters([
            ("customer", "customer = {customer:String}", self.customer),
            ("meter", "meter = {meter:String}", self.meter),
        ])
        sql = (
            "SELECT customer, meter, reason, count() AS events,\n"
            "    sum(toDecimal256(quantity, 9)) AS quantity\n"
            f"FROM {LATE_EVENTS_RESTATED.qualified(self.database)}\n"
            f"{where}"
            "GROUP BY customer, meter, reason\n"
            "ORDER BY customer, meter, reason"
        )
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> dict[tuple[str, str, str], LateTotals]:
        return {(str(customer), str(meter), str(reason)):
                LateTotals(int(events), nano_from_decimal(qty))
                for customer, meter, reason, events, qty in rows}

    def run(self, storage: Storage) -> dict[tuple[str, str, str], LateTotals]:
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
