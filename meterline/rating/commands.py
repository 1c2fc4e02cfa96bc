"""The billing and rating commands of the `meterline` CLI (parsers and handlers).

``meterline.cli`` adds these parsers and hands their commands here, so the CLI module
stays a list of commands. Every change command needs ``--reason`` (why) and records
``--actor`` (who; default ``$METERLINE_ACTOR``, else the login name) in the event log.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

COMMANDS = ("publish-plan", "plans", "subscribe", "change-plan", "cancel", "close-period",
            "subscriptions", "history", "rate", "explain", "invoice", "simulate", "reconcile")


def add_parsers(sub: Any) -> None:
    def change(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--reason", required=True, help="why (kept in the event log)")
        p.add_argument("--actor", default=None,
                       help="who (default: $METERLINE_ACTOR, else the login name)")
        return p

    p = change("publish-plan", "publish a plan, or a new version of one (TOML/JSON file)")
    p.add_argument("file", type=Path)
    p = sub.add_parser("plans", help="list plans and their versions")
    p = change("subscribe", "subscribe a customer to a plan")
    p.add_argument("subscription")
    p.add_argument("customer")
    p.add_argument("plan")
    p.add_argument("--start", required=True, help="UTC instant on the hour, e.g. 2026-11-01")
    p.add_argument("--trial-end", default=None, help="end of a free trial (UTC, on the hour)")
    p.add_argument("--cycle", choices=("calendar", "anniversary"), default="calendar")
    p.add_argument("--yearly", action="store_true", help="12-month periods")
    p = change("change-plan", "upgrade or downgrade, prorated from --at")
    p.add_argument("subscription")
    p.add_argument("plan")
    p.add_argument("--at", required=True, help="UTC instant on the hour")
    p = change("cancel", "end a subscription at --at")
    p.add_argument("subscription")
    p.add_argument("--at", required=True, help="UTC instant on the hour")
    p = change("close-period", "mark the ended periods of a month as invoiced (frozen)")
    p.add_argument("--period", required=True, help="month, e.g. 2026-11")
    p.add_argument("--subscription", default=None)
    p = sub.add_parser("subscriptions", help="list subscriptions (current state)")
    p.add_argument("--customer", default=None)
    p = sub.add_parser("history", help="the event log of a plan or subscription")
    p.add_argument("subject")
    p = sub.add_parser("rate", help="rate the periods of a month into rated_usage")
    p.add_argument("--period", required=True, help="month, e.g. 2026-11")
    p.add_argument("--subscription", default=None)
    p.add_argument("--as-of", default=None, help="UTC instant (default: now)")
    p = sub.add_parser("explain", help="a subscription's rated lines in words")
    p.add_argument("subscription")
    p.add_argument("line", nargs="?", default=None, help="a line id (default: every line)")
    p.add_argument("--period", required=True)
    p = sub.add_parser("invoice", help="invoice preview of a subscription's period")
    p.add_argument("subscription")
    p.add_argument("--period", required=True)
    p = sub.add_parser("simulate", help="re-rate a past period under a candidate plan "
                       "(writes nothing)")
    p.add_argument("--period", required=True)
    p.add_argument("--plan", required=True, type=Path, help="candidate plan (TOML/JSON)")
    p.add_argument("--on-plan", default=None,
                   help="subscriptions of this plan (default: the candidate's id)")
    p.add_argument("--as-of", default=None)
    p = sub.add_parser("reconcile", help="raw events vs rollups vs rated quantities; "
                       "exit 1 on drift")
    p.add_argument("--period", required=True)
    # --- invoicing export (issue 10): --target T, the last hop -------------------------
    from meterline.export.commands import add_reconcile_options

    add_reconcile_options(p)
    # --- end invoicing export ------------------------------------------------------------


def _actor(args: argparse.Namespace) -> str:
    return args.actor or os.environ.get("METERLINE_ACTOR") or getpass.getuser()


def _check_meters(plan: Any, config: Any, source: str) -> None:
    from meterline.core.billing import BillingError
    from meterline.core.billing.plans import meter_errors

    errors = meter_errors(plan, config.registry())
    if errors:
        raise BillingError(errors, source)


def _settle_ms(config: Any) -> int:
    # A window can change until the watermark passes its end plus the allowed lateness.
    r = config.rollups
    return 3_600_000 + r.watermark_delay_ms + r.allowed_lateness_ms


def run(args: argparse.Namespace, config: Any) -> int:
    from meterline.sinks.storage import open_storage

    storage = open_storage(config.storage_config())
    try:
        return _run(args, config, storage)
    finally:
        storage.close()


def _run(args: argparse.Namespace, config: Any, storage: Any) -> int:
    from meterline.core import billing as b
    from meterline.core.pricing.exact import fmt
    from meterline.rating import stage
    from meterline.sinks.billing_events import BillingLedger, EventsQuery
    from meterline.sinks.rated_usage import CurrentLinesQuery

    ledger = BillingLedger(storage)
    cmd = args.command
    if cmd == "publish-plan":
        doc = b.parse_plan_text(args.file.read_text(encoding="utf-8"), str(args.file))
        _check_meters(b.build_plan_version(doc), config, str(args.file))
        (event,) = ledger.record(lambda s, t: b.publish_plan(
            s, doc, actor=_actor(args), reason=args.reason, now_ms=t))
        plan = ledger.state.plans[event.subject]
        print(f"published plan {event.subject} version {plan.latest.version}, effective "
              f"{b.iso(event.effective_ms)} (event {event.seq})")
        return 0
    if cmd == "plans":
        for plan in sorted(ledger.state.plans.values(), key=lambda p: p.id):
            for v in plan.versions:
                eff = "from the start" if v.effective_from_ms is None \
                    else f"from {b.iso(v.effective_from_ms)}"
                print(f"{plan.id:<16} v{v.version:<3} {eff:<32} base fee {v.base_fee} "
                      f"{v.currency.code}, {len(v.charges)} charge(s)")
        return 0
    if cmd == "subscribe":
        trial = b.parse_instant(args.trial_end) if args.trial_end else None
        (event,) = ledger.record(lambda s, t: b.subscribe(
            s, args.subscription, args.customer, args.plan,
            start_ms=b.parse_instant(args.start), actor=_actor(args), reason=args.reason,
            now_ms=t, cycle=args.cycle, trial_end_ms=trial,
            interval_months=12 if args.yearly else 1))
        print(f"subscribed {args.customer} to {args.plan} as {args.subscription} "
              f"from {b.iso(event.effective_ms)} (event {event.seq})")
        return 0
    if cmd == "change-plan":
        (event,) = ledger.record(lambda s, t: b.change_plan(
            s, args.subscription, args.plan, at_ms=b.parse_instant(args.at),
            actor=_actor(args), reason=args.reason, now_ms=t))
        print(f"{args.subscription} moves to {args.plan} at {b.iso(event.effective_ms)} "
              f"(event {event.seq})")
        return 0
    if cmd == "cancel":
        (event,) = ledger.record(lambda s, t: b.cancel(
            s, args.subscription, at_ms=b.parse_instant(args.at), actor=_actor(args),
            reason=args.reason, now_ms=t))
        print(f"{args.subscription} ends at {b.iso(event.effective_ms)} (event {event.seq})")
        return 0
    if cmd == "close-period":
        start, end = stage.month_range(args.period)
        pairs = stage.select_periods(ledger.state, start, end, args.subscription)
        now_ms = time.time_ns() // 1_000_000
        todo = [(s.id, p) for s, p in pairs if p not in s.closed and p.end_ms <= now_ms]
        events = ledger.record(*[
            (lambda s, t, sid=sid, p=p: b.close_period(s, sid, p.start_ms, p.end_ms,
                                                       actor=_actor(args), reason=args.reason,
                                                       now_ms=t))
            for sid, p in todo])
        print(f"closed {len(events)} period(s)")
        return 0
    if cmd == "subscriptions":
        for sub in sorted(ledger.state.subscriptions.values(), key=lambda s: (s.customer, s.id)):
            if args.customer and sub.customer != args.customer:
                continue
            plans = " -> ".join(f"{p} ({b.iso(t)})" for t, p in sub.plans)
            extra = (f", trial until {b.iso(sub.trial_end_ms)}" if sub.trial_end_ms else "") + \
                (f", ends {b.iso(sub.end_ms)}" if sub.end_ms else "")
            print(f"{sub.id:<16} {sub.customer:<16} {sub.cycle.value:<12} {plans}{extra}")
        return 0
    if cmd == "history":
        found = False
        for e in EventsQuery(storage.database).run(storage):
            if e.subject == args.subject:
                found = True
                print(f"#{e.seq} {b.iso(e.recorded_at_ms)} {e.type.value} effective "
                      f"{b.iso(e.effective_ms)} by {e.actor}: {e.reason}")
        if not found:
            print(f"no events for {args.subject}", file=sys.stderr)
            return 1
        return 0
    if cmd == "rate":
        as_of = b.parse_instant(args.as_of) if args.as_of else time.time_ns() // 1_000_000
        result = stage.rate(storage, ledger.state, period=args.period, as_of_ms=as_of,
                            settle_ms=_settle_ms(config), subscription_id=args.subscription)
        statuses = sorted({ln.status for ln in result.lines})
        print(f"rated {result.periods:,} subscription period(s) of {args.period}: "
              f"{len(result.lines):,} line(s) ({', '.join(statuses) or 'none'}), "
              f"{result.written:,} written, {result.deleted:,} withdrawn, "
              f"{result.closed_unchanged:,} closed unchanged")
        for code, total in sorted(result.total_by_currency.items()):
            print(f"  total {total} {code}")
        if result.corrections:
            print(f"{len(result.corrections)} correction line(s) written for closed "
                  "(invoiced) periods whose usage changed (the invoiced lines are kept):")
            for fix in result.corrections[:20]:
                print(f"  {fix.customer} {fix.subscription_id} {b.iso(fix.period_start_ms)} "
                      f"{fix.line_id} correction {fix.correction}: {fix.quantity:+} units, "
                      f"{fix.amount:+} {fix.currency}")
        return 0
    if cmd in ("explain", "invoice"):
        start, end = stage.month_range(args.period)
        lines = CurrentLinesQuery(start, end, storage.database,
                                  subscription_id=args.subscription,
                                  line_id=getattr(args, "line", None)).run(storage)
        if not lines:
            print(f"no rated lines for {args.subscription} in {args.period} "
                  "(run `meterline rate` first?)", file=sys.stderr)
            return 1
        if cmd == "invoice":
            print(stage.invoice_preview(lines))
        else:
            print("\n\n".join(stage.explain_line(ln, ledger.state) for ln in lines))
        return 0
    if cmd == "simulate":
        doc = b.parse_plan_text(args.plan.read_text(encoding="utf-8"), str(args.plan))
        candidate = b.build_plan_version(doc)
        _check_meters(candidate, config, str(args.plan))
        as_of = b.parse_instant(args.as_of) if args.as_of else time.time_ns() // 1_000_000
        sim = stage.simulate(storage, ledger.state, candidate, period=args.period,
                             as_of_ms=as_of, settle_ms=_settle_ms(config),
                             on_plan=args.on_plan)
        print(f"simulation of {args.period} under candidate {sim.candidate} "
              "(nothing written):")
        print(f"  {'customer':<20}{'current':>14}{'candidate':>14}{'change':>14}")
        for customer, code, now, then in sim.rows:
            print(f"  {customer:<20}{now:>14}{then:>14}{then - now:>+14} {code}")
        print(f"  {'total':<20}{sim.total_current:>14}{sim.total_candidate:>14}"
              f"{sim.total_candidate - sim.total_current:>+14}")
        return 0
    if cmd == "reconcile":
        rows = stage.reconcile(storage, ledger.state, period=args.period)
        export_status = 0
        if getattr(args, "target", None):  # invoicing export (issue 10): the last hop
            from meterline.export.commands import reconcile_command

            export_status = reconcile_command(args, config, storage)
        drift = [r for r in rows if r.drift]

        def show(v: Decimal | None) -> str:
            return "-" if v is None else fmt(v)

        print(f"reconcile {args.period}: {len(rows):,} (customer, meter, segment) quantities,"
              f" {len(drift):,} with drift")
        for r in drift[:50]:
            print(f"  DRIFT {r.customer} {r.subscription_id} {r.meter} ({r.aggregation}) "
                  f"{b.iso(r.segment[0])}..{b.iso(r.segment[1])}: raw {show(r.raw)}, "
                  f"rollups {show(r.rollup)}, rated {show(r.rated)}")
        return 1 if drift or export_status else 0
    raise AssertionError(cmd)
