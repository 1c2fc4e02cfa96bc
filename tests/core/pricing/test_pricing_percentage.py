"""Percentage (Lago) and graduated percentage models."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.pricing.base import charge, charge_events
from meterline.core.pricing.breakdown import Kind
from meterline.core.pricing.errors import PriceError, RatingError
from meterline.core.pricing.percentage import (
    GraduatedPercentagePrice,
    PercentagePrice,
    PercentageTier,
)

D = Decimal


def lago_example() -> PercentagePrice:
    # Lago "Percentage" page: 1.2 % + $0.10 per transaction; first 3 events or $500 free.
    return PercentagePrice("USD", D("1.2"), D("0.10"), free_events=3, free_units=D(500))


def test_lago_percentage_example() -> None:
    # Transactions $200, $100, $100 are free; the 4th ($50) exceeds the 3 free events and is
    # charged $0.10 x 1 event + 1.2 % of $50 = $0.70, although $450 < $500.
    price = lago_example()
    assert charge_events(price, [200, 100, 100, 50]) == D("0.70")
    breakdown = price.rate_events([200, 100, 100, 50])
    kinds = {c.kind: c for c in breakdown.components}
    assert kinds[Kind.FREE].quantity == 400
    assert kinds[Kind.PERCENTAGE].amount == D("0.6")
    assert kinds[Kind.FIXED_FEE].amount == D("0.10")
    assert breakdown.events == 4


def test_free_amount_ends_the_allowance_when_it_runs_out_first() -> None:
    price = lago_example()
    # 300 free, then 300 crosses the $500: 100 pays 1.2 % and the event pays the fixed fee.
    assert price.rate_events([300, 300]).amount == D("1.2") + D("0.10")
    # Exactly using up the free amount leaves that event free; the next one pays in full.
    assert price.rate_events([300, 200, 10]).amount == D("0.12") + D("0.10")


def test_free_events_only_and_free_amount_only() -> None:
    events_only = PercentagePrice("USD", D(1), D("0.25"), free_events=2)
    assert events_only.rate_events([1000, 1000, 100]).amount == D(1) + D("0.25")
    amount_only = PercentagePrice("USD", D(1), D("0.25"), free_units=D(150))
    # 100 free, 50 free + 50 paid (with fixed fee), then 100 paid.
    assert amount_only.rate_events([100, 100, 100]).amount == D("1.5") + D("0.50")


def test_percentage_without_per_event_terms_prices_a_total() -> None:
    price = PercentagePrice("EUR", D("2.5"), free_units=D(100))
    assert not price.per_event
    assert charge(price, 1100) == D("25.00")
    assert charge(price, 50) == D("0.00")
    # And the per-event path agrees when there are no per-event terms.
    assert charge_events(price, [600, 500]) == D("25.00")


def test_per_event_terms_need_the_events() -> None:
    with pytest.raises(RatingError, match="rate_events"):
        charge(lago_example(), 450)


def test_per_transaction_min_and_max() -> None:
    # Lago's per-transaction spending minimum/maximum apply to each paid event's amount.
    price = PercentagePrice("USD", D(1), D("0.30"), min_per_event=D("0.50"), max_per_event=D(5))
    breakdown = price.rate_events([10, 100, 1000])
    # 0.40 -> 0.50 (min), 1.30 stays, 10.30 -> 5 (max)
    assert breakdown.amount == D("0.50") + D("1.30") + D(5)
    limit = [c for c in breakdown.components if c.kind is Kind.PER_EVENT_LIMIT]
    assert limit[0].amount == D("0.10") - D("5.30")
    assert limit[0].quantity == 2


def test_free_events_are_not_raised_to_the_minimum() -> None:
    price = PercentagePrice("USD", D(1), free_events=1, min_per_event=D(1))
    assert price.rate_events([5, 5]).amount == D(1)


def test_zero_rate_with_fixed_fee_is_a_per_event_fee() -> None:
    price = PercentagePrice("USD", D(0), D("0.02"))
    assert charge_events(price, [1] * 1000) == D("20.00")


def test_empty_period() -> None:
    assert charge_events(lago_example(), []) == D("0.00")


@pytest.mark.parametrize("rate", ["100.01", "120", "-1", 1.2])
def test_rates_must_be_a_percentage(rate: object) -> None:
    with pytest.raises(PriceError, match="percent"):
        PercentagePrice("USD", rate)  # type: ignore[arg-type]


def test_percentage_errors_at_once() -> None:
    with pytest.raises(PriceError) as info:
        PercentagePrice(
            "USD",
            D(150),
            -1,
            free_events=-2,
            free_units=0.5,  # type: ignore[arg-type]
            min_per_event=D(5),
            max_per_event=D(1),
        )
    assert [e.split(":")[0] for e in info.value.errors] == [
        "percent",
        "fixed_amount",
        "free_events",
        "free_units",
        "min_per_event",
    ]


def lago_graduated_percentage() -> GraduatedPercentagePrice:
    # Lago "Graduated percentage" page: 0-1,000 at 1 % + $200 flat; 1,001-10,000 at 2 % +
    # $300; 10,001+ at 3 % + $400.
    return GraduatedPercentagePrice(
        "USD",
        (
            PercentageTier(D(1000), D(1), D(200)),
            PercentageTier(D(10_000), D(2), D(300)),
            PercentageTier(None, D(3), D(400)),
        ),
    )


def test_lago_graduated_percentage_example() -> None:
    # The page prices transactions of $500, $550 and $4,000 as $205, $306 and $80: each is the
    # increase of the period's charge, so the period of $5,050 costs 205 + 306 + 80 = $591.
    price = lago_graduated_percentage()
    assert charge(price, 500) == D("205.00")
    assert charge(price, 1050) - charge(price, 500) == D("306.00")
    assert charge(price, 5050) - charge(price, 1050) == D("80.00")
    assert charge(price, 5050) == D("591.00")
    assert charge_events(price, [500, 550, 4000]) == D("591.00")
    assert charge(price, 0) == D("0.00")


def test_graduated_percentage_rejects_rates_over_100_and_bad_tiers() -> None:
    with pytest.raises(PriceError) as info:
        GraduatedPercentagePrice(
            "USD",
            [{"up_to": 10, "percent": 101}, {"up_to": 5, "percent": "1"}],
        )
    text = "\n".join(info.value.errors)
    assert "at most 100" in text
    assert "last tier must be unbounded" in text
    assert "ascending" in text


def test_graduated_percentage_tier_needs_a_rate() -> None:
    with pytest.raises(PriceError, match=r"tiers\[0\].percent: missing"):
        GraduatedPercentagePrice("USD", [{"flat_amount": 1}])


values = st.lists(st.decimals(min_value=0, max_value=10**4, places=2), max_size=30)


@given(values, st.integers(0, 5), st.decimals(min_value=0, max_value=10**4, places=2))
def test_percentage_is_deterministic_and_never_negative(
    events: list[Decimal], free_events: int, free_units: Decimal
) -> None:
    price = PercentagePrice("USD", D("1.2"), D("0.1"), free_events, free_units)
    first = price.rate_events(events)
    assert first == price.rate_events(list(events))
    assert first.amount >= 0
    assert first.amount <= sum(events, D(0)) * D("0.012") + D("0.1") * len(events)
