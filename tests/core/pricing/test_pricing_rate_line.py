"""``Price.rate_line`` (the rating stage's word-free path) gives what ``rate`` gives.

The overrides in unit.py and tiers.py repeat each model's arithmetic without building the
explanation; these properties hold them to ``rate``: same model, same amount and rounded
line (compared by ``repr``, so a different Decimal exponent fails too), same tiers, and the
same error for a quantity ``rate`` refuses.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.pricing.base import Price
from meterline.core.pricing.errors import RatingError
from meterline.core.pricing.tiers import GraduatedPrice, Tier, VolumePrice
from meterline.core.pricing.unit import PerUnitPrice
from meterline.core.pricing.wrappers import Allowance, Commitment

CURRENCIES = st.sampled_from(["USD", "JPY", "BHD"])
AMOUNTS = st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False,
                      allow_infinity=False) | st.sampled_from(
    [Decimal("0"), Decimal("0.00042"), Decimal("1E+2"), Decimal("0.000000000000000001"),
     Decimal("2.50"), Decimal("999999999999999")])
QUANTITIES = (
    st.integers(min_value=0, max_value=10**12)
    | st.decimals(min_value=0, max_value=10**15, places=9, allow_nan=False,
                  allow_infinity=False)
    | st.sampled_from([Decimal("0E-9"), Decimal("0"), Decimal("1E+3"), Decimal("1000"),
                       Decimal("1000.000000001"), Decimal("100"), Decimal("100.0"),
                       Decimal("99999999999999999999.999999999"), "12.5", "0"]))


@st.composite
def tiers(draw: st.DrawFn) -> list[Tier]:
    bounds = sorted(set(draw(st.lists(st.decimals(min_value=Decimal("0.001"), max_value=10**7,
                                                   places=3, allow_nan=False,
                                                   allow_infinity=False),
                                      max_size=4))))
    out = [Tier(b, draw(AMOUNTS), draw(st.sampled_from([0, 0, Decimal("5"), Decimal("0.5")])))
           for b in bounds]
    return out + [Tier(None, draw(AMOUNTS), draw(st.sampled_from([0, Decimal("12.34")])))]


@st.composite
def prices(draw: st.DrawFn) -> Price:
    cur = draw(CURRENCIES)
    kind = draw(st.sampled_from(["per_unit", "graduated", "volume", "allowance", "commit"]))
    if kind == "per_unit":
        return PerUnitPrice(cur, draw(AMOUNTS))
    if kind == "graduated":
        return GraduatedPrice(cur, draw(tiers()))
    if kind == "volume":
        return VolumePrice(cur, draw(tiers()))
    inner = PerUnitPrice(cur, draw(AMOUNTS))
    if kind == "allowance":
        return Allowance(inner, draw(st.sampled_from([0, 10, Decimal("2.5")])))
    return Commitment(inner, minimum=Decimal("10"))


def _via_rate(price: Price, quantity: object) -> tuple[str, str, str, tuple[int, ...]]:
    b = price.rate(quantity)
    return b.model, repr(b.amount), repr(b.rounded), b.tiers


@settings(max_examples=400, deadline=None)
@given(prices(), QUANTITIES)
def test_rate_line_is_rate_without_the_words(price: Price, quantity: object) -> None:
    model, amount, rounded, tier_numbers = price.rate_line(quantity)
    assert (model, repr(amount), repr(rounded), tier_numbers) == _via_rate(price, quantity)


@pytest.mark.parametrize("quantity", [Decimal("-1"), -1, 0.5, Decimal("1.0000000001"),
                                      Decimal("NaN"), "x", None])
@pytest.mark.parametrize("price", [
    PerUnitPrice("USD", "0.1"),
    GraduatedPrice("USD", [Tier(10, "1"), Tier(None, "0.5")]),
    VolumePrice("USD", [Tier(10, "1"), Tier(None, "0.5")]),
])
def test_rate_line_refuses_what_rate_refuses(price: Price, quantity: object) -> None:
    with pytest.raises(RatingError) as by_rate:
        price.rate(quantity)
    with pytest.raises(RatingError) as by_line:
        price.rate_line(quantity)
    assert str(by_line.value) == str(by_rate.value)
