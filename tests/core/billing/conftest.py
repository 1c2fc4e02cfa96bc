"""Factories for the billing core tests: plans, a state built through commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from meterline.core.billing import BillingState, parse_instant, publish_plan, subscribe

ACTOR, REASON = "ops@example.com", "test"


def plan_doc(plan_id: str = "pro", base_fee: str = "30.00", **extra: Any) -> dict[str, Any]:
    return {
        "id": plan_id, "name": plan_id.title(), "currency": "USD", "base_fee": base_fee,
        "charges": [{"meter": "api_calls", "aggregation": "count",
                     "price": {"model": "per_unit", "unit_amount": "0.01"}}],
        **extra,
    }


@pytest.fixture
def state_factory() -> Callable[..., BillingState]:
    """``make(plans=[doc, ...])``: a state with those plans published at 2026-01-01."""

    def make(plans: list[dict[str, Any]] | None = None) -> BillingState:
        state = BillingState()
        now = parse_instant("2026-01-01")
        for doc in plans or [plan_doc("basic", "10.00"), plan_doc("pro", "30.00")]:
            state.apply(publish_plan(state, doc, actor=ACTOR, reason=REASON, now_ms=now))
        return state

    return make


def add_subscription(state: BillingState, sub_id: str, plan: str, start: str,
                     **kw: Any) -> None:
    state.apply(subscribe(state, sub_id, f"cust-{sub_id}", plan, start_ms=parse_instant(start),
                          actor=ACTOR, reason=REASON, now_ms=parse_instant(start), **kw))


@pytest.fixture
def kit() -> Any:
    """The helpers above for tests (test modules cannot import a conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(ACTOR=ACTOR, REASON=REASON, plan_doc=plan_doc,
                           add_subscription=add_subscription)
