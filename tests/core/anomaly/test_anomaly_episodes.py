"""EpisodeTracker: one open, material updates only, one resolve after N normal windows."""

from __future__ import annotations

import json
import math

from meterline.core.anomaly.episodes import EpisodeTracker
from meterline.core.anomaly.model import Anomaly, EpisodeEvent, SeriesKey

HOUR_MS = 3_600_000
KEY = SeriesKey("acme", "api_calls")


def anomaly(hour: int, ratio: float, severity: str = "minor", direction: str = "up",
            since: int | None = None) -> Anomaly:
    observed = 100.0 * ratio
    return Anomaly(KEY, hour * HOUR_MS, "seasonal_robust", direction, observed, 100.0, 30.0,
                   350.0, 10.0 * math.log(ratio), severity,
                   hour * HOUR_MS if since is None else since)


def feed(tracker: EpisodeTracker, hour: int, ratio: float, severity: str = "minor",
         direction: str = "up") -> list[EpisodeEvent]:
    a = anomaly(hour, ratio, severity, direction,
                tracker.since_for(hour * HOUR_MS, direction))
    return tracker.abnormal_window(a, math.log(ratio), (hour + 1) * HOUR_MS)


def test_one_open_material_updates_and_one_resolve() -> None:
    tracker = EpisodeTracker(resolve_windows=3)
    events = feed(tracker, 10, 5.0)
    events += feed(tracker, 11, 6.0)  # a bit worse: not material
    events += feed(tracker, 12, 5.5)
    events += feed(tracker, 13, 12.0)  # ratio more than doubled since the open: update
    events += feed(tracker, 14, 13.0, "major")  # severity climbed: update
    events += feed(tracker, 15, 4.0)  # easing: never an update
    tracker.hold_window()  # not back to normal: the resolve count starts over
    for hour in range(16, 19):
        events += tracker.normal_window(hour * HOUR_MS)
    assert [e.kind for e in events] == ["open", "update", "update", "resolve"]
    assert [e.seq for e in events] == [0, 1, 2, 3]
    assert {e.since_ms for e in events} == {10 * HOUR_MS}
    resolve = events[-1]
    assert resolve.windows == 6 and resolve.until_ms == 16 * HOUR_MS
    assert resolve.anomaly.observed == 1300.0  # the peak, not the last window
    assert [e.key for e in events] == [f"acme|api_calls||{10 * HOUR_MS}|{i}" for i in range(4)]
    assert not tracker.is_open


def test_resolve_needs_consecutive_normal_windows() -> None:
    tracker = EpisodeTracker(resolve_windows=3)
    feed(tracker, 0, 8.0)
    assert tracker.normal_window(1 * HOUR_MS) == []
    assert tracker.normal_window(2 * HOUR_MS) == []
    tracker.hold_window()
    assert tracker.normal_window(4 * HOUR_MS) == []
    assert tracker.normal_window(5 * HOUR_MS) == []
    assert [e.kind for e in tracker.normal_window(6 * HOUR_MS)] == ["resolve"]
    assert tracker.normal_window(7 * HOUR_MS) == []  # nothing open: nothing to say


def test_a_turn_from_spike_to_silence_is_two_episodes() -> None:
    tracker = EpisodeTracker(resolve_windows=3)
    events = feed(tracker, 0, 9.0) + feed(tracker, 1, 0.05, direction="down")
    assert [(e.kind, e.since_ms) for e in events] == [
        ("open", 0), ("resolve", 0), ("open", HOUR_MS)]


def test_a_partial_and_then_the_complete_window_count_once() -> None:
    tracker = EpisodeTracker(resolve_windows=3)
    feed(tracker, 5, 6.0)  # early, from the window in progress
    events = feed(tracker, 5, 7.0)  # the same window, complete
    assert events == [] and tracker.windows == 1


def test_open_episode_round_trips_through_json() -> None:
    tracker = EpisodeTracker(resolve_windows=3)
    feed(tracker, 0, 8.0)
    feed(tracker, 1, 20.0, "major")
    restored = EpisodeTracker(resolve_windows=3)
    restored.load_plain(json.loads(json.dumps(tracker.to_plain())), KEY)
    assert restored.to_plain() == tracker.to_plain() and restored.peak == tracker.peak
    for t in (tracker, restored):
        t.normal_window(2 * HOUR_MS)
        t.normal_window(3 * HOUR_MS)
    assert tracker.normal_window(4 * HOUR_MS) == restored.normal_window(4 * HOUR_MS)
    closed = EpisodeTracker(resolve_windows=3)
    assert closed.to_plain() is None
    closed.load_plain(None, KEY)
    assert not closed.is_open


def test_series_ids_cannot_collide() -> None:
    # A '|' in a customer id must not make two series share an idempotency key.
    a = SeriesKey("a|b", "c")
    b = SeriesKey("a", "b|c")
    assert a.id != b.id
    assert SeriesKey("x", "m", (("k", "v&w=1"),)).id == "x|m|k=v%26w%3D1"
    assert SeriesKey.of(("x", "m", {"region": "eu"})) == SeriesKey("x", "m", (("region", "eu"),))
