"""Hourly rollup rows in, episode events out: what the anomaly stage runs per partition.

The rollup stage writes window *totals* with a ``version`` (events folded so far), often
several times per window while it fills, again after a crash (replays), and late events
may still change a window for ``allowed_lateness_ms`` after it ended. The detectors want
each window once, final, in order. ``RollupFeed`` turns the first into the second,
deterministically from the rows alone, so a replay of the same rows gives the same events:

- **One ``AnomalyEngine`` per source partition** (``source``, ``partition`` of the rows).
  The rollup stage closes windows per source partition on that partition's watermark, and
  a series lives in one source partition (customers are routed by the SDK), so a slow
  partition never makes another's windows look silent.
- **Latest version wins.** Per (series, window) the row with the highest ``version`` is
  kept until the window is final; lower versions (replays, reordered rows) are ignored.
- **A window is final when the rollup stage can no longer change it**: the rollup closes
  ``[start, end)`` once ``end + allowed_lateness <= watermark`` and the watermark is the
  partition's newest event time minus ``watermark_delay``. A row for a window starting at
  ``S`` proves an event at or after ``S``, so every window with ``end + allowed_lateness +
  watermark_delay <= S`` is final. Those are fed in window order, series in a fixed order,
  and then ``advance`` feeds zeros to the partition's series that had no row (silence is
  noticed when the window is final, not at the series' next row). The settings must be
  the rollup stage's: a smaller lateness here would score windows before they are final.
- A row for a window already fed is counted as ``stale`` and ignored (it can only be a
  replay or a write that reached the topic after a later one; the totals used are the
  rollup's final ones).
- **Early warnings.** A window that is not final yet but already holds more than the
  whole window should (``SeriesDetector.peek_partial``) gives one ``kind="early"`` event
  per series and window, unless an upward episode is open already. It does not touch the
  detector: episodes stay exactly what the final totals give.

Deterministic and bounded: state is the engines, the rows of windows not final yet (a few
hours per series) and two watermarks per source partition; ``export_state`` /
``from_state`` round-trip through JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meterline.core.anomaly.engine import AnomalyEngine
from meterline.core.anomaly.errors import AnomalyError
from meterline.core.anomaly.model import EARLY, EpisodeEvent, SeriesKey
from meterline.core.anomaly.settings import AnomalySettings
from meterline.core.errors import ConfigError
from meterline.core.lateness import DEFAULT_ALLOWED_LATENESS_MS, DEFAULT_WATERMARK_DELAY_MS
from meterline.core.outputs import RollupRecord
from meterline.core.windows import HOUR_MS

__all__ = ["FeedResult", "FeedSettings", "RollupFeed"]

FEED_STATE_VERSION = 1
NANOS = 10**9
_NONE = -(2**63)


@dataclass(frozen=True)
class FeedSettings:
    """How the feed decides a window is final: the rollup stage's own lateness settings
    (``[rollups]`` in the config), plus whether to raise early warnings."""

    allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS
    watermark_delay_ms: int = DEFAULT_WATERMARK_DELAY_MS
    early_warning: bool = True

    def errors(self) -> list[str]:
        out = []
        for name in ("allowed_lateness_ms", "watermark_delay_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                out.append(f"{name} must be an int >= 0 (milliseconds), got {value!r}")
        if not isinstance(self.early_warning, bool):
            out.append(f"early_warning must be true or false, got {self.early_warning!r}")
        return out

    @property
    def settle_ms(self) -> int:
        """How far past a window's end the newest window start must be for it to be final."""
        return self.allowed_lateness_ms + self.watermark_delay_ms


@dataclass(slots=True)
class FeedResult:
    """What one ``apply`` produced, in a deterministic order."""

    events: list[EpisodeEvent] = field(default_factory=list)  # episodes and early warnings
    rows: int = 0  # hourly rows taken (pending or replacing a lower version)
    stale: int = 0  # hourly rows for windows already final
    ignored: int = 0  # daily rows (the detectors run on hours)
    windows_closed: int = 0  # (source partition, window) pairs fed to the detectors


class _SourceFeed:
    """One source partition: its engine, the rows of windows not final yet, its clock."""

    __slots__ = ("closed_before_ms", "engine", "max_start_ms", "pending", "warned")

    def __init__(self, engine: AnomalyEngine) -> None:
        self.engine = engine
        self.max_start_ms = _NONE  # newest hourly window start seen
        self.closed_before_ms = _NONE  # every window starting before this has been fed
        # window start -> series -> (version, value_nanos), for windows not final yet
        self.pending: dict[int, dict[SeriesKey, tuple[int, int]]] = {}
        self.warned: set[tuple[SeriesKey, int]] = set()  # early warnings already raised


def _order(key: SeriesKey) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    return key.customer, key.meter, key.group


