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

from meterline.core.meters import Aggregation, MeterRegistry
from meterline.sinks.columns import range_errors, require
from meterline.sinks.raw_events import nano_from_decimal
from meterline.sinks.reaggregation import reaggregated_windows_sql, value_property_params
from meterline.sinks.restatement import DAY_MS, HOUR_MS
from meterline.sinks.schema import (
    DAILY_ROLLUPS,
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
    "CustomerUsageQuery",
    "DailyRollupRow",
    "DailyRollupRowsQuery",
    "LateTotals",
    "RollupTotalsQuery",
    "RollupUsageQuery",
    "RollupUsageRow",
]

Granularity = Literal["hour", "day"]

_VIEWS: Mapping[str, View] = {"hour": HOURLY_USAGE, "day": DAILY_USAGE}
_WINDOW_MS: Mapping[str, int] = {"hour": HOUR_MS, "day": DAY_MS}

# Which meters are unique_count and what they count: a MeterRegistry, or
# ``{meter: value_property}`` of the unique_count meters.
ValueProperties = MeterRegistry | Mapping[str, str]


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


def _unique_properties(registry: ValueProperties | None) -> dict[str, str]:
    if registry is None:
        return {}
    if isinstance(registry, MeterRegistry):
        return {m.name: m.value_property for m in registry
                if m.aggregation is Aggregation.UNIQUE_COUNT}
    return dict(registry)


def _property_errors(registry: ValueProperties | None) -> list[str]:
    if registry is None or isinstance(registry, MeterRegistry):
        return []
    if not isinstance(registry, Mapping):
        return [f"registry must be a MeterRegistry or a {{meter: value_property}} mapping, "
                f"got {type(registry).__name__}"]
    return [f"value_property of meter {m!r} must be a non-empty string, got {p!r}"
            for m, p in registry.items()
            if not isinstance(m, str) or not isinstance(p, str) or not p]


def _usage_source(granularity: str, database: str,
                  registry: ValueProperties | None) -> tuple[str, str, dict[str, str]]:
    """The FROM clause over a usage view, the prefix of its columns (``u.`` when joined)
    and the columns (value_exact, events, late_events, late_pending) as read through it.

    With the unique_count meters' value properties, a unique_count window with restated
    late events is re-aggregated from raw_events_deduplicated (sinks/reaggregation.py)
    when raw holds exactly the window's counted events; otherwise, and without them, its
    late events stay ``late_pending`` as in the view."""
    view = _VIEWS[granularity].qualified(database)
    properties = _unique_properties(registry)
    if not properties:  # the view as it is (the same SQL as before registries existed)
        return f"{view}\n", "", {name: name for name in ("value_exact", "events",
                                                          "late_events", "late_pending")}
    expr = value_property_params(properties)
    reaggregated = reaggregated_windows_sql(_WINDOW_MS[granularity], database, expr,
                                            ("unique_count",))
    ok = ("(u.aggregation = 'unique_count' AND u.late_pending > 0"
          " AND r.raw_events = u.rollup_events + u.late_pending)")
    columns = {
        "value_exact": f"if({ok}, toDecimal256(r.raw_unique, 9), u.value_exact)",
        "events": f"if({ok}, u.rollup_events + u.late_pending, u.events)",
        "late_events": f"if({ok}, u.late_pending, u.late_events)",
        "late_pending": f"if({ok}, 0, u.late_pending)",
    }
    source = (
        f"{view} AS u\n"
        f"LEFT JOIN (\n{reaggregated}\n) AS r ON r.customer = u.customer\n"
        "    AND r.meter = u.meter AND r.group_key = u.group_key\n"
        "    AND r.window_start_ms = u.window_start_ms\n"
    )
    return source, "u.", columns


def _usage_sql(what: str, granularity: Granularity, database: str,
               registry: ValueProperties | None, start_ms: int, end_ms: int, *,
               all_meters: bool) -> str:
    """The usage-view read of one customer: one meter (``{meter}`` bound), or every meter
    with the meter as the first column (``CustomerUsageQuery``)."""
    errors = range_errors(start_ms, end_ms)
    errors += _common_errors(database, granularity)
    errors += _property_errors(registry)
    require(errors, what)
    source, u, col = _usage_source(granularity, database, registry)
    meter = f"{u}meter, " if all_meters else ""
    return (
        f"SELECT {meter}{u}window_start_ms, {u}dimensions, {col['value_exact']},"
        f" {col['events']},\n"
        f"    {col['late_events']}, {col['late_pending']}\n"
        f"FROM {source}"
        f"WHERE {u}customer = {{customer:String}}\n"
        + ("" if all_meters else f"  AND {u}meter = {{meter:String}}\n")
        + f"  AND {u}window_start_ms >= {{start_ms:Int64}}\n"
        f"  AND {u}window_start_ms < {{end_ms:Int64}}\n"
        f"ORDER BY {meter}{u}window_start_ms, {u}group_key"
    )


