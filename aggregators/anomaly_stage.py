"""The anomaly stage over the rollups topic, engine-agnostic: what `meterline anomalies`
(Faust, ``anomaly_faust.py``) and an embedded runner share.

It is the rollup worker's exactly-once protocol (``runner.py``) applied to a second log:

- **Input**: ``<usage topic>.rollups``, whose records hold chunks of window-total rows of
  one source partition (``outputs_io.KafkaOutputWriter``). Each partition of that topic
  has an ``AnomalyPartition``: a :class:`~meterline.core.anomaly.feed.RollupFeed` (one
  detector engine per source partition, final windows only) and ``next_offset``.
- **Deterministic replay.** What the feed emits depends only on the partition's records in
  log order: no wall clock, no fetch sizes. A partition folds only the record at exactly
  ``next_offset``; below it the record is in the state already (skipped), above it is a
  *gap* settled against the log (:meth:`AnomalyWorker.resolve_gap`, the rollup worker's
  rule: seek back, move past offsets the log confirms empty, or stop loudly).
- **Idempotent outputs.** Every event carries a deterministic key (``EpisodeEvent.key``:
  series, episode start, sequence), so writing it again after a crash - to the
  ``<topic>.anomalies`` topic (keyed by it) or to the ``anomalies`` table
  (ReplacingMergeTree on it) - shows it once to anyone who dedupes on the key.
- **The order inside** :meth:`AnomalyWorker.flush` **is the protocol**: 1. write the
  pending events (durable on return), 2. save the checkpoints (feed state + next offset,
  one blob per partition), 3. report the offsets that are safe to commit, 4. hand the
  written events to ``on_written`` (the webhook queue, metrics). A crash between any two
  steps re-reads records whose events may already be written; they come out identical.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from meterline.aggregators.checkpoints import CheckpointStore, checkpoint_key
from meterline.aggregators.runner import Gap, LogGapError, LogProbe, TopicPartition
from meterline.core.anomaly.errors import AnomalyError
from meterline.core.anomaly.feed import FeedSettings, RollupFeed
from meterline.core.anomaly.model import EVENT_KINDS, EpisodeEvent
from meterline.core.anomaly.settings import AnomalySettings
from meterline.core.outputs import RollupRecord, rollups_from_columns
from meterline.ingest.sources import SourceRecord
from meterline.logs import where
from meterline.sinks.rollup_arrow import decode_block, is_arrow_payload

__all__ = ["CHECKPOINT_FORMAT", "AnomalyCounters", "AnomalyPartition", "AnomalyWorker",
           "EventWriter", "MemoryEventWriter", "decode_rollup_rows"]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class EventWriter(Protocol):
    def write(self, events: Sequence[EpisodeEvent]) -> None:
        """Make ``events`` durable (a Kafka topic, the anomalies table, both)."""
        ...


class MemoryEventWriter:
    """Tests: every write kept, in order (duplicates included, as a topic would)."""

    def __init__(self) -> None:
        self.events: list[EpisodeEvent] = []
        self.fail = False

    def write(self, events: Sequence[EpisodeEvent]) -> None:
        if self.fail:
            raise RuntimeError("injected write failure")
        self.events.extend(events)


@dataclass(slots=True)
class AnomalyCounters:
    """Activity of this process (a replay counts again; the exact events are keyed)."""

    records: int = 0
    skipped_records: int = 0
    gap_records: int = 0
    absent_offsets: int = 0
    unreadable_records: int = 0  # not a rollups-topic record: logged, skipped, counted
    rows: int = 0
    stale_rows: int = 0
    daily_rows: int = 0
    windows_closed: int = 0
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_KINDS, 0))

    def add(self, other: AnomalyCounters) -> None:
        for name in ("records", "skipped_records", "gap_records", "absent_offsets",
                     "unreadable_records", "rows", "stale_rows", "daily_rows",
                     "windows_closed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for kind, n in other.events.items():
            self.events[kind] = self.events.get(kind, 0) + n


def decode_rollup_rows(payload: bytes) -> list[RollupRecord]:
    """A rollups-topic record -> its rows. Raises ValueError on anything else."""
    if is_arrow_payload(payload):  # the worker's block form (sinks/rollup_arrow.py)
        return decode_block(payload).records()
    try:
        doc = orjson.loads(payload)
        rows = [RollupRecord.from_dict(d) for d in doc.get("rollups", ())]
        if "rollup_columns" in doc:  # JSON blocks of sessions 20-21 (core/outputs.py)
            rows += rollups_from_columns(doc["rollup_columns"])
        return rows
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a rollups record: {exc}") from None


class AnomalyPartition:
    """One partition of the rollups topic: records in, episode events and checkpoints out."""

    def __init__(self, tp: TopicPartition, feed: RollupFeed, *, next_offset: int = 0,
                 restored: bool = False) -> None:
        self.tp = tp
        self.feed = feed
        self.next_offset = next_offset
        self.restored = restored
        self.counters = AnomalyCounters()
        self._pending: list[EpisodeEvent] = []

    @property
    def fresh(self) -> bool:
        return not self.restored and self.next_offset == 0

    def process(self, record: SourceRecord) -> bool:
        """Fold one record; ``False`` when it lies past a gap and was not folded. Bad
        records are logged and counted, never raised: the stage must not stall on one."""
        if record.offset != self.next_offset:
            if record.offset < self.next_offset:
                self.counters.skipped_records += 1
                return True
            self.counters.gap_records += 1
            return False
        self.counters.records += 1
        try:
            rows = decode_rollup_rows(record.payload)
            result = self.feed.apply(rows)
        except (ValueError, AnomalyError) as exc:
            # Only Meterline writes this topic: one unreadable record is a bug to look at
            # (it stays in the topic at this offset), not a reason to stop detecting.
            self.counters.unreadable_records += 1
            log.error("%s[%d]@%d: unreadable rollups record skipped: %s", record.topic,
                      record.partition, record.offset, exc,
                      extra=where(record.topic, record.partition, record.offset))
        else:
            c = self.counters
            c.rows += result.rows
            c.stale_rows += result.stale
            c.daily_rows += result.ignored
            c.windows_closed += result.windows_closed
            for event in result.events:
                c.events[event.kind] = c.events.get(event.kind, 0) + 1
            self._pending += result.events
        self.next_offset = record.offset + 1
        return True

    def skip_to(self, offset: int) -> None:
        if offset < self.next_offset:
            raise ValueError(f"skip_to({offset}) behind next_offset {self.next_offset}")
        self.counters.absent_offsets += offset - self.next_offset
        self.next_offset = offset

    def take_events(self) -> list[EpisodeEvent]:
        out, self._pending = self._pending, []
        return out

    def put_back(self, events: list[EpisodeEvent]) -> None:
        self._pending = events + self._pending

    @property
    def pending(self) -> int:
        return len(self._pending)

    def checkpoint(self) -> bytes:
        if self._pending:
            raise RuntimeError("checkpoint() with unwritten events; take_events() first")
        doc = {"format": CHECKPOINT_FORMAT, "topic": self.tp.topic,
               "partition": self.tp.partition, "next_offset": self.next_offset,
               "feed": self.feed.export_state()}
        return zlib.compress(orjson.dumps(doc), 1)

    @classmethod
    def from_checkpoint(cls, blob: bytes, settings: AnomalySettings,
                        feed_settings: FeedSettings) -> AnomalyPartition:
        doc = json.loads(zlib.decompress(blob))
        if doc.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown anomaly checkpoint format {doc.get('format')!r}")
        feed = RollupFeed.from_state(doc["feed"], settings, feed_settings)
        return cls(TopicPartition(doc["topic"], doc["partition"]), feed,
                   next_offset=doc["next_offset"], restored=True)


class AnomalyWorker:
    """The rollups-topic partitions one process owns (see the module docstring)."""

    def __init__(self, settings: AnomalySettings, feed_settings: FeedSettings,
                 writer: EventWriter, store: CheckpointStore, *, group: str,
                 probe: LogProbe | None = None, flush_interval_s: float = 1.0,
                 checkpoint_interval_s: float = 30.0,
                 on_written: Callable[[list[EpisodeEvent]], None] | None = None) -> None:
        RollupFeed(settings, feed_settings)  # validate now: every error at once
        self.settings = settings
        self.feed_settings = feed_settings
        self.writer = writer
        self.store = store
        self.group = group
        self.probe = probe
        self.flush_interval_s = flush_interval_s
        self.checkpoint_interval_s = checkpoint_interval_s
        self.on_written = on_written
        self.processors: dict[TopicPartition, AnomalyPartition] = {}
        self.counters = AnomalyCounters()  # of partitions no longer owned
        self.flushes = 0
        self.checkpoints = 0
        self._saved: dict[TopicPartition, int] = {}
        self._held: dict[TopicPartition, tuple[int, int]] = {}
        self._last_flush = self._last_checkpoint = time.monotonic()
        # Open episodes by (meter, direction, severity) per partition, refreshed at each
        # checkpoint on the processing thread; the metrics scrape reads this copy.
        self.open_counts: dict[TopicPartition, dict[tuple[str, str, str], int]] = {}

    def _key(self, tp: TopicPartition) -> str:
        return checkpoint_key(self.group, tp.topic, tp.partition)

    # ------------------------------------------------------------------ ownership

    def assign(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        new = [tp for tp in partitions if tp not in self.processors]
        blobs: dict[str, bytes] = {}
        for topic in sorted({tp.topic for tp in new}):
            blobs.update(self.store.load_prefixed(checkpoint_key(self.group, topic, "")))
        made: dict[TopicPartition, AnomalyPartition] = {}
        for tp in new:
            blob = blobs.get(self._key(tp))
            if blob is None:
                made[tp] = AnomalyPartition(tp, RollupFeed(self.settings, self.feed_settings))
            else:
                made[tp] = AnomalyPartition.from_checkpoint(blob, self.settings,
                                                            self.feed_settings)
        positions: dict[TopicPartition, int | None] = {}
        for tp, proc in made.items():
            positions[tp] = proc.next_offset if proc.restored else None
            if proc.restored:
                self._saved[tp] = proc.next_offset
            self.processors[tp] = proc
            self.open_counts[tp] = proc.feed.open_counts()
            log.info("anomalies: assigned %s[%d], resuming at %s", tp.topic, tp.partition,
                     positions[tp])
        return positions

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            proc = self.processors.pop(tp, None)
            if proc is not None:
                self.counters.add(proc.counters)
            self._saved.pop(tp, None)
            self._held.pop(tp, None)
            self.open_counts.pop(tp, None)

    def owns(self, record: SourceRecord) -> bool:
        return TopicPartition(record.topic, record.partition) in self.processors

    # ------------------------------------------------------------------ records

    def process(self, record: SourceRecord) -> Gap | None:
        tp = TopicPartition(record.topic, record.partition)
        proc = self.processors.get(tp)
        if proc is None or proc.process(record):
            return None
        return Gap(tp, proc.next_offset, record.offset)

    def resolve_gap(self, gap: Gap) -> int | None:
        """The rollup worker's rule (``RollupWorker.resolve_gap``): the offset to seek
        back to, ``None`` when the log holds nothing in between (moved past it: process
        the record again), or :class:`LogGapError` when rows that must be read are gone."""
        if self.probe is None:
            raise LogGapError(f"{gap.tp.topic}[{gap.tp.partition}]: record at {gap.offset} "
                              f"but the state expects {gap.expected}, and no log probe")
        proc = self.processors.get(gap.tp)
        if proc is None or proc.next_offset != gap.expected:
            return None
        tp, name = gap.tp, f"{gap.tp.topic}[{gap.tp.partition}]"
        start = self.probe.log_start(tp)
        if proc.next_offset < start:
            committed = self.probe.committed(self.group, tp) if proc.fresh else None
            if not proc.fresh or committed:
                raise LogGapError(
                    f"{name}: the anomaly state resumes at offset {proc.next_offset} but the "
                    f"log now starts at {start}: rollup rows [{proc.next_offset}, {start}) "
                    f"are gone (retention) and episodes there would be wrong. Raise the "
                    f"rollups topic's retention, or delete this partition's anomaly "
                    f"checkpoint and the group's offsets to start it afresh.")
            proc.skip_to(start)
            return None if gap.offset == start else start
        hint = self._held.get(tp)
        if hint is not None and hint[0] == proc.next_offset and hint[1] < gap.offset:
            return proc.next_offset
        first = self.probe.first_offset(tp, proc.next_offset)
        if first is not None:
            self._held[tp] = (proc.next_offset, first)
        if first is not None and first == gap.offset:
            log.info("%s: offsets [%d, %d) hold no records; moving past them", name,
                     proc.next_offset, gap.offset)
            proc.skip_to(gap.offset)
            return None
        log.info("%s: record at %d while expecting %d; seeking back", name, gap.offset,
                 proc.next_offset)
        return proc.next_offset

    # ------------------------------------------------------------------ flushing

    def due(self, now: float | None = None) -> tuple[bool, bool]:
        now = time.monotonic() if now is None else now
        return (now - self._last_flush >= self.flush_interval_s,
                now - self._last_checkpoint >= self.checkpoint_interval_s)

    def flush(self, *, checkpoint: bool,
              only: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Write pending events; with ``checkpoint``, save checkpoints and return the
        offsets that are now safe to commit. Then hand the written events on."""
        tps = sorted(self.processors if only is None else only)
        parts = {tp: self.processors[tp].take_events() for tp in tps}
        events = [e for tp in tps for e in parts[tp]]
        if events:
            try:
                self.writer.write(events)
            except BaseException:
                for tp, part in parts.items():
                    self.processors[tp].put_back(part)
                raise
        self.flushes += 1
        self._last_flush = time.monotonic()
        if events and self.on_written is not None:
            try:
                self.on_written(events)
            except Exception:  # alerting must never stop detection
                log.exception("anomalies: on_written hook failed")
        if not checkpoint:
            return {}
        changed = [tp for tp in tps if self._saved.get(tp) != self.processors[tp].next_offset]
        if changed:
            self.store.save({self._key(tp): self.processors[tp].checkpoint() for tp in changed})
            for tp in changed:
                self._saved[tp] = self.processors[tp].next_offset
                self.open_counts[tp] = self.processors[tp].feed.open_counts()
        self.checkpoints += 1
        self._last_checkpoint = time.monotonic()
        return {tp: self.processors[tp].next_offset for tp in tps}

    def checkpoint_age_s(self, now: float) -> float:
        return now - self._last_checkpoint

    def totals(self) -> AnomalyCounters:
        total = AnomalyCounters()
        total.add(self.counters)
        for proc in list(self.processors.values()):
            total.add(proc.counters)
        return total

    def open_totals(self) -> dict[tuple[str, str, str], int]:
        out: dict[tuple[str, str, str], int] = {}
        for counts in list(self.open_counts.values()):
            for label, n in counts.items():
                out[label] = out.get(label, 0) + n
        return out
