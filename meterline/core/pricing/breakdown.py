"""How a charge was computed: the unrounded, explainable form of a line item.

``price.rate(quantity)`` returns a ``ChargeBreakdown``: the components that make up the
amount (units in each tier, flat fees, fixed fees per event, a minimum's true-up, ...),
each at full precision, in the order they apply. ``amount`` is their exact sum and
``rounded`` the single rounding of the line; ``explain()`` says it in words for the
`explain` command and support tickets.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from meterline.core.pricing.currencies import Currency
from meterline.core.pricing.exact import ZERO, exact, fmt


class Kind(StrEnum):
    UNITS = "units"  # quantity x unit amount (per-unit, or the units inside one tier)
    FLAT_FEE = "flat_fee"  # a tier's flat fee or a recurring flat fee
    PACKAGES = "packages"  # whole packages x package amount
    PERCENTAGE = "percentage"  # rate applied to a value
    FIXED_FEE = "fixed_fee"  # fixed amount per (paid) event
    FREE = "free"  # units or events given away; amount is always 0
    PER_EVENT_LIMIT = "per_event_limit"  # per-transaction min/max adjustments
    TRUE_UP = "true_up"  # raises the line to a minimum commitment
    CAP = "cap"  # lowers the line to a maximum (negative amount)


# Adjustments are what a commitment adds or removes on top of the usage itself; they can
# be shown as their own invoice line (see ChargeBreakdown.lines).
ADJUSTMENTS = frozenset({Kind.TRUE_UP, Kind.CAP})


@dataclass(frozen=True, slots=True)
class Component:
    kind: Kind
    description: str
    amount: Decimal  # full precision, in major units
    quantity: Decimal | None = None  # units (or events) this component covers
    unit_amount: Decimal | None = None  # price per unit / package / event, or rate in %
    tier: int | None = None  # 1-based tier number for tiered models


@dataclass(frozen=True, slots=True)
class ChargeBreakdown:
    model: str
    currency: Currency
    quantity: Decimal  # the period's quantity (for per-event models, the sum of values)
    components: tuple[Component, ...]
    events: int | None = None  # number of events, for models priced per event

    @property
    def amount(self) -> Decimal:
        """Exact sum of the components, in major units, not rounded."""
        with exact():
            return sum((c.amount for c in self.components), ZERO)

    @property
    def rounded(self) -> Decimal:
        """The line item: ``amount`` rounded once to the currency's minor unit."""
        return self.currency.round(self.amount)

    @property
    def usage_amount(self) -> Decimal:
        """The amount before a minimum's true-up or a maximum's cap."""
        with exact():
            return sum((c.amount for c in self.components if c.kind not in ADJUSTMENTS), ZERO)

    @property
    def tiers(self) -> tuple[int, ...]:
        """Tier numbers that received units or a flat fee, in order, without repeats."""
        seen: list[int] = []
        for c in self.components:
            if c.tier is not None and c.tier not in seen:
                seen.append(c.tier)
        return tuple(seen)

    def lines(self) -> tuple[Decimal, ...]:
        """The line as invoice lines that add up to ``rounded`` exactly: the usage alone, or
        usage plus one adjustment line when a minimum or maximum applied.

        The adjustment is taken against the *rounded* usage, so a USD 10.00 minimum over
        3.335 of usage becomes 3.34 + 6.66, never 3.34 + 6.67.
        """
        usage = self.currency.round(self.usage_amount)
        if not any(c.kind in ADJUSTMENTS for c in self.components):
            return (usage,)
        with exact():
            return (usage, self.rounded - usage)

    def explain(self) -> str:
        """The computation in words, one component per line, ending with the rounding."""
        code = self.currency.code
        head = f"{self.model}: quantity {fmt(self.quantity)}"
        if self.events is not None:
            head += f" over {self.events} event(s)"
        out = [head]
        for c in self.components:
            out.append(f"  {c.description} = {fmt(c.amount)} {code}")
        out.append(
            f"  total {fmt(self.amount)} {code}, rounded half-up to "
            f"{self.currency.minor_units} decimal(s): {self.rounded} {code}"
        )
        return "\n".join(out)
