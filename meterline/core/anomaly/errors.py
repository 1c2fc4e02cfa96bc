"""Errors of the anomaly core. Settings errors are ``meterline.core.errors.ConfigError``
(every problem at once); this one is for bad input to a running detector."""

from __future__ import annotations

from meterline.core.errors import MeterlineError


class AnomalyError(MeterlineError, ValueError):
    """A detector was fed something it cannot score: a window start off the interval grid,
    a NaN or infinite value, an elapsed fraction outside (0, 1], or a state saved under
    other settings."""
