"""One source partition's rollup stage: records in, flushes and checkpoints out.

This is the whole exactly-once mechanism; the Faust agent and the embedded runner only
move bytes around it. It rests on three facts:

1. **Determinism.** Everything the processor decides depends only on the partition's
   records in log order and their log timestamps (dedupe expiry, lateness, the future-skew
   check) - never on wall-clock time, flush timing or how records were fetched. Replaying
   the same records from the same state gives the same windows and the same outputs.
2. **Idempotent outputs.** A rollup row is a window's *total* with ``version`` = events
   folded into it, and a given version always carries the same total (fact 1), so
   ReplacingMergeTree(version) keeps the right row however many times a flush is written.
   Dead letters and late events carry their log position and collapse on it.
3. **Checkpoints are self-contained snapshots.** ``checkpoint()`` captures the windows,
   both dedupe sets, the watermark *and* the next offset in one blob, so they can never
   disagree. It is taken only after the flush it covers was written durably.

Recovery = restore the latest checkpoint, re-read the partition from its ``next_offset``
and write whatever comes out again. The processor folds a record **only at exactly
``next_offset``**: below it the record is already in the state (skipped), above it is a
*gap* - records in between were never seen, and folding this one would skip them for good.
``process`` refuses such a record and the runner resolves the gap against the log itself
(``runner.py``: seek back, or accept offsets the log confirms hold no records). So where
the consumer happens to be - its committed offset, a fetch left over from before a
rebalance, a consumer that skipped ahead - can cost a re-read but never an event.

Settings (allowed lateness, watermark delay, dedupe horizon) are the *current* config, even
for a restored checkpoint, with one guard: windows already closed stay closed
(``RollupState.closed_before_ms`` is checkpointed), so raising the lateness cannot reopen
an evicted window at version 1.

Upgrading from checkpoints older than format 4: explicit ids were deduped bare (one scope
for the whole partition) and no entry recorded the windows it counted in. Such ids are
restored as *legacy* ids that match an id under any (customer, meter) - what they meant
when they were recorded - and every old entry (ids, batch ids, producer runs) is held
until the hour of the partition's newest event at the upgrade (``legacy_until_ms``) has
closed, since every window they counted in ends by then. So no resend within the horizon
is counted twice across the upgrade; the legacy ids drain within one horizon.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from meterline.aggregators.id_store import IdEntry, IdStore, MemoryIdStore
from meterline.core.dedupe import (
    DEFAULT_DEDUPE_HORIZON_MS,
    NO_PIN,
    InMemoryDeduper,
    SequenceDeduper,
)
from meterline.core.envelope import Batch, decode_batch
from meterline.core.errors import EnvelopeError
from meterline.core.lateness import (
    DEFAULT_ALLOWED_LATENESS_MS,
    DEFAULT_WATERMARK_DELAY_MS,
    NO_WATERMARK_MS,
    PartitionWatermark,
)
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import (
    DeadLetterRecord,
    Flush,
    LateRecord,
    RollupRecord,
    event_dead_letter,
    record_dead_letter,
)
from meterline.core.rollup import BatchOutcome, Dedupers, Key, RollupState
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.ingest.sources import SourceRecord
from meterline.logs import where

__all__ = ["CHECKPOINT_FORMAT", "Counters", "PartitionProcessor", "RollupSettings"]

log = logging.getLogger(__name__)

# 4: explicit ids scoped (customer, meter, id), every dedupe entry carries the end of the
# window it counted in (until_ms), legacy bare ids; 3: explicit event ids leave the blob for
# deltas (id_store.py); 2: + closed_before_ms. Formats 1 to 3 are still read.
CHECKPOINT_FORMAT = 4


@dataclass(frozen=True, slots=True)
class RollupSettings:
    allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS
    watermark_delay_ms: int = DEFAULT_WATERMARK_DELAY_MS
    dedupe_horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS

    def validate(self) -> list[str]:
        errors = []
        for name in ("allowed_lateness_ms", "watermark_delay_ms", "dedupe_horizon_ms"):
            value = getattr(self, name)
            if type(value) is not int or value < (1 if name == "dedupe_horizon_ms" else 0):
                errors.append(f"{name} must be a non-negative int (ms), got {value!r}")
        return errors


@dataclass(slots=True)
class Counters:
    """What this process did. Not checkpointed: after a crash the replayed records are
    counted again, so these are activity metrics; exact counts live in the tables."""

    records: int = 0
    skipped_records: int = 0  # below next_offset: already in the restored state
    gap_records: int = 0  # past next_offset: refused, the runner resolves the gap
    absent_offsets: int = 0  # offsets the log confirmed hold no record (e.g. txn markers)
    accepted: int = 0
    duplicate: int = 0
    late: int = 0
    late_allowed: int = 0
    rejected: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, other: Counters) -> None:
        for name in ("records", "skipped_records", "gap_records", "absent_offsets",
                     "accepted", "duplicate", "late", "late_allowed", "rejected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.by_reason.items():
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n


def cells_json(cells: list[list[Any]]) -> bytes:
    """Checkpoint cells (``RollupState.export_all``) as JSON text."""
    try:
        return orjson.dumps(cells)
    except TypeError:  # a total beyond 64-bit ints: the stdlib encoder handles any int
        return json.dumps(cells, separators=(",", ":"), ensure_ascii=False).encode()


class PartitionProcessor:
    def __init__(self, source: str, partition: int, registry: MeterRegistry,
                 settings: RollupSettings | None = None, *, next_offset: int = 0,
                 ids: IdStore | None = None) -> None:
        self.source = source
        self.partition = partition
        self.registry = registry
        self.settings = settings = settings or RollupSettings()
        errors = settings.validate()
        if errors:
            raise ValueError("; ".join(errors))
        self.next_offset = next_offset
        self.state = RollupState(settings.allowed_lateness_ms)
        self.watermark = PartitionWatermark(settings.watermark_delay_ms)
        # Explicit event ids: on disk and checkpointed as deltas when the runner gives a
        # SqliteIdStore (their volume follows traffic); batch ids stay in memory.
        self.ids = ids if ids is not None else MemoryIdStore(settings.dedupe_horizon_ms)
        self.dedupers = Dedupers(InMemoryDeduper(settings.dedupe_horizon_ms), self.ids,
                                 SequenceDeduper(settings.dedupe_horizon_ms))
        self.counters = Counters()
        self.restored = False  # True when built from a checkpoint
        # Set when restored from a checkpoint older than format 4 (see the module
        # docstring): old entries are held until windows ending by this are closed.
        self._legacy_until_ms: int | None = None
        self._legacy_inline = False  # legacy ids came from the blob (formats 1-2), not deltas
        # The source topic's partition count when this state was built: customers are
        # routed by it, so the state is only valid while it holds (see runner.assign).
        self.source_partitions: int | None = None
        self._dirty: set[Key] = set()
        self._pending = Flush()
        self._clock_ms = -(2**63)  # largest record timestamp seen: processing time

    @property
    def legacy_until_ms(self) -> int | None:
        """While bare ids of an older checkpoint are held: the window end they wait for."""
        return None if self.dedupers.legacy_ids is None else self._legacy_until_ms

    # ------------------------------------------------------------------ processing

    @property
    def fresh(self) -> bool:
        """Nothing restored and nothing read yet."""
        return not self.restored and self.next_offset == 0

    def process_many(self, records: Sequence[SourceRecord]) -> int:
        """Fold ``records`` (one partition's, in log order); returns how many leading
        records were handled (folded, or skipped: already in the state). ``records[n]``,
        if any, lies past a gap and was *not* handed to :meth:`process`. The columnar
        engine overrides this with a fold of the whole run."""
        for n, record in enumerate(records):
            if record.offset > self.next_offset:
                return n
            self.process(record)
        return len(records)

    def process(self, record: SourceRecord) -> bool:
        """Fold one record (an envelope) in; ``False`` when it lies past a gap and was *not*
        folded (see the module docstring). Never raises on bad input: a record that cannot
        be decoded becomes a dead letter, bad events become dead letters."""
        if record.offset != self.next_offset:
            if record.offset < self.next_offset:
                self.counters.skipped_records += 1
                return True
            self.counters.gap_records += 1
            return False
        self.counters.records += 1
        # The log timestamp is the clock (see meterline.core.dedupe); monotone here so a
        # producer-set CreateTime going backwards cannot rewind dedupe expiry.
        if record.timestamp_ms > self._clock_ms:
            self._clock_ms = record.timestamp_ms
        now_ms = self._clock_ms
        try:
            batch = decode_batch(record.payload)
        except EnvelopeError as exc:
            self._dead(record_dead_letter(record.topic, record.partition, record.offset, now_ms,
                                          f"envelope.{exc.reason}", record.payload))
        else:
            if now_ms < 0:  # no log timestamp at all (not Kafka): the batch's own clock
                now_ms = self._clock_ms = max(self._clock_ms, batch.created_ms)
            self.ids.offset = record.offset  # ids first seen here are stored with it
            outcome = self.state.apply_batch(batch, self.registry, self.dedupers,
                                             self.watermark, now_ms, self._dirty)
            self._collect(record, batch, outcome, now_ms)
        self.next_offset = record.offset + 1
        return True

    def skip_to(self, offset: int) -> None:
        """The log holds no records in ``[next_offset, offset)`` (transaction markers,
        compaction, or a fresh start at a log that begins later): move past them. Only the
        runner calls this, after asking the log."""
        if offset < self.next_offset:
            raise ValueError(f"skip_to({offset}) behind next_offset {self.next_offset}")
        self.counters.absent_offsets += offset - self.next_offset
        self.next_offset = offset

    def _collect(self, record: SourceRecord, batch: Batch, out: BatchOutcome,
                 now_ms: int) -> None:
        c = self.counters
        c.accepted += out.accepted
        c.duplicate += out.duplicate
        c.late += out.late
        c.late_allowed += out.late_allowed
        for dl in out.dead_letters:
            self._dead(event_dead_letter(record.topic, record.partition, record.offset, now_ms,
                                         batch, dl.position, dl.event_id, "event." + dl.reason))
        for late in out.late_events:
            i = late.position
            meter = self.registry.get(batch.meters[i])
            dims = (batch.dimensions[i] if batch.dimensions is not None else None) or {}
            group = tuple((d, dims.get(d, "")) for d in meter.group_by) if meter else ()
            self._pending.late.append(LateRecord(
                source=record.topic, partition=record.partition, offset=record.offset,
                position=i, event_id=late.event_id, customer=batch.customers[i],
                meter=batch.meters[i], group=group, quantity_nanos=batch.quantities[i],
                timestamp_ms=batch.timestamps_ms[i], window_start_ms=late.window_start_ms,
                received_at_ms=now_ms,
            ))

    def _dead(self, dead: DeadLetterRecord) -> None:
        # Built by core.outputs for the raw stage too: one payload format, one unit.
        self.counters.rejected += 1
        self.counters.by_reason[dead.reason] = self.counters.by_reason.get(dead.reason, 0) + 1
        self._pending.dead_letters.append(dead)

    # ------------------------------------------------------------------ flushing

    @property
    def pending(self) -> int:
        """Changed windows plus dead/late records not yet handed out by ``take_flush``."""
        return len(self._dirty) + len(self._pending)

    def take_flush(self) -> Flush:
        """Everything changed since the last flush, then evict windows that can no longer
        change (their final totals are in this or an earlier flush)."""
        flush, self._pending = self._pending, Flush()
        flush.rollups += self._take_rows()
        self.state.evict_closed(self.watermark, keys=False)
        return flush

    def _take_rows(self) -> list[RollupRecord]:
        """The changed windows' rows; clears the changed set."""
        source, partition = self.source, self.partition
        rows = [
            RollupRecord(window, customer, meter, group, start,
                         start + (HOUR_MS if window == "hourly" else DAY_MS),
                         aggregation, value, events, events, source, partition)
            for (window, customer, meter, group, start), aggregation, value, events
            in self.state.totals(self._dirty)
        ]
        self._dirty = set()
        return rows

    def put_back(self, flush: Flush) -> None:
        """A flush that could not be written: keep it for the next one (its windows may
        already be evicted, so the records themselves are kept, not the keys). Rollup rows
        it repeats are superseded by newer versions; checkpoints wait until it is written."""
        pending, self._pending = self._pending, Flush()
        self._pending.extend(flush)
        self._pending.extend(pending)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> bytes:
        """The partition's complete state as one blob. Only valid between flushes: a
        checkpoint with unwritten changes would lose them on restore."""
        if self.pending:
            raise RuntimeError("checkpoint() with unflushed changes; call take_flush() first")
        self.dedupers.sequences.expire(self._clock_ms)  # producers idle past the horizon
        doc = {
            "format": CHECKPOINT_FORMAT, "source": self.source, "partition": self.partition,
            "next_offset": self.next_offset, "clock_ms": self._clock_ms,
            "max_event_ms": self.watermark.max_event_ms,
            "closed_before_ms": self.state.closed_before_ms,
            "source_partitions": self.source_partitions,
            "settings": [self.settings.allowed_lateness_ms, self.settings.watermark_delay_ms,
                         self.settings.dedupe_horizon_ms],
            "batches": self.dedupers.batches.export(),  # type: ignore[attr-defined]
            "sequences": self.dedupers.sequences.export(),
            "ids_clock_ms": self.ids.now_ms,  # the ids themselves: take_id_delta()
            "cells": orjson.Fragment(self._cells_json()),
        }
        legacy = self.dedupers.legacy_ids
        if legacy is not None:
            doc["legacy_until_ms"] = self.legacy_until_ms
            if self._legacy_inline:  # formats 1-2 had no deltas to keep them in
                doc["legacy_ids"] = [[t, k] for t, k, _ in legacy.export()[1]]
        return zlib.compress(orjson.dumps(doc), 1)

    def _cells_json(self) -> bytes:
        """The windows as checkpoint JSON text (the columnar engine writes its compiled
        windows' text itself, without a Python object per window)."""
        return cells_json(self.state.export_all())

    def take_id_delta(self) -> list[IdEntry]:
        """Explicit ids first seen since the last call: saved with the next checkpoint."""
        return self.ids.take_delta()

    @classmethod
    def from_checkpoint(cls, blob: bytes, registry: MeterRegistry,
                        settings: RollupSettings | None = None, *,
                        ids: IdStore | None = None,
                        id_deltas: Iterable[list[IdEntry]] = ()) -> PartitionProcessor:
        """Restore a checkpoint; ``id_deltas`` are the partition's saved id deltas (only
        ids first seen before the checkpoint's ``next_offset`` are kept)."""
        doc = json.loads(zlib.decompress(blob))
        fmt = doc.get("format")
        if fmt not in (1, 2, 3, CHECKPOINT_FORMAT):
            raise ValueError(f"unknown checkpoint format {fmt!r}")
        saved = RollupSettings(*doc["settings"])
        settings = settings or saved
        proc = cls(doc["source"], doc["partition"], registry, settings,
                   next_offset=doc["next_offset"], ids=ids)
        proc.restored = True
        proc.source_partitions = doc.get("source_partitions")
        proc._clock_ms = doc["clock_ms"]
        proc.watermark.max_event_ms = doc["max_event_ms"]
        if "closed_before_ms" in doc:
            proc.state.closed_before_ms = doc["closed_before_ms"]
        else:  # format 1: what the settings it was written with had closed
            old = PartitionWatermark(saved.watermark_delay_ms, doc["max_event_ms"])
            proc.state.closed_before_ms = max(NO_WATERMARK_MS,
                                              old.watermark_ms - saved.allowed_lateness_ms)
        if saved != settings:
            log.warning("%s[%d]: rollup settings changed since the checkpoint (%s -> %s); "
                        "windows closed before %d stay closed", proc.source, proc.partition,
                        saved, settings, proc.state.closed_before_ms,
                        extra=where(proc.source, proc.partition))
        closed = proc.state.closed_before_ms
        proc.dedupers.close_before(closed)
        if fmt < CHECKPOINT_FORMAT:
            max_event_ms = doc["max_event_ms"]
            legacy_until = (NO_PIN if max_event_ms is None
                            else max_event_ms - max_event_ms % HOUR_MS + HOUR_MS)
        else:
            legacy_until = doc.get("legacy_until_ms")
        proc._legacy_until_ms = legacy_until
        old_until = NO_PIN if legacy_until is None else legacy_until
        batches_clock, batch_ids = doc["batches"]
        proc.dedupers.batches.restore(batches_clock, batch_ids,  # type: ignore[attr-defined]
                                      old_until)
        if "sequences" in doc:
            sequences_clock, runs = doc["sequences"]
            proc.dedupers.sequences.restore(sequences_clock, runs, old_until)
        next_offset = doc["next_offset"]
        legacy: list[tuple[int, str]] = []
        ids_clock = doc.get("ids_clock_ms", doc["clock_ms"])
        if "events" in doc:  # formats 1-2: bare ids in the blob
            ids_clock, entries = doc["events"]
            legacy += [(int(t), str(k)) for t, k in entries]
            proc._legacy_inline = True
        if "legacy_ids" in doc:
            legacy += [(int(t), str(k)) for t, k in doc["legacy_ids"]]
            proc._legacy_inline = True

        def scoped() -> Iterator[IdEntry]:
            for delta in id_deltas:
                for entry in delta:
                    if entry[3] is not None:
                        yield entry
                    elif legacy_until is not None and entry[2] < next_offset:
                        legacy.append((entry[1], entry[0]))  # a bare id of an old delta

        proc.ids.close_before(closed)
        proc.ids.load(scoped(), next_offset, ids_clock, closed)
        if legacy and legacy_until is not None:
            ids = InMemoryDeduper(settings.dedupe_horizon_ms)
            ids.close_before(closed)
            # A bare id in two deltas: the later sighting counts, as in the id stores.
            newest: dict[str, int] = {}
            for t, k in legacy:
                newest[k] = max(t, newest.get(k, t))
            ids.restore(proc.ids.now_ms, sorted((t, k, legacy_until)
                                                for k, t in newest.items()))
            ids.expire(proc.ids.now_ms)
            if ids:
                proc.dedupers.legacy_ids = ids
        for window, customer, meter, group, start, aggregation, plain, events in doc["cells"]:
            key = (window, customer, meter, tuple((k, v) for k, v in group), start)
            proc.state.restore(key, aggregation, plain, events)
        return proc
