"""`meterline usage`: one customer's usage, read from the rollups.

It reads what billing, the dashboards and the server's usage API read: the rollup views
(``hourly_usage`` / ``daily_usage``) through the server's ``UsageReader``, given the meter
registry, so late usage restated into its window is included (unique_count windows
re-aggregated from raw events) and what the rollups refused (an unknown meter, a negative
quantity: dead letters) is not. A count meter counts events, whatever quantity was sent.
``raw_events`` is the audit trail, not the usage: it is not read here.

    meterline usage CUSTOMER [--meter M] [--granularity hour|day|month]
                             [--from ISO --to ISO] [--tenant T] [--json]
                             [--server URL]   # read key in $METERLINE_API_KEY

Without ``--granularity`` the table shows the period's total per meter and dimension group
(windows folded per the meter's aggregation, day windows); with it, every window. ``--json``
prints, per meter, the exact document ``GET /api/v1/usage/{customer}/{meter}`` returns for
the same range, plus the totals.

On the embedded default ``meterline serve`` owns the chDB directory (one process per
directory), so while it runs ``--server URL`` reads the same numbers through its usage
API instead, with a read key from ``$METERLINE_API_KEY`` (not an option: a key on the
command line is visible to every user of the machine in the process list).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson

from meterline.core.errors import MeterlineError
from meterline.core.meters import Aggregation, Meter, MeterRegistry
from meterline.core.quantity import format_nanos
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.server.usage import (
    DEFAULT_RANGE_MS,
    GRANULARITIES,
    MAX_RANGE_MS,
    Granularity,
    NotFoldable,
    UsagePoint,
    UsageReader,
    fold,
    iso_ms,
    month_start_ms,
    next_month_ms,
    usage_document,
)

__all__ = ["MeterUsage", "UsageArgumentError", "parse_time_ms", "read_usage",
           "read_usage_http", "render_json", "render_table", "run_usage", "usage_range"]

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class UsageArgumentError(MeterlineError):
    """A ``meterline usage`` argument cannot be used (bad time, empty range, no meter)."""


@dataclass(frozen=True)
class GroupTotal:
    group: dict[str, str]
    events: int
    value_nanos: int | None  # None: the windows cannot be combined (unique_count)


@dataclass(frozen=True)
class MeterUsage:
    meter: Meter
    points: list[UsagePoint]
    totals: list[GroupTotal]
    note: str = ""  # why there is no total or no data (e.g. a unique_count month)


def parse_time_ms(text: str, name: str) -> int:
    """``2026-11-01`` (UTC midnight), RFC 3339 (``2026-11-01T12:00:00Z``) or UTC ms."""
    from meterline.server.formats.common import rfc3339_ms

    text = text.strip()
    if text.isdigit():
        return int(text)
    if _DATE.match(text):
        text += "T00:00:00Z"
    try:
        return rfc3339_ms(text)
    except ValueError as exc:
        raise UsageArgumentError(f"--{name}: {exc}; or a date (2026-11-01) or UTC ms") from None


def _window_end(granularity: str, now_ms: int) -> int:
    """The end of the window holding ``now_ms``: the default range ends with whole windows."""
    if granularity == "hour":
        return now_ms - now_ms % HOUR_MS + HOUR_MS
    if granularity == "day":
        return now_ms - now_ms % DAY_MS + DAY_MS
    return next_month_ms(month_start_ms(now_ms))


def usage_range(granularity: str, start: str | None, end: str | None, now_ms: int
                ) -> tuple[int, int]:
    """``[from, to)`` in UTC ms: as given, else the server API's default length ending with
    the current window; refused when empty or longer than the API allows."""
    end_ms = parse_time_ms(end, "to") if end else _window_end(granularity, now_ms)
    start_ms = parse_time_ms(start, "from") if start else end_ms - DEFAULT_RANGE_MS[granularity]
    if start_ms >= end_ms:
        raise UsageArgumentError(f"--from ({iso_ms(start_ms)}) must be before --to "
                                 f"({iso_ms(end_ms)})")
    if end_ms - start_ms > MAX_RANGE_MS[granularity]:
        days = MAX_RANGE_MS[granularity] // DAY_MS
        raise UsageArgumentError(f"the range is longer than {days} days, the most one "
                                 f"{granularity} read covers; narrow --from/--to or use a "
                                 "coarser --granularity")
    return start_ms, end_ms


def _totals(meter: Meter, points: Sequence[UsagePoint]) -> list[GroupTotal]:
    by_group: dict[tuple[tuple[str, str], ...], list[UsagePoint]] = {}
    for p in points:
        by_group.setdefault(tuple(sorted(p.group.items())), []).append(p)
    out = []
    for key, ps in sorted(by_group.items()):
        values = [p.value_nanos for p in ps]  # in window order (the reader's order)
        try:
            value: int | None = values[0] if len(values) == 1 else fold(meter, values)
        except NotFoldable:
            value = None
        out.append(GroupTotal(dict(key), sum(p.events for p in ps), value))
    return out


def read_usage(reader: UsageReader, customer: str, meters: Sequence[Meter],
               granularity: Granularity, start_ms: int, end_ms: int) -> list[MeterUsage]:
    """Each meter's windows of ``customer`` starting in [start_ms, end_ms), and the period
    total per dimension group, through the reader the server's usage API uses."""
    out = []
    for meter in meters:
        try:
            points = reader.usage(customer, meter, granularity, start_ms, end_ms)
        except NotFoldable as exc:
            out.append(MeterUsage(meter, [], [], note=str(exc)))
            continue
        note = ""
        if meter.aggregation is Aggregation.UNIQUE_COUNT and len(
                {p.window_start_ms for p in points}) > 1:
            note = (f"distinct {meter.unit}s per window; windows cannot be added "
                    "(use --granularity to see each)")
        out.append(MeterUsage(meter, points, _totals(meter, points), note))
    return out


