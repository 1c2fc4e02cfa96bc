"""The billing event log: every change to a plan or subscription, immutable, append-only.

An event says *what* changed (``type``, ``subject``, ``payload``), *when it takes effect*
(``effective_ms``), *when it was recorded* (``recorded_at_ms``), *who* did it (``actor``)
and *why* (``reason``). ``seq`` orders the log (1, 2, 3, ... without gaps); current state
is ``BillingState.replay(events)``, so any past state can be rebuilt and audited.

``event_id`` is a digest of the event's content and position: writing the same event
twice (a retried insert) stores it once, and two different events claiming the same
``seq`` (two writers racing) are both kept and make replay fail loudly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    PLAN_PUBLISHED = "plan.published"  # a plan's first version, or a new version of it
    SUBSCRIPTION_CREATED = "subscription.created"
    PLAN_CHANGED = "subscription.plan_changed"  # upgrade or downgrade, prorated
    SUBSCRIPTION_CANCELED = "subscription.canceled"
    PERIOD_CLOSED = "subscription.period_closed"  # invoiced: its lines never change again


@dataclass(frozen=True, slots=True)
class BillingEvent:
    seq: int
    type: EventType
    subject: str  # plan id or subscription id
    effective_ms: int
    recorded_at_ms: int
    actor: str
    reason: str
    payload: Mapping[str, Any] = field(default_factory=dict)  # JSON-safe values only
    event_id: str = ""

    def __post_init__(self) -> None:
        if not self.event_id:
            object.__setattr__(self, "event_id", event_digest(self))

    def payload_json(self) -> str:
        return json.dumps(self.payload, sort_keys=True, separators=(",", ":"))


def event_digest(event: BillingEvent) -> str:
    body = json.dumps(
        [event.seq, event.type.value, event.subject, event.effective_ms, event.recorded_at_ms,
         event.actor, event.reason, event.payload],
        sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:32]
