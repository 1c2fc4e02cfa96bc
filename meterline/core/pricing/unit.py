"""Per-unit, package (Stripe's transform_quantity) and flat recurring fee models."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import ClassVar

from meterline.core.pricing._fields import assign
from meterline.core.pricing.base import Price, raise_if_errors
from meterline.core.pricing.breakdown import ChargeBreakdown, Component, Kind
from meterline.core.pricing.currencies import Currency, parse_currency
from meterline.core.pricing.exact import (
    ZERO,
    AmountLike,
    exact,
    fmt,
    parse_amount,
    parse_bound,
    to_quantity,
)


@dataclass(frozen=True, init=False)
class PerUnitPrice(Price):
    """``quantity x unit_amount``. The unit amount may be finer than the minor unit
    (0.00042 USD per token); only the line is rounded."""

    currency: Currency
    unit_amount: Decimal
    model: ClassVar[str] = "per_unit"

    def __init__(self, currency: Currency | str, unit_amount: AmountLike) -> None:
        errors: list[str] = []
        cur = parse_currency(currency, "currency", errors)
        unit = parse_amount(unit_amount, "unit_amount", errors)
        raise_if_errors(errors)
        assign(self, currency=cur, unit_amount=unit)

    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        amount = quantity * self.unit_amount
        text = f"{fmt(quantity)} unit(s) x {fmt(self.unit_amount)}"
        part = Component(Kind.UNITS, text, amount, quantity, self.unit_amount)
        return ChargeBreakdown(self.model, self.currency, quantity, (part,))

    def rate_line(self, quantity: object) -> tuple[str, Decimal, Decimal, tuple[int, ...]]:
        # _rate without the words; the sum starts at ZERO as ChargeBreakdown.amount does
        # (ZERO + 1E+2 is 100: the exponent is part of what is stored and shown).
        q = to_quantity(quantity)
        with exact():
            amount = ZERO + q * self.unit_amount
        return self.model, amount, self.currency.round(amount), ()


class PackageRounding(StrEnum):
    UP = "up"  # a started package is paid in full (Lago's package model, Stripe round=up)
    DOWN = "down"  # only complete packages are paid (Stripe round=down)


@dataclass(frozen=True, init=False)
class PackagePrice(Price):
    """``package_amount`` per started (``up``) or completed (``down``) package of
    ``package_size`` units: Stripe's ``transform_quantity`` {divide_by, round} and Lago's
    ``package`` model. Free units before packaging: wrap in ``Allowance``."""

    currency: Currency
    package_amount: Decimal
    package_size: Decimal
    rounding: PackageRounding = PackageRounding.UP
    model: ClassVar[str] = "package"

    def __init__(
        self,
        currency: Currency | str,
        package_amount: AmountLike,
        package_size: AmountLike,
        rounding: PackageRounding | str = PackageRounding.UP,
    ) -> None:
        errors: list[str] = []
        cur = parse_currency(currency, "currency", errors)
        amount = parse_amount(package_amount, "package_amount", errors)
        size = parse_bound(package_size, "package_size", errors)
        if size is not None and size == 0:
            errors.append("package_size: must be greater than 0 (a package of 0 units never fills)")
        try:
            how = PackageRounding(rounding)
        except ValueError:
            errors.append(f"rounding: must be 'up' or 'down', got {rounding!r}")
        raise_if_errors(errors)
        assign(self, currency=cur, package_amount=amount, package_size=size, rounding=how)

    def packages(self, quantity: Decimal) -> Decimal:
        """Number of packages billed for ``quantity`` (exact integer arithmetic)."""
        whole = quantity // self.package_size
        if self.rounding is PackageRounding.UP and quantity % self.package_size:
            whole += 1
        return whole

    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        count = self.packages(quantity)
        how = "started" if self.rounding is PackageRounding.UP else "complete"
        text = (
            f"{fmt(quantity)} unit(s) = {fmt(count)} {how} package(s) of "
            f"{fmt(self.package_size)} x {fmt(self.package_amount)}"
        )
        part = Component(
            Kind.PACKAGES, text, count * self.package_amount, count, self.package_amount
        )
        return ChargeBreakdown(self.model, self.currency, quantity, (part,))


@dataclass(frozen=True, init=False)
class FlatFee(Price):
    """A recurring fee that does not depend on usage (a platform fee, a seat bundle).
    Proration for partial periods belongs to the plan, not to the price."""

    currency: Currency
    amount: Decimal
    model: ClassVar[str] = "flat"

    def __init__(self, currency: Currency | str, amount: AmountLike) -> None:
        errors: list[str] = []
        cur = parse_currency(currency, "currency", errors)
        fee = parse_amount(amount, "amount", errors)
        raise_if_errors(errors)
        assign(self, currency=cur, amount=fee)

    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        part = Component(Kind.FLAT_FEE, "flat fee for the period", self.amount)
        return ChargeBreakdown(self.model, self.currency, quantity, (part,))
