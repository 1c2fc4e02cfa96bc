"""Tiered prices: graduated (each tier prices its own slice) and volume (the tier the
total falls in prices every unit).

Tiers are described by their inclusive upper bound, like Stripe's ``up_to``: tier *n*
covers ``(up_to[n-1], up_to[n]]`` and the first tier starts at 0. Bounds must be strictly
ascending and the last tier must be unbounded (``up_to`` None), so every quantity has a
tier. Quantities may be fractional (GB, hours); a slice is exact.

Flat fees follow Lago's charge-model code, which is explicit about it (lago-api
``ChargeModels::GraduatedService`` / ``VolumeService``):
- graduated: a tier's flat fee is due once any unit falls in the tier, so a quantity of 0
  costs nothing;
- volume: the tier the total falls in is always exactly one tier, and its flat fee is
  due even at 0 (0 falls in the first tier).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar, Protocol, TypeVar

from meterline.core.pricing._fields import assign
from meterline.core.pricing.base import Price, raise_if_errors
from meterline.core.pricing.breakdown import ChargeBreakdown, Component, Kind
from meterline.core.pricing.currencies import Currency, parse_currency
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.exact import (
    ZERO,
    AmountLike,
    exact,
    fmt,
    parse_amount,
    parse_bound,
    reject_unknown_keys,
    to_quantity,
)

TIER_KEYS = {"up_to", "unit_amount", "flat_amount"}


@dataclass(frozen=True, init=False)
class Tier:
    up_to: Decimal | None  # inclusive upper bound; None for the final, unbounded tier
    unit_amount: Decimal
    flat_amount: Decimal

    def __init__(
        self, up_to: AmountLike | None, unit_amount: AmountLike = 0, flat_amount: AmountLike = 0
    ) -> None:
        errors: list[str] = []
        bound = None if up_to is None else parse_bound(up_to, "up_to", errors)
        unit = parse_amount(unit_amount, "unit_amount", errors)
        flat = parse_amount(flat_amount, "flat_amount", errors)
        if errors:
            raise PriceError(errors, "tier")
        assign(self, up_to=bound, unit_amount=unit, flat_amount=flat)

    @classmethod
    def parse(cls, raw: object, where: str, errors: list[str]) -> Tier | None:
        """A tier from a Tier or a mapping in Meterline's format; problems go to ``errors``."""
        if isinstance(raw, Tier):
            return raw
        if not isinstance(raw, Mapping):
            errors.append(f"{where}: must be a table with up_to, unit_amount, flat_amount")
            return None
        reject_unknown_keys(raw, TIER_KEYS, where, errors)
        before = len(errors)
        up_to = (
            None
            if raw.get("up_to") is None
            else parse_bound(raw["up_to"], f"{where}.up_to", errors)
        )
        unit = parse_amount(raw.get("unit_amount", ZERO), f"{where}.unit_amount", errors)
        flat = parse_amount(raw.get("flat_amount", ZERO), f"{where}.flat_amount", errors)
        if len(errors) > before or unit is None or flat is None:
            return None
        return cls(up_to, unit, flat)


class _Unparsed:
    """A tier bound that failed to parse (already reported): skipped by order checks."""


UNPARSED = _Unparsed()
Bound = Decimal | None | _Unparsed


def check_bounds(bounds: Sequence[tuple[str, Bound]], where: str, errors: list[str]) -> None:
    """Rules on tier upper bounds, shared by every tiered model and loader. ``bounds`` holds
    (label, up_to) for each tier in order; labels name the field in the caller's format."""
    if not bounds:
        errors.append(f"{where}: needs at least one tier (the last one unbounded)")
        return
    for label, up_to in bounds[:-1]:
        if up_to is None:
            errors.append(f"{label}: only the last tier may be unbounded")
    last_label, last = bounds[-1]
    if isinstance(last, Decimal):
        errors.append(
            f"{last_label}: the last tier must be unbounded (no upper bound), so that every "
            f"quantity has a price; got {fmt(last)}"
        )
    previous: Decimal | None = None
    for label, up_to in bounds:
        if not isinstance(up_to, Decimal):
            continue
        if up_to == 0:
            errors.append(f"{label}: must be greater than 0 (tier 1 starts at 0)")
        elif previous is not None and up_to <= previous:
            errors.append(
                f"{label}: tiers must be in ascending order, "
                f"{fmt(up_to)} is not above {fmt(previous)}"
            )
        previous = up_to if previous is None else max(previous, up_to)


class _Bounded(Protocol):
    @property
    def up_to(self) -> Decimal | None: ...


T = TypeVar("T", bound=_Bounded)


def parse_tier_list(
    raw: object,
    errors: list[str],
    parse_one: Callable[[object, str, list[str]], T | None],
) -> tuple[T, ...]:
    """Parse every tier (reporting each one's problems) and check the bounds together."""
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
        errors.append("tiers: must be a list of tiers")
        return ()
    tiers: list[T] = []
    bounds: list[tuple[str, Bound]] = []
    for index, item in enumerate(raw):
        where = f"tiers[{index}]"
        tier = parse_one(item, where, errors)
        if tier is not None:
            tiers.append(tier)
            bounds.append((f"{where}.up_to", tier.up_to))
            continue
        # Keep checking the order with whatever bound parsed, so one bad amount does not
        # hide a misordered table.
        bound: Bound = UNPARSED
        if isinstance(item, Mapping):
            scratch: list[str] = []
            up = item.get("up_to")
            parsed = None if up is None else parse_bound(up, "", scratch)
            if not scratch:
                bound = parsed
        bounds.append((f"{where}.up_to", bound))
    check_bounds(bounds, "tiers", errors)
    return tuple(tiers)


