"""The anomaly detectors inside the embedded rollup runner (``meterline rollup-local``).

With Kafka the detectors are their own stage (``meterline anomalies``) reading
``<topic>.rollups``. The embedded runner has no rollups topic: its flushes go straight into
storage. So the stage rides on the flushes themselves, by wrapping the two seams of
``RollupWorker`` (no change to the worker):

- :class:`FeedingWriter` wraps the ``OutputWriter``: after the rollup rows of a flush are
  written, they go through the same :class:`~meterline.core.anomaly.feed.RollupFeed` as the
  Kafka stage (one per local-log partition: final windows only, latest version wins) and
  the episode events that come out are written with ``sinks.anomalies.write_events``
  before ``write`` returns.
- :class:`CheckpointingStore` wraps the ``CheckpointStore``: every save of rollup
  checkpoints carries the detectors' state in the *same* save (one SQLite transaction).

Why that is exact under kill -9: ``RollupWorker.flush`` writes, then saves. So a saved
rollup checkpoint and the feed state saved with it cover exactly the same rollup rows,
and every event those rows produced is already in the ``anomalies`` table. A crash rolls
both back to that checkpoint; the restart re-derives the rows after it from the log and
the feed turns them into the same episode events with the same keys (episodes depend only
on the *final* window totals, fed in window order, never on how rows were batched into
flushes), which the table (ReplacingMergeTree on the key) keeps once. Early warnings
depend on the partial totals a flush happened to see, so a replay may raise one that the
first run did not (or the reverse); their key (series, window, ``early``) keeps them at
most one per series and window.

Checkpoint deltas: a partition's detector state (~1.6 KB a series) changes only when a
window closes, about once an hour; what changes with every row is small (rows of windows
not final yet, two clocks). They are saved under two keys, and the detector state is
rewritten only when a window closed since the last save. A partition with nothing new is
not written at all.

A saved state is used only if it belongs to the rollup checkpoint it is restored with
(same ``next_offset``): state left from a run with the detectors switched off, or from
other detector settings, would score the gap as silence; the partition's detectors then
start afresh (a week of warm-up) and say so in the log.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson

from meterline.aggregators.anomaly_stage import AnomalyCounters, EventWriter
from meterline.aggregators.checkpoints import CheckpointStore, checkpoint_key
from meterline.aggregators.runner import OutputWriter
from meterline.core.anomaly.errors import AnomalyError
from meterline.core.anomaly.feed import FeedSettings, RollupFeed
from meterline.core.anomaly.model import EpisodeEvent
from meterline.core.anomaly.settings import AnomalySettings
from meterline.core.outputs import Flush, RollupRecord

__all__ = ["EMBEDDED_FORMAT", "CheckpointingStore", "EmbeddedAnomalies", "FeedingWriter",
           "StorageEventWriter", "anomaly_group"]

log = logging.getLogger(__name__)

EMBEDDED_FORMAT = 1
ENGINE_SUFFIX = "/engine"


def anomaly_group(rollup_group: str) -> str:
    """The checkpoint group of the detectors riding on ``rollup_group``. Not a prefix of
    the rollup keys (``<group>/<topic>/...``), so neither side ever loads the other's."""
    return f"{rollup_group}.anomalies"


class StorageEventWriter:
    """Episode events into the ``anomalies`` table of ``storage``."""

    def __init__(self, storage: Any, database: str | None = None) -> None:
        self.storage = storage
        self.database = database

    def write(self, events: Sequence[EpisodeEvent]) -> None:
        from meterline.sinks.anomalies import write_events

        write_events(self.storage, events, database=self.database)


def _pack(doc: Any) -> bytes:
    return zlib.compress(orjson.dumps(doc), 1)


def _unpack(blob: bytes) -> Any:
    return orjson.loads(zlib.decompress(blob))


