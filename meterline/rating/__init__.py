"""Public facade of the rating core: price models, loaders and the two ways to charge.

    from meterline.rating import load_price, charge

    price = load_price('model = "per_unit"\\ncurrency = "USD"\\nunit_amount = "0.00042"')
    charge(price, 1_000_000)  # Decimal('420.00')

The price models are re-exported from ``meterline.core.pricing`` (pure, stdlib only);
see docs/rating.md for the formats and the rounding rule. Plans and subscriptions are in
``meterline.core.billing``; the rating stage that reads rollups and writes ``rated_usage``
(``rate``, ``simulate``, ``reconcile``, ``explain``) is ``meterline.rating.stage``.
"""

from __future__ import annotations

from meterline.core.pricing import (
    Allowance,
    ChargeBreakdown,
    Commitment,
    Component,
    Currency,
    FlatFee,
    GraduatedPercentagePrice,
    GraduatedPrice,
    Kind,
    PackagePrice,
    PackageRounding,
    PercentagePrice,
    PercentageTier,
    PerUnitPrice,
    Price,
    PriceError,
    RatingError,
    RoundedLines,
    Tier,
    VolumePrice,
    charge,
    charge_events,
    currency,
    load_price,
    price_from_lago,
    price_from_stripe,
    round_amount,
    round_lines,
)

__all__ = [
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
    "PercentagePrice",
    "PercentageTier",
    "PerUnitPrice",
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
