"""Window maths: half-open UTC windows over integer milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.windows import (
    DAILY,
    DAY_MS,
    HOUR_MS,
    HOURLY,
    WindowSpec,
    window_end,
    window_start,
    windows_for,
)


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()) * 1000


def test_sizes() -> None:
    assert HOUR_MS == 3_600_000
    assert DAY_MS == 86_400_000
    assert (HOURLY.name, HOURLY.size_ms) == ("hourly", HOUR_MS)
    assert (DAILY.name, DAILY.size_ms) == ("daily", DAY_MS)


def test_half_open_boundaries() -> None:
    eleven = ms(2024, 3, 5, 11)
    assert window_start(eleven, HOUR_MS) == eleven  # the start belongs to its window
    assert window_start(eleven - 1, HOUR_MS) == eleven - HOUR_MS  # the end does not
    assert window_start(eleven + HOUR_MS - 1, HOUR_MS) == eleven
    assert window_end(eleven, HOUR_MS) == eleven + HOUR_MS
    assert HOURLY.contains(eleven, eleven)
    assert not HOURLY.contains(eleven, eleven + HOUR_MS)
    assert not HOURLY.contains(eleven, eleven - 1)


def test_windows_for_matches_utc_calendar() -> None:
    ts = ms(2024, 2, 29, 23, 59, 59) + 999  # leap day, last ms
    assert windows_for(ts) == (ms(2024, 2, 29, 23), ms(2024, 2, 29))
    assert windows_for(ts + 1) == (ms(2024, 3, 1), ms(2024, 3, 1))


def test_negative_timestamps_floor() -> None:
    assert window_start(-1, HOUR_MS) == -HOUR_MS
    assert window_start(-HOUR_MS, HOUR_MS) == -HOUR_MS
    assert window_start(-HOUR_MS - 1, HOUR_MS) == -2 * HOUR_MS


@pytest.mark.parametrize("size", [0, -1, 1.5, None])
def test_bad_sizes_rejected(size: object) -> None:
    with pytest.raises(ValueError, match="size_ms"):
        window_start(10, size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size_ms"):
        WindowSpec("bad", size)  # type: ignore[arg-type]


def test_spec_start_end() -> None:
    ts = ms(2024, 3, 5, 11, 30)
    assert HOURLY.start(ts) == ms(2024, 3, 5, 11)
    assert HOURLY.end(HOURLY.start(ts)) == ms(2024, 3, 5, 12)
    assert DAILY.start(ts) == ms(2024, 3, 5)
    assert DAILY.end(DAILY.start(ts)) == ms(2024, 3, 6)


@given(
    st.integers(min_value=-(2**62), max_value=2**62),
    st.integers(min_value=1, max_value=10 * DAY_MS),
)
def test_start_contains_timestamp(ts: int, size: int) -> None:
    start = window_start(ts, size)
    assert start <= ts < start + size
    assert start % size == 0


@given(st.integers(min_value=0, max_value=2**62))
def test_hour_nests_in_day(ts: int) -> None:
    hour, day = windows_for(ts)
    assert window_start(hour, DAY_MS) == day
    assert day <= hour < hour + HOUR_MS <= day + DAY_MS