def tier_slices(
    quantity: Decimal, bounds: Sequence[Decimal | None]
) -> list[tuple[int, Decimal, Decimal]]:
    """(tier index, lower bound, units in tier) for every tier that receives units."""
    slices = []
    lower = ZERO
    for index, upper in enumerate(bounds):
        if quantity <= lower:
            break
        top = quantity if upper is None else min(quantity, upper)
        slices.append((index, lower, top - lower))
        if upper is None:
            break
        lower = upper
    return slices


def volume_tier(quantity: Decimal, bounds: Sequence[Decimal | None]) -> int:
    """Index of the one tier a total falls in: the first whose bound is >= quantity."""
    for index, upper in enumerate(bounds):
        if upper is None or quantity <= upper:
            return index
    raise AssertionError("validated tiers end with an unbounded tier")


def range_text(lower: Decimal, upper: Decimal | None) -> str:
    if upper is None:
        return f"above {fmt(lower)}"
    return f"{fmt(lower)} < q <= {fmt(upper)}"


@dataclass(frozen=True, init=False)
class _TieredPrice(Price):
    currency: Currency
    tiers: tuple[Tier, ...]

    def __init__(self, currency: Currency | str, tiers: Sequence[Tier | Mapping[str, Any]]) -> None:
        errors: list[str] = []
        cur = parse_currency(currency, "currency", errors)
        parsed = parse_tier_list(tiers, errors, Tier.parse)
        raise_if_errors(errors)
        assign(self, currency=cur, tiers=parsed)

    @property
    def bounds(self) -> list[Decimal | None]:
        return [t.up_to for t in self.tiers]


@dataclass(frozen=True, init=False)
class GraduatedPrice(_TieredPrice):
    """Each tier prices the units that fall inside it; the amounts are summed."""

    model: ClassVar[str] = "graduated"

    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        parts: list[Component] = []
        for index, lower, units in tier_slices(quantity, self.bounds):
            tier = self.tiers[index]
            text = (
                f"tier {index + 1} ({range_text(lower, tier.up_to)}): "
                f"{fmt(units)} unit(s) x {fmt(tier.unit_amount)}"
            )
            parts.append(
                Component(
                    Kind.UNITS, text, units * tier.unit_amount, units, tier.unit_amount, index + 1
                )
            )
            if tier.flat_amount:
                parts.append(
                    Component(
                        Kind.FLAT_FEE,
                        f"tier {index + 1} flat fee",
                        tier.flat_amount,
                        tier=index + 1,
                    )
                )
        return ChargeBreakdown(self.model, self.currency, quantity, tuple(parts))

    def rate_line(self, quantity: object) -> tuple[str, Decimal, Decimal, tuple[int, ...]]:
        # _rate without the words: the components' amounts added in the same order.
        q = to_quantity(quantity)
        tiers: list[int] = []
        with exact():
            amount = ZERO
            for index, _, units in tier_slices(q, self.bounds):
                tier = self.tiers[index]
                amount += units * tier.unit_amount
                if tier.flat_amount:
                    amount += tier.flat_amount
                tiers.append(index + 1)
        return self.model, amount, self.currency.round(amount), tuple(tiers)


@dataclass(frozen=True, init=False)
class VolumePrice(_TieredPrice):
    """The tier the total falls in prices every unit (plus that tier's flat fee)."""

    model: ClassVar[str] = "volume"

    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        index = volume_tier(quantity, self.bounds)
        tier = self.tiers[index]
        lower = ZERO if index == 0 else self.bounds[index - 1]
        assert lower is not None
        text = (
            f"all {fmt(quantity)} unit(s) in tier {index + 1} ({range_text(lower, tier.up_to)}) "
            f"x {fmt(tier.unit_amount)}"
        )
        parts = [
            Component(
                Kind.UNITS, text, quantity * tier.unit_amount, quantity, tier.unit_amount, index + 1
            )
        ]
        if tier.flat_amount:
            parts.append(
                Component(
                    Kind.FLAT_FEE, f"tier {index + 1} flat fee", tier.flat_amount, tier=index + 1
                )
            )
        return ChargeBreakdown(self.model, self.currency, quantity, tuple(parts))

    def rate_line(self, quantity: object) -> tuple[str, Decimal, Decimal, tuple[int, ...]]:
        # _rate without the words: the components' amounts added in the same order.
        q = to_quantity(quantity)
        with exact():
            index = volume_tier(q, self.bounds)
            tier = self.tiers[index]
            amount = ZERO + q * tier.unit_amount
            if tier.flat_amount:
                amount += tier.flat_amount
        return self.model, amount, self.currency.round(amount), (index + 1,)
