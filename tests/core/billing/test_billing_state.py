"""Event-sourced plans and subscriptions: replay, and refused transitions with reasons."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from meterline.core.billing import (
    BillingError,
    BillingEvent,
    BillingState,
    TransitionError,
    cancel,
    change_plan,
    close_period,
    parse_instant,
    publish_plan,
    subscribe,
)

T = parse_instant
ACTOR, REASON = "ops@example.com", "test"


@pytest.fixture
def plan_doc(kit: Any) -> Any:
    return kit.plan_doc


@pytest.fixture
def add_subscription(kit: Any) -> Any:
    return kit.add_subscription


def test_replay_rebuilds_the_same_state_from_the_log(
        state_factory: Callable[..., BillingState], plan_doc: Any,
        add_subscription: Any) -> None:
    state = state_factory()
    log: list[BillingEvent] = []

    def do(event: BillingEvent) -> None:
        state.apply(event)
        log.append(event)

    # Rebuild the log through commands so every event is captured.
    state = BillingState()
    for doc in (plan_doc("basic", "10.00"), plan_doc("pro", "30.00")):
        do(publish_plan(state, doc, actor=ACTOR, reason=REASON, now_ms=T("2026-01-01")))
    do(subscribe(state, "s1", "acme", "basic", start_ms=T("2026-11-03T00:00:00Z"),
                 actor=ACTOR, reason="signed up", now_ms=T("2026-11-03")))
    do(change_plan(state, "s1", "pro", at_ms=T("2026-11-16T12:00:00Z"), actor="acme-admin",
                   reason="needs more calls", now_ms=T("2026-11-16T12:00:00Z")))
    do(cancel(state, "s1", at_ms=T("2027-01-01"), actor=ACTOR, reason="churn",
              now_ms=T("2026-12-05")))
    shuffled = log[:]
    random.Random(3).shuffle(shuffled)
    again = BillingState.replay(shuffled)
    sub = again.subscriptions["s1"]
    assert sub.plans == [(T("2026-11-03"), "basic"), (T("2026-11-16T12:00:00Z"), "pro")]
    assert sub.end_ms == T("2027-01-01")
    assert sub.events == [3, 4, 5]
    assert again.last_seq == 5 and again.plans.keys() == {"basic", "pro"}
    # Who and why are kept on every event.
    assert [e.actor for e in log][3] == "acme-admin" and log[3].reason == "needs more calls"


def test_invalid_transitions_are_refused_with_every_reason(
        state_factory: Callable[..., BillingState], plan_doc: Any,
        add_subscription: Any) -> None:
    state = state_factory()
    add_subscription(state, "s1", "basic", "2026-11-03")
    with pytest.raises(TransitionError) as info:
        change_plan(state, "s1", "basic", at_ms=T("2026-11-02T10:30:00Z"), actor=" ",
                    reason="", now_ms=T("2026-11-05"))
    errors = info.value.errors
    for fragment in ("actor: who made the change is required",
                     "reason: why the change was made is required",
                     "is not on a whole UTC hour",
                     "must come after the start",
                     "already on plan basic"):
        assert any(fragment in e for e in errors), (fragment, errors)
    assert state.last_seq == 3  # nothing applied


def test_refusals_of_subscriptions_cancellations_and_closed_periods(
        state_factory: Callable[..., BillingState], plan_doc: Any,
        add_subscription: Any) -> None:
    state = state_factory([plan_doc("basic"), {**plan_doc("euro"), "currency": "EUR"}])
    with pytest.raises(TransitionError) as info:
        subscribe(state, "bad id!", "", "nope", start_ms=T("2026-11-01") + 5, actor=ACTOR,
                  reason=REASON, now_ms=0, trial_end_ms=T("2026-10-01"))
    errs = " | ".join(info.value.errors)
    for fragment in ("id: must match", "customer: must be a non-empty string",
                     "start 2026-11-01T00:00:00.005Z is not on a whole UTC hour",
                     "trial end 2026-10-01T00:00:00Z must be after the start",
                     "plan 'nope' does not exist"):
        assert fragment in errs, (fragment, errs)

    add_subscription(state, "s1", "basic", "2026-11-01")
    with pytest.raises(TransitionError, match="one period has one currency"):
        change_plan(state, "s1", "euro", at_ms=T("2026-11-10"), actor=ACTOR, reason=REASON,
                    now_ms=T("2026-11-10"))
    with pytest.raises(TransitionError, match="only an ended period can be closed"):
        close_period(state, "s1", T("2026-11-01"), T("2026-12-01"), actor=ACTOR,
                     reason=REASON, now_ms=T("2026-11-20"))
    state.apply(close_period(state, "s1", T("2026-11-01"), T("2026-12-01"), actor=ACTOR,
                             reason="invoiced", now_ms=T("2026-12-02")))
    with pytest.raises(TransitionError, match="inside a closed"):
        cancel(state, "s1", at_ms=T("2026-11-20"), actor=ACTOR, reason=REASON,
               now_ms=T("2026-12-03"))
    with pytest.raises(TransitionError, match="already closed"):
        close_period(state, "s1", T("2026-11-01"), T("2026-12-01"), actor=ACTOR,
                     reason=REASON, now_ms=T("2026-12-03"))
    state.apply(cancel(state, "s1", at_ms=T("2026-12-20"), actor=ACTOR, reason=REASON,
                       now_ms=T("2026-12-03")))
    with pytest.raises(TransitionError, match="already cancelled"):
        cancel(state, "s1", at_ms=T("2026-12-21"), actor=ACTOR, reason=REASON,
               now_ms=T("2026-12-03"))
    with pytest.raises(TransitionError, match="no plan change at or after it"):
        change_plan(state, "s1", "basic", at_ms=T("2026-12-22"), actor=ACTOR, reason=REASON,
                    now_ms=T("2026-12-03"))


def test_price_versions_cannot_be_backdated_or_reordered(
        state_factory: Callable[..., BillingState], plan_doc: Any,
        add_subscription: Any) -> None:
    state = state_factory()
    v2 = {**plan_doc("pro", "35.00"), "effective_from": "2026-12-01"}
    with pytest.raises(TransitionError, match="cannot be backdated"):
        publish_plan(state, v2, actor=ACTOR, reason=REASON, now_ms=T("2026-12-05"))
    state.apply(publish_plan(state, v2, actor=ACTOR, reason=REASON, now_ms=T("2026-11-20")))
    v3 = {**plan_doc("pro", "40.00"), "effective_from": "2026-11-25"}
    with pytest.raises(TransitionError, match="must be after version 2's"):
        publish_plan(state, v3, actor=ACTOR, reason=REASON, now_ms=T("2026-11-21"))
    assert [v.base_fee for v in state.plans["pro"].versions] == [30, 35]


def test_replay_fails_loudly_on_a_seq_claimed_twice(
        state_factory: Callable[..., BillingState], plan_doc: Any,
        add_subscription: Any) -> None:
    state = BillingState()
    first = publish_plan(state, plan_doc("a"), actor=ACTOR, reason=REASON, now_ms=0)
    rival = publish_plan(state, plan_doc("b"), actor=ACTOR, reason=REASON, now_ms=0)
    assert first.seq == rival.seq == 1 and first.event_id != rival.event_id
    with pytest.raises(BillingError, match="seq 1 is claimed by two different events"):
        BillingState.replay([first, rival])
    # A gap is refused too (the log has no gaps).
    with pytest.raises(TransitionError, match="seq must be 1"):
        BillingState.replay([replace(first, seq=2, event_id="")])


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ops = st.lists(st.tuples(st.sampled_from(["subscribe", "change", "cancel", "close"]),
                          st.integers(0, 3), st.sampled_from(["basic", "pro", "gone"]),
                          st.integers(-24, 24 * 70), st.integers(0, 1)), max_size=25)


@settings(max_examples=80, deadline=None)
@given(_ops)
def test_replaying_the_log_rebuilds_exactly_the_state_the_commands_built(ops: Any) -> None:
    from meterline.core.billing import BillingState

    start = T("2026-11-01")
    state = BillingState()
    log = []
    for doc in ({"id": "basic", "currency": "USD"}, {"id": "pro", "currency": "USD"}):
        event = publish_plan(state, doc, actor=ACTOR, reason=REASON, now_ms=0)
        state.apply(event)
        log.append(event)
    for op, n, plan, hours, trial in ops:
        at = start + hours * 3_600_000
        sid = f"s{n}"
        try:
            if op == "subscribe":
                event = subscribe(state, sid, f"c{n}", plan, start_ms=at, actor=ACTOR,
                                  reason=REASON, now_ms=at,
                                  trial_end_ms=at + 72 * 3_600_000 if trial else None)
            elif op == "change":
                event = change_plan(state, sid, plan, at_ms=at, actor=ACTOR, reason=REASON,
                                    now_ms=at)
            elif op == "cancel":
                event = cancel(state, sid, at_ms=at, actor=ACTOR, reason=REASON, now_ms=at)
            else:
                sub = state.subscriptions.get(sid)
                if sub is None:
                    continue
                p = sub.period_at(at)
                event = close_period(state, sid, p.start_ms, p.end_ms, actor=ACTOR,
                                     reason=REASON, now_ms=p.end_ms + 1)
        except TransitionError:
            continue  # refused: nothing applied
        state.apply(event)
        log.append(event)
    again = BillingState.replay(log)
    assert again.subscriptions == state.subscriptions
    assert again.last_seq == state.last_seq == len(log)
    # Invariants the refusals protect: plan changes ascend inside the subscription's life,
    # on whole hours, never to the plan already in force.
    for sub in again.subscriptions.values():
        times = [t for t, _ in sub.plans]
        assert times == sorted(set(times)) and all(t % 3_600_000 == 0 for t in times)
        assert all(a != b for (_, a), (_, b) in zip(sub.plans, sub.plans[1:], strict=False))
        if sub.end_ms is not None and len(times) > 1:
            assert times[-1] < sub.end_ms
