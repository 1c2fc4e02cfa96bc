"""Group a run's accepted events by window and merge the partials into the window state.

The ordered loop (``processor.py``) has decided, per event and exactly as the per-event
fold would, which events are accepted. What is left is order-free: every aggregation's
``merge`` agrees with its ``add`` (``core/aggregations.py``, property-tested), so folding
a window's accepted events of this run into one partial and merging it into the window
gives the state the per-event fold reaches. The group-by is a stable sort of integer keys
(customer, meter, dimension group, window); the reductions are numpy ``reduceat`` over
int64 - exact, because the run's sum of |quantity| is below 2**62 (``columns.py``).

Windows are created in the order the per-event fold creates them (by the first accepted
event, the hourly before the daily one), so the state, and with it a checkpoint, is the
same byte for byte. With the compiled window state (``native_state.py``) the events of
the aggregations it holds go there instead, in log order; only latest windows and those
the Python state holds take the numpy group-by here.
"""

from __future__ import annotations

from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from meterline.aggregators.columnar.columns import Columns
from meterline.aggregators.columnar.native_state import NativeRollupState
from meterline.core.aggregations import Count, Latest, Max, Min, Sum, UniqueCount
from meterline.core.rollup import Key, RollupState
from meterline.core.windows import DAY_MS, HOUR_MS

__all__ = ["merge_accepted"]

I64 = npt.NDArray[np.int64]
_KINDS = {Sum: 0, Count: 1, Min: 2, Max: 3, Latest: 4, UniqueCount: 5}
# What the compiled store holds (native_state.py).
_NATIVE_KINDS = (Sum, Count, Min, Max, UniqueCount)


def _dense(values: I64) -> tuple[I64, int]:
    """Codes 0..k-1 for the distinct values (sorted), and k."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return inverse.astype(np.int64, copy=False), len(uniq)


def merge_accepted(state: RollupState, cols: Columns, accepted: npt.NDArray[np.bool_],
                   dirty: set[Key]) -> int:
    """Fold the accepted events of ``cols`` into ``state``; returns the windows the
    Python state merged (those the compiled store merged are not counted)."""
    idx = np.flatnonzero(accepted)
    if idx.size == 0:
        return 0
    if isinstance(state, NativeRollupState):
        return _merge_native(state, cols, idx, dirty)
    return _merge_python(state, cols, idx, idx, dirty)


def _merge_native(state: NativeRollupState, cols: Columns, idx: I64, dirty: set[Key]) -> int:
    """Events of the aggregations the compiled store holds into it, in log order; the rest
    (latest, and windows the Python state holds) through ``_merge_python``."""
    codes = [state.meter_code(name) if plan is not None
             and type(plan.aggregator) in _NATIVE_KINDS else None
             for name, plan in zip(cols.meters, cols.plans, strict=True)]
    meter_code = np.array([-1 if c is None else c for c in codes], dtype=np.int64)
    m = meter_code[cols.meter[idx]]
    compiled = m >= 0
    rest = idx[~compiled]
    on = idx[compiled]
    if on.size == 0:
        return _merge_python(state, cols, rest, rest, dirty)
    # Run codes -> the store's codes: customers by the store's table, each (meter, group)
    # of the run once.
    customers = np.frombuffer(state.store.customer_codes(cols.customers), dtype=np.int64)
    offsets = np.cumsum([0] + [len(g) for g in cols.groups[:-1]]).astype(np.int64)
    group_code = np.array([state.group_code(g) if code is not None else -1
                           for code, meter_groups in zip(codes, cols.groups, strict=True)
                           for g in meter_groups] or [-1], dtype=np.int64)
    meter_of = cols.meter[on]
    hourly, daily = state.merge_columns(
        customers[cols.customer[on]], m[compiled], group_code[offsets[meter_of] + cols.group[on]],
        cols.timestamp[on], cols.quantity[on], on, cols.unique_values)
    if rest.size == 0 and hourly.size == 0 and daily.size == 0:
        return 0
    return _merge_python(state, cols, np.union1d(rest, on[hourly]),
                         np.union1d(rest, on[daily]), dirty)


def _merge_python(state: RollupState, cols: Columns, hourly_idx: I64, daily_idx: I64,
                  dirty: set[Key]) -> int:
    """Group accepted events (``hourly_idx`` / ``daily_idx``: those to fold into their
    hourly / daily windows, in log order) and merge the partials into ``state``'s cells."""
    firsts, partials = [], []
    kinds = (("hourly", HOUR_MS, hourly_idx), ("daily", DAY_MS, daily_idx))
    k = None
    for kind, (name, size_ms, idx) in enumerate(kinds):
        if idx.size == 0:
            continue
        if k is None or idx is not hourly_idx:
            # (customer, meter, group) -> one dense code, in two steps so no product of
            # code ranges can overflow int64 (each step's codes are < the events).
            k, _ = _dense(cols.customer[idx] * len(cols.meters) + cols.meter[idx])
            width = int(cols.group[idx].max()) + 1
            k, _ = _dense(k * width + cols.group[idx])
        ts = cols.timestamp[idx]
        start = ts - ts % size_ms
        lo = int(start.min())
        span = (int(start.max()) - lo) // size_ms + 1
        window_key = k * span + (start - lo) // size_ms  # < events * windows: fits
        first, found = _groups(cols, idx, window_key, start, name)
        firsts.append(first * 2 + kind)
        partials += found
    if not partials:
        return 0
    # The per-event fold creates a window at its first accepted event, hourly first:
    # merge in that order, so the state's windows (and a checkpoint) come out the same.
    order = np.argsort(np.concatenate(firsts), kind="stable").tolist()
    state.merge_partials([partials[i] for i in order], dirty)
    return len(order)


