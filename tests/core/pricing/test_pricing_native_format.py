"""Meterline's own price format: TOML, JSON or a dict; every error at once."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterline.core.pricing.base import charge, charge_events
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.native_format import MODELS, load_price
from meterline.core.pricing.percentage import (
    GraduatedPercentagePrice,
    PercentagePrice,
    PercentageTier,
)
from meterline.core.pricing.tiers import GraduatedPrice, Tier, VolumePrice
from meterline.core.pricing.unit import FlatFee, PackagePrice, PackageRounding, PerUnitPrice
from meterline.core.pricing.wrappers import Allowance, Commitment

D = Decimal

GRADUATED_TOML = """
model = "graduated"
currency = "USD"
description = "Fonts, Stripe's Typographic example"
tiers = [
  { up_to = 5,  unit_amount = 7.00 },     # TOML floats are read as exact decimals
  { up_to = 10, unit_amount = "6.50" },
  { unit_amount = 6 },
]
"""


def test_toml_graduated() -> None:
    price = load_price(GRADUATED_TOML)
    assert price == GraduatedPrice(
        "USD", (Tier(D(5), D("7.00")), Tier(D(10), D("6.50")), Tier(None, D(6)))
    )
    assert charge(price, 8) == D("54.50")


def test_json_text_keeps_decimals_exact() -> None:
    price = load_price('{"model": "per_unit", "currency": "USD", "unit_amount": 0.1}')
    assert isinstance(price, PerUnitPrice)
    assert price.unit_amount == D("0.1")  # not 0.1000000000000000055511151231257827
    assert charge(price, 3) == D("0.30")


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {"model": "per_unit", "currency": "USD", "unit_amount": "0.05"},
            PerUnitPrice("USD", D("0.05")),
        ),
        (
            {
                "model": "package",
                "currency": "USD",
                "package_amount": 10,
                "package_size": 5,
                "rounding": "down",
            },
            PackagePrice("USD", D(10), D(5), PackageRounding.DOWN),
        ),
        ({"model": "flat", "currency": "GBP", "amount": "49"}, FlatFee("GBP", D(49))),
        (
            {"model": "volume", "currency": "USD", "tiers": [{"unit_amount": "1"}]},
            VolumePrice("USD", (Tier(None, D(1)),)),
        ),
        (
            {
                "model": "percentage",
                "currency": "USD",
                "percent": "1.2",
                "fixed_amount": "0.10",
                "free_events": 3,
                "free_units": 500,
            },
            PercentagePrice("USD", D("1.2"), D("0.10"), 3, D(500)),
        ),
        (
            {"model": "graduated_percentage", "currency": "USD", "tiers": [{"percent": 1}]},
            GraduatedPercentagePrice("USD", (PercentageTier(None, D(1)),)),
        ),
    ],
)
def test_every_model_loads(doc: dict[str, object], expected: object) -> None:
    assert load_price(doc) == expected


def test_every_model_is_documented_in_the_table() -> None:
    assert set(MODELS) == {
        "per_unit",
        "package",
        "graduated",
        "volume",
        "flat",
        "percentage",
        "graduated_percentage",
    }


def test_wrappers_from_keys() -> None:
    price = load_price(
        {
            "model": "package",
            "currency": "USD",
            "package_amount": "5",
            "package_size": 100,
            "included_units": 100,
            "minimum": "20.00",
            "maximum": "1000",
        }
    )
    assert isinstance(price, Commitment)
    assert isinstance(price.price, Allowance)
    assert charge(price, 201) == D("20.00")
    assert charge(price, 10**6) == D("1000.00")


def test_percentage_per_event_from_toml() -> None:
    price = load_price(
        """
        model = "percentage"
        currency = "USD"
        percent = 1.2
        fixed_amount = "0.10"
        free_events = 3
        free_units = 500
        """
    )
    assert charge_events(price, [200, 100, 100, 50]) == D("0.70")


def test_every_error_in_the_document_at_once() -> None:
    with pytest.raises(PriceError) as info:
        load_price(
            {
                "model": "graduated",
                "currency": "usdd",
                "tiers": [{"up_to": 10, "unit_amount": 1.5}, {"up_to": 5, "unit_amount": "-2"}],
                "minimum": "x",
                "colour": "blue",
            }
        )
    errors = info.value.errors
    assert "unknown key(s) colour" in errors
    assert any(e.startswith("currency: unknown currency 'usdd'") for e in errors)
    assert any(e.startswith("tiers[0].unit_amount: float 1.5") for e in errors)
    assert "tiers[1].unit_amount: must not be negative, got -2" in errors
    assert any(e.startswith("tiers[1].up_to: the last tier must be unbounded") for e in errors)
    assert "tiers[1].up_to: tiers must be in ascending order, 5 is not above 10" in errors
    assert "minimum: 'x' is not a decimal number" in errors
    assert len(errors) == 7
    assert str(info.value).startswith("price has 7 error(s):")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"currency": "USD"}, "model: must be one of"),
        ({"model": "per_unit"}, "currency: missing"),
        ({"model": "per_unit", "currency": "USD"}, "unit_amount: missing"),
        (
            {"model": "package", "currency": "USD", "package_amount": 1, "package_size": 0},
            "package_size",
        ),
        ({"model": "percentage", "currency": "USD", "percent": 101}, "at most 100"),
        (
            {"model": "percentage", "currency": "USD", "percent": 1, "included_units": 5},
            "included_units",
        ),
        ({"model": "flat", "currency": "USD", "amount": 1, "description": 5}, "description"),
        ({"model": "flat", "currency": "USD", "amount": 1, "minimum": "0.001"}, "minor unit"),
        (
            {"model": "per_unit", "currency": "USD", "unit_amount": 1, "included_units": -1},
            "included_units",
        ),
    ],
)
def test_rules(doc: dict[str, object], message: str) -> None:
    with pytest.raises(PriceError, match=message):
        load_price(doc)


@pytest.mark.parametrize(
    ("text", "message"),
    [("model = ", "not valid TOML"), ("{nope", "not valid JSON"), ("[1, 2]", "not valid TOML")],
)
def test_unparseable_text(text: str, message: str) -> None:
    with pytest.raises(PriceError, match=message):
        load_price(text)


def test_non_mapping_document() -> None:
    with pytest.raises(PriceError, match="must be a table"):
        load_price([1, 2])  # type: ignore[arg-type]
