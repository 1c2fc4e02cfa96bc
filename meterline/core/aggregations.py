"""Aggregation functions as pure objects over plain, exact states.

Every aggregator has ``initialize() -> state``, ``add(state, quantity_nanos, timestamp_ms,
value, event_id) -> state``, ``merge(a, b) -> state`` and ``result(state) -> int``. ``merge``
is associative and commutative and ``fold(whole) == merge(fold(part1), fold(part2))`` for any
split of a stream, in any order (property-tested): that is what lets hourly states roll up
into the daily one and lets partial states from two batches combine.

Contract on state ownership: ``add`` may update a mutable state (unique_count's set) in place
and returns the state to keep, so callers always use its return value; ``merge`` never
modifies its arguments. ``to_plain``/``from_plain`` convert states to ints, strings, tuples
and ``None`` only, for changelogs and state columns.

Results are nano-units (``int``, 10**9 per unit) for every aggregation, counts included: a
count of 3 events is ``3 * 10**9``. One representation means one ClickHouse column type,
Decimal(38, 9), and readers never have to know which meters are counts.

- sum: exact int addition. min/max: exact ints. Empty min/max/latest states give 0, but a
  rollup window exists only after its first event, so an empty state is never reported.
- latest: the value of the event with the greatest ``(timestamp_ms, event_id)``; the
  quantity breaks the last tie, so the choice is a total order. Arrival order plays no part:
  a replayed or reordered stream picks the same event.
- Range: every quantity fits Decimal(38, 9) (``quantity.MAX_NANOS``), and only a *sum* can
  leave that range (``total_can_overflow``): min, max and latest report one event's
  quantity; count and unique_count would need 10**29 events in one window (a billion a
  second for three trillion years). The rollup checks a sum's new hourly and daily results
  before storing either (so ``add`` of such an aggregator must not modify its argument),
  and a ``merge`` of states within range is exact: Python ints do not overflow, and the
  daily state is itself a checked fold, so merged hours never exceed what it holds.
- unique_count: the exact set of distinct values. Memory grows with the distinct values per
  (customer, meter, group, window): roughly 100 bytes per short id in CPython, so a million
  distinct users in one daily window is ~100 MB. The bounded alternative is a sketch
  (HyperLogLog, ClickHouse ``uniqCombined``; ~1-2 % error, a few KB), which is not
  acceptable for billing; an exact middle ground for integer ids is a Roaring bitmap
  (ClickHouse ``groupBitmap``). We keep exact sets and count on windows being evicted.

Time-weighted sum (gauges, e.g. GB stored -> GB-milliseconds)
-------------------------------------------------------------
A gauge value ``v`` (nanos) set at ``t1`` and replaced at ``t2`` contributes
``v * (t2 - t1)`` nano-unit-milliseconds. With integer nanos and integer ms this product is
exact, and it stays exact under reordering *if the state is the set of change points, not a
running total*: a point's contribution depends on the next point, which a late event can
insert at any time, so a running total cannot be updated incrementally. With
``state = sorted change points`` and ``merge = sorted union``, the integral over
``[start, end)`` is a pure function of the points and the value carried in from before
``start``; it is exact and independent of arrival order, and hourly integrals (each with its
carry-in) sum exactly to the daily integral because integrals add over adjacent intervals.

It does not fit the plain ``result(state)`` shape, which is why it is not in the registry
(``meters.Aggregation`` has no member for it either):

1. The result needs the window bounds and the carried-in value (the last change point
   before the window, possibly days earlier). A late-but-allowed change point shifts the
   carry of every following window up to the next change point, so the rollup must re-dirty
   those windows too, and keep each window's last value after the window is evicted.
2. A too-late change point (its window closed) cannot be applied to the closed window; if it
   were still applied to the carry of open windows, the closed and open totals would
   describe different histories. It has to go to the late table like other too-late events.
3. An open window's integral assumes the last value holds until the window end; it is a
   provisional total that later points replace (versioned totals handle this).
4. State is every change point of the open windows. Once a window closes it compacts to
   ``(integral, last_value)``, so memory is bounded by change points per open window.
5. ``v * duration_ms`` outgrows Decimal(38, 9) for huge gauges (10**38 nanos at most,
   times 86,400,000 ms a day): store nano-unit-ms in Int256 or Decimal(76, 0).

``TimeWeightedSum`` below implements the exact part (points, merge, ``integral``,
``carry_out``); wiring it into rollups needs the carry chain of points 1-2.
"""

