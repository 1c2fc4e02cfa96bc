"""Rating one subscription's period into line items, and saying each line in words.

``usage_requests`` lists the quantities a period needs (meter x aggregation x segment);
an adapter reads them from the rollups (sinks/rated_usage.py) and ``rate_period`` turns
them into ``RatedLine``s. Pure: the same subscription, plans, period and quantities give
the same lines, byte for byte.

Rounding happens in exactly one place per line: a usage line is the price's one rounding
(docs/rating.md section 3), a base-fee line the prorated fee rounded half away from zero.
An invoice total is the sum of its rounded lines, never rounded again, so the lines add up
to the total with no drift.

Line identity (``line_id``) is ``<segment start ms>/<kind>/<meter>:<aggregation>``, unique
within (subscription, period). A later correction of a closed period (late usage
restated into the rollups) is a new row with the same ``line_id`` and ``correction`` =
1, 2, ..., carrying the difference and ``corrects`` = the original's line id: the key of
``rated_usage`` already includes ``correction``, so the original row is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction
from typing import Literal, NamedTuple

from meterline.core.billing.periods import Period, iso
from meterline.core.billing.plans import Charge, PlanVersion
from meterline.core.billing.segments import Segment, prorated_fee
from meterline.core.billing.state import Subscription
from meterline.core.pricing.exact import fmt

LineKind = Literal["base_fee", "usage", "trial_usage"]
Status = Literal["in_progress", "final"]


class UsageRequest(NamedTuple):
    """One quantity a period needs: ``meter`` aggregated over ``[start_ms, end_ms)``.

    A NamedTuple rather than a frozen dataclass: it is built and hashed twice per line of
    a month (~600,000 lines for 100,000 subscriptions), and a tuple's C construction and
    hash are ~3x cheaper than a dataclass's generated ``__init__`` and ``__hash__``."""

    customer: str
    meter: str
    aggregation: str
    start_ms: int
    end_ms: int
    dimension: str | None = None
    time_unit: str | None = None


@dataclass(frozen=True, slots=True)
class RatedLine:
    subscription_id: str
    customer: str
    period_start_ms: int
    period_end_ms: int
    line_id: str
    kind: LineKind
    segment_start_ms: int
    segment_end_ms: int
    plan_id: str
    plan_version: int
    meter: str  # "" for a base fee
    aggregation: str  # "" for a base fee
    quantity: Decimal  # in the meter's units (time-weighted: unit x time_unit)
    currency: str
    amount: Decimal  # the line item, rounded once to the minor unit
    amount_exact: str  # before rounding: a decimal, or a fraction for prorated fees
    proration_num: int  # segment ms / period ms, reduced; 1/1 when not prorated
    proration_den: int
    tiers: str  # tiers that received units, "1,2"; "" when the model has none
    price_model: str
    status: Status
    correction: int = 0
    corrects: str = ""


def usage_requests(sub: Subscription, segs: Sequence[Segment]) -> list[UsageRequest]:
    return [_request(sub, seg, charge) for seg in segs for charge in seg.plan.charges]


def _request(sub: Subscription, seg: Segment, charge: Charge) -> UsageRequest:
    return UsageRequest(sub.customer, charge.meter, charge.aggregation.value, seg.start_ms,
                        seg.end_ms, charge.dimension, charge.time_unit)


def line_status(period: Period, as_of_ms: int, settle_ms: int) -> Status:
    """Final once the period has ended and the rollups can no longer change for it (the
    window's lateness allowance has passed); in progress before that."""
    return "final" if period.end_ms + settle_ms <= as_of_ms else "in_progress"


