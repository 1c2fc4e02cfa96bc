"""Rating a period: segments at plan changes and trial end, proration by the millisecond,
usage priced per segment, deterministic lines that add up to the invoice total."""

from __future__ import annotations

import decimal
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.billing import (
    BillingState,
    Cycle,
    UsageRequest,
    change_plan,
    explain,
    invoice_total,
    parse_instant,
    rate_period,
    segments,
    subscribe,
    time_weighted_quantity,
    usage_requests,
)
from meterline.core.billing.segments import round_fraction
from meterline.core.pricing import currency

T = parse_instant
HOUR = 3_600_000
ACTOR, REASON = "ops", "test"


def _state(plans: list[dict[str, Any]], kit: Any) -> BillingState:
    state = BillingState()
    for doc in plans:
        from meterline.core.billing import publish_plan

        state.apply(publish_plan(state, doc, actor=ACTOR, reason=REASON, now_ms=0))
    return state


def test_upgrade_mid_month_prorates_fees_and_prices_each_segments_usage(kit: Any) -> None:
    basic = {**kit.plan_doc("basic", "10.00"), "charges": [
        {"meter": "api_calls", "aggregation": "count",
         "price": {"model": "graduated", "tiers": [{"up_to": 100, "unit_amount": "0"},
                                                   {"unit_amount": "0.05"}]}}]}
    pro = {**kit.plan_doc("pro", "40.00"), "charges": [
        {"meter": "api_calls", "aggregation": "count",
         "price": {"model": "per_unit", "unit_amount": "0.01"}}]}
    state = _state([basic, pro], kit)
    state.apply(subscribe(state, "s1", "acme", "basic", start_ms=T("2026-11-01"), actor=ACTOR,
                          reason=REASON, now_ms=0))
    state.apply(change_plan(state, "s1", "pro", at_ms=T("2026-11-11"), actor=ACTOR,
                            reason=REASON, now_ms=0))
    sub = state.subscriptions["s1"]
    period = sub.period_at(T("2026-11-05"))
    segs = segments(sub, state.plans, period)
    assert [(s.plan.plan_id, s.start_ms, s.end_ms) for s in segs] == [
        ("basic", T("2026-11-01"), T("2026-11-11")), ("pro", T("2026-11-11"), T("2026-12-01"))]
    reqs = usage_requests(sub, segs)
    quantities = {reqs[0]: Decimal(250), reqs[1]: Decimal(1000)}
    lines = rate_period(sub, period, segs, quantities, status="final")
    got = {(ln.plan_id, ln.kind): ln.amount for ln in lines}
    # Hand-computed: November has 30 days. basic fee 10 x 10/30 = 3.333.. -> 3.33;
    # basic usage: 100 free, 150 x 0.05 = 7.50; pro fee 40 x 20/30 = 26.666.. -> 26.67;
    # pro usage 1000 x 0.01 = 10.00.
    assert got == {("basic", "base_fee"): Decimal("3.33"), ("basic", "usage"): Decimal("7.50"),
                   ("pro", "base_fee"): Decimal("26.67"), ("pro", "usage"): Decimal("10.00")}
    assert invoice_total(lines) == Decimal("47.50")
    fee = next(ln for ln in lines if ln.plan_id == "basic" and ln.kind == "base_fee")
    assert (fee.proration_num, fee.proration_den) == (1, 3)
    assert fee.amount_exact == "10/3"
    text = explain(fee, state.plans["basic"].latest)
    assert "10 USD x 864,000,000 ms / 2,592,000,000 ms (= 1/3 of the period, 10 day(s) of " \
        "30 day(s)) = 10/3 USD" in text
    assert "Rounded once, half-up to 2 decimal(s): 3.33 USD" in text
    tampered = explain(replace(fee, amount_exact="3.4"), state.plans["basic"].latest)
    assert "NOTE: the stored line says 3.4 USD before rounding, recomputing gives 10/3" in tampered
    usage = next(ln for ln in lines if ln.plan_id == "basic" and ln.kind == "usage")
    assert usage.tiers == "1,2" and usage.line_id == f"{T('2026-11-01')}/usage/api_calls:count"


