"""Hourly and daily rollup state: validate -> dedupe -> classify lateness -> aggregate.

One ``RollupState`` holds the open windows of one partition (all of a customer's events
share a partition). ``apply_batch`` folds one decoded envelope into it and says what
happened to every event; ``snapshot`` turns windows into rows to write.

Per event, in this order:

1. Validate against the meter registry. Failures become dead letters ``(position, event_id,
   reason)`` with a reason from ``REJECTION_REASONS``; a bad event never sinks its batch.
2. Dedupe: a batch seen within the horizon (by ``(producer, seq)``, or batch id) marks the
   whole batch duplicate (nothing else happens, the watermark included); explicit event
   ids are deduped one by one, scoped ``(customer, meter, id)`` (``dedupe.scoped_id``).
   Every entry is held until its horizon passed on the log clock *and* the windows it
   counted in are closed (``dedupe.py``), so a resend is never counted twice in an open
   window, whatever the two clocks do. Rejected events are not remembered, so a corrected
   resend of one is not taken for a duplicate.
3. Lateness against the watermark *as it was before this batch*, so the order of events
   inside a batch cannot change any decision. TOO_LATE events become late entries with
   their hourly window start (for the late table); they are never dropped.
4. Aggregate into the hourly and the daily window. Both are folds of the same accepted
   events, and every aggregation's ``merge`` agrees with its fold, so the daily state equals
   the merge of its hourly states (tested). Folding the daily state directly, rather than
   merging hours on demand, lets a closed hour be evicted while its day is still open.
   An event that would take its hourly or daily *total* out of Decimal(38, 9) is checked
   before either cell changes and becomes a dead letter (``window_total_out_of_range``):
   a window the sink cannot store would stall every later flush of the partition.

Rows carry window *totals* and ``version`` = the number of events folded into the window.
The version grows with every change, and a given version always comes with the same total
(the events of a partition are replayed in log order after a crash), so a
ReplacingMergeTree(version) keyed by (window, customer, meter, group, window_start) keeps
the right row whichever duplicates of a flush reach ClickHouse.

``now_ms`` is the batch's processing time: the Kafka record timestamp, not ``time.time()``,
so a replay of the partition reproduces dedupe expiry and the future-skew check exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from meterline.core.aggregations import Aggregator, Sum, aggregator_for
from meterline.core.dedupe import (
    DEFAULT_DEDUPE_HORIZON_MS,
    NO_PIN,
    BatchDeduper,
    Deduper,
    EventDeduper,
    InMemoryDeduper,
    SequenceDeduper,
    scoped_id,
)
from meterline.core.envelope import Batch
from meterline.core.events import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS
from meterline.core.lateness import (
    DEFAULT_ALLOWED_LATENESS_MS,
    NO_WATERMARK_MS,
    PartitionWatermark,
)
from meterline.core.meters import Aggregation, Meter, MeterRegistry
from meterline.core.quantity import MAX_NANOS
from meterline.core.windows import DAILY, DAY_MS, HOUR_MS, HOURLY

__all__ = [
    "MAX_FUTURE_SKEW_MS",
    "REJECTION_REASONS",
    "BatchOutcome",
    "DeadLetter",
    "Dedupers",
    "Key",
    "LateEvent",
    "MeterPlan",
    "RollupRow",
    "RollupState",
    "WindowKey",
]

# 15 min, the clock skew AWS SigV4 tolerates. An event far in the future would drag the
# partition's watermark forward and make everybody else's events too late, so it is
# rejected instead (a wrong client clock or seconds/ms mixed up).
MAX_FUTURE_SKEW_MS = 15 * 60_000

MISSING_CUSTOMER = "missing_customer"
UNKNOWN_METER = "unknown_meter"
TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
NEGATIVE_QUANTITY = "negative_quantity"
QUANTITY_OUT_OF_RANGE = "quantity_out_of_range"  # would not fit Decimal(38, 9)
DIMENSION_NOT_ALLOWED = "dimension_not_allowed"
MISSING_UNIQUE_VALUE = "missing_unique_value"
# The event is valid, but adding it would take its hourly or daily total out of
# Decimal(38, 9); the window keeps its total without it and takes later events as usual.
WINDOW_TOTAL_OUT_OF_RANGE = "window_total_out_of_range"
REJECTION_REASONS = (MISSING_CUSTOMER, UNKNOWN_METER, TIMESTAMP_OUT_OF_RANGE, NEGATIVE_QUANTITY,
                     QUANTITY_OUT_OF_RANGE, DIMENSION_NOT_ALLOWED, MISSING_UNIQUE_VALUE,
                     WINDOW_TOTAL_OUT_OF_RANGE)

Group = tuple[tuple[str, str], ...]  # (dimension, value) in the meter's group_by order


class WindowKey(NamedTuple):
    window: str  # WindowSpec.name: "hourly" | "daily"
    customer: str
    meter: str
    group: Group  # a group_by dimension the event lacks has value ""
    window_start_ms: int


# How windows are keyed inside: a plain tuple equal (and hash-equal) to its WindowKey.
# Building a NamedTuple costs ~10x a tuple literal, once per event and window; the named
# form is made only where keys leave this module in bulk (window_keys, snapshot).
Key = tuple[str, str, str, Group, int]


class DeadLetter(NamedTuple):
    position: int  # index in the batch, to copy the event into the dead-letter topic
    event_id: str
    reason: str


class LateEvent(NamedTuple):
    position: int
    event_id: str
    window_start_ms: int  # the hourly window the event belonged to


@dataclass(slots=True)
class Dedupers:
    batches: Deduper  # batch ids of envelopes without (producer, seq): other producers
    events: Deduper  # explicit ids, keyed by dedupe.scoped_id(customer, meter, id)
    sequences: SequenceDeduper = field(default_factory=SequenceDeduper)
    # Bare explicit ids restored from a checkpoint written before ids were scoped: they
    # match the id under *any* (customer, meter) until they expire, so an event counted
    # before an upgrade is not counted again after it. Never added to; None once empty.
    legacy_ids: InMemoryDeduper | None = None

    def close_before(self, closed_before_ms: int) -> None:
        self.batches.close_before(closed_before_ms)
        self.events.close_before(closed_before_ms)
        self.sequences.close_before(closed_before_ms)
        if self.legacy_ids is not None:
            self.legacy_ids.close_before(closed_before_ms)

    @classmethod
    def in_memory(cls, horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> Dedupers:
        return cls(BatchDeduper(horizon_ms), EventDeduper(horizon_ms),
                   SequenceDeduper(horizon_ms))


@dataclass(slots=True)
class BatchOutcome:
    """What happened to each event of one batch. Every event is counted exactly once in
    accepted + duplicate + late + rejected."""

    batch_id: str
    duplicate_batch: bool = False
    accepted: int = 0
    late_allowed: int = 0  # of accepted: their window's watermark had passed (metrics)
    duplicate: int = 0
    late: int = 0  # too late: in late_events, not in the rollups
    rejected: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    late_events: list[LateEvent] = field(default_factory=list)
    dirty: set[Key] = field(default_factory=set)  # WindowKey-equal tuples


@dataclass(frozen=True, slots=True)
class RollupRow:
    window: str
    customer: str
    meter: str
    group: Group
    window_start_ms: int
    window_end_ms: int
    aggregation: str
    value_nanos: int  # the window total so far, nano-units
    events: int
    version: int


class _Cell:
    __slots__ = ("aggregator", "events", "state")

    def __init__(self, aggregator: Aggregator[Any], state: Any, events: int) -> None:
        self.aggregator = aggregator
        self.state = state
        self.events = events


class MeterPlan:
    """One meter's rules, and the facts the fold needs, looked up once per batch instead
    of once per event.

    ``check`` is *the* per-event meter rule: the raw-events stage calls the same method
    (``ingest/raw_loader.py``), so an event the fold refuses never lands in raw_events
    and both stages give it the same reason. The fold itself tests ``unknown_meter``
    (no plan) and then ``missing_customer`` before ``check``; so does the raw stage.
    """

    __slots__ = ("aggregator", "allow_negative", "allowed", "checks_total", "empty_group",
                 "group_by", "plain_sum", "unique", "value_property")

    def __init__(self, meter: Meter) -> None:
        self.aggregator = aggregator_for(meter.aggregation)
        # Only a sum's result can leave Decimal(38, 9) when every quantity fits (see
        # aggregations.py); the others skip the per-event range check.
        self.checks_total = self.aggregator.total_can_overflow
        self.plain_sum = type(self.aggregator) is Sum  # state == result == int total
        self.allow_negative = meter.allow_negative
        self.allowed = frozenset(meter.dimensions)
        self.group_by = meter.group_by
        self.empty_group: Group = tuple((d, "") for d in meter.group_by)
        self.unique = meter.aggregation is Aggregation.UNIQUE_COUNT
        self.value_property = meter.value_property

    def check(self, qty: int, ts: int, dims: dict[str, str] | None,
              newest_ok_ms: int) -> str | tuple[Group, str | None]:
        """A rejection reason, or the event's ``(group, unique value)``."""
        if not MIN_TIMESTAMP_MS <= ts <= newest_ok_ms:
            return TIMESTAMP_OUT_OF_RANGE
        if qty < 0 and not self.allow_negative:
            return NEGATIVE_QUANTITY
        if not -MAX_NANOS <= qty <= MAX_NANOS:
            return QUANTITY_OUT_OF_RANGE
        if not dims:
            return MISSING_UNIQUE_VALUE if self.unique else (self.empty_group, None)
        if not self.allowed.issuperset(dims):
            return DIMENSION_NOT_ALLOWED
        value = dims.get(self.value_property)
        if self.unique and not value:  # "" is no user id either
            return MISSING_UNIQUE_VALUE
        return tuple([(d, dims.get(d, "")) for d in self.group_by]), value


