"""Watermarks and the on-time / late-allowed / too-late decision."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.lateness import (
    DEFAULT_ALLOWED_LATENESS_MS,
    DEFAULT_WATERMARK_DELAY_MS,
    NO_WATERMARK_MS,
    Lateness,
    PartitionWatermark,
    classify,
    window_closed,
)
from meterline.core.windows import DAY_MS, HOUR_MS

HOUR = 1_700_002_800_000  # an hour boundary
L = 2 * HOUR_MS


def test_defaults() -> None:
    assert DEFAULT_ALLOWED_LATENESS_MS == 2 * HOUR_MS
    assert DEFAULT_WATERMARK_DELAY_MS == 60_000
    assert HOUR % HOUR_MS == 0


@pytest.mark.parametrize(
    ("watermark", "expected"),
    [
        (NO_WATERMARK_MS, Lateness.ON_TIME),
        (HOUR, Lateness.ON_TIME),
        (HOUR + HOUR_MS - 1, Lateness.ON_TIME),  # the watermark has not passed the end yet
        (HOUR + HOUR_MS, Lateness.LATE_ALLOWED),  # window end reached
        (HOUR + HOUR_MS + L - 1, Lateness.LATE_ALLOWED),  # last ms it still accepts
        (HOUR + HOUR_MS + L, Lateness.TOO_LATE),  # end + allowed lateness <= watermark: closed
        (HOUR + 10 * DAY_MS, Lateness.TOO_LATE),
    ],
)
def test_classify_boundaries(watermark: int, expected: Lateness) -> None:
    for ts in (HOUR, HOUR + 1, HOUR + HOUR_MS - 1):  # anywhere in the hour: same answer
        assert classify(ts, watermark, L) is expected


def test_window_closed_is_the_too_late_rule() -> None:
    end = HOUR + HOUR_MS
    assert not window_closed(end, end + L - 1, L)
    assert window_closed(end, end + L, L)


def test_zero_lateness_closes_at_window_end() -> None:
    assert classify(HOUR, HOUR + HOUR_MS - 1, 0) is Lateness.ON_TIME
    assert classify(HOUR, HOUR + HOUR_MS, 0) is Lateness.TOO_LATE


def test_daily_windows() -> None:
    day = HOUR - HOUR % DAY_MS
    assert classify(day + 5, day + DAY_MS - 1, 0, DAY_MS) is Lateness.ON_TIME
    assert classify(day + 5, day + DAY_MS, 0, DAY_MS) is Lateness.TOO_LATE


def test_negative_lateness_rejected() -> None:
    with pytest.raises(ValueError, match="allowed_lateness_ms"):
        classify(HOUR, HOUR, -1)


def test_partition_watermark_is_monotone_and_delayed() -> None:
    wm = PartitionWatermark(delay_ms=1000)
    assert wm.watermark_ms == NO_WATERMARK_MS
    wm.observe(HOUR + 5000)
    assert wm.watermark_ms == HOUR + 4000
    wm.observe(HOUR)  # an older event never moves it back
    assert wm.watermark_ms == HOUR + 4000
    assert wm.max_event_ms == HOUR + 5000
    restored = PartitionWatermark(1000, max_event_ms=wm.max_event_ms)
    assert restored.watermark_ms == wm.watermark_ms


@pytest.mark.parametrize("delay", [-1, 1.0, None])
def test_bad_delay_rejected(delay: object) -> None:
    with pytest.raises(ValueError, match="delay_ms"):
        PartitionWatermark(delay)  # type: ignore[arg-type]


_ORDER = {Lateness.ON_TIME: 0, Lateness.LATE_ALLOWED: 1, Lateness.TOO_LATE: 2}


@given(
    st.integers(min_value=0, max_value=10 * DAY_MS),
    st.lists(st.integers(min_value=-DAY_MS, max_value=20 * DAY_MS), min_size=2, max_size=8),
    st.integers(min_value=0, max_value=DAY_MS),
)
def test_classification_only_gets_later(ts: int, watermarks: list[int], lateness: int) -> None:
    ranks = [_ORDER[classify(ts, wm, lateness)] for wm in sorted(watermarks)]
    assert ranks == sorted(ranks)


@given(st.integers(min_value=0, max_value=10 * DAY_MS), st.integers(0, DAY_MS),
       st.integers(0, DAY_MS))
def test_counted_iff_max_seen_before_end_plus_delay_plus_lateness(
    ts: int, delay: int, lateness: int
) -> None:
    end = ts - ts % HOUR_MS + HOUR_MS
    for max_seen in (end + delay + lateness - 1, end + delay + lateness):
        wm = PartitionWatermark(delay, max_event_ms=max_seen)
        counted = classify(ts, wm.watermark_ms, lateness) is not Lateness.TOO_LATE
        assert counted == (max_seen < end + delay + lateness)