def test_trial_usage_is_isolated_from_paid_tiers(kit: Any) -> None:
    plan = {**kit.plan_doc("pro", "30.00"), "charges": [
        {"meter": "api_calls", "aggregation": "sum",
         "price": {"model": "graduated", "tiers": [{"up_to": 1000, "unit_amount": "0"},
                                                   {"unit_amount": "0.10"}]}}]}
    state = _state([plan], kit)
    state.apply(subscribe(state, "s1", "acme", "pro", start_ms=T("2026-11-01"), actor=ACTOR,
                          reason=REASON, now_ms=0, trial_end_ms=T("2026-11-15")))
    sub = state.subscriptions["s1"]
    period = sub.period_at(T("2026-11-01"))
    segs = segments(sub, state.plans, period)
    assert [s.trial for s in segs] == [True, False]
    trial_req, paid_req = usage_requests(sub, segs)
    assert (paid_req.start_ms, paid_req.end_ms) == (T("2026-11-15"), T("2026-12-01"))
    lines = rate_period(sub, period, segs, {trial_req: Decimal(5000), paid_req: Decimal(1200)},
                        status="in_progress")
    by_kind = {ln.kind: ln for ln in lines}
    assert by_kind["trial_usage"].amount == 0 and by_kind["trial_usage"].quantity == 5000
    # The paid segment starts with its own free 1000 units: 200 x 0.10 = 20.00; the fee is
    # 16 of 30 days: 30 x 16/30 = 16.00.
    assert by_kind["usage"].amount == Decimal("20.00")
    assert by_kind["base_fee"].amount == Decimal("16.00")
    assert "free trial" in explain(by_kind["trial_usage"], state.plans["pro"].latest)
    usage_text = explain(by_kind["usage"], state.plans["pro"].latest)
    assert "tier 2 (above 1000): 200 unit(s) x 0.1 = 20 USD" in usage_text, usage_text
    assert [ln.kind for ln in lines].count("base_fee") == 1


def _half_up(numerator: int, denominator: int, places: int) -> Decimal:
    # Independent of round_fraction: a wide decimal context, then quantize half-up.
    with decimal.localcontext() as ctx:
        ctx.prec = 80
        value = Decimal(numerator) / Decimal(denominator)
        return value.quantize(Decimal(1).scaleb(-places), rounding=decimal.ROUND_HALF_UP)


@settings(max_examples=100, deadline=None)
@given(st.integers(2000, 2080), st.integers(1, 12), st.integers(0, 10**7),
       st.lists(st.integers(1, 27 * 24), min_size=1, max_size=4, unique=True),
       st.sampled_from(["USD", "JPY", "BHD"]))
def test_split_at_plan_changes_prorates_by_the_millisecond(
        year: int, month: int, fee_minor: int, change_hours: list[int], code: str) -> None:
    cur = currency(code)
    fee = Decimal(fee_minor).scaleb(-cur.minor_units)
    docs = [{"id": f"p{i}", "currency": code, "base_fee": str(fee + i), "charges": []}
            for i in range(len(change_hours) + 1)]
    state = BillingState()
    from meterline.core.billing import publish_plan

    for doc in docs:
        state.apply(publish_plan(state, doc, actor=ACTOR, reason=REASON, now_ms=0))
    start = T(f"{year}-{month:02d}-01")
    state.apply(subscribe(state, "s", "c", "p0", start_ms=start, actor=ACTOR, reason=REASON,
                          now_ms=0, cycle=Cycle.CALENDAR))
    changes = sorted(start + h * HOUR for h in change_hours)
    for i, at in enumerate(changes, start=1):
        state.apply(change_plan(state, "s", f"p{i}", at_ms=at, actor=ACTOR, reason=REASON,
                                now_ms=0))
    sub = state.subscriptions["s"]
    period = sub.period_at(start)
    segs = segments(sub, state.plans, period)
    bounds = [start, *changes, period.end_ms]
    # Segments tile the period exactly, one per plan, in order.
    assert [(s.start_ms, s.end_ms) for s in segs] == list(zip(bounds, bounds[1:], strict=False))
    assert sum(s.proration(period) for s in segs) == 1
    lines = rate_period(sub, period, segs, {}, status="final")
    fees = {ln.plan_id: ln for ln in lines if ln.kind == "base_fee"}
    minor = 10**cur.minor_units
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        plan_fee_minor = fee_minor + i * minor
        if plan_fee_minor == 0:
            assert f"p{i}" not in fees  # a plan without a base fee has no fee line
            continue
        want = _half_up(plan_fee_minor * (b - a), (period.end_ms - period.start_ms) * minor,
                        cur.minor_units)
        assert fees[f"p{i}"].amount == want
    # No drift: the total is the sum of the rounded lines, each within half a minor unit
    # of its exact share.
    assert invoice_total(lines) == sum((ln.amount for ln in lines), Decimal(0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=3, max_size=3), st.integers(0, 2))