from __future__ import annotations

import heapq
from bisect import insort
from typing import Any, Protocol, TypeVar

from meterline.core.meters import Aggregation
from meterline.core.quantity import SCALE

__all__ = [
    "Aggregator",
    "Count",
    "GaugePoint",
    "Latest",
    "Max",
    "Min",
    "Sum",
    "TimeWeightedSum",
    "UniqueCount",
    "aggregator_for",
]

S = TypeVar("S")
LatestState = tuple[int, str, int] | None  # (timestamp_ms, event_id, quantity_nanos)
GaugePoint = tuple[int, str, int]  # (timestamp_ms, event_id, value_nanos)


class Aggregator(Protocol[S]):
    name: str
    # True when results can leave Decimal(38, 9) although each quantity fits; ``add`` is
    # then pure (returns a new state), so a caller can try it and keep the old state.
    total_can_overflow: bool

    def initialize(self) -> S: ...

    def add(
        self, state: S, quantity_nanos: int, timestamp_ms: int, value: str | None = None,
        event_id: str = "",
    ) -> S: ...

    def merge(self, a: S, b: S) -> S: ...

    def result(self, state: S) -> int: ...

    def to_plain(self, state: S) -> Any: ...

    def from_plain(self, plain: Any) -> S: ...


class Sum:
    name = "sum"
    total_can_overflow = True  # two quantities of 6 * 10**37 nano-units already do

    def initialize(self) -> int:
        return 0

    def add(self, state: int, quantity_nanos: int, timestamp_ms: int,
            value: str | None = None, event_id: str = "") -> int:
        return state + quantity_nanos

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, state: int) -> int:
        return state

    def to_plain(self, state: int) -> int:
        return state

    def from_plain(self, plain: Any) -> int:
        return _int(plain)


class Count(Sum):
    """Counts events; the quantity is ignored. State is the event count, result nano-scaled."""

    name = "count"
    total_can_overflow = False  # a result out of range needs 10**29 events in one window

    def add(self, state: int, quantity_nanos: int, timestamp_ms: int,
            value: str | None = None, event_id: str = "") -> int:
        return state + 1

    def result(self, state: int) -> int:
        return state * SCALE


class Min:
    name = "min"
    total_can_overflow = False  # the result is one event's quantity

    def initialize(self) -> int | None:
        return None

    def add(self, state: int | None, quantity_nanos: int, timestamp_ms: int,
            value: str | None = None, event_id: str = "") -> int | None:
        return quantity_nanos if state is None or quantity_nanos < state else state

    def merge(self, a: int | None, b: int | None) -> int | None:
        return a if b is None else self.add(a, b, 0)

    def result(self, state: int | None) -> int:
        return 0 if state is None else state

    def to_plain(self, state: int | None) -> int | None:
        return state

    def from_plain(self, plain: Any) -> int | None:
        return None if plain is None else _int(plain)


class Max(Min):
    name = "max"

    def add(self, state: int | None, quantity_nanos: int, timestamp_ms: int,
            value: str | None = None, event_id: str = "") -> int | None:
        return quantity_nanos if state is None or quantity_nanos > state else state


class Latest:
    name = "latest"
    total_can_overflow = False  # the result is one event's quantity

    def initialize(self) -> LatestState:
        return None

    def add(self, state: LatestState, quantity_nanos: int, timestamp_ms: int,
            value: str | None = None, event_id: str = "") -> LatestState:
        candidate = (timestamp_ms, event_id, quantity_nanos)
        return candidate if state is None or candidate > state else state

    def merge(self, a: LatestState, b: LatestState) -> LatestState:
        if a is None or b is None:
            return b if a is None else a
        return a if a > b else b

    def result(self, state: LatestState) -> int:
        return 0 if state is None else state[2]

    def to_plain(self, state: LatestState) -> tuple[int, str, int] | None:
        return state

    def from_plain(self, plain: Any) -> LatestState:
        return None if plain is None else _triple(plain)


