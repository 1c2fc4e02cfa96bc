"""Meterline's own price format (TOML or JSON), loaded with ``load_price``.

One price per document; ``model`` picks the model and the other keys are that model's
fields, named as on the Python classes. Amounts are in the currency's *major* unit
("0.00042" USD per token). TOML and JSON floats are read as exact decimals (never through
a binary float); from a Python dict, write amounts as strings, ints or Decimals.

    model = "graduated"            # per_unit | package | graduated | volume | flat
    currency = "USD"               #   | percentage | graduated_percentage
    tiers = [
      { up_to = 5,  unit_amount = "7.00" },
      { up_to = 10, unit_amount = "6.50" },
      { unit_amount = "6.00", flat_amount = "0" },   # no up_to: the final, unbounded tier
    ]
    included_units = 0             # optional: free units before the model (not percentage)
    minimum = "10.00"              # optional: true-up to this amount (whole minor units)
    maximum = "500.00"             # optional: cap

See docs/rating.md for every model's keys.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from meterline.core.pricing.base import Price
from meterline.core.pricing.currencies import parse_currency
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.exact import parse_amount, parse_bound, reject_unknown_keys
from meterline.core.pricing.percentage import GraduatedPercentagePrice, PercentagePrice
from meterline.core.pricing.tiers import GraduatedPrice, VolumePrice
from meterline.core.pricing.unit import FlatFee, PackagePrice, PerUnitPrice
from meterline.core.pricing.wrappers import Allowance, Commitment

# model name -> (class, required keys, optional keys)
MODELS: dict[str, tuple[Callable[..., Price], set[str], set[str]]] = {
    "per_unit": (PerUnitPrice, {"unit_amount"}, set()),
    "package": (PackagePrice, {"package_amount", "package_size"}, {"rounding"}),
    "graduated": (GraduatedPrice, {"tiers"}, set()),
    "volume": (VolumePrice, {"tiers"}, set()),
    "flat": (FlatFee, {"amount"}, set()),
    "percentage": (
        PercentagePrice,
        {"percent"},
        {"fixed_amount", "free_events", "free_units", "min_per_event", "max_per_event"},
    ),
    "graduated_percentage": (GraduatedPercentagePrice, {"tiers"}, set()),
}
COMMON_KEYS = {"model", "currency", "description", "included_units", "minimum", "maximum"}


def load_price(source: Mapping[str, Any] | str, name: str = "price") -> Price:
    """Build a price from a mapping or from TOML/JSON text (JSON if it starts with '{').
    Every problem in the document is reported in one ``PriceError``."""
    doc = _parse_text(source, name) if isinstance(source, str) else source
    if not isinstance(doc, Mapping):
        raise PriceError([f"must be a table/object, got {type(doc).__name__}"], name)
    errors: list[str] = []
    model = doc.get("model")
    if model not in MODELS:
        errors.append(f"model: must be one of {', '.join(MODELS)}, got {model!r}")
        reject_unknown_keys(doc, COMMON_KEYS | _all_model_keys(), "", errors)
        raise PriceError(errors, name)
    build, required, optional = MODELS[model]
    reject_unknown_keys(doc, COMMON_KEYS | required | optional, "", errors)
    if "currency" not in doc:
        errors.append("currency: missing")
    for key in sorted(required - set(doc)):
        errors.append(f"{key}: missing")
    if "description" in doc and not isinstance(doc["description"], str):
        errors.append("description: must be a string")
    kwargs = {k: doc[k] for k in (required | optional) if k in doc}
    price: Price | None = None
    if not required - set(doc):
        try:
            price = build(currency=doc.get("currency"), **kwargs)
        except PriceError as exc:
            errors.extend(exc.errors)
    elif "currency" in doc:
        # Still validate the currency so a missing field does not hide a typo'd code.
        parse_currency(doc["currency"], "currency", errors)
    price = _wrap(price, doc, model, errors)
    if errors or price is None:
        raise PriceError(errors, name)
    return price


def _wrap(
    price: Price | None, doc: Mapping[str, Any], model: str, errors: list[str]
) -> Price | None:
    if doc.get("included_units") is not None:
        if model in ("percentage", "graduated_percentage"):
            errors.append(
                "included_units: not for percentage models; use free_units (value) or "
                "free_events on the percentage model, or a first tier at rate 0"
            )
        else:
            free = parse_bound(doc["included_units"], "included_units", errors)
            if price is not None and free is not None:
                price = Allowance(price, free)
    if doc.get("minimum") is not None or doc.get("maximum") is not None:
        if price is None:
            # Validate the amounts anyway, against no currency.
            for key in ("minimum", "maximum"):
                if doc.get(key) is not None:
                    parse_amount(doc[key], key, errors)
            return None
        try:
            price = Commitment(price, doc.get("minimum"), doc.get("maximum"))
        except PriceError as exc:
            errors.extend(exc.errors)
            return None
    return price


def _parse_text(text: str, name: str) -> Any:
    stripped = text.strip()
    try:
        if stripped.startswith("{"):
            return json.loads(stripped, parse_float=Decimal)
        return tomllib.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise PriceError([f"not valid JSON: {exc}"], name) from None
    except tomllib.TOMLDecodeError as exc:
        raise PriceError([f"not valid TOML: {exc}"], name) from None


def _all_model_keys() -> set[str]:
    keys: set[str] = set()
    for _, required, optional in MODELS.values():
        keys |= required | optional
    return keys
