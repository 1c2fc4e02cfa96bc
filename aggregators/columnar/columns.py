"""A run of decoded envelopes as column arrays, validated with vectorised masks.

The per-event fold (``meterline.core.rollup.RollupState.apply_batch``) asks the meter
registry once per event. Here every rule that does not depend on the fold's state is
answered for a whole run of records at once: the validation verdict (``reason``, the
same codes and the same precedence as ``apply_batch`` + ``MeterPlan.check``), the window
of every event and the integer codes (customer, meter, dimension group) the fold groups
by. What *does* depend on state - batch and explicit-id dedupe, the watermark - is left
to the ordered loop in ``fold.py``.

Quantities and times are int64 arrays. A record is only taken when every quantity is an
int64 and the run's sum of |quantity| stays below ``SAFE_ABS_SUM`` (2**62): then no
partial sum of any group can overflow int64, so the fold never needs a float or a wider
type (numpy has no int128). A record that does not qualify goes through the per-event
fold instead (``processor.py``), with exact Python ints.

The dimension checks and the group values still touch one Python dict per event: the
envelope is JSON, so orjson has already built those dicts (see docs/benchmarks.md for what
that costs and what would remove it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate, chain, repeat
from operator import methodcaller, not_
from typing import Any

import numpy as np
import numpy.typing as npt

from meterline.core.envelope import Batch
from meterline.core.events import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS
from meterline.core.meters import MeterRegistry
from meterline.core.rollup import (
    DIMENSION_NOT_ALLOWED,
    MAX_FUTURE_SKEW_MS,
    MISSING_CUSTOMER,
    MISSING_UNIQUE_VALUE,
    NEGATIVE_QUANTITY,
    TIMESTAMP_OUT_OF_RANGE,
    UNKNOWN_METER,
    Group,
    MeterPlan,
)
from meterline.core.windows import HOUR_MS

__all__ = ["REASONS", "SAFE_ABS_SUM", "Columns", "RecordQuantities", "build_columns",
           "quantities_of"]

I64 = npt.NDArray[np.int64]
BOOL = npt.NDArray[np.bool_]

# 2**62: a run whose |quantities| sum below this has every group sum, prefix sums
# included, inside int64 with a factor 2 to spare.
SAFE_ABS_SUM = 1 << 62
# Verdict codes: 0 = valid, else the index of the dead-letter reason. No quantity_out_of_
# range: an int64 quantity always fits Decimal(38, 9), and wider ones never get here.
REASONS = ("", UNKNOWN_METER, MISSING_CUSTOMER, TIMESTAMP_OUT_OF_RANGE, NEGATIVE_QUANTITY,
           DIMENSION_NOT_ALLOWED, MISSING_UNIQUE_VALUE)
_UNKNOWN, _NO_CUSTOMER, _TIME, _NEGATIVE, _DIMENSION, _NO_UNIQUE = range(1, 7)
_EMPTY: dict[str, str] = {}  # shared, never written to


@dataclass(frozen=True, slots=True)
class RecordQuantities:
    """One record's quantities as int64, and the exact sum of their absolute values."""

    values: I64
    abs_sum: int


def quantities_of(batch: Batch) -> RecordQuantities | None:
    """int64 quantities of a batch, or None when one does not fit int64 or their |sum|
    reaches ``SAFE_ABS_SUM`` (the per-event fold takes such a record)."""
    try:
        values = np.array(batch.quantities, dtype=np.int64)
    except OverflowError:
        return None
    widest = max(int(values.max()), -int(values.min()))
    if len(values) * widest < SAFE_ABS_SUM:  # np.abs and the sum cannot overflow
        abs_sum = int(np.abs(values).sum())
    else:
        abs_sum = sum(map(abs, batch.quantities))  # exact Python ints
    return None if abs_sum >= SAFE_ABS_SUM else RecordQuantities(values, abs_sum)


@dataclass(slots=True)
class Columns:
    """Events of a run of records, concatenated in log order (record, then position)."""

    starts: list[int]  # event index of each record's first event; starts[-1] == n
    batch_ids: list[str]  # per record
    record: I64  # record index of every event
    position: I64  # index inside its batch
    quantity: I64
    timestamp: I64
    hour_start: I64
    hour_end: I64
    customer: I64  # code into customers
    meter: I64  # code into meters / plans
    group: I64  # code into groups[meter]
    reason: npt.NDArray[np.int8]  # 0 or an index into REASONS
    has_id: BOOL
    ids: list[str | None]  # explicit ids (None: implied "{batch_id}-{position}")
    unique_values: list[str | None]  # value_property of unique_count events
    customers: list[str]
    meters: list[str]
    plans: list[MeterPlan | None]
    groups: list[list[Group]]  # per meter code: group tuple of each group code
    max_timestamp: list[int] = field(default_factory=list)  # per record, every event

    @property
    def n(self) -> int:
        return self.starts[-1]