class RollupFeed:
    """The anomaly detectors over the hourly rollup rows of any number of source
    partitions. Not thread-safe."""

    def __init__(self, settings: AnomalySettings | None = None,
                 feed: FeedSettings | None = None) -> None:
        self.settings = settings or AnomalySettings()
        self.feed = feed or FeedSettings()
        errors = self.settings.errors() + self.feed.errors()
        if self.settings.interval_ms != HOUR_MS:
            errors.append(f"interval_ms must be {HOUR_MS} (the rollups are hourly), "
                          f"got {self.settings.interval_ms!r}")
        if errors:
            raise ConfigError(errors, "anomaly stage settings")
        self._sources: dict[tuple[str, int], _SourceFeed] = {}

    def _source(self, source: str, partition: int) -> _SourceFeed:
        found = self._sources.get((source, partition))
        if found is None:
            found = self._sources[(source, partition)] = _SourceFeed(
                AnomalyEngine(self.settings))
        return found

    @property
    def sources(self) -> list[tuple[str, int]]:
        return sorted(self._sources)

    def engine(self, source: str, partition: int) -> AnomalyEngine | None:
        found = self._sources.get((source, partition))
        return None if found is None else found.engine

    def series_count(self) -> int:
        return sum(len(s.engine) for s in self._sources.values())

    def pending_rows(self) -> int:
        return sum(len(rows) for s in self._sources.values() for rows in s.pending.values())

    def open_counts(self) -> dict[tuple[str, str, str], int]:
        """Open episodes by (meter, direction, severity) over every source partition."""
        out: dict[tuple[str, str, str], int] = {}
        for src in self._sources.values():
            for label, n in src.engine.open_counts().items():
                out[label] = out.get(label, 0) + n
        return out

    # -- rows ---------------------------------------------------------------------------

    def apply(self, rows: Iterable[RollupRecord]) -> FeedResult:
        """Take one batch of rows (one Kafka record of the rollups topic): remember the
        newest version per (series, window), then feed every window that became final
        and raise early warnings for the windows these rows changed."""
        result = FeedResult()
        early = self.feed.early_warning
        # Source partitions with rows that changed a pending window, and (for the early
        # warnings) which (series, window) pairs they changed.
        touched: dict[tuple[str, int], set[tuple[SeriesKey, int]]] = {}
        # The hot loop of the stage (several rows per series and window): the source, its
        # window dict and the touched set are looked up again only when they change (rows
        # come grouped), and keys are built without SeriesKey.__new__'s Python frame.
        make_key = tuple.__new__
        src: _SourceFeed | None = None
        src_name: tuple[str, int] | None = None
        windows: dict[SeriesKey, tuple[int, int]] = {}
        windows_start = _NONE
        changed: set[tuple[SeriesKey, int]] = set()
        rows_seen = 0
        for row in rows:
            if row.window != "hourly":
                result.ignored += 1
                continue
            start = row.window_start_ms
            if type(start) is not int or start % HOUR_MS:
                raise AnomalyError(f"hourly row with window_start_ms {start!r} off the hour")
            if (src is None or row.partition != src_name[1]  # type: ignore[index]
                    or row.source != src_name[0]):  # type: ignore[index]
                src_name = (row.source, row.partition)
                src = self._source(row.source, row.partition)
                windows_start = _NONE
            if start < src.closed_before_ms:
                result.stale += 1
                continue
            series: SeriesKey = make_key(SeriesKey, (row.customer, row.meter, row.group))
            if start != windows_start:
                windows = src.pending.setdefault(start, {})
                windows_start = start
            held = windows.get(series)
            if held is None or row.version > held[0]:
                windows[series] = (row.version, row.value_nanos)
                if src_name not in touched:
                    touched[src_name] = set()  # type: ignore[index]
                if early:
                    changed = touched[src_name]  # type: ignore[index]
                    changed.add((series, start))
            rows_seen += 1
            if start > src.max_start_ms:
                src.max_start_ms = start
        result.rows = rows_seen
        for name in sorted(touched):
            src = self._sources[name]
            self._close(src, result)
            if early:
                self._early(src, touched[name], result)
        return result

    def _close(self, src: _SourceFeed, result: FeedResult) -> None:
        """Feed every window that is final now, oldest first."""
        if src.max_start_ms == _NONE:
            return
        limit = src.max_start_ms - self.feed.settle_ms  # windows ending at or before it
        close_before = limit - limit % HOUR_MS  # floor to the hour
        start = src.closed_before_ms
        if start == _NONE:
            if not src.pending:
                return
            start = min(src.pending)
        if close_before <= start:
            return
        engine = src.engine
        events = result.events
        w = start
        while w < close_before:
            rows = src.pending.pop(w, None)
            if rows is None and not len(engine):
                # Nothing known in this partition yet: jump to the next window with rows.
                later = [s for s in src.pending if s < close_before]
                if not later:
                    break
                w = min(later)
                continue
            if rows:
                # A SeriesKey sorts as (customer, meter, group), the fixed order; keys are
                # unique, so the held (version, value) is never compared.
                observe = engine.observe
                for series, held in sorted(rows.items()):
                    found = observe(series, w, held[1] / NANOS)
                    if found:
                        events += found
            events += engine.advance(w)
            result.windows_closed += 1
            w += HOUR_MS
        src.closed_before_ms = close_before
        if src.warned:
            src.warned = {sw for sw in src.warned if sw[1] >= close_before}

    def _early(self, src: _SourceFeed, touched: set[tuple[SeriesKey, int]],
               result: FeedResult) -> None:
        # Peeking changes nothing, so the (rare) warnings are put in order afterwards
        # instead of sorting every touched row first: the same events, the same order.
        found = []
        existing = src.engine.existing
        for series, start in touched:
            if start < src.closed_before_ms or (series, start) in src.warned:
                continue
            detector = existing(series)
            if detector is None:
                continue
            episode = detector.open_episode
            if episode is not None and episode[0] == "up":
                continue  # already alerting about exactly this
            held = src.pending[start][series]
            anomaly = detector.peek_partial(start, held[1] / NANOS)
            if anomaly is not None:
                found.append((start, _order(series), series, anomaly))
        for start, _, series, anomaly in sorted(found, key=lambda f: (f[0], f[1])):
            src.warned.add((series, start))
            result.events.append(EpisodeEvent(EARLY, series, start, -1, start, anomaly,
                                              0))

    # -- state --------------------------------------------------------------------------

    def export_state(self, *, engines: bool = True) -> dict[str, Any]:
        """Everything as JSON-able data, in a fixed order.

        ``engines=False`` leaves each source's detector state out (``None`` in its place):
        that state changes only when a window closes (hourly), the rest (pending rows,
        clocks) with every row, so a checkpoint can save the two apart and rewrite the big
        part only when it changed (:meth:`export_engine`, ``restore_state(engines=)``)."""
        sources = []
        for name in sorted(self._sources):
            src = self._sources[name]
            pending = [[w, [[s.to_plain(), v, _json_int(n)] for s, (v, n) in
                            sorted(src.pending[w].items(), key=lambda kv: _order(kv[0]))]]
                       for w in sorted(src.pending)]
            warned = [[s.to_plain(), w] for s, w in
                      sorted(src.warned, key=lambda sw: (sw[1], _order(sw[0])))]
            sources.append([name[0], name[1], src.max_start_ms, src.closed_before_ms,
                            src.engine.export_state() if engines else None, pending, warned])
        return {"v": FEED_STATE_VERSION, "sources": sources}

    def export_engine(self, source: str, partition: int) -> dict[str, Any] | None:
        """One source's detector state (what ``export_state(engines=False)`` leaves out)."""
        found = self._sources.get((source, partition))
        return None if found is None else found.engine.export_state()

    def restore_state(self, state: dict[str, Any],
                      engines: Mapping[tuple[str, int], dict[str, Any]] | None = None
                      ) -> None:
        """Replace everything with ``export_state`` output; a source saved without its
        engine takes it from ``engines[(source, partition)]``."""
        if not isinstance(state, dict) or state.get("v") != FEED_STATE_VERSION:
            raise AnomalyError(f"unsupported feed state (want v={FEED_STATE_VERSION})")
        restored: dict[tuple[str, int], _SourceFeed] = {}
        try:
            for source, partition, max_start, closed, engine, pending, warned in \
                    state["sources"]:
                if engine is None:
                    engine = (engines or {}).get((str(source), int(partition)))
                    if engine is None:
                        raise AnomalyError(f"feed state of {source}[{partition}] was saved "
                                           f"without its engine and none was given")
                src = _SourceFeed(AnomalyEngine.from_state(engine, self.settings))
                src.max_start_ms = int(max_start)
                src.closed_before_ms = int(closed)
                src.pending = {int(w): {SeriesKey.from_plain(s): (int(v), int(n))
                                        for s, v, n in rows} for w, rows in pending}
                src.warned = {(SeriesKey.from_plain(s), int(w)) for s, w in warned}
                restored[(str(source), int(partition))] = src
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, AnomalyError):
                raise
            raise AnomalyError(f"bad saved feed state: {exc!r}") from None
        self._sources = restored

    @classmethod
    def from_state(cls, state: dict[str, Any], settings: AnomalySettings | None = None,
                   feed: FeedSettings | None = None, *,
                   engines: Mapping[tuple[str, int], dict[str, Any]] | None = None
                   ) -> RollupFeed:
        out = cls(settings, feed)
        out.restore_state(state, engines)
        return out


_INT64 = 1 << 63


def _json_int(value: int) -> int | str:
    """A window total for JSON state: exact totals reach 10^38 nano-units (Decimal(38, 9)),
    beyond the 64-bit integers JSON encoders (orjson) take, so those go as decimal text;
    ``restore_state`` reads either with ``int()``."""
    return value if -_INT64 <= value < _INT64 else str(value)