class EmbeddedAnomalies:
    """One :class:`RollupFeed` per local-log partition, its events written by ``writer``,
    its state saved beside the rollup checkpoints (see the module docstring)."""

    def __init__(self, writer: EventWriter, settings: AnomalySettings | None = None,
                 feed_settings: FeedSettings | None = None, *, group: str,
                 topic: str,
                 on_written: Callable[[list[EpisodeEvent]], None] | None = None) -> None:
        self.settings = settings or AnomalySettings()
        self.feed_settings = feed_settings or FeedSettings()
        RollupFeed(self.settings, self.feed_settings)  # validate now: every error at once
        self.writer = writer
        self.group = anomaly_group(group)
        self.topic = topic
        self.feeds: dict[int, RollupFeed] = {}
        self.counters = AnomalyCounters()
        self.restored: dict[int, bool] = {}  # partition -> its saved state was used
        self._rows_since_save: set[int] = set()
        self._engine_dirty: set[int] = set()
        self._engine_saved: set[int] = set()  # partitions whose detector state is saved
        self._saved_offsets: dict[int, int] = {}  # rollup next_offset of the last save
        self.saves = 0
        self.bytes_saved = 0
        # Events written but not yet covered by a saved checkpoint: handed to
        # ``on_written`` (the webhook) after the save, as the Kafka stage does after its
        # commit. A crash before that replays them (same keys) and hands them on then.
        self.on_written = on_written
        self._unannounced: list[EpisodeEvent] = []

    def _key(self, partition: int) -> str:
        return checkpoint_key(self.group, self.topic, partition)

    def _feed(self, partition: int) -> RollupFeed:
        feed = self.feeds.get(partition)
        if feed is None:
            feed = self.feeds[partition] = RollupFeed(self.settings, self.feed_settings)
        return feed

    # ------------------------------------------------------------------ restore

    def restore(self, store: CheckpointStore, rollup_offsets: Mapping[int, int | None]) -> None:
        """Load the saved state of every partition whose rollup checkpoint was restored at
        the same ``next_offset`` (``rollup_offsets``: partition -> restored offset, None
        without a checkpoint); every other partition starts afresh."""
        blobs = store.load_prefixed(checkpoint_key(self.group, self.topic, ""))
        for partition, offset in sorted(rollup_offsets.items()):
            self.restored[partition] = False
            self._saved_offsets[partition] = -1
            blob = blobs.get(self._key(partition))
            if offset is None or blob is None:
                if blob is not None:
                    log.warning("anomalies: %s[%d] has detector state but no rollup "
                                "checkpoint; the detectors start afresh", self.topic, partition)
                continue
            try:
                doc = _unpack(blob)
                if doc.get("format") != EMBEDDED_FORMAT:
                    raise AnomalyError(f"unknown format {doc.get('format')!r}")
                if doc["rollup_next_offset"] != offset:
                    raise AnomalyError(
                        f"it was saved with the rollups at offset {doc['rollup_next_offset']}, "
                        f"they resume at {offset} (were the detectors switched off?)")
                engines = {}
                engine_blob = blobs.get(self._key(partition) + ENGINE_SUFFIX)
                if engine_blob is not None:
                    engines = {(str(s), int(p)): state for s, p, state in _unpack(engine_blob)}
                feed = RollupFeed.from_state(doc["feed"], self.settings, self.feed_settings,
                                             engines=engines)
            except (AnomalyError, ValueError, KeyError, TypeError, zlib.error) as exc:
                log.warning("anomalies: saved detector state of %s[%d] not used, the "
                            "detectors start afresh (a week of warm-up): %s", self.topic,
                            partition, exc)
                continue
            self.feeds[partition] = feed
            self.restored[partition] = True
            self._engine_saved.add(partition)
            self._saved_offsets[partition] = offset

    # ------------------------------------------------------------------ rows

    def apply(self, rows: Iterable[RollupRecord]) -> list[EpisodeEvent]:
        """The rows of one flush -> episode events (and early warnings), partitions in
        order. Rows of a partition the feed cannot take are logged and counted, never
        raised: detection must not stop the billing totals."""
        by_partition: dict[int, list[RollupRecord]] = {}
        for row in rows:
            by_partition.setdefault(row.partition, []).append(row)
        events: list[EpisodeEvent] = []
        c = self.counters
        for partition in sorted(by_partition):
            part = by_partition[partition]
            self._rows_since_save.add(partition)
            feed = self._feed(partition)
            sources = len(feed.sources)
            try:
                result = feed.apply(part)
            except AnomalyError as exc:
                c.unreadable_records += 1
                log.error("anomalies: %d rollup rows of %s[%d] not scored: %s", len(part),
                          self.topic, partition, exc)
                continue
            c.rows += result.rows
            c.stale_rows += result.stale
            c.daily_rows += result.ignored
            c.windows_closed += result.windows_closed
            if result.windows_closed or len(feed.sources) != sources:
                self._engine_dirty.add(partition)
            for event in result.events:
                c.events[event.kind] = c.events.get(event.kind, 0) + 1
            events += result.events
        return events

    def write(self, rows: Iterable[RollupRecord]) -> list[EpisodeEvent]:
        """:meth:`apply`, then make the events durable (raises if the write fails: the
        runner must then restart from its checkpoint, which re-derives them)."""
        events = self.apply(rows)
        if events:
            self.writer.write(events)
            if self.on_written is not None:
                self._unannounced += events
        return events

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_blobs(self, rollup_offsets: Mapping[int, int]) -> dict[str, bytes]:
        """What must be saved with rollup checkpoints at ``rollup_offsets`` (partition ->
        next_offset): the small part of every partition that took rows or moved, the
        detector state only of partitions where a window closed."""
        blobs: dict[str, bytes] = {}
        for partition, offset in sorted(rollup_offsets.items()):
            if (partition not in self._rows_since_save
                    and self._saved_offsets.get(partition) == offset):
                continue
            feed = self._feed(partition)
            blobs[self._key(partition)] = _pack({
                "format": EMBEDDED_FORMAT, "rollup_next_offset": offset,
                "feed": feed.export_state(engines=False)})
            if partition in self._engine_dirty or partition not in self._engine_saved:
                blobs[self._key(partition) + ENGINE_SUFFIX] = _pack(
                    [[s, p, feed.export_engine(s, p)] for s, p in feed.sources])
        return blobs

    def saved(self, rollup_offsets: Mapping[int, int], blobs: Mapping[str, bytes]) -> None:
        """``checkpoint_blobs(rollup_offsets)`` is durable."""
        for partition, offset in rollup_offsets.items():
            if self._key(partition) in blobs:
                self._saved_offsets[partition] = offset
                self._rows_since_save.discard(partition)
            if self._key(partition) + ENGINE_SUFFIX in blobs:
                self._engine_dirty.discard(partition)
                self._engine_saved.add(partition)
        self.saves += 1
        self.bytes_saved += sum(len(b) for b in blobs.values())
        events, self._unannounced = self._unannounced, []
        if events and self.on_written is not None:
            try:
                self.on_written(events)
            except Exception:  # alerting must never stop detection, nor the rollups
                log.exception("anomalies: on_written hook failed")

    @property
    def detector_state_changed(self) -> bool:
        """A window closed (detector state changed) since the last save."""
        return bool(self._engine_dirty)

    def open_counts(self) -> dict[tuple[str, str, str], int]:
        out: dict[tuple[str, str, str], int] = {}
        for feed in self.feeds.values():
            for label, n in feed.open_counts().items():
                out[label] = out.get(label, 0) + n
        return out

    def series_count(self) -> int:
        return sum(f.series_count() for f in self.feeds.values())


