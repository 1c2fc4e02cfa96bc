"""The public rating facade: a locked surface over the pure pricing core."""

from __future__ import annotations

from decimal import Decimal

import meterline.core.pricing
import meterline.rating


def test_rating_public_api_is_locked() -> None:
    assert sorted(meterline.rating.__all__) == [
        "Allowance",
        "ChargeBreakdown",
        "Commitment",
        "Component",
        "Currency",
        "FlatFee",
        "GraduatedPercentagePrice",
        "GraduatedPrice",
        "Kind",
        "PackagePrice",
        "PackageRounding",
        "PerUnitPrice",
        "PercentagePrice",
        "PercentageTier",
        "Price",
        "PriceError",
        "RatingError",
        "RoundedLines",
        "Tier",
        "VolumePrice",
        "charge",
        "charge_events",
        "currency",
        "load_price",
        "price_from_lago",
        "price_from_stripe",
        "round_amount",
        "round_lines",
    ]
    for name in meterline.rating.__all__:
        assert getattr(meterline.rating, name) is getattr(meterline.core.pricing, name), name


def test_facade_round_trip() -> None:
    from meterline.rating import charge, load_price

    price = load_price('model = "per_unit"\ncurrency = "USD"\nunit_amount = "0.00042"')
    assert charge(price, 1_000_000) == Decimal("420.00")


def test_errors_derive_from_the_root_error() -> None:
    from meterline.core.errors import MeterlineError
    from meterline.rating import PriceError, RatingError

    assert issubclass(PriceError, MeterlineError) and issubclass(PriceError, ValueError)
    assert issubclass(RatingError, MeterlineError) and issubclass(RatingError, ValueError)
