"""Errors of the pricing core: one for a malformed price, one for bad rating input."""

from __future__ import annotations

from meterline.core.errors import MeterlineError


class PriceError(MeterlineError, ValueError):
    """A price definition is malformed. Carries *every* problem found, not just the first,
    so whoever edits a price sheet or imports a Stripe/Lago catalogue fixes it in one pass."""

    def __init__(self, errors: list[str], source: str = "price") -> None:
        self.errors = list(errors)
        self.source = source
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source} has {len(self.errors)} error(s):\n{lines}")


class RatingError(MeterlineError, ValueError):
    """A well-formed price was asked to rate something it cannot: a float, a negative
    quantity, or a period total where the model needs the individual events."""
