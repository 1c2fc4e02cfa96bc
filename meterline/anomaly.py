"""Public facade of the anomaly core: detectors, settings, explained anomalies, episodes.

    from meterline.anomaly import detect_series

    anomalies = detect_series(timestamps_ms, values, min_abs_deviation=5)

    from meterline.anomaly import AnomalyEngine, AnomalySettings

    engine = AnomalyEngine(AnomalySettings())
    for event in engine.observe(("acme", "api_calls"), window_start_ms, total):
        print(event.kind, event.key, event.anomaly.explain())

Everything here is re-exported from ``meterline.core.anomaly`` (pure, stdlib only); see
docs/anomalies.md for the model, the settings and the measured quality.
"""

from __future__ import annotations

from meterline.core.anomaly import (
    DIRECTIONS,
    SEVERITIES,
    Anomaly,
    AnomalyEngine,
    AnomalyError,
    AnomalySettings,
    ConfigError,
    EpisodeEvent,
    MeterAnomalySettings,
    SeriesDetector,
    SeriesKey,
    Step,
    detect_series,
)

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