class FeedingWriter:
    """An ``OutputWriter``: the rollup rows first, then the anomaly events they produce."""

    def __init__(self, inner: OutputWriter, anomalies: EmbeddedAnomalies) -> None:
        self.inner = inner
        self.anomalies = anomalies

    def write(self, flush: Flush) -> None:
        self.inner.write(flush)
        rows = flush.rollup_rows()
        if rows:
            self.anomalies.write(rows)


class CheckpointingStore:
    """A ``CheckpointStore`` whose every save also carries the detectors' state.

    ``rollup_offsets()`` says where each partition's rollup state stands at save time
    (the worker saves only after processing, so that is what its blobs record)."""

    def __init__(self, inner: CheckpointStore, anomalies: EmbeddedAnomalies,
                 rollup_offsets: Callable[[], Mapping[int, int]]) -> None:
        self.inner = inner
        self.anomalies = anomalies
        self.rollup_offsets = rollup_offsets

    def load(self, keys: Iterable[str]) -> dict[str, bytes]:
        return self.inner.load(keys)

    def load_prefixed(self, prefix: str) -> dict[str, bytes]:
        return self.inner.load_prefixed(prefix)

    def save(self, blobs: Mapping[str, bytes | None]) -> None:
        offsets = dict(self.rollup_offsets())
        extra = self.anomalies.checkpoint_blobs(offsets)
        self.inner.save({**blobs, **extra})
        self.anomalies.saved(offsets, extra)

    def close(self) -> None:
        self.inner.close()
