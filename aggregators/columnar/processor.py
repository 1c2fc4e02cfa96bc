"""``PartitionProcessor`` that folds a fetch of records column-wise.

Same state, same checkpoints, same outputs as the per-event processor it extends: the
windows live in the same ``RollupState``, so a checkpoint, a flush and a restore are the
parent's code. Only *how* a run of records reaches that state changes:

1. **Decode and classify** each record (``decode_batch``, so an envelope is refused with
   the same reason). Consecutive records whose quantities are int64 and whose |sum| stays
   under 2**62 form a *run* (``columns.py``). A record that does not qualify - or that
   could take a sum window near the edge of Decimal(38, 9), where the per-event fold
   refuses single events - is folded by the per-event code itself (the *slow path*), after
   the run before it. Results do not depend on how records are grouped (the rollup's
   "same version => same total" rule), so splitting a fetch anywhere is exact.
2. **Validate** the run with vectorised masks (``columns.build_columns``).
3. **Ordered loop, once per record** (not per event): the close frontier and dedupe
   expiry, batch dedupe, legacy ids, the explicit ids one by one in log order (first one
   wins: the only per-event Python left in the fold), lateness against the watermark as
   it was before the record, then the watermark moves. These are the record-order rules
   ``apply_batch`` applies, in its order, with its objects.
4. **Group and merge** the accepted events (``fold.merge_accepted``).

Why the range check can be skipped: a sum window's result leaves Decimal(38, 9) only if
|total before| + |quantities added| does. The processor keeps an upper bound of every
sum window's |total| (``RollupState.max_abs_total``, refreshed when it gets close) and
takes a record into a run only while bound + the run's |quantities| <= MAX_NANOS; then no
prefix of any window can leave the range, so the per-event fold would refuse none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from meterline.aggregators.columnar.columns import (
    REASONS,
    SAFE_ABS_SUM,
    RecordQuantities,
    build_columns,
    quantities_of,
)
from meterline.aggregators.columnar.fold import merge_accepted
from meterline.aggregators.columnar.native import NativeColumns
from meterline.aggregators.columnar.native import enabled as native_enabled
from meterline.aggregators.columnar.native_state import NativeRollupState
from meterline.aggregators.id_store import IdStore
from meterline.aggregators.processor import PartitionProcessor, RollupSettings
from meterline.core.dedupe import scoped_id
from meterline.core.envelope import Batch, decode_batch
from meterline.core.errors import EnvelopeError
from meterline.core.events import MAX_TIMESTAMP_MS
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush, record_dead_letter
from meterline.core.quantity import MAX_NANOS
from meterline.core.rollup import (
    MAX_FUTURE_SKEW_MS,
    BatchOutcome,
    DeadLetter,
    LateEvent,
    MeterPlan,
)
from meterline.core.windows import HOUR_MS
from meterline.ingest.sources import SourceRecord

__all__ = ["ColumnarPartitionProcessor", "ColumnarStats"]

# A run's events are capped so the int64 group keys in fold.py stay far from overflow
# (two dense codes < events multiplied by a window span) and its arrays stay small.
MAX_RUN_EVENTS = 1 << 21


@dataclass(slots=True)
class ColumnarStats:
    """Where events went (activity counters, like ``Counters``)."""

    runs: int = 0
    run_events: int = 0  # folded column-wise
    ordered_events: int = 0  # of those: explicit ids, deduped one by one in log order
    slow_events: int = 0  # folded by the per-event code (see the module docstring)
    slow_records: int = 0  # of the native decoder's refusals: folded by the per-event code
    windows_merged: int = 0


@dataclass(slots=True)
class _Item:
    record: SourceRecord
    now_ms: int
    batch: Any  # Batch, a native batch, or None: the envelope was refused (error)
    error: EnvelopeError | None
    quantities: RecordQuantities | None


class ColumnarPartitionProcessor(PartitionProcessor):
    _clock_ms: int  # the parent's processing clock, moved here as process() moves it
    _pending: Flush

    def __init__(self, source: str, partition: int, registry: MeterRegistry,
                 settings: RollupSettings | None = None, *, next_offset: int = 0,
                 ids: IdStore | None = None) -> None:
        super().__init__(source, partition, registry, settings, next_offset=next_offset,
                         ids=ids)
        self._plans: dict[str, MeterPlan | None] = {}
        # The compiled decoder + column builder (native.py), unless absent or turned off,
        # and with it the compiled window state (native_state.py).
        self._native = NativeColumns(registry) if native_enabled() else None
        if self._native is not None:
            self.state = NativeRollupState(self.settings.allowed_lateness_ms, registry,
                                           self._native.window_store())
        # Upper bound of |total| over the sum windows; None: recompute from the state.
        self._bound: int | None = None
        self.stats = ColumnarStats()

    @property
    def pending(self) -> int:
        state = self.state
        extra = (state.pending_windows(self._dirty) if isinstance(state, NativeRollupState)
                 else 0)
        return len(self._dirty) + len(self._pending) + extra

    def take_flush(self) -> Flush:
        """The parent's flush, plus the compiled windows' changes as column blocks."""
        state = self.state
        if not isinstance(state, NativeRollupState):
            return super().take_flush()
        if state.lifted_dirty:  # changed while compiled, then taken over by Python
            self._dirty |= state.lifted_dirty
            state.lifted_dirty = set()
        flush, self._pending = self._pending, Flush()
        # One block per window kind, the Python-held windows' rows in it too: the writer
        # and the loader then see columns only. Taken before eviction, as the parent's.
        flush.rollup_blocks += state.take_blocks(self.source, self.partition,
                                                 self._take_rows())
        state.evict_closed(self.watermark, keys=False)
        return flush

    def _cells_json(self) -> bytes:
        state = self.state
        if isinstance(state, NativeRollupState):
            return state.cells_json()
        return super()._cells_json()

    def process(self, record: SourceRecord) -> bool:
        """One record through the per-event fold (the reference path)."""
        folded = super().process(record)
        self._bound = None
        return folded

    def process_many(self, records: Sequence[SourceRecord]) -> int:
        """Fold ``records`` (one partition's, in log order); returns how many leading
        records were handled. Below ``n`` every record was folded or skipped (already in
        the state); ``records[n]``, if any, lies past a gap and was *not* folded: hand it
        to ``process`` (which refuses it and counts it) and resolve the gap as for
        ``process``."""
        run: list[_Item] = []
        run_abs = run_events = 0
        expected = self.next_offset
        for n, record in enumerate(records):
            if record.offset < expected:
                self.counters.skipped_records += 1
                continue
            if record.offset > expected:
                self._fold_run(run, run_abs)
                return n
            expected += 1
            if self._native is not None:
                native = self._native.decode(record.payload)
                # One room check on the hot path; on a miss the run is folded first, so
                # the record is then judged against the state alone, as below.
                if (native is None or not self._room(run_abs, native.abs_sum)
                        or run_events + len(native) > MAX_RUN_EVENTS):
                    self._fold_run(run, run_abs)
                    run, run_abs, run_events = [], 0, 0
                    if native is None or not self._room(0, native.abs_sum):
                        # Refused, unusual or near the range edge: the reference fold.
                        if native is None:
                            self.stats.slow_records += 1
                        else:
                            self.stats.slow_events += len(native)
                        self.process(record)
                        continue
                run_abs += native.abs_sum
                run_events += len(native)
                run.append(_Item(record, self._advance_clock(record, native.created_ms),
                                 native, None, None))
                continue
            try:
                batch: Batch | None = decode_batch(record.payload)
                error = None
            except EnvelopeError as exc:
                batch, error = None, exc
            quantities = None
            if batch is not None:
                quantities = quantities_of(batch)
                fits = quantities is not None and self._room(run_abs, quantities.abs_sum)
                if not fits or run_events + len(batch) > MAX_RUN_EVENTS:
                    self._fold_run(run, run_abs)
                    run, run_abs, run_events = [], 0, 0
                    if quantities is None or not self._room(0, quantities.abs_sum):
                        self.stats.slow_events += len(batch)
                        self.process(record)  # exact Python ints, per event
                        continue
                assert quantities is not None
                run_abs += quantities.abs_sum
                run_events += len(batch)
            now_ms = self._advance_clock(record, None if batch is None else batch.created_ms)
            run.append(_Item(record, now_ms, batch, error, quantities))
        self._fold_run(run, run_abs)
        return len(records)

    def _advance_clock(self, record: SourceRecord, created_ms: int | None) -> int:
        """The processing clock, as PartitionProcessor.process moves it."""
        if record.timestamp_ms > self._clock_ms:
            self._clock_ms = record.timestamp_ms
        now_ms = self._clock_ms
        if created_ms is not None and now_ms < 0:
            now_ms = self._clock_ms = max(self._clock_ms, created_ms)
        return now_ms

    def _room(self, run_abs: int, abs_sum: int) -> bool:
        """Whether a run of |quantities| ``run_abs + abs_sum`` keeps every sum window in
        range whatever its order (the bound is refreshed from the state when short)."""
        total = run_abs + abs_sum
        if total >= SAFE_ABS_SUM:
            return False
        if self._bound is None or self._bound + total > MAX_NANOS:
            self._bound = self.state.max_abs_total()
        return self._bound + total <= MAX_NANOS

    def _fold_run(self, run: list[_Item], run_abs: int) -> None:
        if not run:
            return
        if self._native is not None:  # every item is a NativeBatch
            cols = self._native.columns([item.batch for item in run],
                                        [item.now_ms for item in run], self._plans)
        else:
            batches, quantities, clocks = [], [], []
            for item in run:
                if item.batch is not None and item.quantities is not None:
                    batches.append(item.batch)
                    quantities.append(item.quantities.values)
                    clocks.append(item.now_ms)
            cols = build_columns(batches, quantities, clocks, self.registry, self._plans)
        n = cols.n
        valid = cols.reason == 0
        explicit = valid & cols.has_id
        duplicate = np.zeros(n, dtype=np.bool_)
        accepted = np.zeros(n, dtype=np.bool_)
        hour_end = cols.hour_end
        hour_end_list = hour_end.tolist() if explicit.any() else []
        state, dedupers, watermark = self.state, self.dedupers, self.watermark
        r = -1
        for item in run:
            record, batch, now_ms = item.record, item.batch, item.now_ms
            self.counters.records += 1
            self.next_offset = record.offset + 1
            if batch is None:
                assert item.error is not None
                self._dead(record_dead_letter(record.topic, record.partition, record.offset,
                                              now_ms, f"envelope.{item.error.reason}",
                                              record.payload))
                continue
            r += 1
            s, e = cols.starts[r], cols.starts[r + 1]
            self.ids.offset = record.offset  # ids first seen here are stored with it
            out = BatchOutcome(batch.batch_id, dirty=self._dirty)
            # From here on, apply_batch's steps in its order (meterline/core/rollup.py).
            closed_before = state.closed_limit(watermark)
            dedupers.close_before(closed_before)
            newest_ok_ms = min(now_ms + MAX_FUTURE_SKEW_MS, MAX_TIMESTAMP_MS - 1)
            newest_ts = min(cols.max_timestamp[r], newest_ok_ms)
            batch_until = newest_ts - newest_ts % HOUR_MS + HOUR_MS
            if (dedupers.batches.seen_or_add(batch.batch_id, now_ms, batch_until)
                    if batch.producer is None
                    else dedupers.sequences.seen_or_add(batch.producer, batch.seq or 0,
                                                        now_ms, batch_until)):
                out.duplicate_batch, out.duplicate = True, len(batch)
                self._collect(record, cast(Batch, batch), out, now_ms)  # counters only
                continue
            legacy = dedupers.legacy_ids
            if legacy is not None:
                legacy.expire(now_ms)
                if not legacy:
                    legacy = dedupers.legacy_ids = None
            watermark_ms = watermark.watermark_ms
            keyed = (np.flatnonzero(explicit[s:e]) + s).tolist()
            if keyed:
                events_seen, ids = dedupers.events, cols.ids
                customers, meters = cols.customers, cols.meters
                customer_of, meter_of = cols.customer, cols.meter
                self.stats.ordered_events += len(keyed)
                for i in keyed:
                    explicit_id = ids[i]
                    assert explicit_id is not None
                    if (legacy is not None and explicit_id in legacy) or events_seen.seen_or_add(
                            scoped_id(customers[customer_of[i]], meters[meter_of[i]],
                                      explicit_id), now_ms, hour_end_list[i]):
                        duplicate[i] = True
            live = valid[s:e] & ~duplicate[s:e]
            late = live & (hour_end[s:e] <= closed_before)
            taken = live & ~late
            accepted[s:e] = taken
            out.accepted = int(taken.sum())
            out.late_allowed = int((taken & (hour_end[s:e] <= watermark_ms)).sum())
            out.duplicate = int(duplicate[s:e].sum())
            prefix = batch.batch_id + "-"
            reasons = cols.reason
            for p in np.flatnonzero(~valid[s:e]).tolist():
                explicit_id = cols.ids[s + p]
                out.dead_letters.append(DeadLetter(
                    p, prefix + str(p) if explicit_id is None else explicit_id,
                    REASONS[reasons[s + p]]))
            for p in np.flatnonzero(late).tolist():
                explicit_id = cols.ids[s + p]
                out.late_events.append(LateEvent(
                    p, prefix + str(p) if explicit_id is None else explicit_id,
                    int(cols.hour_start[s + p])))
            out.rejected = len(out.dead_letters)
            out.late = len(out.late_events)
            if live.any():
                watermark.observe(int(cols.timestamp[s:e][live].max()))
            if type(batch) is not Batch and (out.dead_letters or out.late_events):
                # Their records carry the events' fields: read them the Python way (the
                # native decoder took this envelope, so decode_batch takes it too).
                batch = decode_batch(record.payload)
            self._collect(record, cast(Batch, batch), out, now_ms)
        self.stats.windows_merged += merge_accepted(state, cols, accepted, self._dirty)
        self.stats.runs += 1
        self.stats.run_events += n
        if self._bound is not None:
            self._bound += run_abs  # every sum window moved by at most this
