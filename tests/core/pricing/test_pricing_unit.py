"""Per-unit, package (transform) and flat fee models."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterline.core.pricing.base import charge
from meterline.core.pricing.errors import PriceError, RatingError
from meterline.core.pricing.unit import FlatFee, PackagePrice, PackageRounding, PerUnitPrice


def test_unit_price_finer_than_a_cent() -> None:
    per_token = PerUnitPrice("USD", Decimal("0.00042"))
    assert charge(per_token, 1_000_000) == Decimal("420.00")
    assert charge(per_token, 12) == Decimal("0.01")  # 0.00504 -> 0.01
    breakdown = per_token.rate(12)
    assert breakdown.amount == Decimal("0.00504")  # the explained form is not rounded


def test_lago_standard_example() -> None:
    # Lago "Standard" charge model page: $0.05 per API call, 1,000 calls = $50.
    assert charge(PerUnitPrice("USD", Decimal("0.05")), 1000) == Decimal("50.00")


def test_zero_decimal_currency() -> None:
    assert charge(PerUnitPrice("JPY", Decimal("0.5")), 3) == Decimal("2")


def test_fractional_quantities_are_exact() -> None:
    per_gb = PerUnitPrice("EUR", Decimal("0.023"))
    assert per_gb.rate("1.5").amount == Decimal("0.0345")
    assert charge(per_gb, Decimal("0.000000001")) == Decimal("0.00")


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [(0, "0.00"), (1, "10.00"), (3, "10.00"), (5, "10.00"), (6, "20.00"), (7, "20.00")],
)
def test_package_rounds_up_a_started_package(quantity: int, expected: str) -> None:
    # Stripe "Quantity transformation": $10 per 5 users, rounding up (1,3,5 -> $10; 6,7 -> $20).
    per_five = PackagePrice("USD", Decimal(10), Decimal(5), PackageRounding.UP)
    assert charge(per_five, quantity) == Decimal(expected)


def test_package_brief_example_five_dollars_per_five_units() -> None:
    assert charge(PackagePrice("USD", Decimal(5), Decimal(5)), 8) == Decimal("10.00")


def test_package_rounding_down_bills_only_complete_packages() -> None:
    per_hour = PackagePrice("USD", Decimal(10), Decimal(60), "down")
    assert per_hour.rounding is PackageRounding.DOWN
    assert charge(per_hour, 150) == Decimal("20.00")
    assert charge(per_hour, 59) == Decimal("0.00")


def test_package_with_fractional_quantity_and_size() -> None:
    price = PackagePrice("USD", Decimal(1), Decimal("0.5"))
    assert price.packages(Decimal("1.2")) == 3
    assert charge(price, "1.0") == Decimal("2.00")


def test_flat_fee_ignores_quantity() -> None:
    fee = FlatFee("GBP", Decimal("49.99"))
    assert charge(fee, 0) == charge(fee, 10**6) == Decimal("49.99")
    assert fee.rate_events([1, 2, 3]).events == 3


def test_constructor_reports_every_error_at_once() -> None:
    with pytest.raises(PriceError) as info:
        PackagePrice("XYZ", -1.5, 0, "sideways")  # type: ignore[arg-type]
    errors = info.value.errors
    assert [e.split(":")[0] for e in errors] == [
        "currency",
        "package_amount",
        "package_size",
        "rounding",
    ]
    assert "float" in errors[1]
    assert "greater than 0" in errors[2]


@pytest.mark.parametrize(
    "bad",
    [0.5, Decimal("NaN"), Decimal("-Infinity"), "abc", None, [1], True, "1e16", "0." + "1" * 19],
)
def test_bad_amounts_are_rejected(bad: object) -> None:
    with pytest.raises(PriceError) as info:
        PerUnitPrice("USD", bad)  # type: ignore[arg-type]
    assert info.value.errors[0].startswith("unit_amount:")


def test_amount_trailing_zeros_beyond_the_digit_limit_are_fine() -> None:
    assert PerUnitPrice("USD", "1." + "0" * 30).unit_amount == 1


@pytest.mark.parametrize(
    ("quantity", "message"),
    [
        (1.5, "float"),
        (-1, "negative"),
        ("1.0000000001", "fractional digits"),
        (True, "must be int"),
        (None, "must be int"),
        ("ten", "not a decimal"),
    ],
)
def test_bad_quantities_raise_rating_error(quantity: object, message: str) -> None:
    with pytest.raises(RatingError, match=message):
        charge(PerUnitPrice("USD", Decimal(1)), quantity)


def test_rate_events_rejects_a_bare_string() -> None:
    with pytest.raises(RatingError, match="iterable"):
        PerUnitPrice("USD", Decimal(1)).rate_events("123")


def test_charge_needs_a_price() -> None:
    with pytest.raises(RatingError, match="expected a Price"):
        charge({"unit_amount": 1}, 1)  # type: ignore[arg-type]


def test_prices_are_immutable_and_hashable() -> None:
    price = PerUnitPrice("USD", "0.10")
    assert price == PerUnitPrice("usd", Decimal("0.10"))
    assert hash(price) == hash(PerUnitPrice("USD", Decimal("0.10")))
    with pytest.raises(AttributeError):
        price.unit_amount = Decimal(1)  # type: ignore[misc]
