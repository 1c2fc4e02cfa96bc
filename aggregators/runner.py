"""The rollup stage over whichever partitions this process owns, engine-agnostic.

``RollupWorker`` is what the Faust agent and the embedded runner share: they tell it which
partitions they got and hand it records; it tells them where to start reading and which
offsets are safe to commit. The order inside :meth:`RollupWorker.flush` is the protocol:

1. take every processor's pending outputs and **write** them (durable on return);
2. **checkpoint** the processors (state + next offset, one blob each) and save them;
3. only then report offsets to **commit**: a committed offset never runs ahead of a saved
   checkpoint, so a partition without a checkpoint really has nothing to restore.

A crash between any two steps re-reads records whose outputs may already be written;
they come out identical and collapse (see ``processor.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from meterline.aggregators.checkpoints import CheckpointStore, checkpoint_key
from meterline.aggregators.processor import Counters, PartitionProcessor, RollupSettings
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush
from meterline.ingest.sources import SourceRecord

__all__ = ["OutputWriter", "RollupWorker", "TopicPartition"]

log = logging.getLogger(__name__)
FLUSH_COST_FACTOR = 4


class OutputWriter(Protocol):
    def write(self, flush: Flush) -> None:
        """Make ``flush`` durable (ClickHouse, or Kafka topics a loader drains)."""
        ...


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int


class RollupWorker:
    def __init__(self, registry: MeterRegistry, writer: OutputWriter, store: CheckpointStore,
                 *, group: str, settings: RollupSettings | None = None,
                 flush_interval_s: float = 0.5, checkpoint_interval_s: float = 5.0) -> None:
        self.registry = registry
        self.writer = writer
        self.store = store
        self.group = group
        self.settings = settings or RollupSettings()
        self.flush_interval_s = flush_interval_s
        self.checkpoint_interval_s = checkpoint_interval_s
        self.processors: dict[TopicPartition, PartitionProcessor] = {}
        self.counters = Counters()  # of processors no longer owned
        self._last_flush = self._last_checkpoint = time.monotonic()
        self.flushes = 0
        self.checkpoints = 0
        self._saved: dict[TopicPartition, int] = {}
        self._flush_cost_s = 0.0  # next_offset at the last saved checkpoint

    def _key(self, tp: TopicPartition) -> str:
        return checkpoint_key(self.group, tp.topic, tp.partition)

    # ------------------------------------------------------------------ ownership

    def assign(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
        """Restore checkpoints; returns where each partition must be read from (``None``:
        no checkpoint, read from the committed offset, which is then none or 0)."""
        new = [tp for tp in partitions if tp not in self.processors]
        blobs = self.store.load(self._key(tp) for tp in new)
        positions: dict[TopicPartition, int | None] = {}
        for tp in new:
            blob = blobs.get(self._key(tp))
            if blob is None:
                proc = PartitionProcessor(tp.topic, tp.partition, self.registry, self.settings)
                positions[tp] = None
            else:
                proc = PartitionProcessor.from_checkpoint(blob, self.registry, self.settings)
                positions[tp] = self._saved[tp] = proc.next_offset
            self.processors[tp] = proc
            log.info("assigned %s[%d], resuming at %s", tp.topic, tp.partition, positions[tp])
        return positions

    def revoke(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Flush and checkpoint what is given away, then forget it. Returns the offsets
        to commit for it."""
        gone = [tp for tp in partitions if tp in self.processors]
        if not gone:
            return {}
        offsets = self.flush(checkpoint=True, only=gone)
        self.drop(gone)
        return offsets

    def drop(self, partitions: Iterable[TopicPartition]) -> None:
        """Forget partitions without flushing (their new owner replays what was not
        checkpointed)."""
        for tp in partitions:
            proc = self.processors.pop(tp, None)
            if proc is not None:
                self.counters.add(proc.counters)
            self._saved.pop(tp, None)

    # ------------------------------------------------------------------ records

    def process(self, record: SourceRecord) -> None:
        tp = TopicPartition(record.topic, record.partition)
        proc = self.processors.get(tp)
        if proc is None:  # a record from before a rebalance: not ours any more
            return
        proc.process(record)

    def process_many(self, records: Iterable[SourceRecord]) -> None:
        for record in records:
            self.process(record)

    # ------------------------------------------------------------------ flushing

    def due(self, now: float | None = None) -> tuple[bool, bool]:
        """(flush due, checkpoint due) by the configured intervals."""
        now = time.monotonic() if now is None else now
        # A flush costs in proportion to the windows changed since the last one, not to the
        # events, so under a backlog flushing at the freshness interval could spend most of
        # the time rewriting the same windows. Spacing flushes at least FLUSH_COST_FACTOR
        # times their own duration caps that share near 1/FLUSH_COST_FACTOR; at moderate
        # load flushes are quick and the interval stays ``flush_interval_s``.
        interval = max(self.flush_interval_s, FLUSH_COST_FACTOR * self._flush_cost_s)
        return (now - self._last_flush >= interval,
                now - self._last_checkpoint >= self.checkpoint_interval_s)

    def maybe_flush(self) -> dict[TopicPartition, int]:
        flush_due, checkpoint_due = self.due()
        if flush_due or checkpoint_due:
            return self.flush(checkpoint=checkpoint_due)
        return {}

    def flush(self, *, checkpoint: bool,
              only: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Write pending outputs; with ``checkpoint``, save checkpoints and return the
        offsets that are now safe to commit."""
        started = time.monotonic()
        tps = sorted(self.processors if only is None else only)
        combined = Flush()
        parts = {tp: self.processors[tp].take_flush() for tp in tps}
        for part in parts.values():
            combined.extend(part)
        if len(combined):
            try:
                self.writer.write(combined)
            except BaseException:
                # Nothing is lost: the records go back and are written by a later flush,
                # and no checkpoint is taken before they are.
                for tp, part in parts.items():
                    self.processors[tp].put_back(part)
                raise
        self.flushes += 1
        self._last_flush = time.monotonic()
        self._flush_cost_s = self._last_flush - started
        if not checkpoint:
            return {}
        # An idle partition's state has not changed since its last checkpoint: skip it.
        changed = [tp for tp in tps if self._saved.get(tp) != self.processors[tp].next_offset]
        if changed:
            self.store.save({self._key(tp): self.processors[tp].checkpoint() for tp in changed})
            for tp in changed:
                self._saved[tp] = self.processors[tp].next_offset
        self.checkpoints += 1
        self._last_checkpoint = time.monotonic()
        t = self.totals()
        log.info("checkpoint %d of %d partitions: records=%d accepted=%d duplicate=%d late=%d "
                 "rejected=%d", self.checkpoints, len(tps), t.records, t.accepted, t.duplicate,
                 t.late, t.rejected)
        return {tp: self.processors[tp].next_offset for tp in tps}

    def checkpoint_age_s(self, now: float) -> float:
        return now - self._last_checkpoint

    def totals(self) -> Counters:
        total = Counters()
        total.add(self.counters)
        for proc in list(self.processors.values()):  # list(): read from a scrape thread
            total.add(proc.counters)
        return total