def _codes(values: list[Any]) -> tuple[I64, list[Any]]:
    """Factorise in first-seen order: dict operations driven from C (``fromkeys``,
    ``map``), no sort and no Python-level loop."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) == 1:  # one customer per envelope, one meter per fetch: common
        return np.zeros(len(values), dtype=np.int64), distinct
    table = {v: i for i, v in enumerate(distinct)}
    codes = np.fromiter(map(table.__getitem__, values), dtype=np.int64, count=len(values))
    return codes, distinct


def build_columns(batches: list[Batch], quantities: list[I64], now_ms: list[int],
                  registry: MeterRegistry, plans: dict[str, MeterPlan | None]) -> Columns:
    """Columns and verdicts of ``batches`` (each decoded by ``decode_batch``, so every
    structural rule already holds); ``now_ms``: each record's processing time."""
    counts = [len(b) for b in batches]
    starts = [0, *accumulate(counts)]
    n = starts[-1]
    record = np.repeat(np.arange(len(batches), dtype=np.int64), counts)
    position = np.arange(n, dtype=np.int64) - np.repeat(np.array(starts[:-1], np.int64), counts)
    quantity = np.concatenate(quantities) if quantities else np.zeros(0, np.int64)
    timestamp = np.array(list(chain.from_iterable(b.timestamps_ms for b in batches)),
                         dtype=np.int64)
    hour_start = timestamp - timestamp % HOUR_MS
    customer, customers = _codes(list(chain.from_iterable(b.customers for b in batches)))
    meter, meters = _codes(list(chain.from_iterable(b.meters for b in batches)))
    for name in meters:
        if name not in plans:
            found = registry.get(name)
            plans[name] = None if found is None else MeterPlan(found)
    meter_plans = [plans[name] for name in meters]
    ids: list[str | None] = list(chain.from_iterable(
        repeat(None, len(b)) if b.ids is None else b.ids for b in batches))
    has_id = np.zeros(n, dtype=np.bool_)
    for b, s in zip(batches, starts, strict=False):
        if b.ids is not None:
            has_id[s:s + len(b)] = [i is not None for i in b.ids]
    # No dimensions (None) and {} mean the same to every rule: one shared empty dict
    # for both lets the rules below run as C-level map() calls without a None test.
    dims: list[dict[str, str]] = list(chain.from_iterable(
        repeat(_EMPTY, len(b)) if b.dimensions is None
        else [d or _EMPTY for d in b.dimensions] if None in b.dimensions
        else b.dimensions for b in batches))  # type: ignore[misc]

    # Precedence as in apply_batch: unknown meter, missing customer, then MeterPlan.check
    # (time, sign, [range], dimensions, unique value). Written lowest first, so a higher
    # one overwrites.
    reason = np.zeros(n, dtype=np.int8)
    group = np.zeros(n, dtype=np.int64)
    unique_values: list[str | None] = [None] * n
    groups: list[list[Group]] = []
    for code, plan in enumerate(meter_plans):
        if plan is None:
            groups.append([])
            continue
        where = np.flatnonzero(meter == code)
        at = where.tolist()
        mine = list(map(dims.__getitem__, at))
        verdicts, group_codes, group_list, values = _dimension_rules(plan, mine)
        if verdicts is not None:
            reason[where] = verdicts
        group[where] = group_codes
        groups.append(group_list)
        if plan.unique:
            for i, v in zip(at, values, strict=True):
                unique_values[i] = v
    newest_ok = np.repeat(np.array([min(t + MAX_FUTURE_SKEW_MS, MAX_TIMESTAMP_MS - 1)
                                    for t in now_ms], dtype=np.int64), counts)
    allow_negative = np.array([p is not None and p.allow_negative for p in meter_plans],
                              dtype=np.bool_)
    reason[(quantity < 0) & ~allow_negative[meter]] = _NEGATIVE
    reason[(timestamp < MIN_TIMESTAMP_MS) | (timestamp > newest_ok)] = _TIME
    if customers and "" in customers:
        reason[customer == customers.index("")] = _NO_CUSTOMER
    unknown = [c for c, p in enumerate(meter_plans) if p is None]
    if unknown:
        reason[np.isin(meter, unknown)] = _UNKNOWN
    max_timestamp = (np.maximum.reduceat(timestamp, starts[:-1]).tolist() if n else [])
    return Columns(starts=starts, batch_ids=[b.batch_id for b in batches], record=record,
                   position=position, quantity=quantity,
                   timestamp=timestamp, hour_start=hour_start, hour_end=hour_start + HOUR_MS,
                   customer=customer, meter=meter, group=group, reason=reason, has_id=has_id,
                   ids=ids, unique_values=unique_values, customers=customers, meters=meters,
                   plans=meter_plans, groups=groups, max_timestamp=max_timestamp)


def _dimension_rules(plan: MeterPlan, dims: list[dict[str, str]]
                     ) -> tuple[npt.NDArray[np.int8] | None, I64, list[Group],
                                list[str | None]]:
    """The dimension part of ``MeterPlan.check`` for one meter's events: verdicts (None:
    all valid), group codes, the groups, and the unique values (unique_count only).
    Each rule is one ``map`` over the events (the iteration runs in C)."""
    group_by, allowed, n = plan.group_by, plan.allowed, len(dims)
    values: list[str | None] = [None] * n if plan.unique else []
    if not any(dims):  # no event carries dimensions: one group, the empty one
        verdicts = (np.full(n, _NO_UNIQUE, dtype=np.int8) if plan.unique else None)
        return verdicts, np.zeros(n, dtype=np.int64), [plan.empty_group], values
    ok = np.fromiter(map(allowed.issuperset, dims), dtype=np.bool_, count=n)
    verdict = np.where(ok, 0, _DIMENSION).astype(np.int8)
    if plan.unique:
        values = list(map(methodcaller("get", plan.value_property), dims))
        # no dimensions or an empty value: missing value, unless a key is not allowed
        missing = np.fromiter(map(not_, values), dtype=np.bool_, count=n) & ok
        verdict[missing] = _NO_UNIQUE
    if not group_by:
        codes, group_list = np.zeros(n, dtype=np.int64), [plan.empty_group]
    elif len(group_by) == 1:
        (name,) = group_by
        codes, keys = _codes(list(map(methodcaller("get", name, ""), dims)))
        group_list = [((name, k),) for k in keys]
    else:
        codes, keys = _codes(list(zip(*[map(methodcaller("get", g, ""), dims)
                                        for g in group_by], strict=True)))
        group_list = [tuple(zip(group_by, k, strict=True)) for k in keys]
    return (verdict if verdict.any() else None), codes, group_list, values