def _groups(cols: Columns, idx: I64, window_key: I64, start: I64, name: str
            ) -> tuple[I64, list[tuple[Key, Any, Any, int]]]:
    """Per window of ``window_key``: its first event, and ``(key, aggregator, partial
    state, events)``."""
    order = np.argsort(window_key, kind="stable")  # events keep log order inside a group
    sorted_key = window_key[order]
    bounds = np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1
    heads = np.concatenate(([0], bounds))
    sizes = np.diff(np.concatenate((heads, [len(order)])))
    members = idx[order]  # event indices, grouped
    first = members[heads]  # the group's first event (stable sort: the earliest)
    q = cols.quantity[members]
    meter = cols.meter[first]
    plans = cols.plans
    # Per meter code: what its windows hold (0 sum, 1 count, 2 min, 3 max, 4 latest,
    # 5 unique_count). The int results are picked for every window at once; only latest
    # and unique_count build their states in Python.
    kind_of_meter = np.array([_KINDS.get(type(p.aggregator), 0) if p is not None else 0
                              for p in plans], dtype=np.int8)
    kind = kind_of_meter[meter]
    present = set(np.unique(kind).tolist())
    value = sizes.astype(np.int64)  # count: the state is the number of events
    if 0 in present:
        value = np.where(kind == 0, np.add.reduceat(q, heads), value)
    if 2 in present:
        value = np.where(kind == 2, np.minimum.reduceat(q, heads), value)
    if 3 in present:
        value = np.where(kind == 3, np.maximum.reduceat(q, heads), value)
    partial: list[Any] = value.tolist()
    if 4 in present:
        latest = _latest(cols, members, heads, sizes)
        for j in np.flatnonzero(kind == 4).tolist():
            partial[j] = latest[j]
    if 5 in present:
        member_list, unique_values = members.tolist(), cols.unique_values
        head_of, size_of = heads.tolist(), sizes.tolist()
        for j in np.flatnonzero(kind == 5).tolist():
            h = head_of[j]
            partial[j] = {unique_values[i] for i in member_list[h:h + size_of[j]]}
    # Group tuples of all meters in one table, so a window's group is one index.
    offsets = np.cumsum([0] + [len(g) for g in cols.groups[:-1]]).astype(np.int64)
    all_groups = [g for meter_groups in cols.groups for g in meter_groups]
    keys = zip(repeat(name),
               map(cols.customers.__getitem__, cols.customer[first].tolist()),
               map(cols.meters.__getitem__, meter.tolist()),
               map(all_groups.__getitem__, (offsets[meter] + cols.group[first]).tolist()),
               start[order][heads].tolist())
    aggregators = map([p.aggregator if p is not None else None for p in plans].__getitem__,
                      meter.tolist())
    return first, list(zip(keys, aggregators, partial, sizes.tolist(), strict=True))


def _latest(cols: Columns, members: I64, heads: I64, sizes: I64) -> list[Any]:
    """Per group, the (timestamp, event id, quantity) that ``Latest`` keeps: the newest
    time by a vectorised max, the event id and quantity compared in Python only among the
    events sharing that time."""
    ts = cols.timestamp[members]
    newest = np.maximum.reduceat(ts, heads)
    at_newest = np.flatnonzero(ts == np.repeat(newest, sizes))
    group_of = np.repeat(np.arange(len(heads)), sizes)[at_newest].tolist()
    best: list[Any] = [None] * len(heads)
    for g, i in zip(group_of, members[at_newest].tolist(), strict=True):
        candidate = (int(cols.timestamp[i]), _event_id(cols, i), int(cols.quantity[i]))
        if best[g] is None or candidate > best[g]:
            best[g] = candidate
    return best


def _event_id(cols: Columns, i: int) -> str:
    explicit = cols.ids[i]
    if explicit is not None:
        return explicit
    return f"{cols.batch_ids[int(cols.record[i])]}-{int(cols.position[i])}"
