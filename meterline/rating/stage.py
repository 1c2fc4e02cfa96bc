"""The rating stage: billing state + rollups -> ``rated_usage``; and the reports on it.

- :func:`rate`: every subscription period starting in a month, rated from the rollups and
  written to ``rated_usage`` (idempotent: a re-run rewrites the same keys; lines a re-run
  no longer produces are tombstoned). Periods closed in the event log are never
  rewritten: if re-rating one gives a different line (late usage restated into the
  rollups after the invoice), a correction line carrying the difference is written
  beside it (``correct_line``), referencing the original.
- :func:`simulate`: the same periods re-rated under a candidate plan; nothing is written.
- :func:`reconcile`: raw events vs rollups vs rated quantities per line item.
- :func:`explain_line`, :func:`invoice_preview`: the stored lines in words.

Composition only: the maths is in ``meterline.core.billing`` (pure), storage in
``meterline.sinks.rated_usage`` / ``billing_events``.
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Protocol

from meterline.core.billing import (
    BillingState,
    Period,
    PlanVersion,
    RatedLine,
    Subscription,
    UsageRequest,
    correct_line,
    explain,
    invoice_total,
    iso,
    line_status,
    parse_instant,
    rate_period,
    segments,
    usage_requests,
)
from meterline.core.billing.periods import add_months, periods_starting_in
from meterline.core.billing.segments import billed_span
from meterline.core.pricing.exact import fmt


class UsageReader(Protocol):
    def quantities(self, requests: Iterable[UsageRequest]) -> Mapping[UsageRequest, Decimal]: ...


def month_range(label: str) -> tuple[int, int]:
    """``"2026-11"`` -> [Nov 1, Dec 1) in UTC ms. A period "of" a month is each
    subscription's billing period that *starts* in it."""
    try:
        start = parse_instant(f"{label.strip()}-01")
    except ValueError:
        raise ValueError(f"--period must be a month like 2026-11, got {label!r}") from None
    return start, add_months(start, 1)


def select_periods(state: BillingState, start_ms: int, end_ms: int,
                   subscription_id: str | None = None) -> list[tuple[Subscription, Period]]:
    out = []
    subs = (state.subscriptions.values() if subscription_id is None
            else [state.subscriptions[subscription_id]])
    for sub in subs:
        for period in periods_starting_in(sub.cycle, sub.anchor_ms, start_ms, end_ms,
                                          sub.interval_months):
            if billed_span(sub, period) is not None:
                out.append((sub, period))
    return sorted(out, key=lambda sp: (sp[0].customer, sp[0].id, sp[1].start_ms))


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Rating builds ~600,000 line objects (and their request keys and column tuples) for
    a month of 100,000 subscriptions and keeps them until it returns: the cyclic
    collector, triggered by those allocations, rescanned the growing heap over and over
    and found nothing to free (measured at 50,000 subscriptions: plan 2.1 -> 0.5 s CPU,
    price 5.8 -> 4.6 s, write 3.6 -> 2.0 s). Reference counting still frees what is
    dropped; a cycle made meanwhile waits for the collector, which is back on, as it was,
    on the way out (the switch is process-wide: other threads go without it meanwhile).
    Nests."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Phases:
    """Wall and CPU seconds per phase (``plan``, ``read``, ...). The CPU figure is this
    process's, chDB's threads included: on a shared machine it is the steadier one."""

    def __init__(self, wall: dict[str, float], cpu: dict[str, float]) -> None:
        self.wall, self.cpu = wall, cpu
        self._t, self._c = time.monotonic(), time.process_time()

    def lap(self, name: str) -> None:
        t, c = time.monotonic(), time.process_time()
        self.wall[name] = self.wall.get(name, 0.0) + t - self._t
        self.cpu[name] = self.cpu.get(name, 0.0) + c - self._c
        self._t, self._c = t, c


@dataclass
class RateResult:
    lines: list[RatedLine]
    periods: int
    written: int = 0
    deleted: int = 0
    closed_unchanged: int = 0  # lines of closed periods, not rewritten
    corrections: list[RatedLine] = field(default_factory=list)  # written for closed periods
    queries: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    query_timings: list[tuple[str, int, int, int, float]] = field(default_factory=list)

    @property
    def total_by_currency(self) -> dict[str, Decimal]:
        out: dict[str, Decimal] = defaultdict(Decimal)
        for line in self.lines:
            out[line.currency] += line.amount
        return dict(out)


