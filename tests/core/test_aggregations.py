"""Aggregations: exact ints, merge agrees with fold, order never matters."""

from __future__ import annotations

import functools
import itertools
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.aggregations import (
    Aggregator,
    Count,
    Latest,
    Max,
    Min,
    Sum,
    TimeWeightedSum,
    UniqueCount,
    aggregator_for,
)
from meterline.core.meters import Aggregation
from meterline.core.quantity import SCALE, to_nanos

Event = tuple[int, int, str, str]  # (quantity_nanos, timestamp_ms, value, event_id)
ALL = [aggregator_for(a) for a in Aggregation]


def fold(agg: Aggregator[Any], events: list[Event]) -> Any:
    state = agg.initialize()
    for qty, ts, value, eid in events:
        state = agg.add(state, qty, ts, value, eid)
    return state


events_st = st.lists(
    st.tuples(
        st.integers(min_value=-(10**20), max_value=10**20),
        st.integers(min_value=0, max_value=50),  # few timestamps: ties are common
        st.sampled_from(["u1", "u2", "u3", "u4"]),
        st.sampled_from(["a", "b", "c", "d", "e"]),
    ),
    max_size=30,
)


def test_registry_covers_every_aggregation() -> None:
    for aggregation in Aggregation:
        assert aggregator_for(aggregation).name == aggregation.value
        assert aggregator_for(aggregation.value) is aggregator_for(aggregation)
    with pytest.raises(ValueError):
        aggregator_for("median")


def test_sum_and_count() -> None:
    events = [(to_nanos("0.1"), 1, "x", "a"), (to_nanos("2.5"), 2, "x", "b")]
    assert Sum().result(fold(Sum(), events)) == 2_600_000_000
    # Counts ignore the quantity and are nano-scaled like every other result.
    assert Count().result(fold(Count(), events)) == 2 * SCALE
    assert Count().result(Count().initialize()) == 0


def test_min_max_exact_beyond_float_precision() -> None:
    big = 10**37 + 1  # a float would round this to 1e37
    events = [(big, 1, "", "a"), (10**37, 2, "", "b"), (-5, 3, "", "c")]
    assert Max().result(fold(Max(), events)) == big
    assert Min().result(fold(Min(), events)) == -5
    assert Min().result(Min().initialize()) == 0  # never reported: windows start non-empty


def test_latest_is_by_event_time_then_id_not_arrival() -> None:
    events = [(1, 100, "", "b"), (2, 300, "", "a"), (3, 200, "", "z"), (4, 300, "", "c")]
    for order in itertools.permutations(events):
        # ts 300 twice: the greater event id "c" wins whatever the arrival order.
        assert Latest().result(fold(Latest(), list(order))) == 4


def test_unique_count_counts_distinct_values() -> None:
    agg = UniqueCount()
    state = fold(agg, [(0, 1, "u1", "a"), (0, 2, "u2", "b"), (0, 3, "u1", "c")])
    assert agg.result(state) == 2 * SCALE
    with pytest.raises(ValueError, match="value_property"):
        agg.add(state, 0, 1, None)


def test_merge_never_modifies_its_inputs() -> None:
    agg = UniqueCount()
    a, b = {"u1"}, {"u2"}
    assert agg.merge(a, b) == {"u1", "u2"}
    assert (a, b) == ({"u1"}, {"u2"})


@pytest.mark.parametrize("agg", ALL, ids=lambda a: a.name)
@given(events=events_st)
def test_plain_round_trip(agg: Aggregator[Any], events: list[Event]) -> None:
    state = fold(agg, events)
    plain = agg.to_plain(state)
    assert agg.from_plain(plain) == state
    if isinstance(plain, tuple):  # what a JSON changelog gives back
        assert agg.from_plain(list(plain)) == state


@pytest.mark.parametrize("agg", [Sum(), Min(), Latest()], ids=lambda a: a.name)
def test_from_plain_refuses_floats(agg: Aggregator[Any]) -> None:
    with pytest.raises(ValueError):
        agg.from_plain([1.0, "a", 2] if agg.name == "latest" else 1.0)


@pytest.mark.parametrize("agg", ALL, ids=lambda a: a.name)
@given(events=events_st, data=st.data())
def test_any_split_in_any_order_merges_to_the_whole(
    agg: Aggregator[Any], events: list[Event], data: st.DataObject
) -> None:
    whole = agg.result(fold(agg, events))
    shuffled = data.draw(st.permutations(events))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), max_size=5)))
    parts = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
    merged = functools.reduce(agg.merge, (fold(agg, p) for p in parts), agg.initialize())
    assert agg.result(merged) == whole
    assert agg.result(fold(agg, shuffled)) == whole