def test_rating_is_deterministic(
        qty: list[int], trial: int) -> None:
    plan = {"id": "p", "currency": "EUR", "base_fee": "12.34", "charges": [
        {"meter": "m", "aggregation": "sum",
         "price": {"model": "volume", "tiers": [{"up_to": 1000, "unit_amount": "0.003"},
                                                {"unit_amount": "0.001", "flat_amount": 2}]}}]}

    def build() -> tuple[Any, ...]:
        from meterline.core.billing import publish_plan

        state = BillingState()
        state.apply(publish_plan(state, plan, actor=ACTOR, reason=REASON, now_ms=0))
        state.apply(publish_plan(state, {**plan, "id": "q"}, actor=ACTOR, reason=REASON,
                                 now_ms=0))
        state.apply(subscribe(state, "s", "c", "p", start_ms=T("2026-03-05T07:00:00Z"),
                              actor=ACTOR, reason=REASON, now_ms=0, cycle=Cycle.ANNIVERSARY,
                              trial_end_ms=T("2026-03-09") if trial else None))
        state.apply(change_plan(state, "s", "q", at_ms=T("2026-03-20"), actor=ACTOR,
                                reason=REASON, now_ms=0))
        sub = state.subscriptions["s"]
        period = sub.period_at(T("2026-03-10"))
        segs = segments(sub, state.plans, period)
        reqs = usage_requests(sub, segs)
        return tuple(rate_period(sub, period, segs,
                                 {r: Decimal(q) for r, q in zip(reqs, qty, strict=False)},
                                 status="final"))

    assert build() == build()


def _brute_integral(points: list[tuple[int, str, int]], start: int, end: int,
                    carry: int | None) -> int:
    # One millisecond at a time: the value in force is the last point at or before t.
    total = 0
    for t in range(start, end):
        value = carry
        for ts, _, v in sorted(points):
            if ts <= t:
                value = v
        if value is not None:
            total += value
    return total


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.text("ab", max_size=2),
                          st.integers(0, 5 * 10**9)), max_size=6),
       st.one_of(st.none(), st.integers(0, 10**9)))
def test_time_weighted_sum_equals_a_per_millisecond_walk(
        points: list[tuple[int, str, int]], carry: int | None) -> None:
    start, end = 50, 250
    inside = [p for p in points if start <= p[0] < end]
    got = time_weighted_quantity(inside, start, end, "second", carry)
    integral = _brute_integral(inside, start, end, carry)
    # value-nanos x ms -> units x seconds, rounded half-up to 9 decimals.
    assert got == _half_up(integral, 10**9 * 1000, 9)


def test_round_fraction_is_half_away_from_zero() -> None:
    from fractions import Fraction

    usd = currency("USD")
    assert round_fraction(Fraction(1, 200), usd) == Decimal("0.01")
    assert round_fraction(Fraction(-1, 200), usd) == Decimal("-0.01")
    assert round_fraction(Fraction(1, 3), usd) == Decimal("0.33")
    assert str(round_fraction(Fraction(0), currency("BHD"))) == "0.000"


def test_usage_request_is_hashable_and_keyed_by_segment(
        state_factory: Callable[..., BillingState]) -> None:
    r = UsageRequest("c", "m", "sum", 0, 1)
    assert {r: 1}[UsageRequest("c", "m", "sum", 0, 1)] == 1
