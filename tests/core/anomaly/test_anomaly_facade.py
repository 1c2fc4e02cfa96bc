"""The public facade ``meterline.anomaly``: a locked surface over the pure anomaly core."""

from __future__ import annotations

import math
import random

import pytest

import meterline.anomaly
import meterline.core.anomaly
from meterline.core.errors import ConfigError, MeterlineError

HOUR_MS = 3_600_000
START_MS = 1_704_067_200_000  # a Monday


def test_anomaly_public_api_is_locked() -> None:
    assert sorted(meterline.anomaly.__all__) == [
        "Anomaly",
        "AnomalyEngine",
        "AnomalyError",
        "AnomalySettings",
        "ConfigError",
        "DIRECTIONS",
        "EpisodeEvent",
        "MeterAnomalySettings",
        "SEVERITIES",
        "SeriesDetector",
        "SeriesKey",
        "Step",
        "detect_series",
    ]
    for name in meterline.anomaly.__all__:
        assert getattr(meterline.anomaly, name) is getattr(meterline.core.anomaly, name), name


def test_detect_series_finds_the_spike_and_explains_it() -> None:
    rng = random.Random(5)
    starts = [START_MS + i * HOUR_MS for i in range(21 * 24)]
    values = [500 * (1.5 + math.sin(i / 24 * 2 * math.pi)) * rng.uniform(0.9, 1.1)
              for i in range(len(starts))]
    values[400] *= 10
    anomalies = meterline.anomaly.detect_series(starts, values, min_abs_deviation=5)
    assert [(a.window_start_ms, a.direction) for a in anomalies] == [(starts[400], "up")]
    a = anomalies[0]
    assert a.observed == values[400] and a.observed > a.upper and a.score > 0
    assert a.expected == pytest.approx(values[400] / 10, rel=0.25)


def test_detect_series_validates_its_settings() -> None:
    with pytest.raises(ConfigError, match="sensitivity"):
        meterline.anomaly.detect_series([0], [1.0], sensitivity=-1)
    with pytest.raises(TypeError):
        meterline.anomaly.detect_series([0], [1.0], sensitivty=2)  # a typo is not ignored
    with pytest.raises(ValueError):
        meterline.anomaly.detect_series([0, HOUR_MS], [1.0])  # lengths differ


def test_errors_derive_from_the_root_error() -> None:
    assert issubclass(meterline.anomaly.AnomalyError, MeterlineError)
    assert issubclass(meterline.anomaly.AnomalyError, ValueError)
