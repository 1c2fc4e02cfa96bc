"""Splitting a billing period where the plan or the trial changes, and prorating.

A period (clipped to the subscription's life) is cut at every plan change and at the
trial end; each piece is a ``Segment`` rated on its own:

- **Which plan version**: the version of the segment's plan in effect at the later of
  the period start and the moment the subscription moved onto that plan. A subscriber
  therefore moves to a new price version at its next period start, and someone who joins
  mid-period gets the version current when they joined.
- **Usage** of a segment is the usage inside ``[start_ms, end_ms)``, priced by the
  segment's plan with its full tiers, allowances and commitments (as Lago bills usage on
  a plan change: usage charges are not prorated). The paid segment after a trial starts
  from zero: trial usage never fills paid tiers or allowances.
- **The base fee** of a paid segment is prorated **by the millisecond**:
  ``fee x (segment ms / period ms)``, where period ms is the *nominal* period's length
  (a customer starting on Nov 16 pays 15/30 of November's fee). The fraction is an exact
  ``Fraction``; the product is rounded once, half away from zero, to the minor unit.
  Since changes fall on whole hours, this is also exact by the second and by the hour.
- Trial segments pay no base fee; their usage is reported on ``trial_usage`` lines
  priced at zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from meterline.core.billing.periods import Period
from meterline.core.billing.plans import PlanVersion
from meterline.core.billing.state import Plan, Subscription
from meterline.core.pricing import Currency
from meterline.core.pricing.exact import exact


@dataclass(frozen=True, slots=True)
class Segment:
    start_ms: int
    end_ms: int
    plan: PlanVersion
    trial: bool

    def proration(self, period: Period) -> Fraction:
        return Fraction(self.end_ms - self.start_ms, period.length_ms)


def billed_span(sub: Subscription, period: Period) -> tuple[int, int] | None:
    """The part of ``period`` the subscription is alive for, or None."""
    start = max(period.start_ms, sub.start_ms)
    end = period.end_ms if sub.end_ms is None else min(period.end_ms, sub.end_ms)
    return (start, end) if start < end else None


def segments(sub: Subscription, plans: Mapping[str, Plan], period: Period) -> list[Segment]:
    span = billed_span(sub, period)
    if span is None:
        return []
    start, end = span
    cuts = {start, end}
    cuts.update(t for t, _ in sub.plans if start < t < end)
    if sub.trial_end_ms is not None and start < sub.trial_end_ms < end:
        cuts.add(sub.trial_end_ms)
    bounds = sorted(cuts)
    out: list[Segment] = []
    for seg_start, seg_end in zip(bounds, bounds[1:], strict=False):
        moved_ms, plan_id = sub.plan_at(seg_start)
        version = plans[plan_id].version_at(max(period.start_ms, moved_ms))
        if version is None:  # state.py refuses subscriptions to plans not yet in effect
            raise AssertionError(f"plan {plan_id} has no version at {seg_start}")
        out.append(Segment(seg_start, seg_end, version, sub.in_trial(seg_start)))
    return out


def round_fraction(value: Fraction, currency: Currency) -> Decimal:
    """``value`` (major units, exact) rounded once to the minor unit, half away from zero,
    with integer arithmetic (a third of a cent is never a float or a truncated decimal)."""
    scaled = value * 10**currency.minor_units
    q, r = divmod(abs(scaled.numerator), scaled.denominator)
    if 2 * r >= scaled.denominator:
        q += 1
    signed = -q if scaled < 0 else q
    with exact():
        return Decimal(signed).scaleb(-currency.minor_units)


def round_nanos(value: Fraction) -> int:
    """A quantity in units -> nano-units, rounded once half away from zero."""
    scaled = value * 10**9
    q, r = divmod(abs(scaled.numerator), scaled.denominator)
    if 2 * r >= scaled.denominator:
        q += 1
    return -q if scaled < 0 else q


def prorated_fee(fee: Decimal, fraction: Fraction, currency: Currency) -> tuple[Fraction, Decimal]:
    """(exact amount, rounded line) of a recurring fee for ``fraction`` of a period."""
    exact_amount = Fraction(fee) * fraction
    return exact_amount, round_fraction(exact_amount, currency)
