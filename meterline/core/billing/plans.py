"""Plans: what a customer pays for, as versioned, validated, immutable values.

A plan document (TOML/JSON/dict) describes one *version* of a plan::

    id = "pro"
    name = "Pro"
    currency = "USD"
    base_fee = "49.00"                    # recurring, per period, prorated by time
    effective_from = "2026-12-01"         # versions after the first: when it applies

    [[charges]]                           # one meter, one aggregation, one price
    meter = "api_calls"
    aggregation = "sum"                   # sum | count | max | unique_count | latest
    price = { model = "graduated", tiers = [ { up_to = 100000, unit_amount = "0" },
                                             { unit_amount = "0.0002" } ] }

    [[charges]]
    meter = "storage_gb"
    aggregation = "time_weighted_sum"     # a gauge: GB x time, exact from change points
    time_unit = "hour"                    # GB-hours (also: second, minute, day)
    price = { model = "per_unit", unit_amount = "0.0001" }

    [[limits]]                            # read by the quota-check API
    meter = "api_calls"
    kind = "hard"                         # hard: refuse past it | soft: warn
    value = 1000000

    [entitlements]                        # feature flags and sizes, free-form scalars
    sso = true
    seats = 10

A charge's price is a price document (docs/rating.md section 5) without ``currency``:
it inherits the plan's, so a plan cannot mix currencies on one invoice.

Aggregations over the billing period (quantities in the meter's units):

- ``sum``: sum of the values. ``count``: number of events.
- ``max``: the largest hourly value of the period, dimension groups added per hour.
- ``latest``: per dimension group, the value of its last hour with data; groups added.
- ``unique_count``: distinct values of ``dimension`` over the whole period (from the raw
  events: distinct counts of hours do not add up).
- ``time_weighted_sum``: the gauge's exact integral (value x milliseconds, from the raw
  events' change points, the value in force before the period carried in), expressed in
  ``time_unit`` and rounded once, half-up, to the nano-unit (9 decimals), the precision of
  every quantity in Meterline.

Everything wrong in a document is reported at once in one ``BillingError``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any

from meterline.core.billing.errors import BillingError
from meterline.core.billing.periods import parse_instant
from meterline.core.events import METER_NAME_RE
from meterline.core.pricing import Currency, Price, PriceError, load_price
from meterline.core.pricing.currencies import parse_currency
from meterline.core.pricing.exact import parse_amount, parse_bound, reject_unknown_keys


class PeriodAggregation(StrEnum):
    SUM = "sum"
    COUNT = "count"
    MAX = "max"
    UNIQUE_COUNT = "unique_count"
    LATEST = "latest"
    TIME_WEIGHTED_SUM = "time_weighted_sum"


class LimitKind(StrEnum):
    HARD = "hard"
    SOFT = "soft"


# time_weighted_sum units: milliseconds per unit of time.
TIME_UNITS_MS: dict[str, int] = {"second": 1000, "minute": 60_000, "hour": 3_600_000,
                                 "day": 86_400_000}

_PLAN_KEYS = {"id", "name", "currency", "base_fee", "effective_from", "charges", "limits",
              "entitlements", "description"}
_CHARGE_KEYS = {"meter", "aggregation", "price", "dimension", "time_unit", "description"}
_LIMIT_KEYS = {"meter", "kind", "value"}


@dataclass(frozen=True, slots=True)
class Charge:
    meter: str
    aggregation: PeriodAggregation
    price: Price
    dimension: str | None = None  # unique_count: the dimension whose values are counted
    time_unit: str | None = None  # time_weighted_sum: second | minute | hour | day
    description: str = ""

    @property
    def key(self) -> str:
        """Identifies the charge inside a plan version (a meter may be charged twice with
        different aggregations)."""
        return f"{self.meter}:{self.aggregation.value}"


@dataclass(frozen=True, slots=True)
class Limit:
    meter: str
    kind: LimitKind
    value: Decimal


@dataclass(frozen=True, slots=True)
class PlanVersion:
    plan_id: str
    version: int  # 1, 2, ... in the order versions were published
    effective_from_ms: int | None  # None: from the beginning of time (first version only)
    currency: Currency
    base_fee: Decimal
    charges: tuple[Charge, ...]
    limits: tuple[Limit, ...] = ()
    entitlements: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    document: Mapping[str, Any] = field(default_factory=dict)  # canonical source, for events


def parse_plan_text(text: str, source: str = "plan") -> dict[str, Any]:
    """TOML or JSON (``{`` first) text -> a document with exact decimals (never floats)."""
    stripped = text.strip()
    try:
        if stripped.startswith("{"):
            doc = json.loads(stripped, parse_float=Decimal)
        else:
            doc = tomllib.loads(text, parse_float=Decimal)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BillingError([f"not valid TOML/JSON: {exc}"], source) from None
    if not isinstance(doc, dict):
        raise BillingError([f"must be a table/object, got {type(doc).__name__}"], source)
    return doc


def canonical(doc: Any) -> Any:
    """The document with every Decimal as its exact text: JSON-safe and reloadable to the
    same plan (the event log stores this)."""
    if isinstance(doc, Mapping):
        return {str(k): canonical(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [canonical(v) for v in doc]
    if isinstance(doc, Decimal):
        return str(doc)
    return doc


def build_plan_version(doc: Mapping[str, Any], version: int = 1,
                       source: str = "plan") -> PlanVersion:
    """Validate a plan document; raise one ``BillingError`` with every problem."""
    errors: list[str] = []
    if not isinstance(doc, Mapping):
        raise BillingError([f"must be a table/object, got {type(doc).__name__}"], source)
    reject_unknown_keys(doc, _PLAN_KEYS, "", errors)
    plan_id = doc.get("id")
    if not isinstance(plan_id, str) or not METER_NAME_RE.match(plan_id):
        errors.append(f"id: must match {METER_NAME_RE.pattern}, got {plan_id!r}")
        plan_id = "?"
    cur = parse_currency(doc.get("currency"), "currency", errors)
    base_fee = parse_amount(doc.get("base_fee", 0), "base_fee", errors)
    if cur is not None and base_fee is not None and not cur.is_whole_minor(base_fee):
        errors.append(f"base_fee: {base_fee} is not a whole number of {cur.code} minor units")
    effective: int | None = None
    if doc.get("effective_from") is not None:
        raw = doc["effective_from"]
        try:
            effective = parse_instant(str(raw))
        except ValueError as exc:
            errors.append(f"effective_from: {exc}")
    if version > 1 and effective is None:
        errors.append("effective_from: a new version of a plan needs an effective_from date")
    for key in ("name", "description"):
        if key in doc and not isinstance(doc[key], str):
            errors.append(f"{key}: must be a string")
    charges = _charges(doc.get("charges", []), cur, errors)
    limits = _limits(doc.get("limits", []), errors)
    ents = doc.get("entitlements", {})
    if not isinstance(ents, Mapping):
        errors.append("entitlements: must be a table of name = value")
        ents = {}
    for name, value in ents.items():
        if not isinstance(value, str | int | bool | Decimal):
            errors.append(f"entitlements.{name}: must be a string, number or boolean")
    if errors:
        raise BillingError(errors, source)
    assert cur is not None and base_fee is not None
    return PlanVersion(plan_id=plan_id, version=version, effective_from_ms=effective,
                       currency=cur, base_fee=base_fee, charges=tuple(charges),
                       limits=tuple(limits), entitlements=dict(ents),
                       name=str(doc.get("name", plan_id)), document=canonical(dict(doc)))


def _charges(raw: Any, cur: Currency | None, errors: list[str]) -> list[Charge]:
    if not isinstance(raw, list):
        errors.append("charges: must be a list of tables ([[charges]])")
        return []
    out: list[Charge] = []
    seen: set[str] = set()
    for i, spec in enumerate(raw):
        where = f"charges[{i}]"
        if not isinstance(spec, Mapping):
            errors.append(f"{where}: must be a table")
            continue
        reject_unknown_keys(spec, _CHARGE_KEYS, where, errors)
        meter = spec.get("meter")
        if not isinstance(meter, str) or not METER_NAME_RE.match(meter):
            errors.append(f"{where}.meter: must be a meter name, got {meter!r}")
        agg_raw = spec.get("aggregation")
        try:
            agg = PeriodAggregation(str(agg_raw))
        except ValueError:
            errors.append(f"{where}.aggregation: {agg_raw!r} is not one of "
                          f"{', '.join(a.value for a in PeriodAggregation)}")
            agg = None
        dimension = spec.get("dimension")
        time_unit = spec.get("time_unit")
        if agg is PeriodAggregation.UNIQUE_COUNT:
            if not isinstance(dimension, str) or not dimension:
                errors.append(f"{where}.dimension: unique_count needs the dimension whose "
                              "distinct values are counted")
        elif dimension is not None:
            errors.append(f"{where}.dimension: only for unique_count")
        if agg is PeriodAggregation.TIME_WEIGHTED_SUM:
            if time_unit not in TIME_UNITS_MS:
                errors.append(f"{where}.time_unit: time_weighted_sum needs one of "
                              f"{', '.join(TIME_UNITS_MS)}, got {time_unit!r}")
        elif time_unit is not None:
            errors.append(f"{where}.time_unit: only for time_weighted_sum")
        price_doc = spec.get("price")
        price: Price | None = None
        if not isinstance(price_doc, Mapping):
            errors.append(f"{where}.price: must be a price table (docs/rating.md section 5)")
        elif "currency" in price_doc:
            errors.append(f"{where}.price.currency: a charge is priced in the plan's currency; "
                          "leave it out")
        elif cur is not None:
            try:
                price = load_price({**price_doc, "currency": cur.code})
            except PriceError as exc:
                errors.extend(f"{where}.price.{e}" if not e.startswith("unknown key") else
                              f"{where}.price: {e}" for e in exc.errors)
        if isinstance(meter, str) and agg is not None:
            key = f"{meter}:{agg.value}"
            if key in seen:
                errors.append(f"{where}: {key} is charged twice")
            seen.add(key)
        if "description" in spec and not isinstance(spec["description"], str):
            errors.append(f"{where}.description: must be a string")
        if price is not None and agg is not None and isinstance(meter, str):
            out.append(Charge(meter, agg, price, dimension, time_unit,
                              str(spec.get("description", ""))))
    return out


def _limits(raw: Any, errors: list[str]) -> list[Limit]:
    if not isinstance(raw, list):
        errors.append("limits: must be a list of tables ([[limits]])")
        return []
    out: list[Limit] = []
    for i, spec in enumerate(raw):
        where = f"limits[{i}]"
        if not isinstance(spec, Mapping):
            errors.append(f"{where}: must be a table")
            continue
        reject_unknown_keys(spec, _LIMIT_KEYS, where, errors)
        meter = spec.get("meter")
        if not isinstance(meter, str) or not METER_NAME_RE.match(meter):
            errors.append(f"{where}.meter: must be a meter name, got {meter!r}")
        try:
            kind = LimitKind(str(spec.get("kind")))
        except ValueError:
            errors.append(f"{where}.kind: must be hard or soft, got {spec.get('kind')!r}")
            kind = None
        value = parse_bound(spec.get("value"), f"{where}.value", errors)
        if isinstance(meter, str) and kind is not None and value is not None:
            out.append(Limit(meter, kind, value))
    return out


# Which rollup aggregations each period aggregation can be computed from (the rollups keep
# one value per window; sum/count add up across windows, max and latest need the meter's
# own max/latest values; the raw-event ones read quantities or dimensions).
_NEEDS: dict[PeriodAggregation, frozenset[str]] = {
    PeriodAggregation.SUM: frozenset({"sum", "count"}),
    PeriodAggregation.COUNT: frozenset({"sum", "count", "min", "max", "latest",
                                        "unique_count"}),
    PeriodAggregation.MAX: frozenset({"max"}),
    PeriodAggregation.LATEST: frozenset({"latest"}),
    PeriodAggregation.UNIQUE_COUNT: frozenset({"sum", "count", "min", "max", "latest",
                                               "unique_count"}),
    PeriodAggregation.TIME_WEIGHTED_SUM: frozenset({"sum", "min", "max", "latest"}),
}


def meter_errors(plan: PlanVersion, registry: Any) -> list[str]:
    """Every charge of ``plan`` that the meter registry cannot serve (unknown meter, an
    aggregation the meter's rollups cannot give, a unique_count dimension it does not
    carry). ``registry`` is a ``meterline.core.meters.MeterRegistry``."""
    errors = []
    for i, charge in enumerate(plan.charges):
        where = f"charges[{i}] ({charge.key})"
        meter = registry.get(charge.meter)
        if meter is None:
            errors.append(f"{where}: meter {charge.meter!r} is not defined")
            continue
        kind = meter.aggregation.value
        if kind not in _NEEDS[charge.aggregation]:
            errors.append(f"{where}: a {kind} meter cannot be billed by "
                          f"{charge.aggregation.value} (needs a meter aggregated by "
                          f"{' or '.join(sorted(_NEEDS[charge.aggregation]))})")
        if (charge.aggregation is PeriodAggregation.UNIQUE_COUNT
                and charge.dimension not in meter.dimensions):
            errors.append(f"{where}: meter {charge.meter} has no dimension "
                          f"{charge.dimension!r}")
    return errors
