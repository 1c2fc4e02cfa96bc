"""Where money is rounded, and the guarantee that invoice lines add up.

The rule, stated once for the whole rating stage:

1. Inside a charge everything is exact: unit prices may be finer than the minor unit
   ($0.00042 per token), tiers and fees are summed at full precision.
2. Each *line item* (one price applied to one period's usage) is rounded once, to the
   currency's minor unit, half away from zero (``Currency.round``).
3. The invoice total is the sum of the rounded lines. It is never rounded again, so the
   lines a customer sees always add up to the total, to the cent.

Rounding the exact sum once instead can differ from the sum of rounded lines by up to
half a minor unit per line; ``RoundedLines.rounding_difference`` reports that gap rather
than hiding it in one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from meterline.core.pricing.currencies import Currency
from meterline.core.pricing.errors import RatingError
from meterline.core.pricing.exact import ZERO, exact


@dataclass(frozen=True, slots=True)
class RoundedLines:
    currency: Currency
    lines: tuple[Decimal, ...]  # each rounded to the minor unit
    total: Decimal  # == sum(lines), exactly
    unrounded_total: Decimal  # sum of the inputs at full precision

    @property
    def rounding_difference(self) -> Decimal:
        """total - (unrounded total rounded once): what per-line rounding cost or saved."""
        with exact():
            return self.total - self.currency.round(self.unrounded_total)


def round_amount(amount: Decimal, currency: Currency) -> Decimal:
    """One line's amount rounded to the minor unit (Decimal('66.00') for USD)."""
    _require_decimal(amount, "amount")
    return currency.round(amount)


def round_lines(amounts: Iterable[Decimal], currency: Currency) -> RoundedLines:
    """Round each line once and total the rounded lines. ``sum(result.lines) ==
    result.total`` always holds, whatever the inputs."""
    raw = list(amounts)
    for index, amount in enumerate(raw):
        _require_decimal(amount, f"amounts[{index}]")
    lines = tuple(currency.round(a) for a in raw)
    with exact():
        total = sum(lines, ZERO.quantize(currency.quantum))
        unrounded = sum(raw, ZERO)
    return RoundedLines(currency, lines, total, unrounded)


def _require_decimal(value: object, where: str) -> None:
    if not isinstance(value, Decimal) or isinstance(value, bool):
        kind = type(value).__name__
        raise RatingError(f"{where}: must be a Decimal, got {kind} {value!r}")
    if not value.is_finite():
        raise RatingError(f"{where}: must be finite, got {value}")