def rate_period(sub: Subscription, period: Period, segs: Sequence[Segment],
                quantities: Mapping[UsageRequest, Decimal], *, status: Status,
                plan_override: PlanVersion | None = None) -> list[RatedLine]:
    """The period's lines. ``plan_override`` re-rates every segment under one candidate
    plan (pricing simulation); trials and segment bounds stay as they were."""
    lines: list[RatedLine] = []
    zero = Decimal(0)
    for seg in segs:
        plan = plan_override or seg.plan
        # Positional RatedLine arguments (in field order) and one enum lookup per charge:
        # this loop runs for every line of a month (~600,000 for 100,000 subscriptions).
        code = plan.currency.code
        if not seg.trial and plan.base_fee:
            fraction = seg.proration(period)
            fee_exact, fee = prorated_fee(plan.base_fee, fraction, plan.currency)
            lines.append(RatedLine(
                sub.id, sub.customer, period.start_ms, period.end_ms,
                f"{seg.start_ms}/base_fee", "base_fee", seg.start_ms, seg.end_ms,
                plan.plan_id, plan.version, "", "", zero, code, fee,
                _fraction_text(fee_exact), fraction.numerator, fraction.denominator, "",
                "flat", status))
        trial_zero = zero.scaleb(-plan.currency.minor_units)
        for charge in plan.charges:
            agg = charge.aggregation.value
            key = f"{charge.meter}:{agg}"  # charge.key
            qty = quantities.get(UsageRequest(sub.customer, charge.meter, agg, seg.start_ms,
                                              seg.end_ms, charge.dimension, charge.time_unit),
                                 zero)
            if seg.trial:
                lines.append(RatedLine(
                    sub.id, sub.customer, period.start_ms, period.end_ms,
                    f"{seg.start_ms}/trial_usage/{key}", "trial_usage", seg.start_ms,
                    seg.end_ms, plan.plan_id, plan.version, charge.meter, agg, qty, code,
                    trial_zero, "0", 1, 1, "", charge.price.model, status))
                continue
            # rate_line: rate()'s amount, rounding and tiers without its words (explain
            # recomputes those from the stored line).
            model, exact_amount, rounded, tiers = charge.price.rate_line(qty)
            lines.append(RatedLine(
                sub.id, sub.customer, period.start_ms, period.end_ms,
                f"{seg.start_ms}/usage/{key}", "usage", seg.start_ms, seg.end_ms,
                plan.plan_id, plan.version, charge.meter, agg, qty, code, rounded,
                fmt(exact_amount), 1, 1, ",".join(map(str, tiers)) if tiers else "", model,
                status))
    return lines


def explain(line: RatedLine, plan: PlanVersion) -> str:
    """The line in words a finance person understands, recomputed from what produced it
    (the plan version, quantity and proration stored on the line). Pricing is a pure
    function, so this is the computation the line came from; a stored amount that differs
    from the recomputation (code changed since) is said so, not hidden."""
    code = plan.currency.code
    state = ("final" if line.status == "final"
             else "in progress: usage may still arrive")
    whole = (line.segment_start_ms, line.segment_end_ms) == (line.period_start_ms,
                                                             line.period_end_ms)
    span = "the whole period" if whole else (f"{iso(line.segment_start_ms)} to "
                                              f"{iso(line.segment_end_ms)}")
    eff = ("from the start" if plan.effective_from_ms is None
           else f"effective {iso(plan.effective_from_ms)}")
    charge = next((c for c in plan.charges if c.key == f"{line.meter}:{line.aggregation}"),
                  None)
    what = ("recurring base fee" if line.kind == "base_fee" or charge is None
            else f"usage of {charge.meter} ({_agg_words(charge)})")
    out = [
        f"Customer {line.customer}, subscription {line.subscription_id}: {what}",
        f"  Billing period {iso(line.period_start_ms)} to {iso(line.period_end_ms)} "
        f"({state}); this line covers {span}" + (" (free trial)"
                                                 if line.kind == "trial_usage" else ""),
        f"  Plan {plan.plan_id}" + (f" ({plan.name})" if plan.name != plan.plan_id else "")
        + f" version {plan.version}, {eff}, priced in {code}",
    ]
    recomputed: str
    if line.kind == "base_fee":
        fraction = Fraction(line.proration_num, line.proration_den)
        exact_amount, rounded = prorated_fee(plan.base_fee, fraction, plan.currency)
        recomputed = _fraction_text(exact_amount)
        if fraction == 1:
            out.append(f"  Charged: the full period's fee of {fmt(plan.base_fee)} {code}")
        else:
            seg_ms = line.segment_end_ms - line.segment_start_ms
            per_ms = line.period_end_ms - line.period_start_ms
            out.append(f"  Charged: {fmt(plan.base_fee)} {code} x {seg_ms:,} ms / {per_ms:,} ms "
                       f"(= {fraction.numerator}/{fraction.denominator} of the period, "
                       f"{_days(seg_ms)} of {_days(per_ms)}) = {recomputed} {code}"
                       + ("" if "/" not in recomputed else f" (= {_approx(exact_amount)}...)"))
        out.append(f"  Rounded once, half-up to {plan.currency.minor_units} decimal(s): "
                   f"{rounded} {code}")
    elif charge is None:
        return "\n".join(out + [f"  (plan {plan.plan_id} v{plan.version} has no charge "
                                 f"{line.meter}:{line.aggregation}: cannot explain)"])
    elif line.kind == "trial_usage":
        recomputed = "0"
        out.append(f"  Quantity: {fmt(line.quantity)} during the free trial: not billed "
                   f"(0 {code}); it does not count toward the paid period's tiers or "
                   "allowances")
    else:
        breakdown = charge.price.rate(line.quantity)
        recomputed = fmt(breakdown.amount)
        out.append(f"  Quantity: {fmt(line.quantity)} ({_agg_words(charge)} from "
                   f"{iso(line.segment_start_ms)} to {iso(line.segment_end_ms)})")
        out.append("  Price: " + breakdown.explain().replace("\n", "\n  "))
    if recomputed != line.amount_exact:
        out.append(f"  NOTE: the stored line says {line.amount_exact} {code} before rounding, "
                   f"recomputing gives {recomputed} {code}: the rating code changed since "
                   "this line was rated")
    return "\n".join(out)


