"""Event-time watermarks and the on-time / late / too-late decision.

Windows close on *event time*, never on the wall clock: a worker that restarts, lags or
replays a day of data makes exactly the same decisions as one that kept up.

Two knobs, as in Flink (bounded out-of-orderness plus allowed lateness):

- ``delay_ms``: the watermark of a partition is the largest event time seen on it minus
  ``delay_ms``. It claims "events older than this should have arrived by now". Events of a
  window the watermark has not passed yet are ON_TIME.
- ``allowed_lateness_ms``: a window whose end the watermark has passed still accepts events
  for this long (LATE_ALLOWED: they update the window and a new total is written). The
  window is *closed* once ``window_end + allowed_lateness <= watermark``; its events are
  TOO_LATE.

So an event with hourly window ``[start, end)`` is counted in the rollups iff
``max_event_time_seen < end + delay_ms + allowed_lateness_ms``. (Setting
``delay_ms = allowed_lateness_ms`` gives "watermark = max event time minus the allowed
lateness" and the same close rule, i.e. twice the lateness in total; we keep them apart so
each knob means one thing.)

TOO_LATE events are never dropped: the rollup reports each one with the hourly window it
belonged to, and the aggregator writes it to the late-events table/topic, where it is
visible and can be reconciled. Lateness is classified on the *hourly* window; the daily
window takes exactly the events its hours accepted, so daily == merge of hourly holds.

The watermark is per partition: all of a customer's events share a partition (see
``partitioning.py``), and partitions are consumed independently, so one slow partition
does not make another one's events late.
"""

from __future__ import annotations

from enum import StrEnum

from meterline.core.windows import HOUR_MS

__all__ = [
    "DEFAULT_ALLOWED_LATENESS_MS",
    "DEFAULT_WATERMARK_DELAY_MS",
    "NO_WATERMARK_MS",
    "Lateness",
    "PartitionWatermark",
    "classify",
    "window_closed",
]

# 1 min: SDKs linger a few seconds before sending a batch and many app instances share a
# partition, so events routinely arrive seconds behind the partition's newest one. Such
# events should count as on time (metrics stay quiet), not as late.
DEFAULT_WATERMARK_DELAY_MS = 60_000
# 2 h: covers retries with backoff, a consumer restart and a short broker outage while the
# windows are still in memory. Each extra hour keeps one more hourly window per key alive.
# Longer outages (the SDK's disk spool) surface in the late table instead of silently
# rewriting totals that have been shown to people long ago.
DEFAULT_ALLOWED_LATENESS_MS = 2 * HOUR_MS
# Before a partition has seen any event nothing can be late.
NO_WATERMARK_MS = -(2**63)


class Lateness(StrEnum):
    ON_TIME = "on_time"
    LATE_ALLOWED = "late_allowed"
    TOO_LATE = "too_late"


def window_closed(window_end_ms: int, watermark_ms: int, allowed_lateness_ms: int) -> bool:
    """True once the window ``[.., window_end_ms)`` accepts no more events."""
    return window_end_ms + allowed_lateness_ms <= watermark_ms


def classify(
    timestamp_ms: int,
    watermark_ms: int,
    allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS,
    window_size_ms: int = HOUR_MS,
) -> Lateness:
    """Where an event stands relative to its window (hourly by default) and the watermark."""
    if allowed_lateness_ms < 0:
        raise ValueError(f"allowed_lateness_ms must be >= 0, got {allowed_lateness_ms}")
    end = timestamp_ms - timestamp_ms % window_size_ms + window_size_ms
    if end + allowed_lateness_ms <= watermark_ms:
        return Lateness.TOO_LATE
    if end <= watermark_ms:
        return Lateness.LATE_ALLOWED
    return Lateness.ON_TIME


class PartitionWatermark:
    """The watermark of one partition: largest event time observed minus ``delay_ms``.

    Monotone: observing an older event never moves it back. Callers persist
    ``max_event_ms`` with the window state (it is part of what a restart must restore).
    """

    __slots__ = ("delay_ms", "max_event_ms")

    def __init__(
        self, delay_ms: int = DEFAULT_WATERMARK_DELAY_MS, max_event_ms: int | None = None
    ) -> None:
        if type(delay_ms) is not int or delay_ms < 0:
            raise ValueError(f"delay_ms must be an int >= 0, got {delay_ms!r}")
        self.delay_ms = delay_ms
        self.max_event_ms = max_event_ms

    def observe(self, timestamp_ms: int) -> None:
        if self.max_event_ms is None or timestamp_ms > self.max_event_ms:
            self.max_event_ms = timestamp_ms

    @property
    def watermark_ms(self) -> int:
        if self.max_event_ms is None:
            return NO_WATERMARK_MS
        return self.max_event_ms - self.delay_ms
