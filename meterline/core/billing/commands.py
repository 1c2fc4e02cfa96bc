"""Commands: turn a request (publish a plan, subscribe, change plan, cancel, close a
period) into the next event of the log, checked against the current state.

Each function returns the event *without* applying it; the caller stores it and then
applies it (``BillingLedger.append`` in the sinks does both, in that order). A refused
command raises ``BillingError``/``TransitionError`` with every reason, and nothing is
written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meterline.core.billing.errors import TransitionError
from meterline.core.billing.events import BillingEvent, EventType
from meterline.core.billing.periods import Cycle
from meterline.core.billing.plans import build_plan_version, canonical
from meterline.core.billing.state import BillingState


def _checked(state: BillingState, event: BillingEvent) -> BillingEvent:
    errors = state.check(event)
    if errors:
        raise TransitionError(errors, f"{event.type.value} {event.subject}")
    return event


def publish_plan(state: BillingState, document: Mapping[str, Any], *, actor: str,
                 reason: str, now_ms: int) -> BillingEvent:
    """A new plan, or a new version of an existing plan (same ``id``)."""
    doc = canonical(dict(document))
    plan_id = str(doc.get("id", ""))
    existing = state.plans.get(plan_id)
    version = build_plan_version(doc, 1 if existing is None else len(existing.versions) + 1)
    effective = version.effective_from_ms if version.effective_from_ms is not None else now_ms
    return _checked(state, BillingEvent(
        seq=state.next_seq, type=EventType.PLAN_PUBLISHED, subject=plan_id,
        effective_ms=effective, recorded_at_ms=now_ms, actor=actor, reason=reason,
        payload={"document": doc}))


def subscribe(state: BillingState, subscription_id: str, customer: str, plan_id: str, *,
              start_ms: int, actor: str, reason: str, now_ms: int,
              cycle: Cycle | str = Cycle.CALENDAR, trial_end_ms: int | None = None,
              interval_months: int = 1) -> BillingEvent:
    return _checked(state, BillingEvent(
        seq=state.next_seq, type=EventType.SUBSCRIPTION_CREATED, subject=subscription_id,
        effective_ms=start_ms, recorded_at_ms=now_ms, actor=actor, reason=reason,
        payload={"customer": customer, "plan": plan_id, "cycle": str(cycle),
                 "trial_end_ms": trial_end_ms, "interval_months": interval_months}))


def change_plan(state: BillingState, subscription_id: str, plan_id: str, *, at_ms: int,
                actor: str, reason: str, now_ms: int) -> BillingEvent:
    return _checked(state, BillingEvent(
        seq=state.next_seq, type=EventType.PLAN_CHANGED, subject=subscription_id,
        effective_ms=at_ms, recorded_at_ms=now_ms, actor=actor, reason=reason,
        payload={"plan": plan_id}))


def cancel(state: BillingState, subscription_id: str, *, at_ms: int, actor: str, reason: str,
           now_ms: int) -> BillingEvent:
    return _checked(state, BillingEvent(
        seq=state.next_seq, type=EventType.SUBSCRIPTION_CANCELED, subject=subscription_id,
        effective_ms=at_ms, recorded_at_ms=now_ms, actor=actor, reason=reason))


def close_period(state: BillingState, subscription_id: str, period_start_ms: int,
                 period_end_ms: int, *, actor: str, reason: str,
                 now_ms: int) -> BillingEvent:
    return _checked(state, BillingEvent(
        seq=state.next_seq, type=EventType.PERIOD_CLOSED, subject=subscription_id,
        effective_ms=period_end_ms, recorded_at_ms=now_ms, actor=actor, reason=reason,
        payload={"period_start_ms": period_start_ms, "period_end_ms": period_end_ms}))
