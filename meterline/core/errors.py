"""Error hierarchy of the pure core. Every error says which field or rule failed."""

from __future__ import annotations


class MeterlineError(Exception):
    """Root of every error Meterline raises on purpose."""


class InvalidEventError(MeterlineError, ValueError):
    """A usage event failed validation. `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class EnvelopeError(MeterlineError, ValueError):
    """A batch envelope could not be decoded. `reason` is stable and machine-readable."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConfigError(MeterlineError, ValueError):
    """A configuration failed validation. Carries *every* problem found, not just the first."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = list(errors)
        self.source = source
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source} has {len(self.errors)} error(s):\n{lines}")
