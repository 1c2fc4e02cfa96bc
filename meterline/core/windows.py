"""Tumbling event-time windows over integer UTC milliseconds.

A window is half-open, ``[start_ms, start_ms + size_ms)``: an event at exactly 11:00:00.000
belongs to the 11:00 hour, never to 10:00, so no event is counted twice and none falls
between two windows. There are no floats and no "end minus a tenth" fudges.

Epoch milliseconds have no leap seconds and no time zones, so every UTC hour is exactly
``HOUR_MS`` and every UTC day exactly ``DAY_MS``; flooring to a multiple of the size lands on
the UTC hour or midnight. ``DAY_MS`` is a multiple of ``HOUR_MS``, so every hourly window
lies inside exactly one daily window: that nesting is what lets hourly states merge into the
daily one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DAILY",
    "DAY_MS",
    "HOURLY",
    "HOUR_MS",
    "WindowSpec",
    "window_end",
    "window_start",
    "windows_for",
]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def window_start(timestamp_ms: int, size_ms: int) -> int:
    """Start of the window of ``size_ms`` that contains ``timestamp_ms`` (aligned to epoch 0).

    Python's ``%`` takes the sign of the divisor, so this floors for negative timestamps too
    (-1 ms lies in the window starting at ``-size_ms``), unlike C-style truncation.
    """
    if type(size_ms) is not int or size_ms <= 0:
        raise ValueError(f"size_ms must be a positive int, got {size_ms!r}")
    return timestamp_ms - timestamp_ms % size_ms


def window_end(start_ms: int, size_ms: int) -> int:
    """Exclusive end of the window starting at ``start_ms``."""
    return start_ms + size_ms


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """A named tumbling window size. ``name`` is what rollup keys and tables use."""

    name: str
    size_ms: int

    def __post_init__(self) -> None:
        if type(self.size_ms) is not int or self.size_ms <= 0:
            raise ValueError(f"size_ms must be a positive int, got {self.size_ms!r}")

    def start(self, timestamp_ms: int) -> int:
        return timestamp_ms - timestamp_ms % self.size_ms

    def end(self, start_ms: int) -> int:
        return start_ms + self.size_ms

    def contains(self, start_ms: int, timestamp_ms: int) -> bool:
        return start_ms <= timestamp_ms < start_ms + self.size_ms


HOURLY = WindowSpec("hourly", HOUR_MS)
DAILY = WindowSpec("daily", DAY_MS)


def windows_for(timestamp_ms: int) -> tuple[int, int]:
    """``(hour_start_ms, day_start_ms)`` of an event time: the two windows it updates."""
    return timestamp_ms - timestamp_ms % HOUR_MS, timestamp_ms - timestamp_ms % DAY_MS