def compute_lines(state: BillingState, pairs: Sequence[tuple[Subscription, Period]],
                  reader: UsageReader, *, as_of_ms: int, settle_ms: int,
                  candidate: PlanVersion | None = None, replaces: str | None = None,
                  seconds: dict[str, float] | None = None,
                  cpu_seconds: dict[str, float] | None = None) -> list[RatedLine]:
    """Pure apart from ``reader``: segments, one batched read, then each period's lines.
    With ``candidate``, the segments on plan ``replaces`` are priced by it instead."""
    with _no_cyclic_gc():
        return _compute_lines(state, pairs, reader, as_of_ms=as_of_ms, settle_ms=settle_ms,
                              candidate=candidate, replaces=replaces,
                              phases=_Phases(seconds if seconds is not None else {},
                                             cpu_seconds if cpu_seconds is not None else {}))


def _compute_lines(state: BillingState, pairs: Sequence[tuple[Subscription, Period]],
                   reader: UsageReader, *, as_of_ms: int, settle_ms: int,
                   candidate: PlanVersion | None, replaces: str | None,
                   phases: _Phases) -> list[RatedLine]:
    work = []
    requests: list[UsageRequest] = []
    for sub, period in pairs:
        segs = segments(sub, state.plans, period)
        if candidate is not None:
            segs = [replace(s, plan=candidate) if s.plan.plan_id == replaces else s
                    for s in segs]
        work.append((sub, period, segs))
        requests += usage_requests(sub, segs)
    phases.lap("plan")
    quantities = reader.quantities(requests)
    phases.lap("read")
    lines: list[RatedLine] = []
    for sub, period, segs in work:
        lines += rate_period(sub, period, segs, quantities,
                             status=line_status(period, as_of_ms, settle_ms))
    phases.lap("price")
    return lines


def _key(line: RatedLine) -> tuple[str, int, str, int]:
    return (line.subscription_id, line.period_start_ms, line.line_id, line.correction)


def rate(storage: Any, state: BillingState, *, period: str, as_of_ms: int, settle_ms: int,
         rated_at_ms: int | None = None, database: str | None = None,
         subscription_id: str | None = None) -> RateResult:
    with _no_cyclic_gc():
        return _rate(storage, state, period=period, as_of_ms=as_of_ms, settle_ms=settle_ms,
                     rated_at_ms=rated_at_ms, database=database,
                     subscription_id=subscription_id)


def _rate(storage: Any, state: BillingState, *, period: str, as_of_ms: int, settle_ms: int,
          rated_at_ms: int | None, database: str | None,
          subscription_id: str | None) -> RateResult:
    from meterline.sinks.rated_usage import (
        CurrentKeysQuery,
        CurrentLinesQuery,
        StorageUsageReader,
        write_lines,
    )

    database = database or storage.database
    start_ms, end_ms = month_range(period)
    pairs = select_periods(state, start_ms, end_ms, subscription_id)
    reader = StorageUsageReader(storage, database)
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    lines = compute_lines(state, pairs, reader, as_of_ms=as_of_ms, settle_ms=settle_ms,
                          seconds=seconds, cpu_seconds=cpu_seconds)
    phases = _Phases(seconds, cpu_seconds)
    range_start = min((p.start_ms for _, p in pairs), default=start_ms)
    wanted = {(sub.id, p.start_ms) for sub, p in pairs}
    existing = [k for k in CurrentKeysQuery(range_start, end_ms, database,
                                            subscription_id=subscription_id).run(storage)
                if (k[0], k[1]) in wanted]
    closed = {(sub.id, p.start_ms) for sub, p in pairs if p in sub.closed}
    # Whole lines only for closed periods: they are compared, never rewritten.
    old = {_key(x): x for sid in sorted({s for s, _ in closed})
           for x in CurrentLinesQuery(range_start, end_ms, database,
                                      subscription_id=sid).run(storage)
           if (x.subscription_id, x.period_start_ms) in closed}
    invoiced: dict[tuple[str, int, str], list[RatedLine]] = defaultdict(list)
    for x in old.values():
        invoiced[(x.subscription_id, x.period_start_ms, x.line_id)].append(x)
    result = RateResult(lines=lines, periods=len(pairs))
    to_write: list[RatedLine] = []
    for line in lines:
        if (line.subscription_id, line.period_start_ms) in closed:
            # Never rewritten: a changed line gets a correction of the difference.
            fix = correct_line(line, invoiced[(line.subscription_id, line.period_start_ms,
                                               line.line_id)])
            if fix is None:
                result.closed_unchanged += 1
            else:
                result.corrections.append(fix)
                to_write.append(fix)
            continue
        to_write.append(line)
    produced = {_key(x) for x in lines}
    gone_keys = [k for k in existing if k not in produced and (k[0], k[1]) not in closed]
    gone = (_lines_by_key(storage, database, range_start, end_ms, gone_keys)
            if gone_keys else [])
    phases.lap("compare")
    stamp = rated_at_ms if rated_at_ms is not None else time.time_ns() // 1_000_000
    write_lines(storage, to_write, rated_at_ms=stamp, deleted=gone, database=database)
    phases.lap("write")
    result.written, result.deleted, result.queries = len(to_write), len(gone), reader.queries
    result.query_timings = reader.timings
    result.seconds, result.cpu_seconds = seconds, cpu_seconds
    return result


