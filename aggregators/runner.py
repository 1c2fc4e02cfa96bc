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

Where reading resumes is decided by the checkpoint, never by the consumer: a processor
folds only the record at its ``next_offset``. A record past it is a *gap*, which
:meth:`RollupWorker.resolve_gap` settles by asking the log (a :class:`LogProbe`):

- the log holds records in between -> the caller seeks back to ``next_offset`` (a fetch
  from before a rebalance, or a consumer positioned past the checkpoint);
- the log holds none (transaction markers, compaction) -> skip them and fold the record;
- the log no longer holds them (retention deleted records never counted), or a partition
  has a committed offset but no checkpoint and the log cannot rebuild it from offset 0 ->
  :class:`LogGapError`: the runner stops and says what to do. Totals that would be short
  are never written.

**Engines.** A partition's records are folded by a ``PartitionProcessor`` (``per-event``:
the reference fold of ``meterline.core.rollup``) or its subclass
``ColumnarPartitionProcessor`` (``columnar``, the default: a run of records column-wise
with numpy, proven equal output for output, checkpoint bytes included, by
``tests/aggregators/columnar``). The callers hand runs of records to
:meth:`RollupWorker.process_many`, so the columnar engine sees a fetch at a time; a
checkpoint written by one engine restores in the other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from meterline.aggregators.checkpoints import CheckpointStore, checkpoint_key
from meterline.aggregators.id_store import (
    IdEntry,
    IdStore,
    MemoryIdStore,
    SqliteIdStore,
    decode_delta,
    encode_delta,
)
from meterline.aggregators.processor import Counters, PartitionProcessor, RollupSettings
from meterline.core.dedupe import NO_PIN
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush
from meterline.ingest.sources import SourceRecord
from meterline.logs import where

__all__ = ["ENGINES", "Gap", "LogGapError", "LogProbe", "OutputWriter",
           "PartitionCountChanged", "RollupWorker", "TopicPartition", "by_partition"]

log = logging.getLogger(__name__)
# ``[rollups] engine``: how a partition's records are folded (same results either way).
ENGINES = ("columnar", "per-event")
FLUSH_COST_FACTOR = 4
# An open id delta is sealed at this many ids (~1.5 MB of JSON, rewritten at most once per
# checkpoint) or once it spans this much log time, whichever comes first: a few hundred
# deltas per partition per 24 h horizon however busy it is.
SEAL_DELTA_IDS = 50_000
SEAL_DELTA_MS = 3_600_000


class OutputWriter(Protocol):
    def write(self, flush: Flush) -> None:
        """Make ``flush`` durable (ClickHouse, or Kafka topics a loader drains)."""
        ...


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int


class LogProbe(Protocol):
    """What the gap check needs to know about the source log (blocking calls)."""

    def log_start(self, tp: TopicPartition) -> int:
        """The oldest offset the log still holds (retention moves it forward)."""
        ...

    def first_offset(self, tp: TopicPartition, from_offset: int) -> int | None:
        """Offset of the first record at or after ``from_offset`` (``None``: none yet)."""
        ...

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        """The group's committed offset of ``tp`` (``None``: never committed)."""
        ...


class PartitionCountChanged(RuntimeError):
    """The source topic's partition count differs from the one a checkpoint was made with."""


class LogGapError(RuntimeError):
    """Records that must be counted are not in the log (or the state that counted them is
    gone): continuing would write short totals, so the runner stops."""


@dataclass(frozen=True, slots=True)
class Gap:
    """A record at ``offset`` arrived while its partition expects ``expected``."""

    tp: TopicPartition
    expected: int
    offset: int


# A live delta: (newest first-seen ms of its ids, latest window end they are held for;
# None: bare ids of the legacy format, held for the processor's legacy_until_ms).
DeltaLife = tuple[int, int | None]


def _decoded(deltas: dict[str, bytes], live: dict[str, DeltaLife]) -> Iterator[list[IdEntry]]:
    """Decode one delta at a time (a restore of 10 M ids never holds them all in memory)
    and note what each delta's later tombstone waits for."""
    for key, blob in deltas.items():
        entries = decode_delta(blob)
        live[key] = _life(entries)
        yield entries


def _processor_class(engine: str) -> type[PartitionProcessor]:
    if engine == "per-event":
        return PartitionProcessor
    from meterline.aggregators.columnar import ColumnarPartitionProcessor

    return ColumnarPartitionProcessor


