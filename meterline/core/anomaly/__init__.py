"""Anomaly detection over usage series: pure, online, one pass, bounded JSON-able state.

One module per concern:
- ``settings``: ``AnomalySettings`` and per-meter overrides, validated all at once.
- ``baseline``: what a series normally looks like (hour-of-week factors x a recent level,
  noise width, bursts) and how each window teaches it; ``seasonal``: the detector that
  scores windows against it (robust, log space); ``episodes``: one open/update/resolve
  per incident.
- ``series``: one series end to end (gaps, partial windows, state); ``engine``: many.
- ``model``: ``SeriesKey``, ``Anomaly``, ``EpisodeEvent``. Bad settings raise
  ``ConfigError`` (every problem at once), bad input ``AnomalyError``.

``meterline.anomaly`` is the public facade; docs/anomalies.md explains the model.
"""

from __future__ import annotations

from meterline.core.anomaly.engine import AnomalyEngine
from meterline.core.anomaly.errors import AnomalyError
from meterline.core.anomaly.model import SEVERITIES, Anomaly, EpisodeEvent, SeriesKey
from meterline.core.anomaly.series import SeriesDetector, Step, detect_series
from meterline.core.anomaly.settings import DIRECTIONS, AnomalySettings, MeterAnomalySettings
from meterline.core.errors import ConfigError

__all__ = [
    "DIRECTIONS",
    "SEVERITIES",
    "Anomaly",
    "AnomalyEngine",
    "AnomalyError",
    "AnomalySettings",
    "ConfigError",
    "EpisodeEvent",
    "MeterAnomalySettings",
    "SeriesDetector",
    "SeriesKey",
    "Step",
    "detect_series",
]
