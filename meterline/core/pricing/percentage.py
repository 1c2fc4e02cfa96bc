"""Percentage of a value (Lago's ``percentage`` model) and graduated percentage tiers
(Lago's ``graduated_percentage``).

Rates are percentages: ``percent = 1.2`` takes 1.2 % of the value, like Lago's ``rate``
property (named ``percent`` here because ``Price.rate()`` is the rating method). A rate
above 100 is refused: these models take a share of a transaction, and 130 % is far more
often a typo than a price.

Free allowance of the percentage model, per Lago's percentage page ("the first 3 events
or $500 are free"): events are free while *both* allowances last. Walking the events in
order, an event is free when it is within the first ``free_events`` (if set) and its
value still fits in the remaining ``free_units`` (if set). The allowance ends at
whichever runs out first. The event that crosses the free amount pays the rate on its
excess and the fixed fee; an event that exactly uses up the free amount is free (lago-api
charges it the fixed fee, counting free events only while the running total stays below
the free amount; we follow the documented "$500 are free").
Free events pay no fixed fee and are not raised to the per-transaction minimum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from meterline.core.pricing._fields import assign
from meterline.core.pricing.base import Price, raise_if_errors
from meterline.core.pricing.breakdown import ChargeBreakdown, Component, Kind
from meterline.core.pricing.currencies import Currency, parse_currency
from meterline.core.pricing.errors import PriceError
from meterline.core.pricing.exact import (
    HUNDRED,
    ZERO,
    AmountLike,
    fmt,
    parse_amount,
    parse_bound,
    parse_count,
    reject_unknown_keys,
)
from meterline.core.pricing.tiers import parse_tier_list, range_text, tier_slices


def parse_rate(value: object, where: str, errors: list[str]) -> Decimal | None:
    rate = parse_amount(value, where, errors)
    if rate is not None and rate > HUNDRED:
        errors.append(f"{where}: a percentage must be at most 100, got {fmt(rate)}")
        return None
    return rate


@dataclass(frozen=True, init=False)
class PercentagePrice(Price):
    """``percent`` % of the value, plus ``fixed_amount`` per paid event, with optional free
    events / free value and per-transaction minimum and maximum."""

    currency: Currency
    percent: Decimal
    fixed_amount: Decimal
    free_events: int
    free_units: Decimal
    min_per_event: Decimal | None
    max_per_event: Decimal | None
    model: ClassVar[str] = "percentage"

    def __init__(
        self,
        currency: Currency | str,
        percent: AmountLike,
        fixed_amount: AmountLike = 0,
        free_events: int = 0,
        free_units: AmountLike = 0,
        min_per_event: AmountLike | None = None,
        max_per_event: AmountLike | None = None,
    ) -> None:
        errors: list[str] = []
        cur = parse_currency(currency, "currency", errors)
        rate = parse_rate(percent, "percent", errors)
        fixed = parse_amount(fixed_amount, "fixed_amount", errors)
        events = parse_count(free_events, "free_events", errors)
        units = parse_bound(free_units, "free_units", errors)
        low = (
            None if min_per_event is None else parse_amount(min_per_event, "min_per_event", errors)
        )
        high = (
            None if max_per_event is None else parse_amount(max_per_event, "max_per_event", errors)
        )
        if low is not None and high is not None and low > high:
            errors.append(f"min_per_event: {fmt(low)} is above max_per_event {fmt(high)}")
        raise_if_errors(errors)
        assign(
            self,
            currency=cur,
            percent=rate,
            fixed_amount=fixed,
            free_events=events,
            free_units=units,
            min_per_event=low,
            max_per_event=high,
        )

    @property
    def per_event(self) -> bool:
        return bool(
            self.fixed_amount
            or self.free_events
            or self.min_per_event is not None
            or self.max_per_event is not None
        )

    def _percent(self, value: Decimal) -> Decimal:
        return value * self.percent / HUNDRED  # exact: dividing by 100 only shifts digits

    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        free = min(quantity, self.free_units)
        chargeable = quantity - free
        parts = []
        if self.free_units:
            parts.append(
                Component(
                    Kind.FREE, f"{fmt(free)} of {fmt(self.free_units)} free unit(s)", ZERO, free
                )
            )
        parts.append(
            Component(
                Kind.PERCENTAGE,
                f"{fmt(self.percent)}% of {fmt(chargeable)}",
                self._percent(chargeable),
                chargeable,
                self.percent,
            )
        )
        return ChargeBreakdown(self.model, self.currency, quantity, tuple(parts))

    def _rate_events(self, values: list[Decimal]) -> ChargeBreakdown:
        has_allowance = bool(self.free_events or self.free_units)
        events_left: int | None = self.free_events or None  # None: no limit on events
        amount_left: Decimal | None = self.free_units or None  # None: no limit on value
        free_count = 0
        free_value = ZERO
        paid_count = 0
        chargeable_total = ZERO
        limit_adjustment = ZERO
        limited = 0
        for value in values:
            chargeable = value
            if has_allowance:
                covered = value if amount_left is None else min(value, amount_left)
                free_value += covered
                chargeable = value - covered
                if amount_left is not None:
                    amount_left -= covered
                if events_left is not None:
                    events_left -= 1
                if events_left == 0 or amount_left == 0:
                    has_allowance = False
                if not chargeable:
                    free_count += 1
                    continue
            paid_count += 1
            chargeable_total += chargeable
            amount = self._percent(chargeable) + self.fixed_amount
            bounded = amount
            if self.min_per_event is not None and bounded < self.min_per_event:
                bounded = self.min_per_event
            if self.max_per_event is not None and bounded > self.max_per_event:
                bounded = self.max_per_event
            if bounded != amount:
                limited += 1
                limit_adjustment += bounded - amount
        parts = []
        if self.free_events or self.free_units:
            parts.append(
                Component(
                    Kind.FREE,
                    f"{free_count} free event(s); {fmt(free_value)} unit(s) of value free",
                    ZERO,
                    free_value,
                )
            )
        parts.append(
            Component(
                Kind.PERCENTAGE,
                f"{fmt(self.percent)}% of {fmt(chargeable_total)}",
                self._percent(chargeable_total),
                chargeable_total,
                self.percent,
            )
        )
        if self.fixed_amount:
            parts.append(
                Component(
                    Kind.FIXED_FEE,
                    f"{paid_count} paid event(s) x {fmt(self.fixed_amount)} fixed fee",
                    paid_count * self.fixed_amount,
                    Decimal(paid_count),
                    self.fixed_amount,
                )
            )
        if limited:
            parts.append(
                Component(
                    Kind.PER_EVENT_LIMIT,
                    f"per-transaction minimum/maximum applied to {limited} event(s)",
                    limit_adjustment,
                    Decimal(limited),
                )
            )
        total = sum(values, ZERO)
        return ChargeBreakdown(self.model, self.currency, total, tuple(parts), events=len(values))


PERCENTAGE_TIER_KEYS = {"up_to", "percent", "flat_amount"}


@dataclass(frozen=True, init=False)
class PercentageTier:
    up_to: Decimal | None
    percent: Decimal
    flat_amount: Decimal

    def __init__(
        self, up_to: AmountLike | None, percent: AmountLike, flat_amount: AmountLike = 0
    ) -> None:
        errors: list[str] = []
        bound = None if up_to is None else parse_bound(up_to, "up_to", errors)
        rate = parse_rate(percent, "percent", errors)
        flat = parse_amount(flat_amount, "flat_amount", errors)
        if errors:
            raise PriceError(errors, "tier")
        assign(self, up_to=bound, percent=rate, flat_amount=flat)

    @classmethod
    def parse(cls, raw: object, where: str, errors: list[str]) -> PercentageTier | None:
        if isinstance(raw, PercentageTier):
            return raw
        if not isinstance(raw, Mapping):
            errors.append(f"{where}: must be a table with up_to, percent, flat_amount")
            return None
        reject_unknown_keys(raw, PERCENTAGE_TIER_KEYS, where, errors)
        before = len(errors)
        up_to = (
            None
            if raw.get("up_to") is None
            else parse_bound(raw["up_to"], f"{where}.up_to", errors)
        )
        if "percent" not in raw:
            errors.append(f"{where}.percent: missing")
        rate = parse_rate(raw.get("percent", ZERO), f"{where}.percent", errors)
        flat = parse_amount(raw.get("flat_amount", ZERO), f"{where}.flat_amount", errors)
        if len(errors) > before or rate is None or flat is None:
            return None
        return cls(up_to, rate, flat)


@dataclass(frozen=True, init=False)
class GraduatedPercentagePrice(Price):
    """Each tier takes its own percentage of the slice of value inside it, plus its flat
    fee once any value reaches the tier (Lago's graduated_percentage)."""

    currency: Currency
    tiers: tuple[PercentageTier, ...]
    model: ClassVar[str] = "graduated_percentage"

    def __init__(
        self, currency: Currency | str, tiers: Sequence[PercentageTier | Mapping[str, Any]]
    ) -> None:
        errors: list[str] = []
        cur = parse_currency(currency, "currency", errors)
        parsed = parse_tier_list(tiers, errors, PercentageTier.parse)
        raise_if_errors(errors)
        assign(self, currency=cur, tiers=parsed)

    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        parts: list[Component] = []
        for index, lower, units in tier_slices(quantity, [t.up_to for t in self.tiers]):
            tier = self.tiers[index]
            where = range_text(lower, tier.up_to)
            text = f"tier {index + 1} ({where}): {fmt(tier.percent)}% of {fmt(units)}"
            parts.append(
                Component(
                    Kind.PERCENTAGE,
                    text,
                    units * tier.percent / HUNDRED,
                    units,
                    tier.percent,
                    index + 1,
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
