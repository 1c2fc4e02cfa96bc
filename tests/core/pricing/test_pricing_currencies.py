"""Currencies: ISO 4217 minor units and the one rounding rule."""

from __future__ import annotations

from decimal import Decimal

import pytest

from meterline.core.pricing.currencies import MINOR_UNITS, Currency, currency
from meterline.core.pricing.errors import PriceError


@pytest.mark.parametrize(
    ("code", "minor"),
    [
        ("USD", 2),
        ("EUR", 2),
        ("GBP", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("BHD", 3),
        ("KWD", 3),
        ("CHF", 2),
        ("CAD", 2),
        ("AUD", 2),
        ("INR", 2),
    ],
)
def test_required_currencies_have_iso_minor_units(code: str, minor: int) -> None:
    assert MINOR_UNITS[code] == minor
    assert currency(code) == Currency(code, minor)


def test_lookup_is_case_insensitive_like_stripe_codes() -> None:
    assert currency("usd") == currency(" USD ") == Currency("USD", 2)


@pytest.mark.parametrize("bad", ["UDS", "", "US", None, 840, Decimal(1)])
def test_unknown_or_malformed_codes_are_rejected(bad: object) -> None:
    with pytest.raises(PriceError) as info:
        currency(bad)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("currency:")


@pytest.mark.parametrize(
    ("code", "amount", "rounded"),
    [
        ("USD", "66", "66.00"),
        ("USD", "0.005", "0.01"),  # half rounds away from zero
        ("USD", "0.0049999", "0.00"),
        ("USD", "-0.005", "-0.01"),  # credits round symmetrically
        ("USD", "-0.001", "0.00"),  # and never produce a negative zero
        ("JPY", "0.5", "1"),
        ("JPY", "1234.4", "1234"),
        ("KRW", "999.5", "1000"),
        ("BHD", "1.0005", "1.001"),
        ("KWD", "0.0004", "0.000"),
    ],
)
def test_round_to_minor_unit_half_up(code: str, amount: str, rounded: str) -> None:
    result = currency(code).round(Decimal(amount))
    assert result == Decimal(rounded)
    assert str(result) == rounded  # the exponent is the minor unit: '66.00', not '66'


def test_round_keeps_huge_amounts_exact() -> None:
    big = Decimal("123456789012345678901234567890.125")
    assert currency("USD").round(big) == Decimal("123456789012345678901234567890.13")


@pytest.mark.parametrize(
    ("code", "minor", "major"),
    [("USD", "5", "0.05"), ("USD", "105.5", "1.055"), ("JPY", "5", "5"), ("BHD", "1500", "1.500")],
)
def test_minor_to_major_is_exact(code: str, minor: str, major: str) -> None:
    assert currency(code).to_major(Decimal(minor)) == Decimal(major)


def test_whole_minor_units() -> None:
    usd = currency("USD")
    assert usd.is_whole_minor(Decimal("10.00"))
    assert usd.is_whole_minor(Decimal("10"))
    assert not usd.is_whole_minor(Decimal("10.005"))
    assert not currency("JPY").is_whole_minor(Decimal("0.5"))