def _lines_by_key(storage: Any, database: str, start_ms: int, end_ms: int,
                  keys: Sequence[tuple[str, int, str, int]]) -> list[RatedLine]:
    """The current lines with these keys (to tombstone them: a tombstone row carries the
    line's key columns, so it replaces exactly that line)."""
    from meterline.sinks.rated_usage import CurrentLinesQuery

    wanted = set(keys)
    out: list[RatedLine] = []
    for sid in sorted({k[0] for k in keys}):
        out += [x for x in CurrentLinesQuery(start_ms, end_ms, database,
                                             subscription_id=sid).run(storage)
                if _key(x) in wanted]
    return out


# --------------------------------------------------------------------------- simulate


@dataclass
class Simulation:
    period: str
    candidate: str
    rows: list[tuple[str, str, Decimal, Decimal]]  # customer, currency, current, candidate

    @property
    def total_current(self) -> Decimal:
        return sum((r[2] for r in self.rows), Decimal(0))

    @property
    def total_candidate(self) -> Decimal:
        return sum((r[3] for r in self.rows), Decimal(0))


def simulate(storage: Any, state: BillingState, candidate: PlanVersion, *, period: str,
             as_of_ms: int, settle_ms: int, on_plan: str | None = None,
             database: str | None = None) -> Simulation:
    """Re-rate the period's segments on plan ``on_plan`` (default: the candidate's plan
    id) under ``candidate``, and compare each customer's period total with the rating under
    their actual plans. Other segments (before an upgrade, say), trials and proration stay
    as they were. Nothing is written."""
    from meterline.sinks.rated_usage import StorageUsageReader

    start_ms, end_ms = month_range(period)
    target = on_plan or candidate.plan_id
    pairs = [(s, p) for s, p in select_periods(state, start_ms, end_ms)
             if any(seg.plan.plan_id == target for seg in segments(s, state.plans, p))]
    reader = StorageUsageReader(storage, database)
    now = compute_lines(state, pairs, reader, as_of_ms=as_of_ms, settle_ms=settle_ms)
    then = compute_lines(state, pairs, reader, as_of_ms=as_of_ms, settle_ms=settle_ms,
                         candidate=candidate, replaces=target)
    totals: dict[tuple[str, str], list[Decimal]] = defaultdict(lambda: [Decimal(0)] * 2)
    for i, lines in enumerate((now, then)):
        for line in lines:
            totals[(line.customer, line.currency)][i] += line.amount
    rows = [(c, cur, v[0], v[1]) for (c, cur), v in sorted(totals.items())]
    return Simulation(period, f"{candidate.plan_id} v{candidate.version}", rows)


# --------------------------------------------------------------------------- reconcile


@dataclass
class ReconcileRow:
    customer: str
    subscription_id: str
    meter: str
    aggregation: str
    segment: tuple[int, int]
    raw: Decimal | None  # None: raw events cannot answer this aggregation directly
    rollup: Decimal
    rated: Decimal | None  # None: no rated line stored (not rated yet)

    @property
    def drift(self) -> bool:
        if self.rated is None or self.rated != self.rollup:
            return True
        return self.raw is not None and self.raw != self.rollup


def reconcile(storage: Any, state: BillingState, *, period: str,
              database: str | None = None) -> list[ReconcileRow]:
    """Per usage line of the period: the quantity in raw events (sum and count), in the
    rollups (re-read now) and on the stored rated line. Any difference is drift."""
    from meterline.sinks.rated_usage import CurrentLinesQuery, StorageUsageReader

    database = database or storage.database
    start_ms, end_ms = month_range(period)
    pairs = select_periods(state, start_ms, end_ms)
    work = [(sub, r) for sub, p in pairs
            for r in usage_requests(sub, segments(sub, state.plans, p))]
    requests = [r for _, r in work]
    rollup = StorageUsageReader(storage, database).quantities(requests)
    raw = _raw_quantities(storage, database, requests)
    range_start = min((p.start_ms for _, p in pairs), default=start_ms)
    # A line and its corrections (closed periods) together are what was billed.
    stored: dict[tuple[str, str, str, int], Decimal] = defaultdict(Decimal)
    for x in CurrentLinesQuery(range_start, end_ms, database).run(storage):
        if x.kind != "base_fee":
            stored[(x.subscription_id, x.meter, x.aggregation, x.segment_start_ms)] += x.quantity
    return [ReconcileRow(r.customer, sub.id, r.meter, r.aggregation, (r.start_ms, r.end_ms),
                         raw.get(r), rollup[r],
                         stored.get((sub.id, r.meter, r.aggregation, r.start_ms)))
            for sub, r in work]