class UniqueCount:
    name = "unique_count"
    total_can_overflow = False  # a result out of range needs 10**29 distinct values

    def initialize(self) -> set[str]:
        return set()

    def add(self, state: set[str], quantity_nanos: int, timestamp_ms: int,
            value: str | None = None, event_id: str = "") -> set[str]:
        if value is None:
            raise ValueError("unique_count needs the value of its value_property dimension")
        state.add(value)  # in place: copying a large set per event would be quadratic
        return state

    def merge(self, a: set[str], b: set[str]) -> set[str]:
        return a | b

    def result(self, state: set[str]) -> int:
        return len(state) * SCALE

    def to_plain(self, state: set[str]) -> tuple[str, ...]:
        return tuple(sorted(state))  # sorted: equal states serialise identically

    def from_plain(self, plain: Any) -> set[str]:
        values = set(plain)
        if not all(type(v) is str for v in values):
            raise ValueError("unique_count state holds str values only")
        return values


class TimeWeightedSum:
    """Exact integral of a gauge, in nano-unit-milliseconds (see the module docstring)."""

    name = "time_weighted_sum"

    def initialize(self) -> list[GaugePoint]:
        return []

    def add(self, state: list[GaugePoint], quantity_nanos: int, timestamp_ms: int,
            value: str | None = None, event_id: str = "") -> list[GaugePoint]:
        insort(state, (timestamp_ms, event_id, quantity_nanos))
        return state

    def merge(self, a: list[GaugePoint], b: list[GaugePoint]) -> list[GaugePoint]:
        return list(heapq.merge(a, b))

    def integral(self, state: list[GaugePoint], start_ms: int, end_ms: int,
                 carry_in: int | None = None) -> int:
        """Integral over ``[start_ms, end_ms)``. Before the first known value (no carry-in,
        no earlier point) the gauge is unknown and contributes nothing. Points at the same
        ms hold for zero time; the last in (timestamp_ms, event_id, value) order carries."""
        value, cursor, total = carry_in, start_ms, 0
        for ts, _, point_value in state:
            if ts >= end_ms:
                break
            if ts > cursor:
                if value is not None:
                    total += value * (ts - cursor)
                cursor = ts
            value = point_value
        if value is not None:
            total += value * (end_ms - cursor)
        return total

    def carry_out(self, state: list[GaugePoint], end_ms: int,
                  carry_in: int | None = None) -> int | None:
        """The value in force at ``end_ms``: the carry-in of the next window."""
        value = carry_in
        for ts, _, point_value in state:
            if ts >= end_ms:
                break
            value = point_value
        return value

    def to_plain(self, state: list[GaugePoint]) -> tuple[GaugePoint, ...]:
        return tuple(state)

    def from_plain(self, plain: Any) -> list[GaugePoint]:
        return sorted(_triple(point) for point in plain)


def _triple(plain: Any) -> tuple[int, str, int]:
    ts, eid, value = plain  # JSON turns the tuple into a list
    if type(eid) is not str:
        raise ValueError(f"state needs a str event id, got {eid!r}")
    return (_int(ts), eid, _int(value))


def _int(value: Any) -> int:
    if type(value) is not int:
        raise ValueError(f"state values are exact ints, got {value!r}")
    return value


_REGISTRY: dict[Aggregation, Aggregator[Any]] = {
    Aggregation.SUM: Sum(),
    Aggregation.COUNT: Count(),
    Aggregation.MIN: Min(),
    Aggregation.MAX: Max(),
    Aggregation.LATEST: Latest(),
    Aggregation.UNIQUE_COUNT: UniqueCount(),
}


def aggregator_for(aggregation: Aggregation | str) -> Aggregator[Any]:
    """The shared, stateless aggregator of a meter's aggregation."""
    return _REGISTRY[Aggregation(aggregation)]