def read_usage_http(base_url: str, key: str, customer: str, meters: Sequence[Meter],
                    granularity: Granularity, start_ms: int, end_ms: int
                    ) -> list[MeterUsage]:
    """As ``read_usage``, through a running server's usage API (the key's tenant)."""
    import urllib.error
    import urllib.request
    from urllib.parse import quote

    from meterline.core.quantity import to_nanos

    out = []
    for meter in meters:
        url = (f"{base_url.rstrip('/')}/api/v1/usage/{quote(customer, safe='')}/"
               f"{quote(meter.name, safe='')}?granularity={granularity}"
               f"&from={start_ms}&to={end_ms}")
        request = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                doc = orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = _problem_detail(exc)
            if exc.code == 422:  # the meter cannot be read this way (a unique_count month)
                out.append(MeterUsage(meter, [], [], note=detail))
                continue
            raise UsageArgumentError(f"{base_url} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageArgumentError(f"cannot reach the server at {base_url}: {reason}"
                                     ) from None
        points = [UsagePoint(p["window_start_ms"], p["window_end_ms"], dict(p["dimensions"]),
                             to_nanos(p["value"]), int(p["events"])) for p in doc["data"]]
        note = ""
        if meter.aggregation is Aggregation.UNIQUE_COUNT and len(
                {p.window_start_ms for p in points}) > 1:
            note = (f"distinct {meter.unit}s per window; windows cannot be added "
                    "(use --granularity to see each)")
        out.append(MeterUsage(meter, points, _totals(meter, points), note))
    return out


def _problem_detail(exc: Any) -> str:
    try:
        doc = orjson.loads(exc.read())
        return str(doc.get("detail") or doc.get("title") or exc.reason)
    except (orjson.JSONDecodeError, OSError, AttributeError):
        return str(exc.reason)


def _group_text(group: dict[str, str]) -> str:
    # A dimension the events did not carry is '' in the rollups: not worth a column.
    return ",".join(f"{k}={v}" for k, v in sorted(group.items()) if v) or "-"


def render_table(customer: str, usage: Sequence[MeterUsage], granularity: str, start_ms: int,
                 end_ms: int, *, windows: bool) -> list[str]:
    lines = [f"usage of {customer} from {iso_ms(start_ms)} to {iso_ms(end_ms)} "
             f"(rollups, {granularity} windows, UTC; late usage restated)"]
    if not any(u.points for u in usage):
        lines.append(f"no usage recorded for {customer} in this range")
        lines += [f"  {u.meter.name}: {u.note}" for u in usage if u.note]
        return lines
    if windows:
        lines.append(f"{'meter':<18}{'window start':<26}{'dimensions':<28}{'events':>10}"
                     f"{'value (exact)':>24}  unit")
        for u in usage:
            for p in u.points:
                lines.append(f"{u.meter.name:<18}{iso_ms(p.window_start_ms):<26}"
                             f"{_group_text(p.group):<28}{p.events:>10,}"
                             f"{format_nanos(p.value_nanos):>24}  {u.meter.unit}")
    else:
        lines.append(f"{'meter':<18}{'aggregation':<14}{'dimensions':<28}{'events':>10}"
                     f"{'total (exact)':>24}  unit")
        for u in usage:
            for t in u.totals:
                value = "-" if t.value_nanos is None else format_nanos(t.value_nanos)
                lines.append(f"{u.meter.name:<18}{u.meter.aggregation.value:<14}"
                             f"{_group_text(t.group):<28}{t.events:>10,}{value:>24}  "
                             f"{u.meter.unit}")
    lines += [f"note: {u.meter.name}: {u.note}" for u in usage if u.note and u.points]
    return lines


