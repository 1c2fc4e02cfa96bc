"""Stripe Price objects -> Meterline prices (``price_from_stripe``).

Follows the Price object of Stripe's API reference:
- ``billing_scheme``: ``per_unit`` (``unit_amount``/``unit_amount_decimal``, optionally
  ``transform_quantity`` {divide_by, round: up|down}) or ``tiered`` (``tiers_mode``
  graduated|volume, ``tiers`` [{up_to, unit_amount(_decimal), flat_amount(_decimal)}]).
- Amounts are in the currency's *minor* unit, as Stripe sends them: ``unit_amount`` 5 with
  ``currency`` "usd" is 0.05 USD; ``unit_amount_decimal`` is a decimal string of minor
  units with up to 12 decimals ("0.05" = 0.0005 USD). For JPY the minor unit is the yen.
- ``up_to`` is an int, or null / "inf" for the last tier (responses say null, requests
  say "inf"). ``tiers`` is only in a response when requested with ``expand[]=tiers``.
- ``recurring.usage_type`` licensed|metered is checked; both are priced the same way, the
  difference is which quantity the caller feeds in (seats or metered usage).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from meterline.core.pricing.base import Price
from meterline.core.pricing.currencies import Currency, parse_currency
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.exact import fraction_digits, parse_amount, parse_count
from meterline.core.pricing.tiers import (
    UNPARSED,
    Bound,
    GraduatedPrice,
    Tier,
    VolumePrice,
    _Unparsed,
    check_bounds,
)
from meterline.core.pricing.unit import PackagePrice, PackageRounding, PerUnitPrice

# Stripe: "unit_amount_decimal accepts decimals up to 12 decimal places" (of a minor unit).
STRIPE_DECIMAL_PLACES = 12
SOURCE = "stripe price"


def price_from_stripe(price: Mapping[str, Any]) -> Price:
    """Build a price from a Stripe Price object (a dict as the API returns it)."""
    if not isinstance(price, Mapping):
        raise PriceError([f"must be a Price object (dict), got {type(price).__name__}"], SOURCE)
    errors: list[str] = []
    if price.get("object", "price") != "price":
        errors.append(f"object: expected 'price', got {price.get('object')!r}")
    currency = parse_currency(price.get("currency"), "currency", errors)
    if price.get("custom_unit_amount") is not None:
        errors.append("custom_unit_amount: customer-chosen amounts cannot be rated from usage")
    _check_recurring(price.get("recurring"), errors)
    scheme = price.get("billing_scheme") or "per_unit"
    transform = price.get("transform_quantity")
    result: Price | None = None
    if scheme == "per_unit":
        unit = _minor_amount(price, "unit_amount", "", currency, errors, required=True)
        if transform is not None:
            size, rounding = _transform(transform, errors)
            if not errors and unit is not None and currency is not None:
                result = PackagePrice(currency, unit, Decimal(size or 1), rounding)
        elif not errors and unit is not None and currency is not None:
            result = PerUnitPrice(currency, unit)
    elif scheme == "tiered":
        mode = price.get("tiers_mode")
        if mode not in ("graduated", "volume"):
            errors.append(
                f"tiers_mode: must be 'graduated' or 'volume' for tiered prices, got {mode!r}"
            )
        if transform is not None:
            errors.append("transform_quantity: Stripe does not combine it with tiered pricing")
        tiers = _tiers(price.get("tiers"), currency, errors)
        if not errors and currency is not None:
            cls = GraduatedPrice if mode == "graduated" else VolumePrice
            result = cls(currency, tiers)
    else:
        errors.append(f"billing_scheme: must be 'per_unit' or 'tiered', got {scheme!r}")
    if errors or result is None:
        raise PriceError(errors or ["no price could be built"], SOURCE)
    return result


def _check_recurring(recurring: object, errors: list[str]) -> None:
    if recurring is None:
        return
    if not isinstance(recurring, Mapping):
        errors.append("recurring: must be an object or null")
        return
    usage_type = recurring.get("usage_type", "licensed")
    if usage_type not in ("licensed", "metered"):
        errors.append(f"recurring.usage_type: must be 'licensed' or 'metered', got {usage_type!r}")


def _transform(transform: object, errors: list[str]) -> tuple[int | None, PackageRounding]:
    if not isinstance(transform, Mapping):
        errors.append("transform_quantity: must be an object {divide_by, round} or null")
        return None, PackageRounding.UP
    size = parse_count(transform.get("divide_by"), "transform_quantity.divide_by", errors)
    if size == 0:
        errors.append("transform_quantity.divide_by: must be greater than 0")
    rounding = transform.get("round")
    if rounding not in ("up", "down"):
        errors.append(f"transform_quantity.round: must be 'up' or 'down', got {rounding!r}")
        return size, PackageRounding.UP
    return size, PackageRounding(rounding)


def _tiers(raw: object, currency: Currency | None, errors: list[str]) -> tuple[Tier, ...]:
    if raw is None:
        errors.append("tiers: missing; retrieve tiered prices with expand[]=tiers")
        return ()
    if not isinstance(raw, list):
        errors.append("tiers: must be a list")
        return ()
    tiers: list[Tier] = []
    bounds: list[tuple[str, Bound]] = []
    for index, item in enumerate(raw):
        where = f"tiers[{index}]"
        if not isinstance(item, Mapping):
            errors.append(f"{where}: must be an object")
            bounds.append((f"{where}.up_to", UNPARSED))
            continue
        before = len(errors)
        up_to = item.get("up_to")
        bound: Bound
        if up_to is None or up_to == "inf":
            bound = None
        else:
            count = parse_count(up_to, f"{where}.up_to", errors)
            bound = UNPARSED if count is None else Decimal(count)
        bounds.append((f"{where}.up_to", bound))
        unit = _minor_amount(item, "unit_amount", f"{where}.", currency, errors)
        flat = _minor_amount(item, "flat_amount", f"{where}.", currency, errors)
        if len(errors) == before and currency is not None and bound is not UNPARSED:
            assert not isinstance(bound, _Unparsed)
            tiers.append(Tier(bound, unit if unit is not None else Decimal(0), flat or Decimal(0)))
    check_bounds(bounds, "tiers", errors)
    return tuple(tiers)


def _minor_amount(
    obj: Mapping[str, Any],
    key: str,
    prefix: str,
    currency: Currency | None,
    errors: list[str],
    required: bool = False,
) -> Decimal | None:
    """``key`` / ``key_decimal`` in minor units -> major units. Both may be present (Stripe
    echoes the integer form when it fits) and must then agree."""
    integer, text = obj.get(key), obj.get(f"{key}_decimal")
    if integer is None and text is None:
        if required:
            errors.append(f"{prefix}{key}: missing (set {key} or {key}_decimal)")
        return None
    value: Decimal | None = None
    if integer is not None:
        if isinstance(integer, bool) or not isinstance(integer, int):
            kind = "a float" if isinstance(integer, float) else repr(integer)
            errors.append(
                f"{prefix}{key}: must be an integer of minor units, got {kind}; "
                f"put fractional minor units in {key}_decimal as a string"
            )
            return None
        value = parse_amount(integer, f"{prefix}{key}", errors)
    if text is not None:
        where = f"{prefix}{key}_decimal"
        decimal = parse_amount(text, where, errors)
        if decimal is None:
            return None
        if fraction_digits(decimal) > STRIPE_DECIMAL_PLACES:
            errors.append(f"{where}: Stripe allows at most {STRIPE_DECIMAL_PLACES} decimal places")
            return None
        if value is not None and value != decimal:
            errors.append(f"{prefix}{key}: {integer} disagrees with {key}_decimal {text!r}")
            return None
        value = decimal
    if value is None or currency is None:
        return None
    return currency.to_major(value)
