"""Errors of the billing core: a malformed plan, and a refused change."""

from __future__ import annotations

from meterline.core.errors import MeterlineError


class BillingError(MeterlineError, ValueError):
    """A plan or subscription document is malformed, or a change is refused.

    Carries *every* problem found (``errors``), so whoever edits a plan or replays a
    command fixes it in one pass. Nothing is written when this is raised.
    """

    def __init__(self, errors: list[str], source: str = "billing") -> None:
        self.errors = list(errors)
        self.source = source
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} error(s):\n{lines}")


class TransitionError(BillingError):
    """An event is valid on its own but not against the current state (e.g. changing the
    plan of a cancelled subscription, or rewriting a closed period). ``errors`` say why."""
