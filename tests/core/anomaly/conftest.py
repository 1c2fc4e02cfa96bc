"""Factories for the anomaly tests: deterministic synthetic usage series."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
START_MS = 1_704_067_200_000  # Monday 2024-01-01 00:00 UTC

Series = tuple[list[int], list[float]]


def business_shape(hour: int, weekday: int) -> float:
    """Busy 9-18 UTC on weekdays (1.0), a quiet night (0.1), weekends at 0.2."""
    if weekday >= 5:
        return 0.2
    return 1.0 if 9 <= hour < 18 else 0.1


@pytest.fixture
def usage() -> Callable[..., Series]:
    """``usage(days, level=..., noise=..., seed=..., interval_ms=..., shape=...)`` ->
    (window starts, values): a business-hours series with multiplicative Gaussian noise,
    rounded to whole units like counts."""

    def make(days: int, level: float = 1000.0, noise: float = 0.1, seed: int = 1,
             interval_ms: int = HOUR_MS,
             shape: Callable[[int, int], float] = business_shape,
             growth_per_day: float = 0.0) -> Series:
        rng = random.Random(seed)
        per_hour = HOUR_MS / interval_ms if interval_ms < HOUR_MS else 1.0
        starts, values = [], []
        for i in range(days * DAY_MS // interval_ms):
            ts = START_MS + i * interval_ms
            hour = (ts // HOUR_MS) % 24
            weekday = (ts // DAY_MS - 19723) % 7  # 2024-01-01 is day 19723, a Monday
            mean = level * shape(hour, weekday) * math.exp(growth_per_day * i * interval_ms
                                                           / DAY_MS) / per_hour
            values.append(float(round(mean * math.exp(rng.gauss(0.0, noise)))))
            starts.append(ts)
        return starts, values

    return make


@pytest.fixture
def at() -> Callable[[int, int], int]:
    """``at(day, hour)``: window start of ``hour`` UTC on day ``day`` (0 = Monday)."""

    def start(day: int, hour: int) -> int:
        return START_MS + day * DAY_MS + hour * HOUR_MS

    return start
