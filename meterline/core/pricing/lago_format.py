"""Lago charge objects -> Meterline prices (``price_from_lago``).

Reads ``charge_model`` and ``properties`` as Lago's API documents them; amounts are
decimal strings in the plan currency's major unit ("0.05"), counts are integers:

- standard: ``amount``
- package: ``amount``, ``package_size``, ``free_units``
- graduated / volume: ``graduated_ranges`` / ``volume_ranges``
  [{from_value, to_value, per_unit_amount, flat_amount}]
- percentage: ``rate`` (percent), ``fixed_amount``, ``free_units_per_events``,
  ``free_units_per_total_aggregation``, ``per_transaction_min_amount``,
  ``per_transaction_max_amount``
- graduated_percentage: ``graduated_percentage_ranges`` [{from_value, to_value, rate,
  flat_amount}]
- the charge's ``min_amount_cents`` (Lago's charge spending minimum) becomes a true-up.

Ranges: the first starts at 0, each next one at the previous ``to_value`` + 1 (or at
``to_value``, Lago's "adjacent" ranges), the last has ``to_value`` null. Both count
units the same way as an inclusive upper bound, which is what Meterline tiers store.

A Lago charge has no currency of its own (it is the plan's ``amount_currency``): pass
``currency=``. Charges with ``filters`` (per-filter properties) are refused rather than
priced with the default properties only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from meterline.core.pricing.base import Price
from meterline.core.pricing.currencies import Currency, parse_currency
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.exact import (
    ZERO,
    fmt,
    parse_amount,
    parse_bound,
    parse_count,
    reject_unknown_keys,
)
from meterline.core.pricing.percentage import (
    GraduatedPercentagePrice,
    PercentagePrice,
    PercentageTier,
    parse_rate,
)
from meterline.core.pricing.tiers import (
    UNPARSED,
    Bound,
    GraduatedPrice,
    Tier,
    VolumePrice,
    check_bounds,
)
from meterline.core.pricing.unit import PackagePrice, PackageRounding, PerUnitPrice
from meterline.core.pricing.wrappers import Allowance, Commitment

SOURCE = "lago charge"
# A builder checks a model's properties (reporting into the error list) and returns how to
# build the price once the currency is known.
Build = Callable[[Currency], Price]
Parse = Callable[[Mapping[str, Any], list[str]], Build | None]
# Properties that shape grouping, not price: accepted and ignored.
_GROUPING = {"grouped_by", "pricing_group_keys"}
_PROPERTIES = {
    "standard": {"amount"},
    "package": {"amount", "package_size", "free_units"},
    "graduated": {"graduated_ranges"},
    "volume": {"volume_ranges"},
    "percentage": {
        "rate",
        "fixed_amount",
        "free_units_per_events",
        "free_units_per_total_aggregation",
        "per_transaction_min_amount",
        "per_transaction_max_amount",
    },
    "graduated_percentage": {"graduated_percentage_ranges"},
}


def price_from_lago(charge: Mapping[str, Any], *, currency: object = None) -> Price:
    """Build a price from a Lago charge object; ``currency`` is the plan's currency
    (falls back to ``amount_currency``/``currency`` on the dict if present)."""
    if not isinstance(charge, Mapping):
        raise PriceError([f"must be a charge object (dict), got {type(charge).__name__}"], SOURCE)
    errors: list[str] = []
    code = (
        currency if currency is not None else charge.get("amount_currency", charge.get("currency"))
    )
    if code is None:
        errors.append(
            "currency: missing; a Lago charge is in its plan's amount_currency, pass currency="
        )
        cur = None
    else:
        cur = parse_currency(code, "currency", errors)
    model = charge.get("charge_model")
    props = charge.get("properties")
    if model not in _PROPERTIES:
        errors.append(f"charge_model: must be one of {', '.join(_PROPERTIES)}, got {model!r}")
    if not isinstance(props, Mapping):
        errors.append("properties: must be an object")
        props = {}
    if charge.get("filters"):
        errors.append(
            "filters: per-filter properties are not supported; price each filter separately"
        )
    price: Price | None = None
    if model in _PROPERTIES:
        reject_unknown_keys(props, _PROPERTIES[model] | _GROUPING, "properties", errors)
        before = len(errors)
        built = _BUILDERS[model](props, errors)
        if len(errors) == before and not errors and cur is not None and built is not None:
            price = built(cur)
    minimum = charge.get("min_amount_cents")
    if minimum is not None:
        cents = parse_count(minimum, "min_amount_cents", errors)
        if price is not None and cents:
            price = Commitment(price, minimum=price.currency.to_major(Decimal(cents)))
    if errors or price is None:
        raise PriceError(errors, SOURCE)
    return price


def _value(props: Mapping[str, Any], key: str, errors: list[str]) -> Decimal | None:
    if props.get(key) is None:
        errors.append(f"properties.{key}: missing")
        return None
    return parse_amount(props[key], f"properties.{key}", errors)


def _standard(props: Mapping[str, Any], errors: list[str]) -> Build | None:
    amount = _value(props, "amount", errors)
    if amount is None:
        return None
    return lambda cur: PerUnitPrice(cur, amount)


def _package(props: Mapping[str, Any], errors: list[str]) -> Build | None:
    amount = _value(props, "amount", errors)
    size = parse_count(props.get("package_size"), "properties.package_size", errors)
    if size == 0:
        errors.append("properties.package_size: must be greater than 0")
    free = parse_count(props.get("free_units") or 0, "properties.free_units", errors)
    if amount is None or not size:
        return None

    def build(cur: Currency) -> Price:
        # Lago: paid units = units - free_units, then packages are counted and rounded up.
        price: Price = PackagePrice(cur, amount, Decimal(size), PackageRounding.UP)
        return Allowance(price, Decimal(free)) if free else price

    return build


def _ranges(
    props: Mapping[str, Any], key: str, amount_keys: tuple[str, ...], errors: list[str]
) -> list[tuple[Decimal | None, dict[str, Decimal]]]:
    """[(up_to, {amount key: value})] from Lago ranges, with every range rule checked."""
    raw = props.get(key)
    where = f"properties.{key}"
    if not isinstance(raw, list) or not raw:
        errors.append(f"{where}: must be a non-empty list of ranges")
        return []
    out: list[tuple[Decimal | None, dict[str, Decimal]]] = []
    bounds: list[tuple[str, Bound]] = []
    previous_to: Decimal | None = None
    for index, item in enumerate(raw):
        at = f"{where}[{index}]"
        if not isinstance(item, Mapping):
            errors.append(f"{at}: must be an object")
            bounds.append((f"{at}.to_value", UNPARSED))
            continue
        reject_unknown_keys(item, {"from_value", "to_value", *amount_keys}, at, errors)
        before = len(errors)
        start = parse_bound(item.get("from_value"), f"{at}.from_value", errors)
        end = (
            None
            if item.get("to_value") is None
            else parse_bound(item["to_value"], f"{at}.to_value", errors)
        )
        if start is not None:
            if index == 0 and start != 0:
                errors.append(f"{at}.from_value: the first range must start at 0, got {fmt(start)}")
            elif (
                index > 0
                and previous_to is not None
                and start not in (previous_to, previous_to + 1)
            ):
                errors.append(
                    f"{at}.from_value: must be the previous to_value ({fmt(previous_to)}) or "
                    f"that + 1, got {fmt(start)}"
                )
            if end is not None and end <= start:
                errors.append(
                    f"{at}.to_value: must be above from_value {fmt(start)}, got {fmt(end)}"
                )
        bound_ok = item.get("to_value") is None or end is not None
        bounds.append((f"{at}.to_value", end if bound_ok else UNPARSED))
        previous_to = end
        amounts: dict[str, Decimal] = {}
        for amount_key in amount_keys:
            raw_amount = item.get(amount_key)
            if raw_amount is None and amount_key == "flat_amount":
                raw_amount = ZERO
            if raw_amount is None:
                errors.append(f"{at}.{amount_key}: missing")
                continue
            parse = parse_rate if amount_key == "rate" else parse_amount
            value = parse(raw_amount, f"{at}.{amount_key}", errors)
            if value is not None:
                amounts[amount_key] = value
        if len(errors) == before:
            out.append((end, amounts))
    check_bounds(bounds, where, errors)
    return out


def _tiered(key: str, cls: type[GraduatedPrice] | type[VolumePrice]) -> Parse:
    def parse(props: Mapping[str, Any], errors: list[str]) -> Build | None:
        ranges = _ranges(props, key, ("per_unit_amount", "flat_amount"), errors)
        tiers = [Tier(up, a["per_unit_amount"], a["flat_amount"]) for up, a in ranges]
        return lambda cur: cls(cur, tuple(tiers))

    return parse


def _graduated_percentage(props: Mapping[str, Any], errors: list[str]) -> Build | None:
    ranges = _ranges(props, "graduated_percentage_ranges", ("rate", "flat_amount"), errors)
    tiers = [PercentageTier(up, a["rate"], a["flat_amount"]) for up, a in ranges]
    return lambda cur: GraduatedPercentagePrice(cur, tuple(tiers))


def _percentage(props: Mapping[str, Any], errors: list[str]) -> Build | None:
    if props.get("rate") is None:
        errors.append("properties.rate: missing")
    rate = parse_rate(props.get("rate", "0"), "properties.rate", errors)

    def optional(key: str) -> Decimal | None:
        raw = props.get(key)
        return None if raw is None else parse_amount(raw, f"properties.{key}", errors)

    fixed = optional("fixed_amount")
    free_units = None
    if props.get("free_units_per_total_aggregation") is not None:
        free_units = parse_bound(
            props["free_units_per_total_aggregation"],
            "properties.free_units_per_total_aggregation",
            errors,
        )
    free_events = parse_count(
        props.get("free_units_per_events") or 0, "properties.free_units_per_events", errors
    )
    low, high = optional("per_transaction_min_amount"), optional("per_transaction_max_amount")
    if low is not None and high is not None and low > high:
        errors.append(
            f"properties.per_transaction_min_amount: {fmt(low)} is above "
            f"per_transaction_max_amount {fmt(high)}"
        )
    if rate is None:
        return None

    def build(cur: Currency) -> Price:
        return PercentagePrice(
            cur,
            percent=rate,
            fixed_amount=fixed or ZERO,
            free_events=free_events or 0,
            free_units=free_units or ZERO,
            min_per_event=low,
            max_per_event=high,
        )

    return build


_BUILDERS: dict[str, Parse] = {
    "standard": _standard,
    "package": _package,
    "graduated": _tiered("graduated_ranges", GraduatedPrice),
    "volume": _tiered("volume_ranges", VolumePrice),
    "percentage": _percentage,
    "graduated_percentage": _graduated_percentage,
}
