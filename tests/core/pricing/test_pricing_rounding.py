"""Rounding: each line once, total = sum of rounded lines, never any drift."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.pricing.currencies import MINOR_UNITS, currency
from meterline.core.pricing.errors import RatingError
from meterline.core.pricing.rounding import round_amount, round_lines

amounts = st.decimals(
    min_value=Decimal("-1000000"),
    max_value=Decimal("1000000"),
    places=9,
    allow_nan=False,
    allow_infinity=False,
)


def test_lines_are_rounded_once_and_total_is_their_sum() -> None:
    usd = currency("USD")
    result = round_lines([Decimal("0.005"), Decimal("0.005"), Decimal("0.005")], usd)
    assert result.lines == (Decimal("0.01"),) * 3
    assert result.total == Decimal("0.03")
    assert result.unrounded_total == Decimal("0.015")
    # Rounding the exact sum once would say 0.02: the difference is reported, not hidden.
    assert result.rounding_difference == Decimal("0.01")


def test_stripe_decimal_amounts_example_each_line_rounded_before_summing() -> None:
    # Stripe "Decimal amounts for pricing": 0.05 cents x 30 = 1.5 cents -> 2 cents per line.
    usd = currency("USD")
    line = Decimal("0.0005") * 30
    result = round_lines([line, line], usd)
    assert result.lines == (Decimal("0.02"), Decimal("0.02"))
    assert result.total == Decimal("0.04")


def test_empty_invoice_totals_zero_in_minor_units() -> None:
    result = round_lines([], currency("USD"))
    assert result.lines == ()
    assert str(result.total) == "0.00"


@pytest.mark.parametrize("bad", [0.1, 1, "0.1", None, Decimal("NaN"), Decimal("Infinity")])
def test_only_finite_decimals_are_accepted(bad: object) -> None:
    with pytest.raises(RatingError):
        round_lines([Decimal(1), bad], currency("USD"))  # type: ignore[list-item]
    with pytest.raises(RatingError):
        round_amount(bad, currency("USD"))  # type: ignore[arg-type]


@given(
    st.lists(amounts, max_size=60),
    st.sampled_from(sorted(MINOR_UNITS)),
)
def test_rounded_lines_add_up_to_the_total_exactly(values: list[Decimal], code: str) -> None:
    cur = currency(code)
    result = round_lines(values, cur)
    assert sum(result.lines, Decimal(0)) == result.total
    assert all(line == cur.round(line) for line in result.lines)  # already minor units
    assert result.total == cur.round(result.total)
    # Per-line rounding moves each line by at most half a minor unit.
    assert abs(result.total - result.unrounded_total) <= cur.quantum / 2 * len(values)
    # Recomputing gives the same answer (no hidden state, no float).
    assert round_lines(values, cur) == result
