"""DDL of the billing tables: ``billing_events`` (the plan/subscription event log) and
``rated_usage`` (rated line items) with its reader view ``rated_usage_current``.

``sinks/schema.py`` (the one DDL source) lists them in its migrations by calling
:func:`tables` / :func:`views`. They are built lazily, after schema's ``Table`` classes
exist, so importing either module first works (no circular import at load time).

``billing_events``: append-only, never expires. ``ReplacingMergeTree`` keyed by
``(seq, event_id)``: a retried insert of the same event collapses; two writers that
raced for one ``seq`` keep both rows, and replay refuses the log until a person looks.

``rated_usage``: one row per line item version. Key ``(customer, subscription_id,
period_start_ms, line_id, correction)``; ``ReplacingMergeTree(rated_at_ms)`` keeps the
latest rating of a line, so re-running ``meterline rate`` rewrites the same keys and
readers see each line once. A line that a re-rating no longer produces (e.g. a plan
change split the period differently) is overwritten by a row with ``deleted = 1``.
No explanation text is stored: ``meterline explain`` recomputes it from the plan version,
quantity and proration on the line (pricing is a pure function), which keeps a month of
100,000 subscriptions' lines small. ``correction`` > 0 is reserved for correction lines
of closed periods, which reference the original in ``corrects`` (late usage restated into
the rollups; see core/billing/lines.py).
Amounts and quantities are exact ``Decimal(38, 9)`` written as Int128 nano-units.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from meterline.sinks.ddl import Table, View

__all__ = ["BillingTables", "tables", "views"]


class BillingTables(NamedTuple):
    events: Table
    rated_usage: Table
    rated_usage_current: View


@cache
def billing_tables() -> BillingTables:
    from meterline.sinks.ddl import QUANTITY_TYPE, Column, Table, View

    def exact(name: str, what: str) -> tuple[Column, Column]:
        return (Column(f"{name}_nano", "Int128", "EPHEMERAL",
                       comment=f"insert-only: exact {what} in 10^-9 units"),
                Column(name, QUANTITY_TYPE, "DEFAULT",
                       f"reinterpret({name}_nano, 'Decimal128(9)')"))

    events = Table(
        name="billing_events",
        columns=(
            Column("seq", "UInt64", comment="position in the log: 1, 2, 3, ... no gaps"),
            Column("event_id", "String", comment="digest of the event (idempotent retries)"),
            Column("type", "LowCardinality(String)"),
            Column("subject", "String", comment="plan id or subscription id"),
            Column("effective_ms", "Int64", comment="when the change takes effect, UTC ms"),
            Column("recorded_at_ms", "Int64", comment="when it was recorded, UTC ms"),
            Column("actor", "String", comment="who made the change"),
            Column("reason", "String", comment="why"),
            Column("payload", "String", comment="JSON: plan document, plan id, ..."),
        ),
        engine="ReplacingMergeTree",
        order_by=("seq", "event_id"),
        comment="Plan and subscription changes, append-only; state = replay in seq order",
    )
    rated = Table(
        name="rated_usage",
        columns=(
            Column("customer", "String"),
            Column("subscription_id", "String"),
            Column("period_start_ms", "Int64", comment="nominal billing period, UTC ms"),
            Column("period_end_ms", "Int64"),
            Column("line_id", "String", comment="<segment start>/<kind>[/<meter>:<agg>]"),
            Column("correction", "UInt32", comment="0: the line; n > 0: n-th correction"),
            Column("corrects", "String", comment="line_id a correction refers to"),
            Column("kind", "LowCardinality(String)", comment="base_fee | usage | trial_usage"),
            Column("segment_start_ms", "Int64", comment="part of the period this line covers"),
            Column("segment_end_ms", "Int64"),
            Column("plan_id", "String"),
            Column("plan_version", "UInt32"),
            Column("meter", "LowCardinality(String)"),
            Column("aggregation", "LowCardinality(String)"),
            *exact("quantity", "quantity"),
            Column("currency", "LowCardinality(String)"),
            *exact("amount", "line amount, rounded to the minor unit"),
            Column("amount_exact", "String", comment="before rounding (decimal or fraction)"),
            Column("proration_num", "UInt64", comment="segment ms / period ms, reduced"),
            Column("proration_den", "UInt64"),
            Column("tiers", "String", comment="tiers that received units, e.g. 1,2"),
            Column("price_model", "LowCardinality(String)"),
            Column("status", "LowCardinality(String)", comment="in_progress | final"),
            Column("deleted", "UInt8", comment="1: no longer produced by rating"),
            Column("rated_at_ms", "Int64", comment="rating run time; the latest wins"),
        ),
        engine="ReplacingMergeTree(rated_at_ms)",
        partition_by="toYYYYMM(fromUnixTimestamp64Milli(period_start_ms, 'UTC'))",
        order_by=("customer", "subscription_id", "period_start_ms", "line_id", "correction"),
        comment="Rated line items; read through rated_usage_current",
    )
    names = [c.name for c in rated.columns if c.kind != "EPHEMERAL" and c.name != "deleted"]
    current = View(
        name="rated_usage_current",
        source=rated,
        # FINAL in a subquery, the filter outside: a deleted line must first replace the
        # row it overwrites, then disappear.
        query=(f"SELECT {', '.join(names)}\n"
               f"FROM (SELECT {', '.join(names)}, deleted FROM {{source}} FINAL)\n"
               "WHERE deleted = 0"),
    )
    return BillingTables(events, rated, current)


def tables() -> tuple[Table, ...]:
    t = billing_tables()
    return (t.events, t.rated_usage)


def views() -> tuple[View, ...]:
    return (billing_tables().rated_usage_current,)
