"""The price interface and the two ways to rate with it.

A ``Price`` turns a quantity into a ``ChargeBreakdown``. Every model is a frozen dataclass
whose constructor validates all of its fields at once and raises one ``PriceError``;
once built, a price is immutable and rating is a pure function of (price, quantity).

- ``charge(price, quantity)``: the period's total quantity (a rollup) -> one rounded line.
- ``charge_events(price, values)``: the individual event values, for models that price
  each event (percentage with a fixed fee per transaction, free events, per-transaction
  min/max). Models that only need the total get ``sum(values)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import replace
from decimal import Decimal
from typing import ClassVar

from meterline.core.pricing.breakdown import ChargeBreakdown
from meterline.core.pricing.currencies import Currency
from meterline.core.pricing.errors import PriceError, RatingError
from meterline.core.pricing.exact import ZERO, exact, to_quantity


class Price(ABC):
    """A price model in one currency. Subclasses are frozen dataclasses."""

    model: ClassVar[str]
    currency: Currency

    @property
    def per_event(self) -> bool:
        """True when the amount depends on individual events, not only on their sum."""
        return False

    def rate(self, quantity: object) -> ChargeBreakdown:
        """Explain the charge for a period's total ``quantity`` (int, Decimal or decimal str,
        in units of the meter; never a float). Not rounded: see ``charge``."""
        if self.per_event:
            raise RatingError(
                f"{self.model} price with per-event terms (fixed fee, free events, "
                "per-transaction min/max) needs the event values: use rate_events / "
                "charge_events"
            )
        q = to_quantity(quantity)
        with exact():
            return self._rate(q)

    def rate_line(self, quantity: object) -> tuple[str, Decimal, Decimal, tuple[int, ...]]:
        """``(model, amount, rounded, tiers)`` exactly as ``rate(quantity)`` gives them,
        without the words. The rating stage prices hundreds of thousands of lines and
        stores no explanation (``meterline explain`` recomputes it with ``rate``), so the
        common models override this with the same arithmetic minus the text; a property
        test (tests/core/pricing/test_pricing_rate_line.py) holds each override to
        ``rate``, value and Decimal exponent alike."""
        b = self.rate(quantity)
        return b.model, b.amount, b.rounded, b.tiers

    def rate_events(self, values: Iterable[object]) -> ChargeBreakdown:
        """Explain the charge for a period's individual event values, in event order."""
        vals = [to_quantity(v, f"values[{i}]") for i, v in enumerate(_iterate(values))]
        with exact():
            if self.per_event:
                return self._rate_events(vals)
            total = sum(vals, ZERO)
            return replace(self._rate(total), events=len(vals))

    @abstractmethod
    def _rate(self, quantity: Decimal) -> ChargeBreakdown:
        """Rate a validated, non-negative quantity. Runs inside ``exact()``."""

    def _rate_events(self, values: list[Decimal]) -> ChargeBreakdown:
        raise NotImplementedError  # only models whose per_event can be True override this


def charge(price: Price, quantity: object) -> Decimal:
    """The line item for a period's quantity, in major units, rounded once to the
    currency's minor unit: ``Decimal('66.00')`` for USD, ``Decimal('66')`` for JPY."""
    _require_price(price)
    return price.rate(quantity).rounded


def charge_events(price: Price, values: Iterable[object]) -> Decimal:
    """The line item for a period's individual event values, rounded once."""
    _require_price(price)
    return price.rate_events(values).rounded


def raise_if_errors(errors: list[str], source: str = "price") -> None:
    if errors:
        raise PriceError(errors, source)


def _require_price(price: object) -> None:
    if not isinstance(price, Price):
        raise RatingError(f"price: expected a Price, got {type(price).__name__}")


def _iterate(values: Iterable[object]) -> Iterable[object]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise RatingError(
            f"values: must be an iterable of event values, got {type(values).__name__}"
        )
    return values