_SIZES = {HOURLY.name: HOURLY.size_ms, DAILY.name: DAILY.size_ms}


def _fits(cell: _Cell, qty: int, ts: int, value: str | None, event_id: str) -> bool:
    """Whether the cell's result stays in Decimal(38, 9) with the event added (its
    aggregator's ``add`` is pure: ``total_can_overflow``)."""
    agg = cell.aggregator
    if type(agg) is Sum:  # once per window and batch: skip two calls
        return -MAX_NANOS <= cell.state + qty <= MAX_NANOS
    return -MAX_NANOS <= agg.result(agg.add(cell.state, qty, ts, value, event_id)) <= MAX_NANOS


class RollupState:
    def __init__(self, allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS) -> None:
        if type(allowed_lateness_ms) is not int or allowed_lateness_ms < 0:
            raise ValueError(f"allowed_lateness_ms must be an int >= 0: {allowed_lateness_ms!r}")
        self.allowed_lateness_ms = allowed_lateness_ms
        # Hour ends at or before this are closed for good, whatever the settings say later.
        # Without it, raising the allowed lateness or the watermark delay after a restart
        # would reopen windows that were already evicted: their next event would start a
        # new cell at version 1 and the older, higher-version row would win in storage -
        # the event lost without a trace. Persisted in checkpoints, only ever moves forward.
        self.closed_before_ms = NO_WATERMARK_MS
        self._cells: dict[Key, _Cell] = {}

    def __len__(self) -> int:
        return len(self._cells)

    def window_keys(self) -> list[WindowKey]:
        return [WindowKey._make(k) for k in self._cells]

    def apply_batch(self, batch: Batch, registry: MeterRegistry, dedupers: Dedupers,
                    watermark: PartitionWatermark, now_ms: int,
                    dirty: set[Key] | None = None) -> BatchOutcome:
        """``dirty``: a set to collect changed windows in (the caller's running set, which
        saves merging a per-batch set into it); ``out.dirty`` is that set."""
        out = BatchOutcome(batch.batch_id) if dirty is None else BatchOutcome(batch.batch_id,
                                                                              dirty=dirty)
        closed_before = self.closed_limit(watermark)  # hour end <= this: too late
        dedupers.close_before(closed_before)
        newest_ok_ms = min(now_ms + MAX_FUTURE_SKEW_MS, MAX_TIMESTAMP_MS - 1)
        # A batch's entry is held until the latest hour any of its events can count in has
        # closed: its newest timestamp, capped where the future-skew check would reject.
        newest_ts = min(max(batch.timestamps_ms, default=NO_PIN), newest_ok_ms)
        batch_until = NO_PIN if newest_ts == NO_PIN else newest_ts - newest_ts % HOUR_MS + HOUR_MS
        if (dedupers.batches.seen_or_add(batch.batch_id, now_ms, batch_until)
                if batch.producer is None
                else dedupers.sequences.seen_or_add(batch.producer, batch.seq or 0, now_ms,
                                                    batch_until)):
            out.duplicate_batch, out.duplicate = True, len(batch)
            return out
        events_seen = dedupers.events
        legacy = dedupers.legacy_ids
        if legacy is not None:
            legacy.expire(now_ms)
            if not legacy:
                legacy = dedupers.legacy_ids = None
        watermark_ms = watermark.watermark_ms
        explicit_ids = batch.ids
        dimensions = batch.dimensions
        prefix = batch.batch_id + "-"
        plans: dict[str, MeterPlan | None] = {}
        touched: dict[tuple[str, str, Group, int], tuple[_Cell, _Cell]] = {}
        dirty, max_ts = out.dirty, None
        rows = zip(batch.customers, batch.meters, batch.quantities, batch.timestamps_ms,
                   strict=True)
        for i, (customer, meter_name, qty, ts) in enumerate(rows):
            explicit_id = explicit_ids[i] if explicit_ids is not None else None
            event_id = prefix + str(i) if explicit_id is None else explicit_id
            if meter_name in plans:
                plan = plans[meter_name]
            else:
                meter = registry.get(meter_name)
                plan = plans[meter_name] = None if meter is None else MeterPlan(meter)
            if plan is None:
                checked: str | tuple[Group, str | None] = UNKNOWN_METER
            elif not customer:
                checked = MISSING_CUSTOMER
            else:
                dims = dimensions[i] if dimensions is not None else None
                checked = plan.check(qty, ts, dims, newest_ok_ms)
            if isinstance(checked, str):
                out.dead_letters.append(DeadLetter(i, event_id, checked))
                continue
            assert plan is not None
            group, value = checked
            hour_start = ts - ts % HOUR_MS
            hour_end = hour_start + HOUR_MS  # same rule as lateness.classify
            scoped = None
            if explicit_id is not None:
                scoped = scoped_id(customer, meter_name, explicit_id)
                if (legacy is not None and explicit_id in legacy) or events_seen.seen_or_add(
                        scoped, now_ms, hour_end):
                    out.duplicate += 1
                    continue
            if hour_end <= closed_before:
                if max_ts is None or ts > max_ts:
                    max_ts = ts
                out.late_events.append(LateEvent(i, event_id, hour_start))
                continue
            aggregator = plan.aggregator
            pair = touched.get((customer, meter_name, group, hour_start))
            if pair is None:  # first event of this window in the batch: one hash per event
                hourly_key = ("hourly", customer, meter_name, group, hour_start)
                daily_key = ("daily", customer, meter_name, group, ts - ts % DAY_MS)
                cells = self._cells
                hourly_cell, daily_cell = cells.get(hourly_key), cells.get(daily_key)
                # Check before a window is created or marked changed: a window exists only
                # once an event counted in it, and a refused event changes nothing. (A new
                # window holds one in-range quantity; a held one may be near the limit.)
                if plan.checks_total and not (
                        (hourly_cell is None or _fits(hourly_cell, qty, ts, value, event_id))
                        and (daily_cell is None or _fits(daily_cell, qty, ts, value, event_id))):
                    self._reject_total(out, i, event_id, scoped, events_seen)
                    continue
                if hourly_cell is None:
                    hourly_cell = cells[hourly_key] = _Cell(aggregator, aggregator.initialize(), 0)
                if daily_cell is None:
                    daily_cell = cells[daily_key] = _Cell(aggregator, aggregator.initialize(), 0)
                dirty.add(hourly_key)
                dirty.add(daily_key)
                pair = touched[(customer, meter_name, group, hour_start)] = (hourly_cell,
                                                                             daily_cell)
            hourly, daily = pair
            if plan.plain_sum:  # the hottest line of the fold: Sum.add and .result inline
                new_hourly, new_daily = hourly.state + qty, daily.state + qty
                if not (-MAX_NANOS <= new_hourly <= MAX_NANOS
                        and -MAX_NANOS <= new_daily <= MAX_NANOS):
                    self._reject_total(out, i, event_id, scoped, events_seen)
                    continue
                hourly.state, daily.state = new_hourly, new_daily
            elif plan.checks_total:
                # Both new states first, stored only if both results fit: atomic.
                new_hourly = aggregator.add(hourly.state, qty, ts, value, event_id)
                new_daily = aggregator.add(daily.state, qty, ts, value, event_id)
                if not (-MAX_NANOS <= aggregator.result(new_hourly) <= MAX_NANOS
                        and -MAX_NANOS <= aggregator.result(new_daily) <= MAX_NANOS):
                    self._reject_total(out, i, event_id, scoped, events_seen)
                    continue
                hourly.state, daily.state = new_hourly, new_daily
            else:
                hourly.state = aggregator.add(hourly.state, qty, ts, value, event_id)
                daily.state = aggregator.add(daily.state, qty, ts, value, event_id)
            hourly.events += 1
            daily.events += 1
            if max_ts is None or ts > max_ts:
                max_ts = ts
            if hour_end <= watermark_ms:
                out.late_allowed += 1
            out.accepted += 1
        out.rejected = len(out.dead_letters)
        out.late = len(out.late_events)
        if max_ts is not None:
            watermark.observe(max_ts)
        return out

    @staticmethod
    def _reject_total(out: BatchOutcome, position: int, event_id: str, scoped: str | None,
                      events_seen: Deduper) -> None:
        out.dead_letters.append(DeadLetter(position, event_id, WINDOW_TOTAL_OUT_OF_RANGE))
        if scoped is not None:  # not counted, so not remembered: a corrected resend counts
            events_seen.forget(scoped)

    def _held(self, key: Key) -> _Cell:
        """A window's cell, for reading (KeyError if not held). The one place the readers
        below look windows up: a state that holds some windows elsewhere (the columnar
        engine's compiled store) overrides this alone."""
        return self._cells[key]

    def snapshot(self, keys: Iterable[Key]) -> list[RollupRow]:
        """Current totals of ``keys``, sorted by key. Raises KeyError for a key that is not
        held (e.g. evicted before its last change was written): losing it must be loud."""
        rows = []
        for plain_key in sorted(keys):
            cell = self._held(plain_key)
            key = WindowKey._make(plain_key)
            rows.append(RollupRow(
                window=key.window, customer=key.customer, meter=key.meter, group=key.group,
                window_start_ms=key.window_start_ms,
                window_end_ms=key.window_start_ms + _SIZES[key.window],
                aggregation=cell.aggregator.name, value_nanos=cell.aggregator.result(cell.state),
                events=cell.events, version=cell.events,
            ))
        return rows

    def totals(self, keys: Iterable[Key]) -> Iterator[tuple[Key, str, int, int]]:
        """``(key, aggregation, total nanos, events)`` of ``keys`` in no particular order:
        ``snapshot`` without the sort and the row objects, for the flush hot path."""
        held = self._held
        for key in keys:
            cell = held(key)
            agg = cell.aggregator
            yield key, agg.name, agg.result(cell.state), cell.events

    def daily_from_hours(self, daily_key: WindowKey) -> int:
        """Result of merging the held hourly states of a daily window (an audit of the
        daily == merge(hourly) invariant; only exact while none of its hours was evicted)."""
        cell = self._held(daily_key)
        agg, state = cell.aggregator, cell.aggregator.initialize()
        for hour in range(daily_key.window_start_ms, daily_key.window_start_ms + DAY_MS, HOUR_MS):
            try:
                hourly = self._held(daily_key._replace(window="hourly", window_start_ms=hour))
            except KeyError:
                continue
            state = agg.merge(state, hourly.state)
        return agg.result(state)

    def closed_limit(self, watermark: PartitionWatermark) -> int:
        """Windows ending at or before this accept no more events: the watermark rule,
        never earlier than what was already closed (``closed_before_ms``)."""
        limit = watermark.watermark_ms - self.allowed_lateness_ms
        return limit if limit > self.closed_before_ms else self.closed_before_ms

    def evict_closed(self, watermark: PartitionWatermark, *, keys: bool = True
                     ) -> list[WindowKey]:
        """Drop windows that can no longer change; snapshot their last changes first.
        Returns their keys (``keys=False``: an empty list, for callers that do not read
        them, which saves a key per evicted window).

        Takes the partition's watermark object, not a number: evicting a window that is
        still open would restart its version at 1 and the stale row would win in storage.
        """
        limit = self.closed_before_ms = self.closed_limit(watermark)  # the too-late rule
        closed = [key for key in self._cells if key[4] + _SIZES[key[0]] <= limit]
        for key in closed:
            del self._cells[key]
        return [WindowKey._make(k) for k in closed] if keys else []

    def merge_partials(self, partials: Iterable[tuple[Key, Aggregator[Any], Any, int]],
                       dirty: set[Key]) -> None:
        """Merge ``(key, aggregator, state, events)`` partials - the states of accepted
        events folded elsewhere - into their windows (created if new, in the order given)
        and mark them changed: the seam of the columnar fold (``aggregators/columnar``).
        The caller has checked that every result stays in Decimal(38, 9) and that the
        events are the ones ``apply_batch`` would have accepted; ``merge`` agrees with
        ``add`` for every aggregation, so each window ends as the per-event fold leaves it."""
        cells = self._cells
        for key, aggregator, partial, events in partials:
            cell = cells.get(key)
            if cell is None:
                cells[key] = _Cell(aggregator, partial, events)
            else:
                cell.state = aggregator.merge(cell.state, partial)
                cell.events += events
            dirty.add(key)

    def max_abs_total(self) -> int:
        """The largest |result| of a window whose result can leave Decimal(38, 9) (sums):
        what the columnar fold bounds before it skips the per-event range check."""
        return max((abs(c.aggregator.result(c.state)) for c in self._cells.values()
                    if c.aggregator.total_can_overflow), default=0)

    def export(self, key: Key) -> tuple[str, Any, int]:
        """``(aggregation, plain state, events)`` of a window, for a changelog."""
        cell = self._held(key)
        return cell.aggregator.name, cell.aggregator.to_plain(cell.state), cell.events

    def export_all(self) -> list[list[Any]]:
        """Every window as ``[window, customer, meter, group, start, aggregation, plain,
        events]`` (JSON-ready), for a checkpoint."""
        return [[*k, c.aggregator.name, c.aggregator.to_plain(c.state), c.events]
                for k, c in self._cells.items()]

    def restore(self, key: Key, aggregation: str, plain: Any, events: int) -> None:
        agg = aggregator_for(aggregation)
        self._cells[key] = _Cell(agg, agg.from_plain(plain), events)