@pytest.mark.parametrize("agg", ALL, ids=lambda a: a.name)
@given(a=events_st, b=events_st, c=events_st)
def test_merge_is_associative_and_commutative(
    agg: Aggregator[Any], a: list[Event], b: list[Event], c: list[Event]
) -> None:
    sa, sb, sc = fold(agg, a), fold(agg, b), fold(agg, c)
    assert agg.merge(sa, sb) == agg.merge(sb, sa)
    assert agg.merge(agg.merge(sa, sb), sc) == agg.merge(sa, agg.merge(sb, sc))
    assert agg.merge(sa, agg.initialize()) == sa  # the initial state is the identity


def test_ten_million_tenths_are_exact_and_fast() -> None:
    started = time.perf_counter()
    tenth = to_nanos(0.1)
    agg = Sum()
    # 10,000 events folded one by one, then 1,000 such partial states merged: 10M events.
    partial = fold(agg, [(tenth, 0, "", "")] * 10_000)
    total = functools.reduce(agg.merge, itertools.repeat(partial, 1_000), agg.initialize())
    assert agg.result(total) == 1_000_000 * SCALE
    # The same 10M additions at C speed, and a count of 10M events.
    assert sum(itertools.repeat(tenth, 10_000_000)) == 1_000_000 * SCALE
    counts = functools.reduce(Count().merge, itertools.repeat(10_000, 1_000))
    assert Count().result(counts) == 10_000_000 * SCALE
    assert time.perf_counter() - started < 3.0
    assert sum(itertools.repeat(0.1, 10_000)) != 1000.0  # what floats would have billed


# --------------------------------------------------------------------- time-weighted sum

TWS = TimeWeightedSum()
Point = tuple[int, str, int]  # (timestamp_ms, event_id, value)


def brute_force(points: list[Point], start: int, end: int, carry: int | None) -> int:
    """Value in force at every single ms, summed: obviously right, only for tiny ranges."""
    total = 0
    ordered = sorted(points)
    for t in range(start, end):
        value = carry
        for ts, _, v in ordered:
            if ts <= t:
                value = v
        total += value or 0
    return total


def build(points: list[Point]) -> list[Point]:
    state = TWS.initialize()
    for ts, eid, value in points:
        state = TWS.add(state, value, ts, None, eid)
    return state


points_st = st.lists(
    st.tuples(st.integers(0, 120), st.sampled_from("abc"), st.integers(-(10**15), 10**15)),
    max_size=12,
)


def test_time_weighted_sum_example() -> None:
    gb = SCALE  # 1 GB in nanos
    state = build([(30, "b", 3 * gb), (10, "a", 2 * gb)])  # out of order on purpose
    # [0,10): unknown -> 0; [10,30): 2 GB * 20 ms; [30,100): 3 GB * 70 ms.
    assert TWS.integral(state, 0, 100) == (2 * 20 + 3 * 70) * gb
    assert TWS.integral(state, 0, 100, carry_in=gb) == (1 * 10 + 2 * 20 + 3 * 70) * gb
    assert TWS.carry_out(state, 100) == 3 * gb
    assert TWS.carry_out(state, 20) == 2 * gb


@given(points=points_st, carry=st.none() | st.integers(-(10**15), 10**15), data=st.data())
@settings(max_examples=60)
def test_time_weighted_sum_matches_brute_force_in_any_order(
    points: list[Point], carry: int | None, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(points))
    start = data.draw(st.integers(0, 60))
    end = data.draw(st.integers(start, 130))
    assert TWS.integral(build(shuffled), start, end, carry) == brute_force(points, start, end,
                                                                            carry)


@given(points=points_st, cuts=st.lists(st.integers(0, 120), max_size=4),
       carry=st.none() | st.integers(0, 10**12))
def test_adjacent_windows_with_carry_add_up_to_the_whole(
    points: list[Point], cuts: list[int], carry: int | None
) -> None:
    bounds = [0, *sorted(cuts), 121]  # points lie in [0, 120]
    state = build(points)
    whole = TWS.integral(state, 0, 121, carry)
    # Each window holds only its own points, as hourly states would, and gets its carry-in
    # from the window before it.
    total, carried = 0, carry
    for lo, hi in itertools.pairwise(bounds):
        own = build([p for p in points if lo <= p[0] < hi])
        total += TWS.integral(own, lo, hi, carried)
        carried = TWS.carry_out(own, hi, carried)
    assert total == whole
    # Merging the per-window point sets gives back the whole state.
    parts = [build([p for p in points if lo <= p[0] < hi]) for lo, hi in
             itertools.pairwise(bounds)]
    assert functools.reduce(TWS.merge, parts, TWS.initialize()) == sorted(points)
    assert TWS.from_plain([list(p) for p in TWS.to_plain(state)]) == state
