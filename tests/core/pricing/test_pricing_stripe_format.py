"""Stripe Price objects, checked against the worked examples of Stripe's docs."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from meterline.core.pricing.base import charge
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.stripe_format import price_from_stripe
from meterline.core.pricing.tiers import GraduatedPrice, Tier, VolumePrice
from meterline.core.pricing.unit import PackagePrice, PackageRounding, PerUnitPrice

D = Decimal


def stripe_price(**fields: Any) -> dict[str, Any]:
    """A Price object shaped like an API response, with the given fields changed."""
    base: dict[str, Any] = {
        "id": "price_123",
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "created": 1700000000,
        "currency": "usd",
        "custom_unit_amount": None,
        "livemode": False,
        "lookup_key": None,
        "metadata": {},
        "nickname": None,
        "product": "prod_123",
        "recurring": {
            "aggregate_usage": None,
            "interval": "month",
            "interval_count": 1,
            "meter": "mtr_123",
            "usage_type": "metered",
        },
        "tax_behavior": "unspecified",
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "recurring",
        "unit_amount": None,
        "unit_amount_decimal": None,
    }
    base.update(fields)
    return base


def typographic(mode: str) -> dict[str, Any]:
    # Stripe "Set up tiered pricing": 1-5 fonts at 7 USD, 6-10 at 6.50, 11+ at 6 (cents here,
    # as the API has them; the last tier's up_to is null in responses).
    tiers = [
        {
            "flat_amount": None,
            "flat_amount_decimal": None,
            "unit_amount": 700,
            "unit_amount_decimal": "700",
            "up_to": 5,
        },
        {
            "flat_amount": None,
            "flat_amount_decimal": None,
            "unit_amount": 650,
            "unit_amount_decimal": "650",
            "up_to": 10,
        },
        {
            "flat_amount": None,
            "flat_amount_decimal": None,
            "unit_amount": 600,
            "unit_amount_decimal": "600",
            "up_to": None,
        },
    ]
    return stripe_price(billing_scheme="tiered", tiers_mode=mode, tiers=tiers)


@pytest.mark.parametrize(
    ("fonts", "total"), [(1, "7.00"), (5, "35.00"), (6, "39.00"), (20, "120.00"), (25, "150.00")]
)
def test_set_up_tiered_pricing_volume_example(fonts: int, total: str) -> None:
    # Stripe "Set up tiered pricing", volume-based table.
    price = price_from_stripe(typographic("volume"))
    assert isinstance(price, VolumePrice)
    assert charge(price, fonts) == D(total)


def test_set_up_tiered_pricing_graduated_example() -> None:
    # Stripe "Set up tiered pricing", graduated: 8 fonts = 5 x 7 + 3 x 6.50 = 54.50 USD.
    price = price_from_stripe(typographic("graduated"))
    assert price == GraduatedPrice(
        "USD", (Tier(D(5), D(7)), Tier(D(10), D("6.5")), Tier(None, D(6)))
    )
    assert charge(price, 8) == D("54.50")
    assert charge(price, 5) == D("35.00")


def test_transform_quantities_example() -> None:
    # Stripe "Transform quantities": 10 USD per hour, usage in minutes, divide_by 60 rounding
    # up; 150 minutes are charged 30 USD.
    price = price_from_stripe(
        stripe_price(unit_amount=1000, transform_quantity={"divide_by": 60, "round": "up"})
    )
    assert price == PackagePrice("USD", D(10), D(60), PackageRounding.UP)
    assert charge(price, 150) == D("30.00")


@pytest.mark.parametrize(
    ("users", "total"), [(1, "10.00"), (3, "10.00"), (5, "10.00"), (6, "20.00"), (7, "20.00")]
)
def test_quantity_transformation_per_five_users(users: int, total: str) -> None:
    # Stripe "Quantity transformation": 10 USD for every 5 users (or portion thereof).
    price = price_from_stripe(
        stripe_price(
            unit_amount=1000,
            transform_quantity={"divide_by": 5, "round": "up"},
            recurring={"interval": "month", "usage_type": "licensed"},
        )
    )
    assert charge(price, users) == D(total)


def test_round_down_transform() -> None:
    price = price_from_stripe(
        stripe_price(unit_amount=500, transform_quantity={"divide_by": 5, "round": "down"})
    )
    assert charge(price, 8) == D("5.00")


def test_decimal_amounts_example() -> None:
    # Stripe "Decimal amounts for pricing": unit_amount_decimal 0.05 (cents) x 30 = 1.5 cents,
    # rounded on the line item to 2 cents; 105.5 means 1.055 USD.
    price = price_from_stripe(stripe_price(unit_amount_decimal="0.05"))
    assert charge(price, 30) == D("0.02")
    assert price_from_stripe(stripe_price(unit_amount_decimal="105.5")) == PerUnitPrice(
        "USD", D("1.055")
    )


def test_minor_units_follow_the_currency() -> None:
    # unit_amount 5 is 0.05 USD but 5 JPY (zero-decimal) and 0.005 BHD (three decimals).
    assert price_from_stripe(stripe_price(unit_amount=5)) == PerUnitPrice("USD", D("0.05"))
    assert price_from_stripe(stripe_price(unit_amount=5, currency="jpy")) == PerUnitPrice(
        "JPY", D(5)
    )
    assert price_from_stripe(stripe_price(unit_amount=5, currency="bhd")) == PerUnitPrice(
        "BHD", D("0.005")
    )


def test_graduated_with_flat_amounts_and_inf() -> None:
    # The fixed-fee-and-overage shape: first 100,000 tokens for a 200 USD flat fee, then
    # 0.001 USD (0.1 cent) per token; requests spell the last bound "inf".
    price = price_from_stripe(
        stripe_price(
            billing_scheme="tiered",
            tiers_mode="graduated",
            tiers=[
                {"up_to": 100000, "unit_amount": 0, "flat_amount": 20000},
                {"up_to": "inf", "unit_amount_decimal": "0.1"},
            ],
        )
    )
    assert charge(price, 100_000) == D("200.00")
    assert charge(price, 150_000) == D("250.00")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(PriceError) as info:
        price_from_stripe(
            stripe_price(
                currency="usx",
                billing_scheme="tiered",
                tiers_mode="stairs",
                transform_quantity={"divide_by": 5, "round": "up"},
                recurring={"usage_type": "seats"},
                tiers=[
                    {"up_to": 10, "unit_amount": 1.5},
                    {"up_to": 5, "unit_amount": -1, "flat_amount_decimal": "x"},
                ],
            )
        )
    errors = info.value.errors
    assert errors[0].startswith("currency: unknown currency 'usx'")
    assert "recurring.usage_type: must be 'licensed' or 'metered', got 'seats'" in errors
    assert "tiers_mode: must be 'graduated' or 'volume' for tiered prices, got 'stairs'" in errors
    assert "transform_quantity: Stripe does not combine it with tiered pricing" in errors
    assert any(
        e.startswith("tiers[0].unit_amount: must be an integer of minor units, got a float")
        for e in errors
    )
    assert "tiers[1].unit_amount: must not be negative, got -1" in errors
    assert "tiers[1].flat_amount_decimal: 'x' is not a decimal number" in errors
    assert any(e.startswith("tiers[1].up_to: the last tier must be unbounded") for e in errors)
    assert "tiers[1].up_to: tiers must be in ascending order, 5 is not above 10" in errors
    assert len(errors) == 9
    assert str(info.value).startswith("stripe price has 9 error(s)")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "unit_amount: missing"),
        ({"unit_amount": 5, "unit_amount_decimal": "6"}, "disagrees"),
        ({"unit_amount_decimal": "0.0000000000001"}, "at most 12 decimal places"),
        ({"unit_amount": True}, "integer of minor units"),
        (
            {"unit_amount": 5, "transform_quantity": {"divide_by": 0, "round": "up"}},
            "greater than 0",
        ),
        ({"unit_amount": 5, "transform_quantity": {"divide_by": 5, "round": "nearest"}}, "round"),
        ({"unit_amount": 5, "transform_quantity": "5"}, "transform_quantity"),
        ({"unit_amount": 5, "custom_unit_amount": {"preset": 500}}, "custom_unit_amount"),
        ({"unit_amount": 5, "billing_scheme": "flat"}, "billing_scheme"),
        ({"unit_amount": 5, "object": "plan"}, "object"),
        ({"unit_amount": 5, "recurring": "monthly"}, "recurring"),
        ({"billing_scheme": "tiered", "tiers_mode": "volume"}, "expand"),
        ({"billing_scheme": "tiered", "tiers_mode": "volume", "tiers": {}}, "must be a list"),
        ({"billing_scheme": "tiered", "tiers_mode": "volume", "tiers": [5]}, "must be an object"),
        (
            {"billing_scheme": "tiered", "tiers_mode": "volume", "tiers": [{"up_to": 2.5}, {}]},
            "whole number",
        ),
    ],
)
def test_rules(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(PriceError, match=message):
        price_from_stripe(stripe_price(**fields))


def test_unit_amount_echoed_in_both_forms_is_fine() -> None:
    price = price_from_stripe(stripe_price(unit_amount=5, unit_amount_decimal="5.000"))
    assert price == PerUnitPrice("USD", D("0.05"))


def test_not_a_mapping() -> None:
    with pytest.raises(PriceError, match="Price object"):
        price_from_stripe("price_123")  # type: ignore[arg-type]
