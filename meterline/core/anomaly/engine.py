"""Many series in one object: what the anomaly agent holds per partition.

    engine = AnomalyEngine(AnomalySettings())
    events = engine.observe(("acme", "api_calls"), window_start_ms, 1234)
    state = engine.export_state()            # JSON-able; after kill -9 ...
    engine = AnomalyEngine.from_state(state, AnomalySettings())   # ... continue exactly

Series are created on first sight and keyed by ``SeriesKey`` (a plain
``(customer, meter, group)`` tuple finds the same entry). Meters switched off in the
settings keep no state at all.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from meterline.core.anomaly.errors import AnomalyError
from meterline.core.anomaly.model import EpisodeEvent, SeriesKey
from meterline.core.anomaly.series import SeriesDetector
from meterline.core.anomaly.settings import AnomalySettings, MeterParams

__all__ = ["AnomalyEngine"]

ENGINE_STATE_VERSION = 1


class AnomalyEngine:
    """A ``SeriesDetector`` per series, with shared settings and one saved state."""

    def __init__(self, settings: AnomalySettings | None = None, *,
                 known_meters: Collection[str] | None = None) -> None:
        self.settings = settings or AnomalySettings()
        self.settings.validate(known_meters)
        self._params: dict[str, MeterParams] = {}
        self._series: dict[SeriesKey, SeriesDetector] = {}

    def __len__(self) -> int:
        return len(self._series)

    def __contains__(self, series: object) -> bool:
        try:
            return SeriesKey.of(series) in self._series
        except TypeError:
            return False

    def series(self) -> Iterator[SeriesKey]:
        return iter(self._series)

    def detector(self, series: SeriesKey | tuple[Any, ...]) -> SeriesDetector | None:
        """The series' detector, created on first use; None if its meter is disabled."""
        key = SeriesKey.of(series)
        found = self._series.get(key)
        if found is not None:
            return found
        params = self._params.get(key.meter)
        if params is None:
            params = self._params[key.meter] = self.settings.for_meter(key.meter)
        if not params.enabled:
            return None
        found = self._series[key] = SeriesDetector(series=key, params=params)
        return found

    def observe(self, series: SeriesKey | tuple[Any, ...], window_start_ms: int,
                value: float) -> list[EpisodeEvent]:
        """Feed one complete window of one series; returns its episode events (usually
        none). The returned list must not be mutated."""
        found = self._series.get(series)  # type: ignore[arg-type]
        if found is None:
            found = self.detector(series)
            if found is None:
                return []
        return found.observe(window_start_ms, value)

    def observe_partial(self, series: SeriesKey | tuple[Any, ...], window_start_ms: int,
                        value_so_far: float, elapsed_fraction: float) -> list[EpisodeEvent]:
        """Early warning from a window still in progress (see SeriesDetector)."""
        found = self.detector(series)
        if found is None:
            return []
        return found.observe_partial(window_start_ms, value_so_far, elapsed_fraction)

    def advance(self, through_window_start_ms: int) -> list[EpisodeEvent]:
        """Every window up to and including ``through_window_start_ms`` is complete (the
        watermark passed its end): series with no value there get zeros, so a series that
        went silent is noticed now and not at its next event. Visits every series."""
        # Only series behind that window get zeros; the others would return nothing, so
        # they are skipped before the sort (the stage calls this every hour for every
        # partition, usually with every series up to date). SeriesKey sorts as _order.
        behind = [(key, detector) for key, detector in self._series.items()
                  if detector.last_ms is not None
                  and detector.last_ms < through_window_start_ms]
        if not behind:
            return []
        events: list[EpisodeEvent] = []
        for _, detector in sorted(behind):  # a fixed order: deterministic output
            events += detector.advance(through_window_start_ms)
        return events

    def existing(self, series: SeriesKey) -> SeriesDetector | None:
        """The series' detector if it has one already (never creates one)."""
        return self._series.get(series)

    def open_counts(self) -> dict[tuple[str, str, str], int]:
        """Open episodes by ``(meter, direction, severity)``: what the stage exports as a
        low-cardinality gauge (no customer)."""
        counts: dict[tuple[str, str, str], int] = {}
        for key, detector in self._series.items():
            found = detector.open_episode
            if found is not None:
                label = (key.meter, found[0], found[1])
                counts[label] = counts.get(label, 0) + 1
        return counts

    def forget(self, series: SeriesKey | tuple[Any, ...]) -> bool:
        """Drop a series' state (a deleted customer). True if it was there."""
        return self._series.pop(SeriesKey.of(series), None) is not None

    # -- state --------------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """Every series' state as JSON-able data, in a fixed order."""
        return {
            "v": ENGINE_STATE_VERSION,
            "settings": self.settings.fingerprint(),
            "series": [[key.to_plain(), self._series[key].to_plain()]
                       for key in sorted(self._series, key=_order)],
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Replace every series' state with ``export_state`` output. Refuses state saved
        under another interval (its hour-of-week slots would be wrong)."""
        if not isinstance(state, dict) or state.get("v") != ENGINE_STATE_VERSION:
            raise AnomalyError(f"unsupported engine state (want v={ENGINE_STATE_VERSION})")
        if state.get("settings") != self.settings.fingerprint():
            raise AnomalyError(f"state was saved under {state.get('settings')}, these "
                               f"settings are {self.settings.fingerprint()}")
        restored: dict[SeriesKey, SeriesDetector] = {}
        try:
            saved = [(SeriesKey.from_plain(k), plain) for k, plain in state["series"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise AnomalyError(f"bad saved engine state: {exc!r}") from None
        for key, plain in saved:
            params = self._params.get(key.meter) or self.settings.for_meter(key.meter)
            self._params[key.meter] = params
            if not params.enabled:
                continue
            detector = SeriesDetector(series=key, params=params)
            detector.load_plain(plain)
            restored[key] = detector
        self._series = restored

    @classmethod
    def from_state(cls, state: dict[str, Any],
                   settings: AnomalySettings | None = None) -> AnomalyEngine:
        engine = cls(settings)
        engine.restore_state(state)
        return engine


def _order(key: SeriesKey) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    return key.customer, key.meter, key.group
