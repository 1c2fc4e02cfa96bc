"""Pure billing core: plans, subscriptions, periods, proration, and rating a period.

One module per concern:
- ``plans``: versioned plan documents (charges, limits, entitlements), validated at once.
- ``events``: the append-only event log; ``state``: current state by replaying it, with
  every refused transition explained; ``commands``: requests -> checked events.
- ``periods``: calendar and anniversary periods in UTC ms; ``segments``: a period split at
  plan changes and trial end, prorated by the millisecond.
- ``lines``: a period's rated line items and their explanation; ``usage``: gauges.

Adapters (storage, CLI) live in ``meterline.sinks.billing`` and ``meterline.cli``.
"""

from __future__ import annotations

from meterline.core.billing.commands import (
    cancel,
    change_plan,
    close_period,
    publish_plan,
    subscribe,
)
from meterline.core.billing.errors import BillingError, TransitionError
from meterline.core.billing.events import BillingEvent, EventType
from meterline.core.billing.lines import (
    RatedLine,
    UsageRequest,
    correct_line,
    explain,
    invoice_total,
    line_status,
    rate_period,
    usage_requests,
)
from meterline.core.billing.periods import (
    Cycle,
    Period,
    add_months,
    iso,
    parse_instant,
    period_at,
    periods_starting_in,
)
from meterline.core.billing.plans import (
    Charge,
    Limit,
    LimitKind,
    PeriodAggregation,
    PlanVersion,
    build_plan_version,
    parse_plan_text,
)
from meterline.core.billing.segments import Segment, prorated_fee, round_fraction, segments
from meterline.core.billing.state import BillingState, Plan, Subscription
from meterline.core.billing.usage import time_weighted_quantity

__all__ = [
    "BillingError",
    "BillingEvent",
    "BillingState",
    "Charge",
    "Cycle",
    "EventType",
    "Limit",
    "LimitKind",
    "Period",
    "PeriodAggregation",
    "Plan",
    "PlanVersion",
    "RatedLine",
    "Segment",
    "Subscription",
    "TransitionError",
    "UsageRequest",
    "add_months",
    "build_plan_version",
    "cancel",
    "change_plan",
    "close_period",
    "correct_line",
    "explain",
    "invoice_total",
    "iso",
    "line_status",
    "parse_instant",
    "parse_plan_text",
    "period_at",
    "periods_starting_in",
    "prorated_fee",
    "publish_plan",
    "rate_period",
    "round_fraction",
    "segments",
    "subscribe",
    "time_weighted_quantity",
    "usage_requests",
]
