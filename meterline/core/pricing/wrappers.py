"""Behaviour added by wrapping a price: a free allowance before it, a minimum commitment
(true-up) or maximum (cap) around it.

Wrapping keeps each model small and lets any model take an allowance or a commitment:
``Commitment(Allowance(GraduatedPrice(...), 1000), minimum=Decimal("10.00"))``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import ClassVar

from meterline.core.pricing._fields import assign
from meterline.core.pricing.base import Price, raise_if_errors
from meterline.core.pricing.breakdown import ChargeBreakdown, Component, Kind
from meterline.core.pricing.currencies import Currency
from meterline.core.pricing.exact import ZERO, AmountLike, fmt, parse_amount, parse_bound


@dataclass(frozen=True, init=False)
class Allowance(Price):
    """The first ``free_units`` of the period are free; the rest goes to ``price``.

    "Package with free units" (Lago's package ``free_units``) is
    ``Allowance(PackagePrice(...), free_units)``: Lago also packages only the paid units.
    Percentage prices have their own value-based allowance (``free_units``), which also
    knows about events, so they are not wrapped.
    """

    price: Price
    free_units: Decimal
    currency: Currency
    model: ClassVar[str] = "allowance"

    def __init__(self, price: Price, free_units: AmountLike) -> None:
        errors: list[str] = []
        if not isinstance(price, Price):
            errors.append(f"price: must be a Price, got {type(price).__name__}")
        elif price.per_event or price.model == "percentage":
            errors.append(
                "price: a percentage price has its own free allowance (free_units, "
                "free_events); set it there instead of wrapping"
            )
        free = parse_bound(free_units, "free_units", errors)
        raise_if_errors(errors)
        assign(self, price=price, free_units=free, currency=price.currency)

    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        free = min(quantity, self.free_units)
        inner = self.price._rate(quantity - free)
        note = Component(
            Kind.FREE, f"{fmt(free)} of {fmt(self.free_units)} included unit(s) free", ZERO, free
        )
        return ChargeBreakdown(
            f"{inner.model} after {fmt(self.free_units)} free unit(s)",
            self.currency,
            quantity,
            (note, *inner.components),
        )


@dataclass(frozen=True, init=False)
class Commitment(Price):
    """A minimum the line is raised to (the difference is a *true-up*) and/or a maximum it
    is capped at.

    Both must be whole minor units (10.00 USD, not 10.005): then rounding the committed
    amount equals committing the rounded amount, and ``ChargeBreakdown.lines()`` can show
    the true-up as its own line that adds up exactly.
    """

    price: Price
    minimum: Decimal | None
    maximum: Decimal | None
    currency: Currency
    model: ClassVar[str] = "commitment"

    def __init__(
        self,
        price: Price,
        minimum: AmountLike | None = None,
        maximum: AmountLike | None = None,
    ) -> None:
        errors: list[str] = []
        currency: Currency | None = None
        if not isinstance(price, Price):
            errors.append(f"price: must be a Price, got {type(price).__name__}")
        else:
            currency = price.currency
        if minimum is None and maximum is None:
            errors.append("minimum/maximum: set at least one of them")
        bounds: dict[str, Decimal | None] = {}
        for name, raw in (("minimum", minimum), ("maximum", maximum)):
            value = None if raw is None else parse_amount(raw, name, errors)
            bounds[name] = value
            if value is not None and currency is not None and not currency.is_whole_minor(value):
                errors.append(
                    f"{name}: {fmt(value)} is finer than the {currency.code} minor unit "
                    f"({currency.quantum}); commitments are whole minor units"
                )
        low, high = bounds["minimum"], bounds["maximum"]
        if low is not None and high is not None and low > high:
            errors.append(f"minimum: {fmt(low)} is above maximum {fmt(high)}")
        raise_if_errors(errors)
        assign(self, price=price, minimum=low, maximum=high, currency=currency)

    @property
    def per_event(self) -> bool:
        return self.price.per_event

    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        return self._commit(self.price._rate(quantity))

    def _rate_events(self, values: list[Decimal]) -> ChargeBreakdown:
        return self._commit(self.price._rate_events(values))

    def _commit(self, inner: ChargeBreakdown) -> ChargeBreakdown:
        usage = inner.amount
        parts = list(inner.components)
        if self.minimum is not None and usage < self.minimum:
            parts.append(
                Component(
                    Kind.TRUE_UP,
                    f"true-up to the minimum of {fmt(self.minimum)}",
                    self.minimum - usage,
                )
            )
        elif self.maximum is not None and usage > self.maximum:
            parts.append(
                Component(
                    Kind.CAP, f"capped at the maximum of {fmt(self.maximum)}", self.maximum - usage
                )
            )
        return replace(inner, components=tuple(parts))
