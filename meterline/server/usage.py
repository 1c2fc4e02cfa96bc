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
from meterline.core.quantity import format_nanos, to_nanos
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.sinks.rollup_queries import CustomerUsageQuery
from meterline.sinks.rollups import RollupUsageQuery

Granularity = Literal["hour", "day", "month"]
GRANULARITIES: tuple[str, ...] = ("hour", "day", "month")
Period = Literal["day", "month"]

# The range read when a request (or `meterline usage`) names none, ending now, and the
# longest range one read may cover: hourly rows are kept ~13 months, and a bound keeps one
# request from scanning years of hours.
DEFAULT_RANGE_MS: Mapping[str, int] = {"hour": DAY_MS, "day": 31 * DAY_MS,
                                       "month": 366 * DAY_MS}
MAX_RANGE_MS: Mapping[str, int] = {"hour": 93 * DAY_MS, "day": 3_700 * DAY_MS,
                                   "month": 3_700 * DAY_MS}


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


def iso_ms(ms: int) -> str:
    """UTC ms -> RFC 3339 with milliseconds and ``Z`` (exact: no float on the way)."""
    return (dt.datetime.fromtimestamp(ms // 1000, dt.UTC)
            .replace(microsecond=(ms % 1000) * 1000)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def usage_document(customer: str, meter: Meter, granularity: str, start_ms: int, end_ms: int,
                   points: Iterable[UsagePoint]) -> dict[str, Any]:
    """The one JSON shape of a usage read: the body of ``GET /api/v1/usage/...`` and each
    meter of ``meterline usage --json``, so the two can be compared field for field.
    Values are exact decimal strings."""
    return {
        "customer": customer, "meter": meter.name, "unit": meter.unit,
        "aggregation": meter.aggregation.value, "granularity": granularity,
        "from": iso_ms(start_ms), "to": iso_ms(end_ms),
        "data": [{"window_start": iso_ms(p.window_start_ms),
                  "window_end": iso_ms(p.window_end_ms),
                  "window_start_ms": p.window_start_ms, "window_end_ms": p.window_end_ms,
                  "dimensions": p.group, "value": format_nanos(p.value_nanos),
                  "events": p.events} for p in points],
    }


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


def months_from_days(meter: Meter, days: Iterable[UsagePoint]) -> list[UsagePoint]:
    """Day windows (oldest first) folded into calendar months per dimension group."""
    if meter.aggregation is Aggregation.UNIQUE_COUNT:
        fold(meter, [])  # raises NotFoldable with the reason
    grouped: dict[tuple[int, tuple[tuple[str, str], ...]], list[UsagePoint]] = {}
    for day in days:
        month = month_start_ms(day.window_start_ms)
        grouped.setdefault((month, tuple(sorted(day.group.items()))), []).append(day)
    return [
        UsagePoint(month, next_month_ms(month), dict(group),
                   fold(meter, [d.value_nanos for d in ds]), sum(d.events for d in ds))
        for (month, group), ds in sorted(grouped.items())
    ]


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
        # The registry lets a unique_count window with late events be re-aggregated from
        # raw events (sinks/rollup_queries.py); without it those late events would be left
        # out of the value, and the API would disagree with billing and the dashboards.
        # Only a unique_count meter needs it: the re-aggregation join scans raw events,
        # and other meters' rows are the same without it.
        found = self.registry.get(meter)
        unique = found is not None and found.aggregation is Aggregation.UNIQUE_COUNT
        query = RollupUsageQuery(customer=customer, meter=meter, start_ms=start_ms,
                                 end_ms=end_ms, granularity=granularity,
                                 database=self._database,
                                 registry=self.registry if unique else None)
        with self._lock:
            rows = query.run(self._storage)
        size = HOUR_MS if granularity == "hour" else DAY_MS
        return [UsagePoint(r.window_start_ms, r.window_start_ms + size, r.group,
                           r.value_nanos, r.events) for r in rows]

    def usage_by_meter(self, customer: str, granularity: Literal["hour", "day"],
                       start_ms: int, end_ms: int) -> dict[str, list[UsagePoint]]:
        """Every registry meter's windows *starting* in [start_ms, end_ms), per dimension
        group, oldest first: ``usage(customer, meter, granularity, ...)`` of each meter
        (a meter without usage: ``[]``), read in one query (the usage page's read)."""
        # The registry goes in whenever it has a unique_count meter: it changes only those
        # meters' windows (see _rows), so the others read the same as one by one.
        unique = any(m.aggregation is Aggregation.UNIQUE_COUNT for m in self.registry)
        query = CustomerUsageQuery(customer=customer, start_ms=start_ms, end_ms=end_ms,
                                   granularity=granularity, database=self._database,
                                   registry=self.registry if unique else None)
        with self._lock:
            found = query.run(self._storage)
        size = HOUR_MS if granularity == "hour" else DAY_MS
        return {name: [UsagePoint(r.window_start_ms, r.window_start_ms + size, r.group,
                                  r.value_nanos, r.events) for r in found.get(name, [])]
                for name in self.registry.names}

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
        return months_from_days(meter, days)

    def used(self, customer: str, meter: Meter, start_ms: int, end_ms: int) -> int:
        """The meter's value over [start_ms, end_ms) (day-aligned), all groups together."""
        check_quota_meter(meter)
        days = self._rows(customer, meter.name, "day", start_ms, end_ms)
        return fold(meter, [d.value_nanos for d in days]) if days else 0


# --------------------------------------------------------------------------- quotas


def check_quota_meter(meter: Meter) -> None:
    if meter.aggregation in (Aggregation.UNIQUE_COUNT, Aggregation.LATEST):
        raise NotFoldable(f"meter {meter.name!r} is a {meter.aggregation.value}: a quota "
                          "needs a sum, count, min or max meter")


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


class NeedsRead(Exception):
    """``QuotaService.status(read=False)``: the answer needs a storage read (a thread)."""


class QuotaService:
    """``used`` for a quota: from the in-memory ``totals`` the embedded rollup writer
    keeps (server/quota_totals.py), else from the views, cached per (customer, meter,
    period) against the rollup generation. One read per key at a time: the requests
    that miss together wait for that read instead of each holding the chDB engine."""

    def __init__(self, reader: UsageReader, limits: LimitSource, generation: Generation, *,
                 totals: Any = None,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self._reader = reader
        self.limits = limits
        self._generation = generation
        self._totals = totals  # a RollupTotals, or None (Kafka mode: rollups elsewhere)
        self._clock_ms = clock_ms
        self._cache: dict[tuple[str, str, int], tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._reading: dict[tuple[str, str, int], threading.Lock] = {}
        # hit: answered from memory (totals or cache); miss: read the views
        self.counts = {"hit": 0, "miss": 0}

    def status(self, tenant: str, external: str, stored: str, meter: Meter, *,
               read: bool = True) -> QuotaStatus | None:
        """None: no quota is set. ``read=False`` raises NeedsRead instead of reading
        storage, so the event loop can answer from memory and hand only misses to a
        thread."""
        limit = self.limits.limit_for(tenant, external, meter.name)
        if limit is None:
            return None
        check_quota_meter(meter)
        now = self._clock_ms()
        month = month_start_ms(now)
        if limit.period == "day":
            start, end = now - now % DAY_MS, now - now % DAY_MS + DAY_MS
        else:
            start, end = month, next_month_ms(month)
        used = None
        if self._totals is not None:
            self._totals.prune(month)
            used = self._totals.used(stored, meter, start, end)
        if used is None:
            used = self._cached(stored, meter, start, end, read)
        else:
            self.counts["hit"] += 1
        return QuotaStatus(limit.amount_nanos, used, limit.period, start, end)

    def _cached(self, stored: str, meter: Meter, start: int, end: int, read: bool) -> int:
        key = (stored, meter.name, start)
        generation = self._generation.value  # read *before* the query: never too new
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] == generation:
            self.counts["hit"] += 1
            return hit[1]
        if not read:
            raise NeedsRead
        with self._lock:
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:
            generation = self._generation.value
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None and hit[0] == generation:  # read by the request before us
                self.counts["hit"] += 1
                return hit[1]
            self.counts["miss"] += 1
            used = self._reader.used(stored, meter, start, end)
            with self._lock:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[key] = (generation, used)
                self._reading.pop(key, None)
        return used


class QuotaCollector:
    """``meterline_quota_cache_total{result}`` for /metrics: quota answers from memory
    (hit) and from a storage read (miss)."""

    def __init__(self, quotas: QuotaService) -> None:
        self._quotas = quotas

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("meterline_quota_cache",
                                     "Quota checks answered from memory (hit) or by reading "
                                     "the usage views (miss)", labels=["result"])
        for result, n in sorted(self._quotas.counts.items()):
            family.add_metric([result], n)
        yield family
