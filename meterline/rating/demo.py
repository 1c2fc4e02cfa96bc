"""The billing part of `meterline demo`: plans, subscriptions, rating, invoices, reconcile.

Three plans for the demo's 1,000 customers (customer i is on plan i mod 3); the first
customer is in a free trial that ends half way through the usage, the second upgrades
from growth to scale at the same hour. The periods the usage falls in are rated from the
rollups into ``rated_usage``; the demo prints invoice previews, revenue per plan, checks
every rated sum/count quantity against the generator's ground truth, and runs
reconcile (raw events vs rollups vs rated), which must report zero drift.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from meterline.core.billing import change_plan as change_plan_cmd
from meterline.core.billing import iso, publish_plan, subscribe
from meterline.core.billing.periods import add_months, month_start
from meterline.core.quantity import SCALE

HOUR_MS = 3_600_000
ACTOR = "demo"

PLANS: list[dict[str, Any]] = [
    {"id": "starter", "name": "Starter", "currency": "USD", "base_fee": "0", "charges": [
        {"meter": "api_calls", "aggregation": "count",
         "price": {"model": "graduated", "tiers": [{"up_to": 1000, "unit_amount": "0"},
                                                   {"unit_amount": "0.002"}]}},
        {"meter": "llm_tokens", "aggregation": "sum",
         "price": {"model": "per_unit", "unit_amount": "0.00042"}}]},
    {"id": "growth", "name": "Growth", "currency": "USD", "base_fee": "49.00", "charges": [
        {"meter": "api_calls", "aggregation": "count",
         "price": {"model": "package", "package_amount": "1.00", "package_size": 1000,
                   "included_units": 5000}},
        {"meter": "llm_tokens", "aggregation": "sum",
         "price": {"model": "graduated", "tiers": [{"up_to": 1000000, "unit_amount": "0.0003"},
                                                   {"unit_amount": "0.0002"}]}},
        {"meter": "compute_seconds", "aggregation": "sum",
         "price": {"model": "per_unit", "unit_amount": "0.00012"}},
        {"meter": "storage_gb", "aggregation": "max",
         "price": {"model": "per_unit", "unit_amount": "0.02"}}]},
    {"id": "scale", "name": "Scale", "currency": "USD", "base_fee": "499.00", "charges": [
        {"meter": "api_calls", "aggregation": "count",
         "price": {"model": "volume", "tiers": [{"up_to": 100000, "unit_amount": "0.0008"},
                                                {"unit_amount": "0.0005"}]}},
        {"meter": "llm_tokens", "aggregation": "sum",
         "price": {"model": "per_unit", "unit_amount": "0.00015"}},
        {"meter": "compute_seconds", "aggregation": "sum",
         "price": {"model": "per_unit", "unit_amount": "0.0001"}},
        {"meter": "storage_gb", "aggregation": "time_weighted_sum", "time_unit": "hour",
         "price": {"model": "per_unit", "unit_amount": "0.0002"}},
        {"meter": "active_users", "aggregation": "unique_count", "dimension": "user_id",
         "price": {"model": "per_unit", "unit_amount": "0.10"}}],
     "limits": [{"meter": "api_calls", "kind": "soft", "value": 10000000}],
     "entitlements": {"sso": True, "support": "priority"}},
]


@dataclass(frozen=True)
class BillingDemoResult:
    lines: int
    subscriptions: int
    truth_checked: int
    truth_mismatches: int
    drift: int
    seconds: float

    @property
    def exact(self) -> bool:
        return self.truth_mismatches == 0 and self.drift == 0 and self.truth_checked > 0


@dataclass(frozen=True)
class BillingDemo:
    result: BillingDemoResult
    text: str
    export_summary: str = ""  # invoicing export (issue 10): printed last by the demo

    def report(self) -> None:
        print(self.text)


def run_billing(storage: Any, truth: Any, customers: list[str], start_ms: int, end_ms: int,
                settle_ms: int) -> BillingDemo:
    """Usage spans [start_ms, end_ms); every customer subscribes at the start of its month."""
    from meterline.rating.stage import invoice_preview, rate, reconcile, revenue_by_plan
    from meterline.sinks.billing_events import BillingLedger

    t0 = time.monotonic()
    sub_start = month_start(start_ms)
    change_at = (start_ms + end_ms) // 2 // HOUR_MS * HOUR_MS
    ledger = BillingLedger(storage, clock_ms=lambda: sub_start)
    ledger.record(*[(lambda s, t, doc=doc: publish_plan(s, doc, actor=ACTOR,
                                                        reason="demo catalogue", now_ms=t))
                    for doc in PLANS])
    names = [p["id"] for p in PLANS]
    commands = []
    for i, customer in enumerate(customers):
        plan = "growth" if i == 1 else names[i % 3]
        trial = change_at if i == 0 else None
        commands.append(lambda s, t, c=customer, p=plan, tr=trial: subscribe(
            s, f"sub-{c}", c, p, start_ms=sub_start, actor=ACTOR, reason="demo signup",
            now_ms=t, trial_end_ms=tr))
    ledger.record(*commands)
    if len(customers) > 1:
        ledger.record(lambda s, t: change_plan_cmd(
            s, f"sub-{customers[1]}", "scale", at_ms=change_at, actor=f"{customers[1]}-admin",
            reason="needs more seats", now_ms=t))
    state = ledger.state
    months = []
    m = month_start(start_ms)
    while m < end_ms:
        months.append(time.strftime("%Y-%m", time.gmtime(m / 1000)))
        m = add_months(m, 1)
    lines = []
    drift = []
    for period in months:
        rated = rate(storage, state, period=period, as_of_ms=end_ms, settle_ms=settle_ms)
        lines += rated.lines
        drift += [r for r in reconcile(storage, state, period=period) if r.drift]

    # Ground truth from the generator (not the pipeline): sum and count per segment.
    cells: dict[tuple[str, str], list[tuple[int, int, int]]] = defaultdict(list)
    for (customer, meter, _group, hour), state_value in truth.hourly_cells.items():
        if meter in ("api_calls", "llm_tokens", "compute_seconds"):
            count = state_value if meter == "api_calls" else 0
            total = state_value if meter != "api_calls" else state_value * SCALE
            cells[(customer, meter)].append((hour, total, count))
    checked = mismatches = 0
    for line in lines:
        if line.aggregation not in ("sum", "count"):
            continue
        want = sum(total for hour, total, _ in cells[(line.customer, line.meter)]
                   if line.segment_start_ms <= hour < line.segment_end_ms)
        checked += 1
        if line.quantity * SCALE != want:
            mismatches += 1

    seconds = time.monotonic() - t0
    out: list[str] = []
    out.append(f"\nBilling ({seconds:.1f}s): {len(state.subscriptions):,} subscriptions on "
               f"{len(PLANS)} plans, {len(lines):,} rated line items for {', '.join(months)}")
    special = [f"sub-{c}" for c in customers[:2]]
    top = sorted({ln.subscription_id for ln in lines if ln.plan_id == "scale"})[:1]
    shown = [ln for ln in lines if ln.subscription_id in special + top]
    out.append(invoice_preview(shown))
    out.append("\nRevenue per plan:")
    for (plan, code), amount in revenue_by_plan(lines).items():
        out.append(f"  {plan:<10}{amount:>16,} {code}")
    total = sum((ln.amount for ln in lines), Decimal(0))
    out.append(f"  {'total':<10}{total:>16,} USD (= the sum of {len(lines):,} rounded lines)")
    if mismatches == 0:
        out.append(f"Exact: {checked:,} rated sum/count quantities equal the ground truth.")
    else:
        out.append(f"MISMATCH: {mismatches} of {checked:,} rated quantities differ from the "
                   "truth.")
    out.append(f"Reconcile (raw events vs rollups vs rated): {len(drift)} drift"
               + ("" if not drift else f", e.g. {drift[0]}"))
    if lines:
        first = lines[0]
        where = getattr(storage, "data_dir", "<the demo's chdb dir>")
        out.append(f"Explain a line: METERLINE_DATA_DIR={where} meterline explain "
                   f"{first.subscription_id} --period "
                   f"{time.strftime('%Y-%m', time.gmtime(first.period_start_ms / 1000))}"
                   f"   (usage spans {iso(start_ms)} .. {iso(end_ms)})")
    # --- invoicing export (issue 10): the lines -> files beside the demo's chDB dir ---------
    export_summary = ""
    data_dir = getattr(storage, "data_dir", None)
    if data_dir:
        from pathlib import Path

        from meterline.export.demo import export_demo_lines

        export_summary = export_demo_lines(lines, Path(data_dir).parent)
    # --- end invoicing export ---------------------------------------------------------------
    return BillingDemo(BillingDemoResult(len(lines), len(state.subscriptions), checked,
                                         mismatches, len(drift), seconds), "\n".join(out),
                       export_summary)