@dataclass(frozen=True)
class RollupUsageRow:
    """One window of a usage view. ``value_nanos`` and ``events`` include the late events
    restated into it (``late_events`` of them); ``late_pending`` late events within the
    restatement horizon are *not* in the value (a unique_count window read without the
    meter registry, or a unique_count/latest window raw cannot re-aggregate exactly: see
    docs/rollups.md)."""

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
    ``registry`` (a MeterRegistry or ``{meter: value_property}`` of unique_count meters)
    lets unique_count windows with late events be re-aggregated from raw events; without
    it their late events stay ``late_pending``, not in the value, as in the views.
    """

    customer: str
    meter: str
    start_ms: int
    end_ms: int
    granularity: Granularity = "hour"
    database: str = DEFAULT_DATABASE
    registry: ValueProperties | None = None

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        sql = _usage_sql("rollup usage query", self.granularity, self.database, self.registry,
                         self.start_ms, self.end_ms, all_meters=False)
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
class CustomerUsageQuery:
    """Every meter of one customer per window and group, for windows starting in
    [start_ms, end_ms): ``{meter: rows}``, each meter's rows exactly (and in the order)
    ``RollupUsageQuery`` returns for it. One query instead of one per meter: a usage-view
    read costs about the same for one meter as for all of a customer's, so a page of N
    meters paid N times that.

    Every meter of the customer is read, unknown ones too (no meter list parameter:
    chDB cannot bind an Array); callers keep the meters they know. The re-aggregation
    that ``registry`` enables applies to unique_count windows only, so passing it leaves
    the other meters' rows as they are without it.
    """

    customer: str
    start_ms: int
    end_ms: int
    granularity: Granularity = "hour"
    database: str = DEFAULT_DATABASE
    registry: ValueProperties | None = None

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        sql = _usage_sql("customer usage query", self.granularity, self.database,
                         self.registry, self.start_ms, self.end_ms, all_meters=True)
        params = {"customer": self.customer, "start_ms": self.start_ms,
                  "end_ms": self.end_ms}
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> dict[str, list[RollupUsageRow]]:
        out: dict[str, list[RollupUsageRow]] = {}
        for meter, start, dims, value, events, late, pending in rows:
            out.setdefault(str(meter), []).append(RollupUsageRow(
                window_start_ms=int(start), group=dict(dims),
                value_nanos=nano_from_decimal(value), events=int(events),
                late_events=int(late), late_pending=int(pending)))
        return out

    def run(self, storage: Storage) -> dict[str, list[RollupUsageRow]]:
        return self.parse(storage.query_rows(*self.to_sql()))


@dataclass(frozen=True, slots=True)
class DailyRollupRow:
    customer: str
    meter: str
    group_key: str
    window_start_ms: int
    source: str
    partition: int
    version: int
    value_nanos: int


@dataclass(frozen=True)
class DailyRollupRowsQuery:
    """Every source partition's current row of ``daily_rollups`` (FINAL: the highest
    version) for day windows starting at or after ``start_ms``, every customer: what the
    server's in-memory quota totals start from (server/quota_totals.py). The table, not
    the view: the rows are per partition exactly as the rollup writer writes them, so
    later flushes replace them one for one; late events are not here (the view adds them).
    """

    start_ms: int
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        errors = range_errors(self.start_ms, None) + _common_errors(self.database)
        require(errors, "daily rollup rows query")
        sql = (
            "SELECT customer, meter, group_key, window_start_ms, source, source_partition,\n"
            "    version, value\n"
            f"FROM {DAILY_ROLLUPS.qualified(self.database)} FINAL\n"
            "WHERE window_start_ms >= {start_ms:Int64}"
        )
        return sql, {"start_ms": self.start_ms}

    def parse(self, rows: Sequence[Sequence[Any]]) -> list[DailyRollupRow]:
        return [DailyRollupRow(str(c), str(m), str(g), int(w), str(s), int(p), int(v),
                               nano_from_decimal(value))
                for c, m, g, w, s, p, v, value in rows]

    def run(self, storage: Storage) -> list[DailyRollupRow]:
        return self.parse(storage.query_rows(*self.to_sql()))


@dataclass(frozen=True)
class RollupTotalsQuery:
    """``{(customer, meter, window_start_ms): value_nanos}``, summed over dimension groups.

    The sum over groups is the meter's total for additive aggregations (sum, count); for
    min, max, latest and unique_count it is only the sum of the per-group values. Late
    events within the restatement horizon are included, as in the views; unique_count
    windows with late events only with ``registry`` (see RollupUsageQuery).
    """

    granularity: Granularity = "hour"
    customer: str | None = None
    meter: str | None = None
    database: str = DEFAULT_DATABASE
    registry: ValueProperties | None = None

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        errors = _common_errors(self.database, self.granularity)
        require(errors + _property_errors(self.registry), "rollup totals query")
        source, u, col = _usage_source(self.granularity, self.database, self.registry)
        where, params = _filters([
            ("customer", f"{u}customer = {{customer:String}}", self.customer),
            ("meter", f"{u}meter = {{meter:String}}", self.meter),
        ])
        keys = f"{u}customer, {u}meter, {u}window_start_ms"
        sql = (
            f"SELECT {keys}, sum({col['value_exact']}) AS value\n"
            f"FROM {source}"
            f"{where}"
            f"GROUP BY {keys}\n"
            f"ORDER BY {keys}"
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