def render_json(customer: str, usage: Sequence[MeterUsage], granularity: str, start_ms: int,
                end_ms: int) -> bytes:
    doc = {
        "customer": customer, "granularity": granularity,
        "from": iso_ms(start_ms), "to": iso_ms(end_ms),
        # Each entry is the server API's document for (customer, meter, range).
        "usage": [usage_document(customer, u.meter, granularity, start_ms, end_ms, u.points)
                  for u in usage if not u.note or u.points],
        "totals": [{"meter": u.meter.name, "dimensions": t.group, "events": t.events,
                    "value": None if t.value_nanos is None else format_nanos(t.value_nanos)}
                   for u in usage for t in u.totals],
        "notes": {u.meter.name: u.note for u in usage if u.note},
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def _meters(registry: MeterRegistry, name: str | None) -> list[Meter]:
    if name is None:
        return list(registry)
    meter = registry.get(name)
    if meter is None:
        raise UsageArgumentError(f"no meter {name!r}; known: {', '.join(registry.names)}")
    return [meter]


def run_usage(config: Any, customer: str, *, meter: str | None = None,
              granularity: str | None = None, start: str | None = None,
              end: str | None = None, tenant: str | None = None, as_json: bool = False,
              server: str | None = None, now_ms: int | None = None) -> int:
    """Print the usage (exit status 0, also when there is none in the range)."""
    import time

    from meterline.sinks.exceptions import StorageOpenError
    from meterline.sinks.storage import open_storage

    if granularity is not None and granularity not in GRANULARITIES:
        raise UsageArgumentError(f"--granularity must be one of {', '.join(GRANULARITIES)}")
    gran = cast(Granularity, granularity or "day")
    registry = config.registry()
    meters = _meters(registry, meter)
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    start_ms, end_ms = usage_range(gran, start, end, now)
    if server is not None:
        import os

        key = os.environ.get("METERLINE_API_KEY", "")
        if not key:
            raise UsageArgumentError("--server needs a read key in $METERLINE_API_KEY")
        if tenant is not None:
            raise UsageArgumentError("--tenant is the key's with --server: leave it out")
        usage = read_usage_http(server, key, customer, meters, gran, start_ms, end_ms)
        _print(customer, usage, gran, start_ms, end_ms, as_json, granularity is not None)
        return 0
    stored = customer
    if tenant is not None:
        from meterline.server.tenancy import check_tenant, scoped_customer

        try:
            stored = scoped_customer(check_tenant(tenant), customer)
        except ValueError as exc:
            raise UsageArgumentError(f"--tenant: {exc}") from None
    try:
        storage = open_storage(config.storage_config())
    except StorageOpenError as exc:
        # On the embedded default `meterline serve` owns the chDB directory (one process
        # per directory): say where the same numbers are, instead of only that it failed.
        raise StorageOpenError(
            f"{exc}\n  if `meterline serve` is running on this data, read through it: "
            "METERLINE_API_KEY=<read key> meterline usage CUSTOMER --server "
            "http://127.0.0.1:8080") from None
    try:
        reader = UsageReader(storage, registry, database=storage.database)
        usage = read_usage(reader, stored, meters, gran, start_ms, end_ms)
    finally:
        storage.close()
    _print(customer, usage, gran, start_ms, end_ms, as_json, granularity is not None)
    return 0


def _print(customer: str, usage: Sequence[MeterUsage], granularity: str, start_ms: int,
           end_ms: int, as_json: bool, windows: bool) -> None:
    if as_json:
        print(render_json(customer, usage, granularity, start_ms, end_ms).decode())
    else:
        print("\n".join(render_table(customer, usage, granularity, start_ms, end_ms,
                                     windows=windows)))
