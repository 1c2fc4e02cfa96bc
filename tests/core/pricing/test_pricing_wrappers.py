"""Allowance (free units before a model) and commitment (minimum true-up, maximum cap)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.pricing.base import charge, charge_events
from meterline.core.pricing.breakdown import Kind
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.percentage import PercentagePrice
from meterline.core.pricing.tiers import GraduatedPrice, Tier
from meterline.core.pricing.unit import PackagePrice, PerUnitPrice
from meterline.core.pricing.wrappers import Allowance, Commitment

D = Decimal


def test_lago_package_with_free_units_example() -> None:
    # Lago "Package" page: $5 per 100 units, first 100 free; 201 units = $0 + $5 + $5 = $10.
    price = Allowance(PackagePrice("USD", D(5), D(100)), D(100))
    assert charge(price, 201) == D("10.00")
    assert charge(price, 100) == D("0.00")
    assert charge(price, 101) == D("5.00")


def test_allowance_then_tiers() -> None:
    price = Allowance(GraduatedPrice("USD", [Tier(D(10), D(1)), Tier(None, D("0.5"))]), D(5))
    assert charge(price, 4) == D("0.00")
    assert charge(price, 20) == D("12.50")  # 15 paid units: 10 x 1 + 5 x 0.5
    assert price.rate(20).components[0].kind is Kind.FREE


def test_allowance_refuses_percentage_models() -> None:
    with pytest.raises(PriceError, match="its own free allowance"):
        Allowance(PercentagePrice("USD", D(1)), D(10))


def test_allowance_reports_every_error() -> None:
    with pytest.raises(PriceError) as info:
        Allowance("not a price", -1)  # type: ignore[arg-type]
    assert len(info.value.errors) == 2


def test_minimum_commitment_trues_up_and_shows_a_separate_line() -> None:
    price = Commitment(PerUnitPrice("USD", D("0.001")), minimum=D("10.00"))
    breakdown = price.rate(3335)
    assert breakdown.usage_amount == D("3.335")
    assert breakdown.amount == D(10)
    assert charge(price, 3335) == D("10.00")
    # As invoice lines: usage rounded once, the true-up taken against the rounded usage.
    assert breakdown.lines() == (D("3.34"), D("6.66"))
    assert sum(breakdown.lines()) == charge(price, 3335)
    assert charge(price, 20_000) == D("20.00")  # above the minimum: no true-up
    assert price.rate(20_000).lines() == (D("20.00"),)


def test_maximum_caps_the_line() -> None:
    price = Commitment(PerUnitPrice("EUR", D("0.5")), maximum=D(100))
    assert charge(price, 1000) == D("100.00")
    assert price.rate(1000).lines() == (D("500.00"), D("-400.00"))
    assert charge(price, 10) == D("5.00")


def test_commitment_around_per_event_model() -> None:
    price = Commitment(PercentagePrice("USD", D(1), D("0.1")), minimum=D(5))
    assert price.per_event
    assert charge_events(price, [10, 10]) == D("5.00")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "set at least one"),
        ({"minimum": D("10.005")}, "finer than the USD minor unit"),
        ({"minimum": D(10), "maximum": D(5)}, "above maximum"),
        ({"maximum": -1}, "negative"),
        ({"minimum": 9.99}, "float"),
    ],
)
def test_commitment_rules(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PriceError, match=message):
        Commitment(PerUnitPrice("USD", D(1)), **kwargs)  # type: ignore[arg-type]


def test_jpy_commitment_must_be_whole_yen() -> None:
    with pytest.raises(PriceError, match="JPY"):
        Commitment(PerUnitPrice("JPY", D(1)), minimum=D("100.5"))


quantities = st.decimals(min_value=0, max_value=10**6, places=9)


@given(
    st.decimals(min_value=0, max_value=1000, places=4),
    st.decimals(min_value="0.001", max_value=10**4, places=3),
    st.decimals(min_value=0, max_value=10**4, places=3),
    st.sampled_from(["up", "down"]),
    quantities,
    quantities,
)
def test_package_with_free_units_is_monotone(
    amount: Decimal, size: Decimal, free: Decimal, rounding: str, a: Decimal, b: Decimal
) -> None:
    price = Allowance(PackagePrice("USD", amount, size, rounding), free)
    low, high = sorted((a, b))
    assert charge(price, low) <= charge(price, high)
    assert price.rate(low).amount <= price.rate(high).amount


@given(
    st.decimals(min_value=0, max_value=10, places=6),
    quantities,
    st.decimals(min_value=0, max_value=10**5, places=2),
    st.decimals(min_value=0, max_value=10**5, places=2),
)
def test_commitment_lines_always_add_up(
    unit: Decimal, quantity: Decimal, low: Decimal, high: Decimal
) -> None:
    minimum, maximum = sorted((low, high))
    price = Commitment(PerUnitPrice("USD", unit), minimum=minimum, maximum=maximum)
    breakdown = price.rate(quantity)
    assert sum(breakdown.lines(), D(0)) == breakdown.rounded == charge(price, quantity)
    assert minimum <= breakdown.rounded <= maximum
