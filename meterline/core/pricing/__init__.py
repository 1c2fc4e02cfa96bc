"""Pure price models of the rating stage: exact Decimal money, one rounding per line.

One module per concern:
- ``currencies``: ISO codes and minor units; ``rounding``: where money is rounded.
- ``unit``, ``tiers``, ``percentage``: the models; ``wrappers``: allowance, commitment.
- ``breakdown``: the explained (unrounded) form of a charge.
- ``native_format``, ``stripe_format``, ``lago_format``: loaders.

``meterline.rating`` is the public facade over this package.
"""

from __future__ import annotations

from meterline.core.pricing.base import Price, charge, charge_events
from meterline.core.pricing.breakdown import ChargeBreakdown, Component, Kind
from meterline.core.pricing.currencies import MINOR_UNITS, Currency, currency
from meterline.core.pricing.errors import PriceError, RatingError
from meterline.core.pricing.lago_format import price_from_lago
from meterline.core.pricing.native_format import load_price
from meterline.core.pricing.percentage import (
    GraduatedPercentagePrice,
    PercentagePrice,
    PercentageTier,
)
from meterline.core.pricing.rounding import RoundedLines, round_amount, round_lines
from meterline.core.pricing.stripe_format import price_from_stripe
from meterline.core.pricing.tiers import GraduatedPrice, Tier, VolumePrice
from meterline.core.pricing.unit import FlatFee, PackagePrice, PackageRounding, PerUnitPrice
from meterline.core.pricing.wrappers import Allowance, Commitment

__all__ = [
    "MINOR_UNITS",
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
