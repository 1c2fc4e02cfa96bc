"""Episodes, not windows: one alert when a series turns abnormal, one when it is over.

Per series, windows arrive with one of three verdicts from a detector: *normal* (back
near the expected value), *hold* (not abnormal, not near normal either) or *abnormal*.

- ``open`` (seq 0): the first abnormal window while no episode is open. ``since_ms`` is
  that window's start and names the episode.
- ``update``: an abnormal window that makes the episode materially worse: its severity
  climbs a level (minor -> major -> critical), or the ratio of observed to expected (in the
  detector's log space) has at least doubled since the last event. Never when it eases:
  a fading spike says nothing new, and the resolve will carry the peak.
- ``resolve``: after ``resolve_windows`` consecutive *normal* windows. A hold window resets
  that count (hysteresis), so a series hovering at the band edge gives one episode, not a
  string of them. Its anomaly is the episode's peak, ``until_ms`` the end of its last
  abnormal window.
- A turn from up to down (or back) inside an episode resolves it and opens a new one:
  a spike followed by silence is two different problems.

Sequence numbers make the idempotency key ``<series id>|<since_ms>|<seq>``.
"""

from __future__ import annotations

import math
from typing import Any

from meterline.core.anomaly.model import Anomaly, EpisodeEvent, SeriesKey

__all__ = ["UPDATE_RATIO", "EpisodeTracker"]

# An update needs the observed/expected ratio to have doubled since the last event: smaller
# steps are noise within one incident, and each update is a notification somebody reads.
UPDATE_RATIO = 2.0
_UPDATE_LOG = math.log(UPDATE_RATIO)
_RANKS = {"minor": 0, "major": 1, "critical": 2}


class EpisodeTracker:
    """The open episode of one series, if any. State is a few numbers and the peak."""

    __slots__ = ("direction", "is_open", "normal", "peak", "reported_r", "reported_rank",
                 "resolve_windows", "seq", "since_ms", "until_ms", "windows")

    def __init__(self, resolve_windows: int) -> None:
        self.resolve_windows = resolve_windows
        self._close()

    def _close(self) -> None:
        self.is_open = False
        self.since_ms = 0
        self.seq = 0
        self.direction = ""
        self.windows = 0
        self.normal = 0
        self.until_ms = 0
        self.reported_rank = 0
        self.reported_r = 0.0
        self.peak: Anomaly | None = None

    def since_for(self, window_start_ms: int, direction: str) -> int:
        """The ``since_ms`` an abnormal window in ``direction`` will belong to."""
        if self.is_open and self.direction == direction:
            return self.since_ms
        return window_start_ms

    def normal_window(self, window_start_ms: int) -> list[EpisodeEvent]:
        if not self.is_open:
            return []
        self.normal += 1
        if self.normal < self.resolve_windows:
            return []
        return [self._resolve(window_start_ms)]

    def hold_window(self) -> None:
        self.normal = 0

    def abnormal_window(self, anomaly: Anomaly, r: float, end_ms: int) -> list[EpisodeEvent]:
        """Record an abnormal (or early, partial) window; ``r`` is its log-ratio and
        ``anomaly.since_ms`` must come from ``since_for``."""
        events: list[EpisodeEvent] = []
        if self.is_open and self.direction != anomaly.direction:
            events.append(self._resolve(anomaly.window_start_ms))
        self.normal = 0
        rank = _RANKS[anomaly.severity]
        if not self.is_open:
            self.is_open = True
            self.since_ms = anomaly.since_ms
            self.direction = anomaly.direction
            self.windows = 1
            self.until_ms = end_ms
            self.peak = anomaly
            self.reported_rank, self.reported_r = rank, abs(r)
            events.append(self._event("open", anomaly))
            return events
        if anomaly.window_start_ms >= self.until_ms:  # not the same window again (partials)
            self.windows += 1
        self.until_ms = max(self.until_ms, end_ms)
        if self.peak is None or abs(anomaly.score) > abs(self.peak.score):
            self.peak = anomaly
        if rank > self.reported_rank or abs(r) - self.reported_r >= _UPDATE_LOG:
            self.seq += 1
            self.reported_rank = max(rank, self.reported_rank)
            self.reported_r = max(abs(r), self.reported_r)
            events.append(self._event("update", anomaly))
        return events

    def _resolve(self, window_start_ms: int) -> EpisodeEvent:
        assert self.peak is not None
        self.seq += 1
        event = EpisodeEvent("resolve", self.peak.series, self.since_ms, self.seq,
                             window_start_ms, self.peak, self.windows, self.until_ms)
        self._close()
        return event

    def _event(self, kind: str, anomaly: Anomaly) -> EpisodeEvent:
        return EpisodeEvent(kind, anomaly.series, self.since_ms, self.seq,
                            anomaly.window_start_ms, anomaly, self.windows)

    def to_plain(self) -> dict[str, Any] | None:
        """The open episode as plain data; the peak is a bare list (the series is known
        from where the state is kept), which keeps a series' state under 2 KB."""
        if not self.is_open:
            return None
        peak = self.peak
        assert peak is not None
        return {"since_ms": self.since_ms, "seq": self.seq, "direction": self.direction,
                "windows": self.windows, "normal": self.normal, "until_ms": self.until_ms,
                "reported": [self.reported_rank, self.reported_r],
                "peak": [peak.window_start_ms, peak.detector, peak.direction, peak.observed,
                         peak.expected, peak.lower, peak.upper, peak.score, peak.severity,
                         peak.elapsed_fraction]}

    def load_plain(self, plain: dict[str, Any] | None, series: SeriesKey) -> None:
        self._close()
        if plain is None:
            return
        self.is_open = True
        self.since_ms = int(plain["since_ms"])
        self.seq = int(plain["seq"])
        self.direction = str(plain["direction"])
        self.windows = int(plain["windows"])
        self.normal = int(plain["normal"])
        self.until_ms = int(plain["until_ms"])
        rank, r = plain["reported"]
        self.reported_rank, self.reported_r = int(rank), float(r)
        start, detector, direction, observed, expected, lower, upper, score, severity, \
            elapsed = plain["peak"]
        if severity not in _RANKS or direction not in ("up", "down"):
            raise ValueError(f"bad peak: {plain['peak']!r}")
        self.peak = Anomaly(series, int(start), str(detector), direction, float(observed),
                            float(expected), float(lower), float(upper), float(score),
                            severity, self.since_ms, float(elapsed))
