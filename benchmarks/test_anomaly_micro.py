"""Micro-benchmarks of the anomaly core's hot path (pytest-benchmark).

Every figure is read next to a baseline measured in the same run: the floor (a function
with ``observe``'s signature that only looks the series up) and the harness's EWMA z-score
baseline. Machines here are shared and noisy, so compare ratios, not microseconds.

    .venv/bin/python -m pytest benchmarks/test_anomaly_micro.py --benchmark-only

Results are per round of ``UPDATES`` series updates (divide by it for one update). Series
are warmed up for two weeks first, so the detectors are in their steady state: windows in
time order, series interleaved, as the anomaly agent sees them.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from anomaly_workload import EwmaZScore

from meterline.anomaly import AnomalyEngine, AnomalySettings, SeriesKey

HOUR_MS = 3_600_000
START_MS = 1_704_067_200_000  # a Monday
SERIES = 200
UPDATES = 10_000  # per benchmark round
WARM_HOURS = 14 * 24


def _shape(hour: int) -> float:
    return 1.0 if 9 <= hour % 24 < 18 else 0.15


class Feed:
    """An endless, deterministic, interleaved stream of (series, window, value)."""

    def __init__(self) -> None:
        rng = random.Random(3)
        self.keys = [SeriesKey(f"cust-{i:04d}", "api_calls") for i in range(SERIES)]
        self.levels = [10 ** rng.uniform(1.5, 4.5) for _ in range(SERIES)]
        self.noise = [math.exp(rng.gauss(0.0, 0.1)) for _ in range(997)]
        self.hour = 0

    def window(self) -> list[tuple[SeriesKey, int, float]]:
        """One window of every series, then the clock moves on by an hour."""
        ts = START_MS + self.hour * HOUR_MS
        shape = _shape(self.hour)
        out = [(key, ts, round(level * shape * self.noise[(self.hour * 31 + i) % 997]))
               for i, (key, level) in enumerate(zip(self.keys, self.levels, strict=True))]
        self.hour += 1
        return out

    def updates(self, n: int) -> list[tuple[SeriesKey, int, float]]:
        out: list[tuple[SeriesKey, int, float]] = []
        while len(out) < n:
            out += self.window()
        return out


@pytest.fixture(scope="module")
def warm() -> tuple[AnomalyEngine, Feed]:
    engine, feed = AnomalyEngine(AnomalySettings()), Feed()
    for _ in range(WARM_HOURS):
        for key, ts, value in feed.window():
            engine.observe(key, ts, value)
    return engine, feed


def test_baseline_lookup_only(benchmark, warm):
    """The floor: a function with observe's signature that only finds the series."""
    engine, feed = warm
    table = {key: None for key in feed.keys}

    def observe(series, window_start_ms, value):
        return table.get(series)

    def run():
        for key, ts, value in feed.updates(UPDATES):
            observe(key, ts, value)

    benchmark(run)


def test_baseline_ewma_zscore(benchmark, warm):
    """The harness's EWMA z-score baseline: a few float operations per update."""
    _, feed = warm
    detectors = {key: EwmaZScore(warmup=0, min_abs=10.0) for key in feed.keys}

    def run():
        for key, _ts, value in feed.updates(UPDATES):
            detectors[key].flag(value)

    benchmark(run)


def test_engine_observe_steady_state(benchmark, warm):
    engine, feed = warm
    observe = engine.observe

    def run():
        for key, ts, value in feed.updates(UPDATES):
            observe(key, ts, value)

    benchmark(run)


def test_engine_observe_partial(benchmark, warm):
    """Early warning: a window in progress scored against its whole-window band."""
    engine, feed = warm
    partial = engine.observe_partial

    def run():
        ts = START_MS + feed.hour * HOUR_MS
        for i in range(UPDATES):
            key = feed.keys[i % SERIES]
            partial(key, ts, 10.0, 0.5)

    benchmark(run)


def test_export_and_restore_state(benchmark, warm):
    """A checkpoint of all SERIES series: export, JSON both ways, restore."""
    engine, _ = warm

    def run():
        state = json.loads(json.dumps(engine.export_state()))
        return AnomalyEngine.from_state(state, engine.settings)

    restored = benchmark(run)
    assert len(restored) == SERIES