def by_partition(records: Sequence[SourceRecord]) -> list[list[SourceRecord]]:
    """A fetch split into per-partition runs, each in the fetch's (log) order."""
    runs: dict[tuple[str, int], list[SourceRecord]] = {}
    for record in records:
        runs.setdefault((record.topic, record.partition), []).append(record)
    return list(runs.values())


def _life(entries: list[IdEntry]) -> DeltaLife:
    newest = max((e[1] for e in entries), default=-(2**63))
    if any(e[3] is None for e in entries):
        return newest, None
    return newest, max((e[3] for e in entries if e[3] is not None), default=NO_PIN)


class RollupWorker:
    def __init__(self, registry: MeterRegistry, writer: OutputWriter, store: CheckpointStore,
                 *, group: str, settings: RollupSettings | None = None,
                 flush_interval_s: float = 0.5, checkpoint_interval_s: float = 5.0,
                 probe: LogProbe | None = None, id_store_dir: str | Path | None = None,
                 engine: str = "columnar") -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown rollup engine {engine!r} (known: {', '.join(ENGINES)})")
        self.engine = engine
        self._processor_class = _processor_class(engine)
        self.registry = registry
        self.probe = probe
        # Explicit event ids on disk under this directory (one scratch file per partition,
        # rebuilt from the checkpoint store's deltas on assignment); None: in memory.
        self.id_store_dir = Path(id_store_dir) if id_store_dir is not None else None
        self._deltas: dict[TopicPartition, dict[str, DeltaLife]] = {}  # live delta keys
        self._open: dict[TopicPartition, tuple[str, list[IdEntry]]] = {}  # see _save_checkpoints
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
        self._held: dict[TopicPartition, tuple[int, int]] = {}  # (from, first record) probed
        self._flush_cost_s = 0.0  # next_offset at the last saved checkpoint

    def _key(self, tp: TopicPartition) -> str:
        return checkpoint_key(self.group, tp.topic, tp.partition)

    def _delta_prefix(self, tp: TopicPartition) -> str:
        return self._key(tp) + "/ids/"

    def _id_store(self, tp: TopicPartition) -> IdStore:
        horizon = self.settings.dedupe_horizon_ms
        if self.id_store_dir is None:
            return MemoryIdStore(horizon)
        name = f"{self.group}-{tp.topic}-{tp.partition}.ids.db".replace("/", "_")
        return SqliteIdStore(self.id_store_dir / name, horizon)

    # ------------------------------------------------------------------ ownership

    def assign(self, partitions: Iterable[TopicPartition], *,
               source_partitions: int | None = None) -> dict[TopicPartition, int | None]:
        """Restore checkpoints; returns where each partition must be read from (``None``:
        no checkpoint, read from the committed offset, which is then none or 0).

        ``source_partitions``: the source topic's partition count now. A checkpoint made
        under another count is refused (:class:`PartitionCountChanged`): the SDK routes a
        customer by that count, so after a change one customer's events would be split
        across partitions and per-customer state (dedupe, unique_count, latest) would be
        silently wrong."""
        new = [tp for tp in partitions if tp not in self.processors]
        blobs: dict[str, bytes] = {}
        for topic in sorted({tp.topic for tp in new}):  # one read of the store per topic
            blobs.update(self.store.load_prefixed(checkpoint_key(self.group, topic, "")))
        positions: dict[TopicPartition, int | None] = {}
        made: dict[TopicPartition, PartitionProcessor] = {}
        for tp in new:
            blob = blobs.get(self._key(tp))
            prefix = self._delta_prefix(tp)
            deltas = {k: v for k, v in blobs.items() if k.startswith(prefix)}
            live = self._deltas[tp] = {}
            if blob is None:
                # Deltas without a checkpoint belong to a lost state: delete them at the
                # first checkpoint (the rebuild writes its own).
                live.update(dict.fromkeys(deltas, (-(2**63), NO_PIN)))
                proc = self._processor_class(tp.topic, tp.partition, self.registry,
                                             self.settings, ids=self._id_store(tp))
            else:
                proc = self._processor_class.from_checkpoint(
                    blob, self.registry, self.settings, ids=self._id_store(tp),
                    id_deltas=_decoded(deltas, live))
                was = proc.source_partitions
                if source_partitions is not None and was is not None and was != source_partitions:
                    raise PartitionCountChanged(
                        f"{tp.topic} has {source_partitions} partitions, but the rollup "
                        f"state of partition {tp.partition} was built with {was}: customers "
                        f"now map to other partitions and their dedupe, unique_count and "
                        f"latest state would split. Put the partition count back to {was}, or "
                        f"follow docs/rollups.md 'Changing the partition count' (a new "
                        f"topic).")
            if source_partitions is not None:
                proc.source_partitions = source_partitions
            made[tp] = proc
        for tp, proc in made.items():  # all or nothing
            positions[tp] = None if not proc.restored else proc.next_offset
            if proc.restored:
                self._saved[tp] = proc.next_offset
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
                proc.ids.close()
            self._deltas.pop(tp, None)
            self._open.pop(tp, None)
            self._saved.pop(tp, None)
            self._held.pop(tp, None)

    # ------------------------------------------------------------------ records

    def process(self, record: SourceRecord) -> Gap | None:
        """Fold ``record`` into its partition. Returns a :class:`Gap` when the record lies
        past its partition's ``next_offset`` (not folded; settle it with
        :meth:`resolve_gap`). A record of a partition not owned is ignored: its owner reads
        it from its own checkpoint."""
        tp = TopicPartition(record.topic, record.partition)
        proc = self.processors.get(tp)
        if proc is None or proc.process(record):
            return None
        return Gap(tp, proc.next_offset, record.offset)

    def process_many(self, records: Sequence[SourceRecord]) -> tuple[int, Gap | None]:
        """Fold a run of *one* partition's records, in log order. Returns ``(n, gap)``:
        ``records[:n]`` were handled (folded, or skipped as already in the state); when
        ``n < len(records)``, ``records[n]`` lies past a gap, was refused (and counted as
        :meth:`process` does) and ``gap`` says where; settle it with :meth:`resolve_gap`
        exactly as for :meth:`process`, then hand ``records[n:]`` in again or seek."""
        if not records:
            return 0, None
        tp = TopicPartition(records[0].topic, records[0].partition)
        proc = self.processors.get(tp)
        if proc is None:  # not ours: its owner reads it from its own checkpoint
            return len(records), None
        n = proc.process_many(records)
        if n == len(records):
            return n, None
        proc.process(records[n])  # refused: past the gap (counted as process() counts it)
        return n, Gap(tp, proc.next_offset, records[n].offset)

    def owns(self, record: SourceRecord) -> bool:
        return TopicPartition(record.topic, record.partition) in self.processors

    def resolve_gap(self, gap: Gap) -> int | None:
        """Settle a gap by asking the log (blocking). Returns the offset to seek the
        partition back to, or ``None`` when the log holds no records in between - then the
        processor has moved past them and the record must be processed again. Raises
        :class:`LogGapError` when events that must be counted are not in the log."""
        if self.probe is None:
            raise LogGapError(f"{gap.tp.topic}[{gap.tp.partition}]: record at offset "
                              f"{gap.offset} but the state expects {gap.expected}, and no "
                              f"log probe is configured to settle it")
        proc = self.processors.get(gap.tp)
        if proc is None or proc.next_offset != gap.expected:
            return None  # moved on meanwhile; the caller re-processes the record
        tp, name = gap.tp, f"{gap.tp.topic}[{gap.tp.partition}]"
        start = self.probe.log_start(tp)
        if proc.next_offset < start:
            committed = self.probe.committed(self.group, tp) if proc.fresh else None
            if not proc.fresh or committed:
                what = (f"the checkpoint resumes at offset {proc.next_offset}" if not proc.fresh
                        else f"group {self.group!r} committed offset {committed} but there "
                             f"is no checkpoint to resume from")
                raise LogGapError(
                    f"{name}: {what}, and the log now starts at {start}: records "
                    f"[{proc.next_offset}, {start}) are gone (retention) and cannot be "
                    f"counted. Totals would be short, so the worker stops. If the events are "
                    f"lost for good, see docs/rollups.md 'Recovering from a log gap'.")
            # A fresh group on a log whose start was deleted before Meterline ever read it.
            log.info("%s: first rollup read; the log starts at %d", name, start)
            proc.skip_to(start)
            return None if gap.offset == start else start
        hint = self._held.get(tp)
        if hint is not None and hint[0] == proc.next_offset and hint[1] < gap.offset:
            # Known already: the log holds a record before this one. A burst of records
            # fetched before a seek lands here; one probe answers for all of them.
            return proc.next_offset
        first = self.probe.first_offset(tp, proc.next_offset)
        if first is not None:
            self._held[tp] = (proc.next_offset, first)
        if first is not None and first == gap.offset:
            log.info("%s: offsets [%d, %d) hold no records; moving past them", name,
                     proc.next_offset, gap.offset)
            proc.skip_to(gap.offset)
            return None
        if proc.fresh:
            committed = self.probe.committed(self.group, tp)
            if committed:
                log.warning("%s: group %r committed offset %s but there is no checkpoint; "
                            "rebuilding the partition's windows from offset %d", name,
                            self.group, committed, proc.next_offset,
                            extra=where(tp.topic, tp.partition, proc.next_offset))
        log.info("%s: record at %d while expecting %d; seeking back", name, gap.offset,
                 proc.next_offset)
        return proc.next_offset

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
            self._save_checkpoints(changed)
        self.checkpoints += 1
        self._last_checkpoint = time.monotonic()
        t = self.totals()
        log.info("checkpoint %d of %d partitions: records=%d accepted=%d duplicate=%d late=%d "
                 "rejected=%d", self.checkpoints, len(tps), t.records, t.accepted, t.duplicate,
                 t.late, t.rejected)
        return {tp: self.processors[tp].next_offset for tp in tps}

    def _save_checkpoints(self, tps: list[TopicPartition]) -> None:
        """One save per flush: each partition's *open* id delta, its main blob, and
        tombstones for deltas whose every id may be forgotten.

        The open delta collects the explicit ids first seen since it was opened and is
        rewritten under one key at each checkpoint (compaction keeps the newest) until it
        holds ``SEAL_DELTA_IDS`` ids or spans ``SEAL_DELTA_MS`` of log time; then the next
        one opens. So the store holds a few hundred deltas per partition and horizon, not
        one per checkpoint. Deltas go before the blobs: a saved blob never points past its
        ids, and a delta saved without its blob holds ids at offsets the restore ignores
        (id_store.py). Tombstones go last: a delete never lands without the blob that no
        longer needs it. Ids stay in the open delta until saved, so a failed save loses none.

        A delta may go once its ids' horizon has passed on the log clock *and* the windows
        they counted in are closed (``core/dedupe.py``): ``closed_before_ms`` of the state
        this checkpoint holds has passed every ``until_ms`` in it.
        """
        blobs: dict[str, bytes | None] = {}
        tombstones: dict[str, bytes | None] = {}
        for tp in tps:
            proc = self.processors[tp]
            live = self._deltas.setdefault(tp, {})
            cutoff = proc.ids.now_ms - self.settings.dedupe_horizon_ms
            closed = proc.state.closed_before_ms
            legacy_until = NO_PIN if proc.legacy_until_ms is None else proc.legacy_until_ms
            new = proc.take_id_delta()
            open_key = self._open[tp][0] if tp in self._open else None
            for key, (newest, until) in live.items():
                if newest <= cutoff and (legacy_until if until is None else until) <= closed:
                    if key != open_key:
                        tombstones[key] = None
                    elif not new:  # an open delta with nothing left to hold: close it too
                        tombstones[key] = None
                        del self._open[tp]
            if new:
                key, entries = self._open.get(tp) or (
                    f"{self._delta_prefix(tp)}{proc.next_offset:020d}", [])
                entries.extend(new)
                self._open[tp] = (key, entries)
            if tp in self._open:
                key, entries = self._open[tp]
                blobs[key] = encode_delta(entries)
        blobs.update({self._key(tp): self.processors[tp].checkpoint() for tp in tps})
        blobs.update(tombstones)
        self.store.save(blobs)
        for tp in tps:
            proc = self.processors[tp]
            self._saved[tp] = proc.next_offset
            live = self._deltas[tp]
            for key in tombstones:
                live.pop(key, None)
            if tp in self._open:
                key, entries = self._open[tp]
                live[key] = _life(entries)
                if (len(entries) >= SEAL_DELTA_IDS
                        or entries[-1][1] - entries[0][1] >= SEAL_DELTA_MS):
                    del self._open[tp]

    def checkpoint_age_s(self, now: float) -> float:
        return now - self._last_checkpoint

    def totals(self) -> Counters:
        total = Counters()
        total.add(self.counters)
        for proc in list(self.processors.values()):  # list(): read from a scrape thread
            total.add(proc.counters)
        return total
