"""Graduated and volume tiers: worked examples, edge rules, validation, properties."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.pricing.base import charge
from meterline.core.pricing.breakdown import Kind
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.tiers import GraduatedPrice, Tier, VolumePrice

# Stripe "Set up tiered pricing" (Typographic fonts): 1-5 at 7 USD, 6-10 at 6.50, 11+ at 6.
TYPOGRAPHIC = (
    Tier(Decimal(5), Decimal(7)),
    Tier(Decimal(10), Decimal("6.5")),
    Tier(None, Decimal(6)),
)


@pytest.mark.parametrize(
    ("fonts", "total"),
    [(1, "7"), (5, "35"), (6, "39"), (20, "120"), (25, "150")],
)
def test_stripe_volume_example(fonts: int, total: str) -> None:
    # Stripe "Set up tiered pricing", volume-based table: 1->7, 5->35, 6->39, 20->120, 25->150.
    assert charge(VolumePrice("USD", TYPOGRAPHIC), fonts) == Decimal(total)


@pytest.mark.parametrize(
    ("fonts", "total"),
    [(1, "7.00"), (5, "35.00"), (6, "41.50"), (8, "54.50"), (20, "127.50"), (25, "157.50")],
)
def test_stripe_graduated_example(fonts: int, total: str) -> None:
    # Stripe "Set up tiered pricing", graduated: the page states 5 fonts = 35 USD, like volume;
    # beyond that each tier prices its own slice: 8 fonts = 5 x 7 + 3 x 6.50 = 54.50. The
    # other totals are computed from the page's tiers the same way.
    assert charge(GraduatedPrice("USD", TYPOGRAPHIC), fonts) == Decimal(total)


def test_lago_graduated_tiers() -> None:
    # Lago "Graduated" page: $1/unit for the first 100, $0.50 for the next 100, $0.10 after.
    # The page states no total; 250 units = 100 + 50 + 5 by its definition.
    price = GraduatedPrice(
        "USD",
        (
            Tier(Decimal(100), Decimal(1)),
            Tier(Decimal(200), Decimal("0.5")),
            Tier(None, Decimal("0.1")),
        ),
    )
    assert charge(price, 250) == Decimal("155.00")
    assert price.rate(250).tiers == (1, 2, 3)


def test_lago_volume_example_with_flat_fee() -> None:
    # Lago "Volume" page: 65,000 API calls fall in tier 3: 65,000 x $0.0006 + $10 = $49.
    price = VolumePrice(
        "USD",
        (
            Tier(Decimal(10_000), Decimal("0.0010"), Decimal(10)),
            Tier(Decimal(50_000), Decimal("0.0008"), Decimal(10)),
            Tier(Decimal(100_000), Decimal("0.0006"), Decimal(10)),
            Tier(None, Decimal("0.0004"), Decimal(10)),
        ),
    )
    assert charge(price, 65_000) == Decimal("49.00")
    assert price.rate(65_000).tiers == (3,)


def test_stripe_fixed_fee_and_overage_as_one_graduated_price() -> None:
    # Stripe "Model usage-based pricing", fixed fee and overage: 200 USD includes 100,000
    # tokens, then 0.001 USD per token; here as a first tier with a flat fee.
    price = GraduatedPrice(
        "USD", (Tier(Decimal(100_000), Decimal(0), Decimal(200)), Tier(None, Decimal("0.001")))
    )
    assert charge(price, 100_000) == Decimal("200.00")
    assert charge(price, 150_000) == Decimal("250.00")


def test_overflow_below_a_cent_is_rounded_once_on_the_line() -> None:
    # Stripe community forum ("free overflow tokens"): $4 for the first 100,000 tokens, then
    # $0.000065 per token; 100,070 tokens = $4.00455 -> $4.00 on the invoice.
    price = GraduatedPrice(
        "USD", (Tier(Decimal(100_000), Decimal(0), Decimal(4)), Tier(None, Decimal("0.000065")))
    )
    assert price.rate(100_070).amount == Decimal("4.00455")
    assert charge(price, 100_070) == Decimal("4.00")


def test_tier_boundaries_are_inclusive_upper_bounds() -> None:
    price = GraduatedPrice("USD", TYPOGRAPHIC)
    assert price.rate(5).tiers == (1,)
    assert price.rate("5.000000001").tiers == (1, 2)
    assert VolumePrice("USD", TYPOGRAPHIC).rate(10).tiers == (2,)
    assert VolumePrice("USD", TYPOGRAPHIC).rate("10.5").tiers == (3,)


def test_flat_fees_graduated_only_for_tiers_reached() -> None:
    price = GraduatedPrice(
        "USD",
        (Tier(Decimal(10), Decimal(1), Decimal(100)), Tier(None, Decimal(2), Decimal(50))),
    )
    assert charge(price, 0) == Decimal("0.00")  # nothing reached, no flat fee (Lago)
    assert charge(price, 1) == Decimal("101.00")
    assert charge(price, 10) == Decimal("110.00")
    assert charge(price, 11) == Decimal("162.00")


def test_volume_charges_the_first_tier_flat_fee_at_zero() -> None:
    # 0 falls in tier 1 (Lago's VolumeService picks the range with from_value 0).
    price = VolumePrice("USD", (Tier(Decimal(10), Decimal(1), Decimal(5)), Tier(None, Decimal(1))))
    breakdown = price.rate(0)
    assert breakdown.tiers == (1,)
    assert charge(price, 0) == Decimal("5.00")


def test_single_unbounded_tier_is_per_unit() -> None:
    assert charge(GraduatedPrice("USD", [Tier(None, Decimal(3))]), 4) == Decimal("12.00")


def test_tiers_from_mappings_and_lists_are_normalised() -> None:
    price = GraduatedPrice("usd", [{"up_to": 5, "unit_amount": "7"}, {"unit_amount": 6}])
    assert price.tiers == (Tier(Decimal(5), Decimal(7)), Tier(None, Decimal(6)))
    assert price.currency.code == "USD"


def test_malformed_tiers_report_every_error_at_once() -> None:
    with pytest.raises(PriceError) as info:
        GraduatedPrice(
            "EURO",
            [
                {"up_to": 10, "unit_amount": "-1"},
                {"up_to": 5, "unit_amount": 0.5},
                {"up_to": None, "flat_amount": "1"},
                {"up_to": 20, "unit_amount": "1", "colour": "red"},
            ],
        )
    errors = info.value.errors
    assert "currency: unknown currency 'EURO' (not in Meterline's ISO 4217 table)" in errors
    assert "tiers[0].unit_amount: must not be negative, got -1" in errors
    assert any(e.startswith("tiers[1].unit_amount: float 0.5") for e in errors)
    assert "tiers[3]: unknown key(s) colour" in errors
    assert "tiers[2].up_to: only the last tier may be unbounded" in errors
    assert any(e.startswith("tiers[3].up_to: the last tier must be unbounded") for e in errors)
    assert "tiers[1].up_to: tiers must be in ascending order, 5 is not above 10" in errors
    assert len(errors) == 7


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ([], "needs at least one tier"),
        ([{"up_to": 0, "unit_amount": 1}, {"unit_amount": 1}], "greater than 0"),
        ([{"up_to": 5}, {"up_to": 5}, {}], "ascending"),
        ([{"up_to": 5}], "last tier must be unbounded"),
        ("5,10", "must be a list"),
        ([3], "must be a table"),
        ([{"up_to": -1}, {}], "negative"),
        ([{"up_to": 2.5}, {}], "float"),
    ],
)
def test_tier_rules(tiers: object, message: str) -> None:
    with pytest.raises(PriceError, match=message):
        VolumePrice("USD", tiers)  # type: ignore[arg-type]


def test_a_tier_alone_validates_its_fields() -> None:
    with pytest.raises(PriceError) as info:
        Tier(Decimal(-1), 0.5, "x")  # type: ignore[arg-type]
    assert len(info.value.errors) == 3


# --- properties ---------------------------------------------------------------------------

money = st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False, allow_infinity=False)
quantities = st.decimals(
    min_value=0, max_value=10**6, places=9, allow_nan=False, allow_infinity=False
)


@st.composite
def tier_tables(draw: st.DrawFn) -> tuple[Tier, ...]:
    steps = draw(st.lists(st.decimals(min_value="0.001", max_value=10**5, places=3), max_size=6))
    bounds: list[Decimal | None] = []
    total = Decimal(0)
    for step in steps:
        total += step
        bounds.append(total)
    bounds.append(None)
    return tuple(Tier(b, draw(money), draw(money)) for b in bounds)


@given(tier_tables(), quantities)
def test_graduated_equals_the_sum_over_its_tiers(
    tiers: tuple[Tier, ...], quantity: Decimal
) -> None:
    # Independent formula: units in tier i = clamp(q - lower_i, 0, upper_i - lower_i).
    expected = Decimal(0)
    lower = Decimal(0)
    for tier in tiers:
        upper = tier.up_to
        units = max(Decimal(0), (quantity if upper is None else min(quantity, upper)) - lower)
        if units > 0:
            expected += units * tier.unit_amount + tier.flat_amount
        if upper is not None:
            lower = upper
    breakdown = GraduatedPrice("USD", tiers).rate(quantity)
    assert breakdown.amount == expected
    assert (
        sum((c.quantity or 0 for c in breakdown.components if c.kind is Kind.UNITS), Decimal(0))
        == quantity
    )


@given(tier_tables(), quantities)
def test_volume_picks_exactly_one_tier(tiers: tuple[Tier, ...], quantity: Decimal) -> None:
    breakdown = VolumePrice("USD", tiers).rate(quantity)
    assert len(breakdown.tiers) == 1
    chosen = tiers[breakdown.tiers[0] - 1]
    lower = Decimal(0) if breakdown.tiers[0] == 1 else tiers[breakdown.tiers[0] - 2].up_to
    assert lower is not None
    assert chosen.up_to is None or quantity <= chosen.up_to
    assert breakdown.tiers[0] == 1 or quantity > lower
    assert breakdown.amount == quantity * chosen.unit_amount + chosen.flat_amount


@given(tier_tables(), quantities)
def test_tiered_charges_are_deterministic(tiers: tuple[Tier, ...], quantity: Decimal) -> None:
    for cls in (GraduatedPrice, VolumePrice):
        first = cls("EUR", tiers)
        again = cls("EUR", tuple(Tier(t.up_to, t.unit_amount, t.flat_amount) for t in tiers))
        assert first.rate(quantity) == again.rate(quantity)
        assert charge(first, quantity) == charge(again, str(quantity))
