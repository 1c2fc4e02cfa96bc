"""One series end to end: windows in, explained anomalies and episode events out.

``SeriesDetector`` joins the seasonal detector and the episode tracker and owns the
series' clock:

- Windows are fed in order. A window start not on the ``interval_ms`` grid is an error; one
  at or before the last window fed is stale (a rollup correcting a closed window) and is
  ignored: online learning cannot un-learn, and ignoring it keeps replays deterministic.
- Missing windows are zeros: rollups write a row only for windows that had events, so a
  gap between two windows *is* usage of 0. A gap longer than ``MAX_GAP_WINDOWS_MS`` (a week)
  gets a week of zeros only: the detector's memory of a level is shorter than that.
  ``advance()`` fills zeros up to a window with no event at all, which is how a series that
  went silent is noticed without waiting for its next event.
- ``observe_partial`` scores a window still in progress without learning from it.

``detect_series`` runs one detector over a whole series in one call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from meterline.core.anomaly.episodes import EpisodeTracker
from meterline.core.anomaly.errors import AnomalyError
from meterline.core.anomaly.model import SEVERITIES, Anomaly, EpisodeEvent, SeriesKey
from meterline.core.anomaly.seasonal import HOLD, NAME, SeasonalDetector, Verdict
from meterline.core.anomaly.settings import AnomalySettings, MeterParams
from meterline.core.windows import DAY_MS

__all__ = ["MAX_GAP_WINDOWS_MS", "SeriesDetector", "Step", "detect_series"]

MAX_GAP_WINDOWS_MS = 7 * DAY_MS  # zeros filled into one gap, at most (as a duration)
STATE_VERSION = 1
_INF = math.inf
_NO_EVENTS: list[EpisodeEvent] = []  # returned on the fast path; callers must not mutate


@dataclass(frozen=True, slots=True)
class Step:
    """What one call produced: the abnormal windows (gap fills included) and the events."""

    anomalies: list[Anomaly]
    events: list[EpisodeEvent]


class SeriesDetector:
    """Streaming detector for one series. Not thread-safe; one instance per series."""

    __slots__ = ("_detector", "_max_gap", "_tracker", "interval_ms", "last_ms", "params",
                 "series")

    def __init__(self, settings: AnomalySettings | None = None,
                 series: SeriesKey | tuple[Any, ...] = ("", ""),
                 *, params: MeterParams | None = None) -> None:
        self.series = SeriesKey.of(series)
        if params is None:
            settings = settings or AnomalySettings()
            settings.validate()
            params = settings.for_meter(self.series.meter)
        self.params = params
        self.interval_ms = params.interval_ms
        self._max_gap = max(1, MAX_GAP_WINDOWS_MS // params.interval_ms)
        self._detector = SeasonalDetector(params)
        self._tracker = EpisodeTracker(params.resolve_windows)
        self.last_ms: int | None = None

    @property
    def episode_open(self) -> bool:
        return self._tracker.is_open

    @property
    def windows_seen(self) -> int:
        return self._detector.n

    def observe(self, window_start_ms: int, value: float) -> list[EpisodeEvent]:
        """Feed the total of a complete window; returns the episode events it caused
        (usually none). Do not mutate the returned list."""
        # Fast paths for a plain finite non-negative number; _value checks everything else.
        if type(value) is float and 0.0 <= value < _INF:
            x = value
        elif type(value) is int and 0 <= value < _INF:
            x = float(value)
        else:
            x = _value(value)
        last = self.last_ms
        if (last is not None and type(window_start_ms) is int
                and window_start_ms - last == self.interval_ms):
            # Fast path: the next window, nothing abnormal going on.
            self.last_ms = window_start_ms
            verdict = self._detector.window(window_start_ms, x)
            if verdict is None and not self._tracker.is_open:
                return _NO_EVENTS
            events: list[EpisodeEvent] = []
            self._apply(window_start_ms, verdict, None, events)
            return events
        return self.update(window_start_ms, value).events

    def update(self, window_start_ms: int, value: float) -> Step:
        """Like ``observe`` but also returns every abnormal window it scored."""
        x = _value(value)
        anomalies: list[Anomaly] = []
        events: list[EpisodeEvent] = []
        if not self._fill_to(window_start_ms, anomalies, events):
            return Step(anomalies, events)
        self.last_ms = window_start_ms
        verdict = self._detector.window(window_start_ms, x)
        self._apply(window_start_ms, verdict, anomalies, events)
        return Step(anomalies, events)

    def observe_partial(self, window_start_ms: int, value_so_far: float,
                        elapsed_fraction: float) -> list[EpisodeEvent]:
        """Score the window at ``window_start_ms`` while it is still open. Only a value
        that already exceeds the whole window's upper band counts (see ``partial``); a
        partial window is never a drop and is not learned. Earlier missing windows are
        filled with zeros first (they are complete)."""
        return self.update_partial(window_start_ms, value_so_far, elapsed_fraction).events

    def update_partial(self, window_start_ms: int, value_so_far: float,
                       elapsed_fraction: float) -> Step:
        x = _value(value_so_far)
        if (isinstance(elapsed_fraction, bool) or not isinstance(elapsed_fraction, int | float)
                or not 0.0 < elapsed_fraction <= 1.0):
            raise AnomalyError(f"elapsed_fraction must be in (0, 1], got {elapsed_fraction!r}")
        anomalies: list[Anomaly] = []
        events: list[EpisodeEvent] = []
        # The partial window itself is not fed: fill up to the one before it.
        if not self._fill_to(window_start_ms, anomalies, events):
            return Step(anomalies, events)
        verdict = self._detector.partial(window_start_ms, x)
        if verdict is not None:
            anomaly = self._anomaly(window_start_ms, verdict, float(elapsed_fraction))
            anomalies.append(anomaly)
            events += self._tracker.abnormal_window(
                anomaly, verdict[7], window_start_ms + self.interval_ms)
        return Step(anomalies, events)

    def peek_partial(self, window_start_ms: int, value_so_far: float) -> Anomaly | None:
        """Would ``value_so_far`` already be abnormal for the window at ``window_start_ms``
        (a window later than the last one fed; earlier windows may still be unfed)?
        Changes nothing: no gap is filled, no episode opens, nothing is learned. The
        anomaly stage uses it for early warnings on windows whose total is not final yet,
        so its episodes stay exactly what the final totals give. ``None`` when not
        abnormal, not past the warm-up, or not a later window."""
        self._check_grid(window_start_ms)
        if self.last_ms is None or window_start_ms <= self.last_ms:
            return None
        verdict = self._detector.partial(window_start_ms, _value(value_so_far))
        if verdict is None:
            return None
        return self._anomaly(window_start_ms, verdict, 1.0)

    @property
    def open_episode(self) -> tuple[str, str, int] | None:
        """``(direction, severity reported so far, since_ms)`` of the open episode."""
        tracker = self._tracker
        if not tracker.is_open:
            return None
        return tracker.direction, SEVERITIES[tracker.reported_rank], tracker.since_ms

    def advance(self, through_window_start_ms: int) -> list[EpisodeEvent]:
        """The window at ``through_window_start_ms`` is complete and this series had no
        event up to and including it: feed zeros through it (no-op if already fed)."""
        if self.last_ms is None or through_window_start_ms <= self.last_ms:
            return _NO_EVENTS
        return self.observe(through_window_start_ms, 0)

    def expected(self, window_start_ms: int) -> tuple[float, float, float]:
        """``(expected, lower, upper)`` for a window, as the detector sees it now."""
        self._check_grid(window_start_ms)
        return self._detector.expected(window_start_ms)

    # -- internals --------------------------------------------------------------------

    def _check_grid(self, window_start_ms: int) -> None:
        if type(window_start_ms) is not int or window_start_ms % self.interval_ms:
            raise AnomalyError(f"window_start_ms {window_start_ms!r} is not a multiple of "
                               f"interval_ms {self.interval_ms}")

    def _fill_to(self, window_start_ms: int, anomalies: list[Anomaly],
                 events: list[EpisodeEvent]) -> bool:
        """Feed zeros for the windows missing before ``window_start_ms``. False if that
        window is stale (already fed)."""
        self._check_grid(window_start_ms)
        last = self.last_ms
        if last is None:
            return True
        if window_start_ms <= last:
            return False
        step = self.interval_ms
        missing = (window_start_ms - last) // step - 1
        start = window_start_ms - min(missing, self._max_gap) * step
        detector = self._detector
        for gap_ms in range(start, window_start_ms, step):
            self.last_ms = gap_ms
            self._apply(gap_ms, detector.window(gap_ms, 0.0), anomalies, events)
        return True

    def _apply(self, window_start_ms: int, verdict: Verdict | None,
               anomalies: list[Anomaly] | None, events: list[EpisodeEvent]) -> None:
        tracker = self._tracker
        if verdict is None:
            events += tracker.normal_window(window_start_ms)
        elif verdict is HOLD:
            tracker.hold_window()
        else:
            anomaly = self._anomaly(window_start_ms, verdict, 1.0)
            if anomalies is not None:
                anomalies.append(anomaly)
            events += tracker.abnormal_window(anomaly, verdict[7],
                                              window_start_ms + self.interval_ms)

    def _anomaly(self, window_start_ms: int, v: Verdict, elapsed: float) -> Anomaly:
        direction, observed, expected, lower, upper, score, rank, _ = v
        return Anomaly(self.series, window_start_ms, NAME, direction, observed, expected,
                       lower, upper, score, SEVERITIES[rank],
                       self._tracker.since_for(window_start_ms, direction), elapsed)

    # -- state --------------------------------------------------------------------------

    def to_plain(self) -> dict[str, Any]:
        """The whole state as JSON-able data: about 1.6 KB as compact JSON, 1.85 KB with
        an open episode (docs/anomalies.md, section 8)."""
        return {"v": STATE_VERSION, "last_ms": self.last_ms,
                "detector": self._detector.to_plain(), "episode": self._tracker.to_plain()}

    def load_plain(self, plain: dict[str, Any]) -> None:
        """Continue from ``to_plain`` output: afterwards this detector produces exactly what
        the saved one would have."""
        if not isinstance(plain, dict) or plain.get("v") != STATE_VERSION:
            raise AnomalyError(f"unsupported saved series state (want v={STATE_VERSION})")
        try:
            last = plain["last_ms"]
            self.last_ms = None if last is None else int(last)
            self._detector.load_plain(plain["detector"])
            self._tracker.load_plain(plain["episode"], self.series)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, AnomalyError):
                raise
            raise AnomalyError(f"bad saved series state: {exc!r}") from None


def _value(value: Any) -> float:
    if isinstance(value, bool | str | bytes):
        raise AnomalyError(f"value must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise AnomalyError(f"value must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise AnomalyError(f"value must be finite, got {value!r}")
    # Usage is never negative; a negative total (a correction) is scored as no usage.
    return x if x > 0.0 else 0.0


def detect_series(timestamps_ms: Sequence[int] | Iterable[int], values: Iterable[float],
                  *, series: SeriesKey | tuple[Any, ...] = ("", ""),
                  **settings: Any) -> list[Anomaly]:
    """Every abnormal window of one series, in order. ``timestamps_ms`` are window starts
    on the ``interval_ms`` grid, increasing; missing windows count as 0. ``settings`` are
    ``AnomalySettings`` fields (``sensitivity=2.0``, ``direction="up"``, ...)."""
    config = AnomalySettings(**settings)
    detector = SeriesDetector(config, series)
    out: list[Anomaly] = []
    for ts, value in zip(timestamps_ms, values, strict=True):
        out += detector.update(ts, value).anomalies
    return out
