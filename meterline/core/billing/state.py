"""Current plans and subscriptions, derived by replaying the event log.

``BillingState.replay(events)`` applies the events in ``seq`` order; ``apply`` refuses an
event that is invalid against the state so far with a ``TransitionError`` listing every
reason, and changes nothing. The rules, each a refusal with its reason:

Plans
- A plan's versions take effect in the order they are published, and a new version may
  not take effect before it is recorded (no backdating). Together with "a subscriber
  moves to a new version at its next period start" (segments.py), this is why **a price
  change never rewrites a closed period, nor splits an open one**.

Subscriptions
- Start, trial end, plan changes and cancellation fall on whole UTC hours: usage is
  metered in hourly windows, so a change inside an hour could not split that hour's
  usage exactly between two plans.
- A plan change happens inside the subscription's life, after the previous change, to a
  different plan in the same currency (one period, one invoice currency), not inside a
  closed period.
- Cancellation: once; not before the start, a plan change, or the end of a closed period.
- A period can be closed (invoiced) only once it has ended, and only after the periods
  before it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meterline.core.billing.errors import BillingError, TransitionError
from meterline.core.billing.events import BillingEvent, EventType
from meterline.core.billing.periods import Cycle, Period, iso, period_at
from meterline.core.billing.plans import PlanVersion, build_plan_version

HOUR_MS = 3_600_000
SUBSCRIPTION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
MAX_CUSTOMER_LEN = 256


@dataclass
class Plan:
    id: str
    versions: list[PlanVersion] = field(default_factory=list)

    def version_at(self, t_ms: int) -> PlanVersion | None:
        """The latest version in effect at ``t_ms``."""
        found = None
        for v in self.versions:
            if v.effective_from_ms is None or v.effective_from_ms <= t_ms:
                found = v
        return found

    @property
    def latest(self) -> PlanVersion:
        return self.versions[-1]


@dataclass
class Subscription:
    id: str
    customer: str
    cycle: Cycle
    interval_months: int
    start_ms: int
    trial_end_ms: int | None
    plans: list[tuple[int, str]]  # (from_ms, plan id), ascending
    end_ms: int | None = None
    closed: list[Period] = field(default_factory=list)  # invoiced periods, in order
    events: list[int] = field(default_factory=list)  # seqs of the events that shaped it

    @property
    def anchor_ms(self) -> int:
        return self.start_ms

    @property
    def closed_through_ms(self) -> int | None:
        return self.closed[-1].end_ms if self.closed else None

    def plan_at(self, t_ms: int) -> tuple[int, str]:
        """``(moved_on_ms, plan_id)`` in force at ``t_ms`` (the first plan before start)."""
        current = self.plans[0]
        for entry in self.plans:
            if entry[0] <= t_ms:
                current = entry
        return current

    def period_at(self, t_ms: int) -> Period:
        return period_at(self.cycle, self.anchor_ms, t_ms, self.interval_months)

    def in_trial(self, t_ms: int) -> bool:
        return self.trial_end_ms is not None and t_ms < self.trial_end_ms

    def active_at(self, t_ms: int) -> bool:
        return self.start_ms <= t_ms and (self.end_ms is None or t_ms < self.end_ms)


class BillingState:
    """Plans and subscriptions as of the events applied so far."""

    def __init__(self) -> None:
        self.plans: dict[str, Plan] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.last_seq = 0

    @classmethod
    def replay(cls, events: Iterable[BillingEvent]) -> BillingState:
        ordered = sorted(events, key=lambda e: (e.seq, e.event_id))
        dupes = sorted(s for s, n in Counter(e.seq for e in ordered).items() if n > 1)
        if dupes:
            raise BillingError([f"seq {s} is claimed by two different events (two writers "
                                "raced); resolve by hand before rating" for s in dupes],
                               "billing event log")
        state = cls()
        for event in ordered:
            state.apply(event)
        return state

    @property
    def next_seq(self) -> int:
        return self.last_seq + 1

    def subscriptions_of(self, customer: str) -> list[Subscription]:
        return [s for s in self.subscriptions.values() if s.customer == customer]

    # ----------------------------------------------------------------- apply

    def apply(self, event: BillingEvent) -> None:
        errors = self.check(event)
        if errors:
            raise TransitionError(errors, f"{event.type.value} {event.subject} (seq {event.seq})")
        _APPLY[event.type](self, event)
        self.last_seq = event.seq

    def check(self, event: BillingEvent) -> list[str]:
        """Every reason ``event`` cannot be applied now (empty: it can)."""
        errors: list[str] = []
        if event.seq != self.next_seq:
            errors.append(f"seq must be {self.next_seq} (the log has no gaps), got {event.seq}")
        if not event.actor.strip():
            errors.append("actor: who made the change is required")
        if not event.reason.strip():
            errors.append("reason: why the change was made is required")
        errors += _CHECK[event.type](self, event)
        return errors

    # ----------------------------------------------------------------- plans

    def _check_plan(self, event: BillingEvent) -> list[str]:
        errors: list[str] = []
        plan = self.plans.get(event.subject)
        version_no = 1 if plan is None else len(plan.versions) + 1
        try:
            version = build_plan_version(event.payload.get("document", {}), version_no)
        except BillingError as exc:
            return errors + exc.errors
        if version.plan_id != event.subject:
            errors.append(f"document id {version.plan_id!r} differs from {event.subject!r}")
        if plan is not None:
            eff = version.effective_from_ms
            last = plan.latest.effective_from_ms
            if eff is not None and last is not None and eff <= last:
                errors.append(f"effective_from {iso(eff)} must be after version "
                              f"{plan.latest.version}'s {iso(last)}")
            if eff is not None and eff < event.recorded_at_ms:
                errors.append(f"effective_from {iso(eff)} is before now "
                              f"({iso(event.recorded_at_ms)}): a price change cannot be "
                              "backdated (it would rewrite periods already billed)")
        return errors

    def _apply_plan(self, event: BillingEvent) -> None:
        plan = self.plans.setdefault(event.subject, Plan(event.subject))
        plan.versions.append(build_plan_version(event.payload["document"],
                                                len(plan.versions) + 1))

    # ----------------------------------------------------------------- subscriptions

    def _check_created(self, event: BillingEvent) -> list[str]:
        p = event.payload
        errors: list[str] = []
        if not SUBSCRIPTION_ID_RE.match(event.subject):
            errors.append(f"id: must match {SUBSCRIPTION_ID_RE.pattern}, got {event.subject!r}")
        if event.subject in self.subscriptions:
            errors.append(f"subscription {event.subject} already exists")
        customer = p.get("customer")
        if not isinstance(customer, str) or not customer or len(customer) > MAX_CUSTOMER_LEN:
            errors.append(f"customer: must be a non-empty string of at most "
                          f"{MAX_CUSTOMER_LEN} characters")
        if p.get("cycle") not in {c.value for c in Cycle}:
            errors.append(f"cycle: must be calendar or anniversary, got {p.get('cycle')!r}")
        if p.get("interval_months") not in (1, 12):
            errors.append(f"interval_months: must be 1 (monthly) or 12 (yearly), "
                          f"got {p.get('interval_months')!r}")
        start = event.effective_ms
        errors += _hour_errors("start", start)
        trial_end = p.get("trial_end_ms")
        if trial_end is not None:
            if type(trial_end) is not int:
                errors.append("trial_end_ms: must be an int of UTC ms")
            else:
                errors += _hour_errors("trial end", trial_end)
                if trial_end <= start:
                    errors.append(f"trial end {iso(trial_end)} must be after the start "
                                  f"{iso(start)}")
        errors += self._plan_errors(p.get("plan"), start)
        return errors

    def _apply_created(self, event: BillingEvent) -> None:
        p = event.payload
        self.subscriptions[event.subject] = Subscription(
            id=event.subject, customer=p["customer"], cycle=Cycle(p["cycle"]),
            interval_months=p["interval_months"], start_ms=event.effective_ms,
            trial_end_ms=p.get("trial_end_ms"), plans=[(event.effective_ms, p["plan"])],
            events=[event.seq])

    def _plan_errors(self, plan_id: Any, at_ms: int) -> list[str]:
        plan = self.plans.get(plan_id) if isinstance(plan_id, str) else None
        if plan is None:
            return [f"plan {plan_id!r} does not exist"]
        if plan.version_at(at_ms) is None:
            return [f"plan {plan_id} has no version in effect at {iso(at_ms)} (its first "
                    f"takes effect {iso(plan.versions[0].effective_from_ms or 0)})"]
        return []

    def _existing(self, event: BillingEvent, errors: list[str]) -> Subscription | None:
        sub = self.subscriptions.get(event.subject)
        if sub is None:
            errors.append(f"subscription {event.subject} does not exist")
        return sub

    def _check_change(self, event: BillingEvent) -> list[str]:
        errors: list[str] = []
        sub = self._existing(event, errors)
        at = event.effective_ms
        errors += _hour_errors("plan change", at)
        new_plan = str(event.payload.get("plan"))
        plan_errors = self._plan_errors(new_plan, at)
        errors += plan_errors
        if sub is None:
            return errors
        if at <= sub.start_ms:
            errors.append(f"a plan change must come after the start {iso(sub.start_ms)}; "
                          "to start on another plan, cancel and subscribe again")
        if sub.end_ms is not None and at >= sub.end_ms:
            errors.append(f"subscription ends {iso(sub.end_ms)}: no plan change at or after it")
        last_change = sub.plans[-1][0]
        if at <= last_change:
            errors.append(f"a plan change must come after the previous change or start "
                          f"({iso(last_change)})")
        _, current = sub.plan_at(at)
        if new_plan == current:
            errors.append(f"subscription is already on plan {current} at {iso(at)}")
        closed = sub.closed_through_ms
        if closed is not None and at < closed:
            errors.append(f"{iso(at)} is inside a closed (invoiced) period ending "
                          f"{iso(closed)}")
        if not plan_errors:
            cur_version = self.plans[current].version_at(at)
            new_version = self.plans[new_plan].version_at(at)
            if cur_version and new_version and cur_version.currency != new_version.currency:
                errors.append(f"plan {new_plan} bills in {new_version.currency.code}, the "
                              f"subscription in {cur_version.currency.code}: one period has "
                              "one currency; cancel and subscribe again at a period start")
        return errors

    def _apply_change(self, event: BillingEvent) -> None:
        sub = self.subscriptions[event.subject]
        sub.plans.append((event.effective_ms, event.payload["plan"]))
        sub.events.append(event.seq)

    def _check_cancel(self, event: BillingEvent) -> list[str]:
        errors: list[str] = []
        sub = self._existing(event, errors)
        at = event.effective_ms
        errors += _hour_errors("cancellation", at)
        if sub is None:
            return errors
        if sub.end_ms is not None:
            errors.append(f"already cancelled, ending {iso(sub.end_ms)}")
        if at < sub.start_ms:
            errors.append(f"cannot end before the start {iso(sub.start_ms)}")
        if at <= sub.plans[-1][0] and len(sub.plans) > 1:
            errors.append(f"cannot end at or before the plan change of {iso(sub.plans[-1][0])}")
        closed = sub.closed_through_ms
        if closed is not None and at < closed:
            errors.append(f"{iso(at)} is inside a closed (invoiced) period ending {iso(closed)}")
        return errors

    def _apply_cancel(self, event: BillingEvent) -> None:
        sub = self.subscriptions[event.subject]
        sub.end_ms = event.effective_ms
        sub.events.append(event.seq)

    def _check_close(self, event: BillingEvent) -> list[str]:
        errors: list[str] = []
        sub = self._existing(event, errors)
        start, end = event.payload.get("period_start_ms"), event.payload.get("period_end_ms")
        if type(start) is not int or type(end) is not int:
            return errors + ["period_start_ms and period_end_ms must be ints of UTC ms"]
        if sub is None:
            return errors
        if sub.period_at(start) != Period(start, end):
            errors.append(f"{iso(start)} .. {iso(end)} is not one of this subscription's "
                          "billing periods")
        if end > event.recorded_at_ms:
            errors.append(f"the period ends {iso(end)}, after now ({iso(event.recorded_at_ms)})"
                          ": only an ended period can be closed")
        closed = sub.closed_through_ms
        if closed is not None and start < closed:
            errors.append(f"periods up to {iso(closed)} are already closed")
        return errors

    def _apply_close(self, event: BillingEvent) -> None:
        sub = self.subscriptions[event.subject]
        sub.closed.append(Period(event.payload["period_start_ms"],
                                 event.payload["period_end_ms"]))
        sub.events.append(event.seq)


def _hour_errors(what: str, t_ms: Any) -> list[str]:
    if type(t_ms) is not int:
        return [f"{what}: must be an int of UTC ms"]
    if t_ms % HOUR_MS:
        return [f"{what} {iso(t_ms)} is not on a whole UTC hour: usage is metered in hourly "
                "windows, so changes take effect on the hour"]
    return []


_CHECK: Mapping[EventType, Any] = {
    EventType.PLAN_PUBLISHED: BillingState._check_plan,
    EventType.SUBSCRIPTION_CREATED: BillingState._check_created,
    EventType.PLAN_CHANGED: BillingState._check_change,
    EventType.SUBSCRIPTION_CANCELED: BillingState._check_cancel,
    EventType.PERIOD_CLOSED: BillingState._check_close,
}
_APPLY: Mapping[EventType, Any] = {
    EventType.PLAN_PUBLISHED: BillingState._apply_plan,
    EventType.SUBSCRIPTION_CREATED: BillingState._apply_created,
    EventType.PLAN_CHANGED: BillingState._apply_change,
    EventType.SUBSCRIPTION_CANCELED: BillingState._apply_cancel,
    EventType.PERIOD_CLOSED: BillingState._apply_close,
}