def _raw_quantities(storage: Any, database: str, requests: Sequence[UsageRequest]
                    ) -> dict[UsageRequest, Decimal]:
    """Raw-event side of reconcile, for sum and count (independent of the rollups)."""
    from meterline.core.quantity import to_decimal, to_nanos
    from meterline.sinks.schema import RAW_EVENTS_DEDUPLICATED

    view = RAW_EVENTS_DEDUPLICATED.qualified(database)
    ranges: dict[tuple[int, int], list[UsageRequest]] = defaultdict(list)
    for r in requests:
        if r.aggregation in ("sum", "count"):
            ranges[(r.start_ms, r.end_ms)].append(r)
    out: dict[UsageRequest, Decimal] = {}
    for (start, end), reqs in ranges.items():
        params: dict[str, Any] = {"start": start, "end": end}
        meters = sorted({r.meter for r in reqs})
        names = []
        for i, meter in enumerate(meters):
            params[f"m{i}"] = meter
            names.append(f"{{m{i}:String}}")
        rows = storage.query_rows(
            "SELECT customer, meter, sum(quantity), count()\n"
            f"FROM {view}\n"
            f"WHERE meter IN ({', '.join(names)}) AND timestamp_ms >= {{start:Int64}}\n"
            "  AND timestamp_ms < {end:Int64}\n"
            "GROUP BY customer, meter", params)
        found = {(str(c), str(m)): (to_decimal(to_nanos(q)), Decimal(int(n)))
                 for c, m, q, n in rows}
        for r in reqs:
            q, n = found.get((r.customer, r.meter), (Decimal(0), Decimal(0)))
            out[r] = q if r.aggregation == "sum" else n
    return out


# --------------------------------------------------------------------------- reports


def invoice_preview(lines: Sequence[RatedLine]) -> str:
    """Lines grouped per subscription period, with the total (sum of the rounded lines)."""
    by_period: dict[tuple[str, str, int], list[RatedLine]] = defaultdict(list)
    for line in lines:
        by_period[(line.customer, line.subscription_id, line.period_start_ms)].append(line)
    out = []
    for (customer, sub_id, _), group in sorted(by_period.items()):
        first = group[0]
        out.append(f"Invoice preview: {customer} ({sub_id}), {iso(first.period_start_ms)} to "
                   f"{iso(first.period_end_ms)} [{first.status}]")
        for line in sorted(group, key=lambda x: (x.segment_start_ms, x.line_id)):
            what = ("base fee" if line.kind == "base_fee"
                    else f"{line.meter} {fmt(line.quantity)}"
                    + (" (trial)" if line.kind == "trial_usage" else ""))
            prorate = ("" if line.proration_den == 1
                       else f" x {line.proration_num}/{line.proration_den}")
            out.append(f"  {line.plan_id} v{line.plan_version:<3} {what:<38}{prorate:<12}"
                       f"{line.amount:>14} {line.currency}")
        out.append(f"  {'total':<60}{invoice_total(group):>14} {first.currency}")
    return "\n".join(out)


def explain_line(line: RatedLine, state: BillingState,
                 candidate: PlanVersion | None = None) -> str:
    """The stored line in words, recomputed from its plan version (``candidate`` for the
    lines of a simulation)."""
    if line.correction:
        # A correction carries a difference: pricing it as a quantity of its own would
        # explain the wrong thing.
        return (f"Correction {line.correction} of line {line.corrects} of "
                f"{line.subscription_id}, {iso(line.period_start_ms)} to "
                f"{iso(line.period_end_ms)} (invoiced, so the line itself is never changed): "
                f"usage restated after the invoice changed the quantity by "
                f"{fmt(line.quantity)} and the amount by {fmt(line.amount)} {line.currency}."
                f"\n  The line plus its corrections is now what rating the period today "
                f"gives (`meterline explain {line.subscription_id} {line.corrects}` with "
                f"the period shows the original).")
    plan = candidate or state.plans[line.plan_id].versions[line.plan_version - 1]
    return explain(line, plan) + f"\n  Line {line.line_id} of {line.subscription_id}"


def revenue_by_plan(lines: Sequence[RatedLine]) -> dict[tuple[str, str], Decimal]:
    out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for line in lines:
        out[(line.plan_id, line.currency)] += line.amount
    return dict(sorted(out.items()))


__all__ = ["RateResult", "ReconcileRow", "Simulation", "compute_lines", "explain_line",
           "invoice_preview", "month_range", "rate", "reconcile", "revenue_by_plan",
           "select_periods", "simulate"]