def _agg_words(charge: Charge) -> str:
    return {
        "sum": "total", "count": "number of events", "max": "peak hourly value",
        "latest": "last reported value",
        "unique_count": f"distinct {charge.dimension} values",
        "time_weighted_sum": f"{charge.meter} x {charge.time_unit}s, time-weighted",
    }[charge.aggregation.value]


def _days(ms: int) -> str:
    days, rest = divmod(ms, 86_400_000)
    hours, rest = divmod(rest, 3_600_000)
    text = f"{days} day(s)" + (f" {hours} h" if hours else "")
    return text + (f" {rest} ms" if rest else "")


def _fraction_text(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    # Show a terminating decimal exactly; otherwise the fraction (never a float).
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d == 1:
        from meterline.core.pricing.exact import exact

        with exact():
            return fmt(Decimal(value.numerator) / Decimal(value.denominator))
    return f"{value.numerator}/{value.denominator}"


def _approx(value: Fraction) -> str:
    """A non-terminating amount to 8 decimals, truncated, for reading only (the line
    is rounded from the exact fraction)."""
    q = (value.numerator * 10**8) // value.denominator
    return fmt(Decimal(q).scaleb(-8))


def correct_line(current: RatedLine, invoiced: Sequence[RatedLine]) -> RatedLine | None:
    """The correction a closed (invoiced) period's line needs, or None.

    ``current`` is the line as rating computes it now (late usage restated into the
    rollups since); ``invoiced`` is what was already billed under the same line id: the
    line itself (correction 0) and any earlier corrections. What was sent is never
    changed: the correction is a new line, ``correction`` = the next number, ``corrects``
    = the line id, carrying the difference in quantity and in amount. The amount is the
    difference of two rounded amounts, so it needs no rounding of its own and the
    invoice's lines plus its corrections add up to the line as rated now, to the cent.
    """
    mine = [x for x in invoiced if x.line_id == current.line_id
            and x.subscription_id == current.subscription_id
            and x.period_start_ms == current.period_start_ms]
    quantity = sum((x.quantity for x in mine), Decimal(0))
    amount = sum((x.amount for x in mine), Decimal(0))
    if quantity == current.quantity and amount == current.amount:
        return None
    delta = current.amount - amount
    return replace(current, correction=max((x.correction for x in mine), default=0) + 1,
                   corrects=current.line_id, quantity=current.quantity - quantity,
                   amount=delta, amount_exact=fmt(delta), status="final")


def invoice_total(lines: Sequence[RatedLine]) -> Decimal:
    """Sum of the rounded lines: the invoice total (never rounded again)."""
    total = Decimal(0)
    for line in lines:
        total += line.amount
    return total
