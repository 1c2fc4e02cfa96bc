"""Usage and quota reads from the rollup views (``hourly_usage`` / ``daily_usage``).

Only the query objects of ``meterline.sinks.rollups`` touch SQL: customer, meter and the
time range travel as bound parameters, dimension filters are applied to the returned rows
in Python, so no request value is ever part of SQL text.

Months are folded from days per the meter's aggregation (sum and count add up, min and max
take the extreme, latest takes the last day's value). A unique_count cannot be folded: the
distinct users of a month are not the sum of each day's, and the rollups keep counts, not
sets, so a month of a unique_count meter is refused rather than approximated.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from meterline.core.meters import Aggregation, Meter, MeterRegistry
from meterline.core.quantity import to_nanos
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.sinks.rollups import RollupUsageQuery

Granularity = Literal["hour", "day", "month"]
GRANULARITIES: tuple[str, ...] = ("hour", "day", "month")
Period = Literal["day", "month"]


class NotFoldable(ValueError):
    """The meter's aggregation cannot be combined over the windows asked for."""


@dataclass(frozen=True, slots=True)
class UsagePoint:
    window_start_ms: int
    window_end_ms: int
    group: dict[str, str]
    value_nanos: int
    events: int


def month_start_ms(ms: int) -> int:
    d = dt.datetime.fromtimestamp(ms // 1000, dt.UTC)
    return int(dt.datetime(d.year, d.month, 1, tzinfo=dt.UTC).timestamp()) * 1000


def next_month_ms(month_start: int) -> int:
    d = dt.datetime.fromtimestamp(month_start // 1000, dt.UTC)
    year, month = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return int(dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()) * 1000


def fold(meter: Meter, values: list[int]) -> int:
    """Combine window values (in window order) into one, per the meter's aggregation."""
    agg = meter.aggregation
    if agg in (Aggregation.SUM, Aggregation.COUNT):
        return sum(values)
    if agg is Aggregation.MIN:
        return min(values)
    if agg is Aggregation.MAX:
        return max(values)
    if agg is Aggregation.LATEST:
        return values[-1]
    raise NotFoldable(f"meter {meter.name!r} is a {agg.value}: its windows cannot be combined "
                      "exactly (the rollups keep distinct counts, not the sets)")


class UsageReader:
    """Reads one customer's meter from the rollup views. ``lock`` serialises access to an
    embedded chDB shared with the pipeline threads (one engine per process)."""

    def __init__(self, storage: Any, registry: MeterRegistry, *, database: str,
                 lock: threading.Lock | None = None) -> None:
        self._storage = storage
        self.registry = registry
        self._database = database
        self._lock = lock or threading.Lock()

    def _rows(self, customer: str, meter: str, granularity: Literal["hour", "day"],
              start_ms: int, end_ms: int) -> list[UsagePoint]:
        query = RollupUsageQuery(customer=customer, meter=meter, start_ms=start_ms,
                                 end_ms=end_ms, granularity=granularity,
                                 database=self._database)
        with self._lock:
            rows = query.run(self._storage)
        size = HOUR_MS if granularity == "hour" else DAY_MS
        return [UsagePoint(r.window_start_ms, r.window_start_ms + size, r.group,
                           r.value_nanos, r.events) for r in rows]

    def usage(self, customer: str, meter: Meter, granularity: Granularity, start_ms: int,
              end_ms: int, dimensions: Mapping[str, str] | None = None) -> list[UsagePoint]:
        """Windows *starting* in [start_ms, end_ms), per dimension group, oldest first;
        ``dimensions`` keeps only groups with those values."""
        if granularity == "month":
            points = self._months(customer, meter, start_ms, end_ms)
        else:
            points = self._rows(customer, meter.name, granularity, start_ms, end_ms)
        if dimensions:
            points = [p for p in points
                      if all(p.group.get(k) == v for k, v in dimensions.items())]
        return points

    def _months(self, customer: str, meter: Meter, start_ms: int, end_ms: int
                ) -> list[UsagePoint]:
        if meter.aggregation is Aggregation.UNIQUE_COUNT:
            fold(meter, [])  # raises NotFoldable with the reason
        first = month_start_ms(start_ms)
        if first < start_ms:
            first = next_month_ms(first)
        if first >= end_ms:
            return []
        # Whole months: the last one starting before end_ms is read to its end.
        days = self._rows(customer, meter.name, "day", first,
                          next_month_ms(month_start_ms(end_ms - 1)))
        grouped: dict[tuple[int, tuple[tuple[str, str], ...]], list[UsagePoint]] = {}
        for day in days:
            month = month_start_ms(day.window_start_ms)
            grouped.setdefault((month, tuple(sorted(day.group.items()))), []).append(day)
        return [
            UsagePoint(month, next_month_ms(month), dict(group),
                       fold(meter, [d.value_nanos for d in ds]), sum(d.events for d in ds))
            for (month, group), ds in sorted(grouped.items())
        ]

    def used(self, customer: str, meter: Meter, start_ms: int, end_ms: int) -> int:
        """The meter's value over [start_ms, end_ms) (day-aligned), all groups together."""
        if meter.aggregation in (Aggregation.UNIQUE_COUNT, Aggregation.LATEST):
            raise NotFoldable(f"meter {meter.name!r} is a {meter.aggregation.value}: a quota "
                              "needs a sum, count, min or max meter")
        days = self._rows(customer, meter.name, "day", start_ms, end_ms)
        return fold(meter, [d.value_nanos for d in days]) if days else 0


# --------------------------------------------------------------------------- quotas


@dataclass(frozen=True, slots=True)
class Limit:
    amount_nanos: int
    period: Period


class LimitSource(Protocol):
    """Where quota limits come from: config today, the rating engine's plans later."""

    def limit_for(self, tenant: str, customer: str, meter: str) -> Limit | None: ...


@dataclass(frozen=True, slots=True)
class QuotaRule:
    meter: str
    limit_nanos: int
    period: Period = "month"
    tenant: str | None = None
    customer: str | None = None


def parse_quota_rules(raw: object, registry: MeterRegistry) -> tuple[list[QuotaRule], list[str]]:
    """``[[server.quotas]]`` tables -> rules, and every problem found."""
    errors: list[str] = []
    rules: list[QuotaRule] = []
    if raw is None:
        return rules, errors
    if not isinstance(raw, list):
        return rules, ["[[server.quotas]] must be an array of tables"]
    for i, entry in enumerate(raw):
        where = f"[[server.quotas]] #{i + 1}"
        if not isinstance(entry, dict):
            errors.append(f"{where}: must be a table")
            continue
        unknown = sorted(set(entry) - {"meter", "limit", "period", "tenant", "customer"})
        if unknown:
            errors.append(f"{where}: unknown key(s) {', '.join(unknown)}")
        meter = entry.get("meter")
        if meter not in registry:
            errors.append(f"{where}: meter {meter!r} is not in the registry")
        period = entry.get("period", "month")
        if period not in ("day", "month"):
            errors.append(f"{where}: period must be 'day' or 'month', got {period!r}")
        limit = entry.get("limit")
        try:
            if isinstance(limit, float):  # TOML floats are binary: state limits exactly
                raise ValueError("write the limit as an integer or a decimal string")
            nanos = to_nanos(limit)
            if nanos < 0:
                raise ValueError("must be >= 0")
        except ValueError as exc:
            errors.append(f"{where}: limit {limit!r}: {exc}")
            continue
        for key in ("tenant", "customer"):
            if key in entry and not (isinstance(entry[key], str) and entry[key]):
                errors.append(f"{where}: {key} must be a non-empty string")
        if isinstance(meter, str) and period in ("day", "month"):
            rules.append(QuotaRule(meter, nanos, period, entry.get("tenant"),
                                   entry.get("customer")))
    return rules, errors


class ConfigLimits:
    """Limits from config; the most specific rule wins (tenant+customer, tenant, any)."""

    def __init__(self, rules: Iterable[QuotaRule]) -> None:
        self._rules: dict[tuple[str, str | None, str | None], QuotaRule] = {
            (r.meter, r.tenant, r.customer): r for r in rules}

    def limit_for(self, tenant: str, customer: str, meter: str) -> Limit | None:
        for key in ((meter, tenant, customer), (meter, tenant, None), (meter, None, None)):
            rule = self._rules.get(key)
            if rule is not None:
                return Limit(rule.limit_nanos, rule.period)
        return None


@dataclass(frozen=True, slots=True)
class QuotaStatus:
    limit_nanos: int
    used_nanos: int
    period: Period
    period_start_ms: int
    period_end_ms: int

    @property
    def remaining_nanos(self) -> int:
        return max(self.limit_nanos - self.used_nanos, 0)


class RollupGeneration:
    """A counter the rollup writer bumps after every write it made durable. Anything
    cached against an older generation may be stale. Thread-safe."""

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    def bump(self) -> None:
        with self._lock:
            self._value += 1

    @property
    def value(self) -> int:
        return self._value


class TimeGeneration:
    """For rollups written by another process (Kafka mode): a generation that moves every
    ``interval_s``, the rollups' flush interval, so a cached total is never older than the
    rollups themselves can be fresh."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._clock = clock

    @property
    def value(self) -> int:
        return int(self._clock() / self._interval)


class Generation(Protocol):
    @property
    def value(self) -> int: ...


class QuotaService:
    def __init__(self, reader: UsageReader, limits: LimitSource, generation: Generation, *,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self._reader = reader
        self.limits = limits
        self._generation = generation
        self._clock_ms = clock_ms
        self._cache: dict[tuple[str, str, int], tuple[int, int]] = {}
        self._lock = threading.Lock()

    def status(self, tenant: str, external: str, stored: str, meter: Meter
               ) -> QuotaStatus | None:
        limit = self.limits.limit_for(tenant, external, meter.name)
        if limit is None:
            return None
        now = self._clock_ms()
        if limit.period == "day":
            start, end = now - now % DAY_MS, now - now % DAY_MS + DAY_MS
        else:
            start = month_start_ms(now)
            end = next_month_ms(start)
        generation = self._generation.value  # read *before* the query: never too new
        key = (stored, meter.name, start)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] == generation:
            used = hit[1]
        else:
            used = self._reader.used(stored, meter, start, end)
            with self._lock:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[key] = (generation, used)
        return QuotaStatus(limit.amount_nanos, used, limit.period, start, end)
