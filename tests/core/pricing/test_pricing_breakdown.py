"""The explained form of a charge: components, words, invoice lines."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from meterline.core.pricing.base import Price, charge
from meterline.core.pricing.breakdown import Kind
from meterline.core.pricing.native_format import load_price
from meterline.core.pricing.tiers import GraduatedPrice, Tier

D = Decimal


def test_explain_says_how_the_line_was_computed() -> None:
    price = GraduatedPrice("USD", [Tier(D(5), D(7)), Tier(D(10), D("6.5")), Tier(None, D(6))])
    assert price.rate(8).explain() == (
        "graduated: quantity 8\n"
        "  tier 1 (0 < q <= 5): 5 unit(s) x 7 = 35 USD\n"
        "  tier 2 (5 < q <= 10): 3 unit(s) x 6.5 = 19.5 USD\n"
        "  total 54.5 USD, rounded half-up to 2 decimal(s): 54.50 USD"
    )


def test_components_carry_tier_quantities_and_unit_amounts() -> None:
    price = GraduatedPrice("USD", [Tier(D(5), D(7), D(1)), Tier(None, D(6))])
    parts = price.rate(8).components
    assert [(c.kind, c.tier, c.quantity, c.unit_amount, c.amount) for c in parts] == [
        (Kind.UNITS, 1, D(5), D(7), D(35)),
        (Kind.FLAT_FEE, 1, None, None, D(1)),
        (Kind.UNITS, 2, D(3), D(6), D(18)),
    ]


SHEETS: list[dict[str, Any]] = [
    {"model": "per_unit", "currency": "USD", "unit_amount": "0.00042"},
    {"model": "package", "currency": "EUR", "package_amount": "5", "package_size": 7},
    {"model": "flat", "currency": "JPY", "amount": 1000},
    {
        "model": "volume",
        "currency": "BHD",
        "tiers": [
            {"up_to": 100, "unit_amount": "0.0125", "flat_amount": "1.5"},
            {"unit_amount": "0.01"},
        ],
        "minimum": "2.000",
    },
    {
        "model": "graduated",
        "currency": "KWD",
        "tiers": [{"up_to": "2.5", "unit_amount": "0.3333"}, {"unit_amount": "0.1111"}],
        "included_units": 1,
        "maximum": 50,
    },
    {"model": "percentage", "currency": "CHF", "percent": "2.9", "free_units": 10},
    {
        "model": "graduated_percentage",
        "currency": "INR",
        "tiers": [{"up_to": 1000, "percent": "1", "flat_amount": "5"}, {"percent": "0.5"}],
    },
]
PRICES: list[Price] = [load_price(sheet) for sheet in SHEETS]


@given(st.sampled_from(PRICES), st.decimals(min_value=0, max_value=10**7, places=9))
def test_breakdown_invariants_for_every_model(price: Price, quantity: Decimal) -> None:
    breakdown = price.rate(quantity)
    assert breakdown.amount == sum((c.amount for c in breakdown.components), D(0))
    assert breakdown.rounded == price.currency.round(breakdown.amount) == charge(price, quantity)
    assert sum(breakdown.lines(), D(0)) == breakdown.rounded
    assert breakdown.rounded >= 0
    assert breakdown == price.rate(quantity)  # deterministic
    assert all(c.amount == 0 for c in breakdown.components if c.kind is Kind.FREE)
    assert breakdown.explain().endswith(f"{breakdown.rounded} {price.currency.code}")
