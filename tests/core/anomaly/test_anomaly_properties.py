"""Properties over generated series: no alert without a change, bounded state, exact
restore at any point."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.anomaly import AnomalySettings, SeriesDetector, SeriesKey

HOUR_MS = 3_600_000
START_MS = 1_704_067_200_000
KEY = SeriesKey("cust-1", "api_calls", (("region", "eu-west-1"),))

# Usage-like values: idle hours, small counts, big totals, and the odd huge outlier.
values_strategy = st.one_of(
    st.just(0.0),
    st.integers(0, 50).map(float),
    st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False),
    st.floats(1e6, 1e15, allow_nan=False, allow_infinity=False),
)


def run(detector: SeriesDetector, values: list[float], first: int = 0) -> list[object]:
    out: list[object] = []
    for i, value in enumerate(values, start=first):
        step = detector.update(START_MS + i * HOUR_MS, value)
        out += step.anomalies + step.events
    return out


@settings(max_examples=40, deadline=None)
@given(value=st.floats(0.0, 1e12, allow_nan=False, allow_infinity=False),
       windows=st.integers(0, 24 * 21),
       sensitivity=st.floats(0.25, 8.0),
       min_abs=st.floats(0.0, 100.0))
def test_a_constant_series_never_alerts(value: float, windows: int, sensitivity: float,
                                        min_abs: float) -> None:
    detector = SeriesDetector(AnomalySettings(sensitivity=sensitivity,
                                              min_abs_deviation=min_abs, warmup_windows=24),
                              KEY)
    assert run(detector, [value] * windows) == []


@settings(max_examples=30, deadline=None)
@given(values=st.lists(values_strategy, min_size=0, max_size=24 * 28))
def test_state_stays_under_two_kilobytes(values: list[float]) -> None:
    detector = SeriesDetector(AnomalySettings(warmup_windows=24), KEY)
    run(detector, values)
    assert len(json.dumps(detector.to_plain(), separators=(",", ":"))) <= 2048


@settings(max_examples=30, deadline=None)
@given(values=st.lists(values_strategy, min_size=1, max_size=24 * 21), data=st.data())
def test_restore_at_any_point_continues_exactly(values: list[float],
                                                data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(values)))
    config = AnomalySettings(warmup_windows=24)
    original = SeriesDetector(config, KEY)
    run(original, values[:cut])
    restored = SeriesDetector(config, KEY)
    restored.load_plain(json.loads(json.dumps(original.to_plain())))
    assert run(restored, values[cut:], cut) == run(original, values[cut:], cut)
    assert restored.to_plain() == original.to_plain()
