"""Batch and event dedupe: exact horizon, bounded memory, caller-driven clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.dedupe import (
    DEFAULT_DEDUPE_HORIZON_MS,
    MAX_RUNS_PER_PRODUCER,
    NO_PIN,
    BatchDeduper,
    Deduper,
    EventDeduper,
    InMemoryDeduper,
    SequenceDeduper,
    scoped_id,
)

T = 1_700_000_000_000
H = 1_000


def test_default_horizon_is_a_day() -> None:
    assert DEFAULT_DEDUPE_HORIZON_MS == 24 * 3600 * 1000
    assert BatchDeduper().horizon_ms == DEFAULT_DEDUPE_HORIZON_MS
    assert EventDeduper().horizon_ms == DEFAULT_DEDUPE_HORIZON_MS


def test_both_drivers_satisfy_the_protocol() -> None:
    drivers: list[Deduper] = [BatchDeduper(H), EventDeduper(H)]
    for d in drivers:
        assert d.seen_or_add("x", T) is False
        assert d.seen_or_add("x", T) is True


def test_horizon_boundary_is_exact() -> None:
    d = InMemoryDeduper(H)
    assert not d.seen_or_add("b1", T)
    assert d.seen_or_add("b1", T + H - 1)  # still remembered on the last ms
    assert "b1" in d
    assert not d.seen_or_add("b1", T + H)  # forgotten at t + horizon: new again


def test_repeat_does_not_extend_the_horizon() -> None:
    d = InMemoryDeduper(H)
    d.seen_or_add("b1", T)
    assert d.seen_or_add("b1", T + H - 1)
    assert d.expire(T + H) == 1  # measured from first sight, not from the repeat
    assert len(d) == 0


def test_clock_stepping_back_is_clamped() -> None:
    d = InMemoryDeduper(H)
    d.seen_or_add("a", T + 500)
    d.seen_or_add("b", T)  # earlier now_ms: treated as T + 500, keeping insertion order
    assert d.expire(T + 500 + H - 1) == 0
    assert d.expire(T) == 0  # going back cannot expire more, nor resurrect anything
    assert d.expire(T + 500 + H) == 2


def test_memory_is_bounded_by_the_horizon() -> None:
    d = InMemoryDeduper(H)
    for i in range(100_000):  # 100 ids per ms of clock, 1,000 ms horizon
        assert not d.seen_or_add(f"id-{i}", T + i // 100)
        assert len(d) <= 100 * H
    assert len(d) == 100 * H
    d.expire(T + 10 * H)
    assert len(d) == 0


def test_expire_returns_forgotten_count() -> None:
    d = InMemoryDeduper(H)
    for i in range(5):
        d.seen_or_add(str(i), T + i)
    assert d.expire(T + H + 2) == 3
    assert sorted(k for k in "01234" if k in d) == ["3", "4"]


@pytest.mark.parametrize("horizon", [0, -1, 1.5, None])
def test_bad_horizon_rejected(horizon: object) -> None:
    with pytest.raises(ValueError, match="horizon_ms"):
        InMemoryDeduper(horizon)  # type: ignore[arg-type]


# ---------------------------------------------------------------- (producer, seq) batches



@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 40)), max_size=300))
def test_sequences_answer_like_a_set_of_everything_seen(sends: list[tuple[str, int]]) -> None:
    d = SequenceDeduper(horizon_ms=10**12)
    seen: set[tuple[str, int]] = set()
    for t, (producer, seq) in enumerate(sends):
        assert d.seen_or_add(producer, seq, t) == ((producer, seq) in seen)
        seen.add((producer, seq))


def test_in_order_traffic_is_one_run_per_producer() -> None:
    d = SequenceDeduper()
    for seq in range(10_000):
        for producer in ("p1", "p2"):
            assert not d.seen_or_add(producer, seq, seq)
    assert len(d) == 2
    _clock, runs = d.export()
    assert runs == {"p1": [[0, 9_999, 9_999, NO_PIN]], "p2": [[0, 9_999, 9_999, NO_PIN]]}
    assert d.seen_or_add("p1", 1234, 10_000)  # a resend, long after


def test_state_is_per_producer_not_per_batch() -> None:
    """10,000 emitting producers, 100 batches each: 10,000 entries, each one run."""
    import json

    d = SequenceDeduper()
    for seq in range(100):
        for p in range(10_000):
            d.seen_or_add(f"01J{p:023d}", seq, T + seq, T + 3_600_000)  # + the window end
    assert len(d) == 10_000
    size = len(json.dumps(d.export()[1]))
    assert size < 10_000 * 90, size


def test_runs_expire_after_the_horizon_and_idle_producers_go() -> None:
    d = SequenceDeduper(horizon_ms=100)
    d.seen_or_add("p", 0, 0)
    assert d.seen_or_add("p", 0, 99)  # within the horizon (not extended by a repeat)
    assert not d.seen_or_add("p", 0, 100)  # forgotten: counted again, as with batch ids
    d.seen_or_add("q", 0, 100)
    assert d.expire(250) == 2 and len(d) == 0


def test_a_producer_with_endless_holes_stays_bounded() -> None:
    d = SequenceDeduper()
    for i in range(MAX_RUNS_PER_PRODUCER * 3):
        d.seen_or_add("lossy", 2 * i, i)  # every other batch lost: a new run each time
    assert len(d.export()[1]["lossy"]) == MAX_RUNS_PER_PRODUCER
    assert d.forgotten_runs == MAX_RUNS_PER_PRODUCER * 2


def test_rollup_dedupes_resent_batches_by_producer_and_seq() -> None:
    from meterline.core.envelope import Batch
    from meterline.core.lateness import PartitionWatermark
    from meterline.core.meters import MeterRegistry
    from meterline.core.rollup import Dedupers, RollupState

    registry = MeterRegistry.from_mapping({"meters": {"calls": {"aggregation": "count"}}})
    state, dedupers, wm = RollupState(), Dedupers.in_memory(), PartitionWatermark()
    t = 1_700_000_000_000
    first = Batch("id-1", t, ["c"], ["calls"], [1], [t], producer="sdk", seq=0)
    resent = Batch("id-1-again", t, ["c"], ["calls"], [1], [t], producer="sdk", seq=0)
    assert state.apply_batch(first, registry, dedupers, wm, t).accepted == 1
    assert state.apply_batch(resent, registry, dedupers, wm, t).duplicate_batch
    assert len(dedupers.batches) == 0  # type: ignore[arg-type]


# ---------------------------------------------------------------- held while windows are open


def test_an_entry_is_held_until_its_horizon_passed_and_its_window_closed() -> None:
    d = InMemoryDeduper(H)
    assert not d.seen_or_add("k", T, until_ms=5_000)
    assert d.seen_or_add("k", T + 10 * H)  # the horizon passed; its window is open
    d.close_before(4_999)
    assert d.seen_or_add("k", T + 10 * H)
    d.close_before(5_000)  # window [.., 5000) closed: now it may go
    assert not d.seen_or_add("k", T + 10 * H)
    d.close_before(10)  # the frontier never moves back
    assert d.closed_ms == 5_000


def test_closing_first_then_the_horizon_passing_also_frees_it() -> None:
    d = InMemoryDeduper(H)
    d.seen_or_add("k", T, until_ms=5_000)
    d.close_before(6_000)
    assert d.seen_or_add("k", T + H - 1)  # closed, but within its horizon
    assert d.expire(T + H) == 1 and len(d) == 0


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3 * H), st.integers(0, 50),
                          st.integers(0, 40)), max_size=200))
def test_answers_like_the_rule_whatever_the_order_of_calls(
        ops: list[tuple[int, int, int, int]]) -> None:
    """Reference: an entry is held while now < first + horizon or until > closed."""
    d = InMemoryDeduper(H)
    held: dict[str, tuple[int, int]] = {}
    now = closed = 0
    for key_n, step, until, close in ops:
        now += step
        closed = max(closed, close)
        d.close_before(close)
        key = f"k{key_n}"
        ref = key in held and (now < held[key][0] + H or held[key][1] > closed)
        assert d.seen_or_add(key, now, until) == ref
        if not ref:
            held[key] = (now, until)
        _clock, entries = d.export()  # memory holds exactly what the rule still holds
        assert {k for _, k, _ in entries} == {
            k for k, (first, u) in held.items() if now < first + H or u > closed}
        assert [t for t, _, _ in entries] == sorted(t for t, _, _ in entries)


def test_export_restore_keeps_held_entries() -> None:
    d = InMemoryDeduper(H)
    d.seen_or_add("a", T, until_ms=9_000)
    d.seen_or_add("b", T + 1)
    d.expire(T + 5 * H)  # "b" gone, "a" held by its window
    clock, entries = d.export()
    assert entries == [(T, "a", 9_000)]
    e = InMemoryDeduper(H)
    e.restore(clock, entries)
    assert e.seen_or_add("a", T + 6 * H)
    old = InMemoryDeduper(H)
    old.restore(clock, [(T, "a")], default_until_ms=9_000)  # a pair from an old checkpoint
    assert old.seen_or_add("a", T + 6 * H)


def test_forget_undoes_the_last_add() -> None:
    d = InMemoryDeduper(H)
    d.seen_or_add("a", T)
    d.seen_or_add("b", T)
    d.forget("b")
    assert not d.seen_or_add("b", T)
    d.forget("a")  # not the newest: still forgotten
    assert len(d) == 1 and not d.seen_or_add("a", T)


def test_sequence_runs_are_held_by_their_windows() -> None:
    d = SequenceDeduper(horizon_ms=100)
    d.seen_or_add("p", 0, 0, until_ms=1_000)
    d.seen_or_add("p", 1, 10, until_ms=500)
    assert d.seen_or_add("p", 0, 10_000)  # the horizon passed; the run's window is open
    assert d.expire(10_000) == 0
    d.close_before(999)
    assert d.seen_or_add("p", 1, 10_000)
    d.close_before(1_000)  # the run's latest window closed
    assert not d.seen_or_add("p", 1, 10_000)
    assert d.export()[1] == {"p": [[1, 1, 10_000, NO_PIN]]}
    d.restore(0, {"q": [[0, 5, 0]]}, default_until_ms=2_000)  # a run of an old checkpoint
    assert d.seen_or_add("q", 3, 10_000)


@given(st.lists(st.text(max_size=4), min_size=3, max_size=3),
       st.lists(st.text(max_size=4), min_size=3, max_size=3))
def test_scoped_ids_are_unambiguous(a: list[str], b: list[str]) -> None:
    def parse(key: str) -> tuple[str, str, str]:  # an independent reader of the encoding
        n, _, rest = key.partition(":")
        customer, rest = rest[:int(n)], rest[int(n):]
        m, _, rest = rest.partition(":")
        return customer, rest[:int(m)], rest[int(m):]

    assert parse(scoped_id(*a)) == tuple(a)
    assert (scoped_id(*a) == scoped_id(*b)) == (a == b)
