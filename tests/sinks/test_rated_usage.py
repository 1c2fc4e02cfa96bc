"""The rating stage on chDB: the billing event log, `rate` into rated_usage (idempotent,
tombstones, closed periods), reconcile and simulate, checked against brute-force truth
computed from the events themselves (never with the code under test)."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import replace
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

import pytest

from meterline.core.billing import (
    BillingError,
    TransitionError,
    build_plan_version,
    cancel,
    change_plan,
    close_period,
    publish_plan,
    subscribe,
)
from meterline.core.billing.periods import add_months, month_start
from meterline.core.outputs import Flush, LateRecord, RollupRecord
from meterline.core.quantity import SCALE
from meterline.rating.stage import rate, reconcile, simulate
from meterline.sinks.billing_events import BillingLedger, EventsQuery
from meterline.sinks.billing_tables import billing_tables
from meterline.sinks.rated_usage import CurrentLinesQuery
from meterline.sinks.raw_events import RawEventColumns, insert_raw_events
from meterline.sinks.rollups import write_flush
from meterline.sinks.schema import migrate

HOUR = 3_600_000
DAY = 24 * HOUR
ACTOR = "finance@example.com"
METER_AGG = {"api_calls": "count", "llm_tokens": "sum", "storage_gb": "max",
             "active_users": "unique_count"}
GROUP_BY = {"api_calls": ("region",), "llm_tokens": ("model",), "storage_gb": ("region",),
            "active_users": ()}

BASIC = {"id": "basic", "name": "Basic", "currency": "USD", "base_fee": "10.00", "charges": [
    {"meter": "api_calls", "aggregation": "count",
     "price": {"model": "graduated", "tiers": [{"up_to": 100, "unit_amount": "0"},
                                               {"unit_amount": "0.05"}]}},
    {"meter": "llm_tokens", "aggregation": "sum",
     "price": {"model": "per_unit", "unit_amount": "0.00042"}}]}
PRO = {"id": "pro", "name": "Pro", "currency": "USD", "base_fee": "40.00", "charges": [
    {"meter": "api_calls", "aggregation": "count",
     "price": {"model": "per_unit", "unit_amount": "0.01"}},
    {"meter": "llm_tokens", "aggregation": "sum",
     "price": {"model": "per_unit", "unit_amount": "0.0003"}},
    {"meter": "storage_gb", "aggregation": "max",
     "price": {"model": "per_unit", "unit_amount": "0.5"}},
    {"meter": "storage_gb", "aggregation": "time_weighted_sum", "time_unit": "hour",
     "price": {"model": "per_unit", "unit_amount": "0.001"}},
    {"meter": "active_users", "aggregation": "unique_count", "dimension": "user_id",
     "price": {"model": "per_unit", "unit_amount": "1.00"}}]}


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def _events(month: int, seed: int = 5) -> list[tuple[str, str, int, int, dict[str, str], str]]:
    """(customer, meter, ts, nanos, dims, id); storage_gb changes only on whole hours."""
    rnd = random.Random(seed)
    out = []
    for i in range(2500):
        c = f"c{rnd.randrange(3)}"
        ts = month + rnd.randrange(28 * DAY)
        kind = rnd.random()
        if kind < 0.5:
            out.append((c, "api_calls", ts, SCALE, {"region": rnd.choice("ab")}, f"e{i}"))
        elif kind < 0.8:
            out.append((c, "llm_tokens", ts, rnd.randint(1, 4000) * SCALE,
                        {"model": rnd.choice(["s", "l"])}, f"e{i}"))
        elif kind < 0.9:
            out.append((c, "storage_gb", ts - ts % HOUR, rnd.randint(1, 9000) * SCALE // 100,
                        {"region": rnd.choice("ab")}, f"e{i}"))
        else:
            out.append((c, "active_users", ts, SCALE, {"user_id": f"u{rnd.randrange(40)}"},
                        f"e{i}"))
    return out


def _rollups(events: list[Any]) -> list[RollupRecord]:
    """Brute-force rollup rows (hourly and daily) from the events."""
    cells: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for c, m, ts, nanos, dims, _ in events:
        group = tuple((d, dims.get(d, "")) for d in GROUP_BY[m])
        for window, size in (("hourly", HOUR), ("daily", DAY)):
            cells[(window, c, m, group, ts - ts % size, size)].append((nanos, dims))
    out = []
    for (window, c, m, group, start, size), items in cells.items():
        agg = METER_AGG[m]
        if agg == "count":
            value = len(items) * SCALE
        elif agg == "sum":
            value = sum(n for n, _ in items)
        elif agg == "max":
            value = max(n for n, _ in items)
        else:
            value = len({d["user_id"] for _, d in items}) * SCALE
        out.append(RollupRecord(window, c, m, group, start, start + size, agg, value,
                                len(items), 1, "usage", 0))
    return out


def _load(storage: Any, events: list[Any], now_ms: int) -> None:
    write_flush(storage, Flush(rollups=_rollups(events)), clock_ms=lambda: now_ms)
    insert_raw_events(storage, RawEventColumns(
        event_id=[e[5] for e in events], batch_id=["b"] * len(events),
        customer=[e[0] for e in events], meter=[e[1] for e in events],
        quantity_nano=[e[3] for e in events], timestamp_ms=[e[2] for e in events],
        dimensions=[e[4] for e in events], source=["usage"] * len(events),
        ingested_at_ms=[now_ms] * len(events)))


def _truth_quantity(events: list[Any], c: str, meter: str, agg: str, start: int,
                    end: int) -> Decimal:
    mine = [e for e in events if e[0] == c and e[1] == meter and start <= e[2] < end]
    if agg == "count":
        return Decimal(len(mine))
    if agg == "sum":
        return Decimal(sum(e[3] for e in mine)) / SCALE
    if agg == "max":  # per region: its peak; regions added
        peaks: dict[str, int] = {}
        for e in mine:
            r = e[4]["region"]
            peaks[r] = max(peaks.get(r, 0), e[3])
        return Decimal(sum(peaks.values())) / SCALE
    if agg == "unique_count":
        return Decimal(len({e[4]["user_id"] for e in mine}))
    # time-weighted GB-hours: walk the hours; the value at each hour is the last change
    # at or before it (ties: the greatest event id, as the log orders them), carried in
    # from before the range.
    total = Fraction(0)
    for region in "ab":
        pts = sorted((e[2], e[5], e[3]) for e in events
                     if e[0] == c and e[1] == meter and e[4]["region"] == region and e[2] < end)
        for h in range(start, end, HOUR):
            at = [p for p in pts if p[0] <= h]
            if at:
                total += Fraction(at[-1][2], SCALE)
    return Decimal(total.numerator) / Decimal(total.denominator)


def _per_unit_graduated(q: Decimal, free: int, rate_: Decimal) -> Decimal:
    # One unit at a time (quantities here are whole): units past `free` pay `rate_`.
    return sum((rate_ for i in range(1, int(q) + 1) if i > free), Decimal(0))


def _cents(x: Decimal | Fraction) -> Decimal:
    if isinstance(x, Fraction):
        x = Decimal(x.numerator) / Decimal(x.denominator)
    return x.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


@pytest.fixture
def setup(chdb_storage: Any) -> dict[str, Any]:
    now = time.time_ns() // 1_000_000
    month = month_start(now)
    month_end = add_months(month, 1)
    migrate(chdb_storage)
    clock = Clock(month - DAY)
    ledger = BillingLedger(chdb_storage, clock_ms=clock)
    ledger.record(lambda s, t: publish_plan(s, BASIC, actor=ACTOR, reason="launch", now_ms=t),
                  lambda s, t: publish_plan(s, PRO, actor=ACTOR, reason="launch", now_ms=t))
    clock.ms = month
    upgrade_at = month + 10 * DAY + 5 * HOUR
    ledger.record(
        lambda s, t: subscribe(s, "s0", "c0", "basic", start_ms=month, actor=ACTOR,
                               reason="signup", now_ms=t),
        lambda s, t: subscribe(s, "s1", "c1", "basic", start_ms=month, actor=ACTOR,
                               reason="signup", now_ms=t),
        lambda s, t: subscribe(s, "s2", "c2", "pro", start_ms=month, actor=ACTOR,
                               reason="signup", now_ms=t, trial_end_ms=month + 7 * DAY))
    clock.ms = upgrade_at
    ledger.record(lambda s, t: change_plan(s, "s1", "pro", at_ms=upgrade_at, actor="c1-admin",
                                           reason="upgrade", now_ms=t))
    events = _events(month)
    _load(chdb_storage, events, now)
    period = time.strftime("%Y-%m", time.gmtime(month / 1000))
    return {"storage": chdb_storage, "ledger": ledger, "month": month, "end": month_end,
            "upgrade_at": upgrade_at, "events": events, "period": period, "clock": clock}


def _rate(setup: dict[str, Any], **kw: Any) -> Any:
    return rate(setup["storage"], setup["ledger"].reload(), period=setup["period"],
                as_of_ms=setup["month"] + 15 * DAY, settle_ms=3 * HOUR, **kw)


def test_ledger_persists_events_and_refuses_bad_changes_writing_nothing(
        setup: dict[str, Any]) -> None:
    storage, ledger = setup["storage"], setup["ledger"]
    events = EventsQuery(storage.database).run(storage)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert events[5].actor == "c1-admin" and events[5].reason == "upgrade"
    state = ledger.reload()
    assert state.subscriptions["s1"].plans[-1] == (setup["upgrade_at"], "pro")
    # A batch with one refused command writes none of it.
    with pytest.raises(TransitionError, match="does not exist"):
        ledger.record(
            lambda s, t: cancel(s, "s0", at_ms=setup["end"], actor=ACTOR, reason="x", now_ms=t),
            lambda s, t: cancel(s, "nope", at_ms=setup["end"], actor=ACTOR, reason="x",
                                now_ms=t))
    assert len(EventsQuery(storage.database).run(storage)) == 6
    # A malformed plan is refused with every error and nothing written.
    with pytest.raises(BillingError) as info:
        ledger.record(lambda s, t: publish_plan(
            s, {"id": "x", "currency": "usd", "charges": [{"meter": "m", "aggregation": "sum",
                "price": {"model": "graduated", "tiers": [{"up_to": 5, "unit_amount": "1"}]}}],
                "base_fee": "-3"}, actor=ACTOR, reason="x", now_ms=t))
    assert len(info.value.errors) >= 2
    assert len(EventsQuery(storage.database).run(storage)) == 6
    # A retried insert of the very same event collapses to one.
    table = billing_tables().events.qualified(storage.database)
    rows = storage.query_rows(f"SELECT * FROM {table} WHERE seq = 1")
    storage.execute(f"INSERT INTO {table} SELECT * FROM {table} WHERE seq = 1")
    assert len(EventsQuery(storage.database).run(storage)) == 6 and len(rows) == 1


def test_rate_matches_brute_force_truth_and_is_idempotent(setup: dict[str, Any]) -> None:
    storage, events, month, end = (setup["storage"], setup["events"], setup["month"],
                                   setup["end"])
    up = setup["upgrade_at"]
    result = _rate(setup, rated_at_ms=1)
    lines = CurrentLinesQuery(database=storage.database).run(storage)
    got = {(ln.subscription_id, ln.kind, ln.meter, ln.aggregation, ln.segment_start_ms):
           (ln.quantity, ln.amount) for ln in lines}
    month_ms = end - month
    want: dict[tuple[Any, ...], tuple[Decimal, Decimal]] = {}

    def basic(sub: str, c: str, a: int, b: int) -> None:
        want[(sub, "base_fee", "", "", a)] = (Decimal(0),
                                             _cents(Fraction(10) * Fraction(b - a, month_ms)))
        calls = _truth_quantity(events, c, "api_calls", "count", a, b)
        want[(sub, "usage", "api_calls", "count", a)] = (
            calls, _cents(_per_unit_graduated(calls, 100, Decimal("0.05"))))
        tokens = _truth_quantity(events, c, "llm_tokens", "sum", a, b)
        want[(sub, "usage", "llm_tokens", "sum", a)] = (tokens,
                                                       _cents(tokens * Decimal("0.00042")))

    def pro(sub: str, c: str, a: int, b: int, trial: bool = False) -> None:
        kind = "trial_usage" if trial else "usage"
        if not trial:
            want[(sub, "base_fee", "", "", a)] = (
                Decimal(0), _cents(Fraction(40) * Fraction(b - a, month_ms)))
        for meter, agg, unit in (("api_calls", "count", "0.01"), ("llm_tokens", "sum", "0.0003"),
                                 ("storage_gb", "max", "0.5"),
                                 ("storage_gb", "time_weighted_sum", "0.001"),
                                 ("active_users", "unique_count", "1.00")):
            q = _truth_quantity(events, c, meter, agg, a, b)
            want[(sub, kind, meter, agg, a)] = (q, Decimal("0.00") if trial
                                                else _cents(q * Decimal(unit)))

    basic("s0", "c0", month, end)
    basic("s1", "c1", month, up)
    pro("s1", "c1", up, end)
    pro("s2", "c2", month, month + 7 * DAY, trial=True)
    pro("s2", "c2", month + 7 * DAY, end)
    assert got == want
    assert result.written == len(want) and result.deleted == 0
    assert sum(ln.amount for ln in lines) == sum(a for _, a in want.values())
    assert {ln.status for ln in lines} == {"in_progress"}

    # Re-running writes the same rows: same keys, same content; the view still shows each
    # line once.
    again = _rate(setup, rated_at_ms=2)
    lines2 = CurrentLinesQuery(database=storage.database).run(storage)
    assert lines2 == lines and again.written == result.written
    assert [ln.line_id for ln in again.lines] == [ln.line_id for ln in result.lines]


def test_rerating_after_a_change_tombstones_lines_no_longer_produced(
        setup: dict[str, Any]) -> None:
    storage, ledger = setup["storage"], setup["ledger"]
    _rate(setup, rated_at_ms=1)
    before = {ln.line_id for ln in CurrentLinesQuery(database=storage.database,
                                                     subscription_id="s0").run(storage)}
    cancel_at = setup["month"] + 3 * DAY
    setup["clock"].ms = cancel_at
    ledger.record(lambda s, t: cancel(s, "s0", at_ms=cancel_at, actor=ACTOR,
                                      reason="churn", now_ms=t))
    result = _rate(setup, rated_at_ms=2)
    after = CurrentLinesQuery(database=storage.database, subscription_id="s0").run(storage)
    assert {ln.line_id for ln in after} == before  # same lines (one segment), new amounts
    fee = next(ln for ln in after if ln.kind == "base_fee")
    month_ms = setup["end"] - setup["month"]
    assert fee.amount == _cents(Fraction(10) * Fraction(3 * DAY, month_ms))
    assert (fee.segment_end_ms, fee.proration_num * month_ms) == (
        cancel_at, 3 * DAY * fee.proration_den)
    assert result.deleted == 0

    # Cancelling s2 inside its trial removes the paid segment: its six lines (base fee and
    # five usage charges) are tombstoned and the view no longer shows them.
    s2_before = CurrentLinesQuery(database=storage.database, subscription_id="s2").run(storage)
    assert len([ln for ln in s2_before if ln.kind != "trial_usage"]) == 6
    stop = setup["month"] + 5 * DAY
    ledger.record(lambda s, t: cancel(s, "s2", at_ms=stop, actor=ACTOR, reason="trial ended",
                                      now_ms=t))
    result = _rate(setup, rated_at_ms=3)
    assert result.deleted == 6
    s2 = CurrentLinesQuery(database=storage.database, subscription_id="s2").run(storage)
    assert {ln.kind for ln in s2} == {"trial_usage"}
    assert {(ln.segment_start_ms, ln.segment_end_ms) for ln in s2} == {(setup["month"], stop)}
    # The tombstones are rows (the history stays in the table), hidden by the view.
    table = billing_tables().rated_usage.qualified(storage.database)
    assert storage.query_rows(f"SELECT count() FROM {table} FINAL WHERE deleted = 1")[0][0] == 6
    # Rating again deletes nothing more.
    assert _rate(setup, rated_at_ms=4).deleted == 0


def test_closed_periods_are_never_rewritten_and_get_a_correction_of_the_difference(
        setup: dict[str, Any]) -> None:
    storage, ledger, month, end = (setup["storage"], setup["ledger"], setup["month"],
                                   setup["end"])
    result = rate(storage, ledger.reload(), period=setup["period"], as_of_ms=end + DAY,
                  settle_ms=3 * HOUR, rated_at_ms=1)
    assert {ln.status for ln in result.lines} == {"final"}
    assert all(not r.drift for r in reconcile(storage, ledger.state, period=setup["period"]))
    setup["clock"].ms = end + DAY
    ledger.record(lambda s, t: close_period(s, "s0", month, end, actor=ACTOR,
                                            reason="invoiced", now_ms=t))
    invoiced = CurrentLinesQuery(database=storage.database, subscription_id="s0").run(storage)
    # Late usage lands in the rollups and raw events of a closed period.
    late = [("c0", "api_calls", month + 2 * DAY, SCALE, {"region": "a"}, f"late{i}")
            for i in range(500)]
    _load(storage, setup["events"] + late, end + DAY)
    again = rate(storage, ledger.reload(), period=setup["period"], as_of_ms=end + DAY,
                 settle_ms=3 * HOUR, rated_at_ms=2)
    now = CurrentLinesQuery(database=storage.database, subscription_id="s0").run(storage)
    # The invoiced lines are untouched; one correction line is new.
    assert [ln for ln in now if ln.correction == 0] == invoiced
    calls_before = _truth_quantity(setup["events"], "c0", "api_calls", "count", month, end)
    calls_after = calls_before + 500
    fee = [_cents(_per_unit_graduated(q, 100, Decimal("0.05")))
           for q in (calls_before, calls_after)]
    (fix,) = [ln for ln in now if ln.correction]
    assert again.corrections == [fix]
    assert (fix.line_id, fix.correction, fix.corrects, fix.quantity, fix.amount) == (
        fix.corrects, 1, f"{month}/usage/api_calls:count", Decimal(500), fee[1] - fee[0])
    # Line plus correction is the period as rated now; reconcile sees no drift.
    assert not [r for r in reconcile(storage, ledger.state, period=setup["period"])
                if r.drift]
    # Idempotent: a re-run finds nothing more to correct.
    third = rate(storage, ledger.reload(), period=setup["period"], as_of_ms=end + DAY,
                 settle_ms=3 * HOUR, rated_at_ms=3)
    assert third.corrections == [] and third.written == sum(
        1 for ln in third.lines if ln.subscription_id != "s0")
    # More late usage later: a second correction, of the new difference only.
    more = [("c0", "api_calls", month + 3 * DAY, SCALE, {"region": "b"}, f"later{i}")
            for i in range(20)]
    _load(storage, setup["events"] + late + more, end + DAY)
    fourth = rate(storage, ledger.reload(), period=setup["period"], as_of_ms=end + DAY,
                  settle_ms=3 * HOUR, rated_at_ms=4)
    assert [(f.correction, f.quantity, f.amount) for f in fourth.corrections] == [
        (2, Decimal(20), _cents(_per_unit_graduated(calls_after + 20, 100, Decimal("0.05")))
         - fee[1])]


def test_late_events_restated_into_the_rollups_reach_the_bill_once(
        setup: dict[str, Any]) -> None:
    """Late events that never entered a rollup (late_events, restated by the usage views)
    are billed: an open period's line follows them; a resend of one counts once."""
    storage, month = setup["storage"], setup["month"]
    before = {ln.line_id: ln for ln in _rate(setup, rated_at_ms=1).lines
              if ln.subscription_id == "s0"}
    h = month + 3 * DAY
    late = [LateRecord(source="usage", partition=0, offset=10_000 + i, position=0,
                       event_id=f"tok{i}", customer="c0", meter="llm_tokens",
                       group=(("model", "s"),), quantity_nanos=1000 * SCALE,
                       timestamp_ms=h + 5, window_start_ms=h, received_at_ms=h + 5 * HOUR)
            for i in range(3)]
    # tok0 is delivered twice (an SDK resend: a new record, later in the log).
    late.append(replace(late[0], offset=20_000))
    write_flush(storage, Flush(late=late), clock_ms=lambda: h + 5 * HOUR)
    insert_raw_events(storage, RawEventColumns(
        event_id=[x.event_id for x in late], batch_id=["b"] * 4, customer=["c0"] * 4,
        meter=["llm_tokens"] * 4, quantity_nano=[x.quantity_nanos for x in late],
        timestamp_ms=[x.timestamp_ms for x in late], dimensions=[{"model": "s"}] * 4,
        source=["usage"] * 4, ingested_at_ms=[h] * 4, source_partition=[0] * 4,
        source_offset=[x.offset for x in late], position=[0] * 4))
    after = {ln.line_id: ln for ln in _rate(setup, rated_at_ms=2).lines
             if ln.subscription_id == "s0"}
    key = f"{month}/usage/llm_tokens:sum"
    assert after[key].quantity - before[key].quantity == 3000
    tokens = _truth_quantity(setup["events"], "c0", "llm_tokens", "sum", month,
                             setup["end"]) + 3000
    assert after[key].amount == _cents(tokens * Decimal("0.00042"))
    assert not [r for r in reconcile(storage, setup["ledger"].state, period=setup["period"])
                if r.drift]


def test_reconcile_flags_raw_events_missing_from_rollups(setup: dict[str, Any]) -> None:
    storage, ledger = setup["storage"], setup["ledger"]
    _rate(setup, rated_at_ms=1)
    assert not [r for r in reconcile(storage, ledger.reload(), period=setup["period"])
                if r.drift]
    # A late event: in raw events, in no rollup.
    insert_raw_events(storage, RawEventColumns(
        event_id=["late"], batch_id=["b"], customer=["c1"], meter=["llm_tokens"],
        quantity_nano=[7 * SCALE], timestamp_ms=[setup["month"] + HOUR],
        dimensions=[{"model": "s"}], source=["usage"], ingested_at_ms=[0]))
    drift = [r for r in reconcile(storage, ledger.state, period=setup["period"]) if r.drift]
    assert len(drift) == 1 and drift[0].meter == "llm_tokens"
    assert drift[0].raw is not None and drift[0].raw - drift[0].rollup == 7


def test_simulation_rerates_without_writing(setup: dict[str, Any]) -> None:
    storage, ledger = setup["storage"], setup["ledger"]
    _rate(setup, rated_at_ms=1)
    table = billing_tables().rated_usage.qualified(storage.database)
    rows = storage.query_rows(f"SELECT count() FROM {table}")[0][0]
    cheaper = build_plan_version({**BASIC, "base_fee": "5.00"})
    sim = simulate(storage, ledger.reload(), cheaper, period=setup["period"],
                   as_of_ms=setup["month"] + 15 * DAY, settle_ms=3 * HOUR)
    assert storage.query_rows(f"SELECT count() FROM {table}")[0][0] == rows
    by_customer = {c: (now, then) for c, _, now, then in sim.rows}
    assert set(by_customer) == {"c0", "c1"}  # the subscriptions on basic in the period
    # c0 is on basic all month: only the base fee changes, 10.00 -> 5.00.
    assert by_customer["c0"][0] - by_customer["c0"][1] == Decimal("5.00")
    # c1 upgraded to pro mid-month: only its basic segment is re-priced (its fee share).
    share = Fraction(setup["upgrade_at"] - setup["month"], setup["end"] - setup["month"])
    assert by_customer["c1"][0] - by_customer["c1"][1] == (
        _cents(Fraction(10) * share) - _cents(Fraction(5) * share))


def test_period_quantities_combine_source_partitions_and_hour_edges(chdb_storage: Any) -> None:
    """A foreign producer split one customer's windows over two partitions; the period
    runs from 05:00 on day 1 to 03:00 on day 4 (hourly edges around two whole days)."""
    from meterline.core.billing import UsageRequest
    from meterline.sinks.rated_usage import StorageUsageReader

    migrate(chdb_storage)
    day0 = month_start(time.time_ns() // 1_000_000)
    start, end = day0 + 5 * HOUR, day0 + 3 * DAY + 3 * HOUR
    rows = []
    # Per hour h of the first 4 days, partition p holds value (h % 7 + 1) * (p + 1).
    truth_sum = truth_max = 0
    latest = None
    for h in range(4 * 24):
        ws = day0 + h * HOUR
        for p in (0, 1):
            v = (h % 7 + 1) * (p + 1)
            for meter, agg in (("tokens", "sum"), ("gb", "max"), ("seats", "latest")):
                rows.append(RollupRecord("hourly", "c", meter, (), ws, ws + HOUR, agg,
                                         v * SCALE, 1, 1, "usage", p))
        if start <= ws < end:
            truth_sum += 3 * (h % 7 + 1)
            truth_max = max(truth_max, 2 * (h % 7 + 1))
            latest = 2 * (h % 7 + 1)  # the last window; partition 1 wins the tie
    for d in range(4):
        ws = day0 + d * DAY
        hours = range(d * 24, d * 24 + 24)
        for p in (0, 1):
            vals = [(h % 7 + 1) * (p + 1) for h in hours]
            for meter, agg, v in (("tokens", "sum", sum(vals)), ("gb", "max", max(vals)),
                                  ("seats", "latest", vals[-1])):
                rows.append(RollupRecord("daily", "c", meter, (), ws, ws + DAY, agg, v * SCALE,
                                         24, 1, "usage", p))
    write_flush(chdb_storage, Flush(rollups=rows), clock_ms=lambda: day0)
    reqs = [UsageRequest("c", m, a, start, end) for m, a in
            (("tokens", "sum"), ("tokens", "count"), ("gb", "max"), ("seats", "latest"))]
    got = StorageUsageReader(chdb_storage).quantities(reqs)
    hours_in = (end - start) // HOUR
    assert [got[r] for r in reqs] == [truth_sum, 2 * hours_in, truth_max, latest]


def test_unique_count_query_applies_the_dedup_views_first_delivery_rule(
        chdb_storage: Any) -> None:
    """unique_count_sql reads raw_events with raw_events_deduplicated's rule (the first
    delivery of an event id wins: its timestamp and its dimensions); it must count what
    the view counts, also for resent events whose later copies differ."""
    from meterline.sinks.rated_usage import unique_count_sql

    migrate(chdb_storage)
    day0 = month_start(time.time_ns() // 1_000_000)
    start, end = day0 + DAY, day0 + 3 * DAY
    # (event_id, customer, timestamp, dimensions, partition, offset)
    rows = [
        ("e1", "c", start, {"user_id": "a"}, 0, 5),
        ("e1", "c", start, {"user_id": "b"}, 0, 9),  # resend: the first copy counts
        ("e2", "c", start - HOUR, {"user_id": "x"}, 1, 1),  # first copy before the range
        ("e2", "c", start + HOUR, {"user_id": "y"}, 1, 7),
        ("e3", "c", start + HOUR, {}, 0, 2),  # first copy without the dimension
        ("e3", "c", start + HOUR, {"user_id": "z"}, 0, 3),
        ("e4", "c", end - 1, {"user_id": "a"}, 2, 1),
        ("e5", "c", end, {"user_id": "q"}, 2, 2),  # at the end: outside
        ("e6", "d", start, {"user_id": "q"}, 0, 1),
        ("e6", "d", start, {"user_id": "q"}, 0, 1),  # the same delivery twice
        ("e7", "d", start + 2 * HOUR, {"user_id": "r"}, 3, 0),
    ]
    insert_raw_events(chdb_storage, RawEventColumns(
        event_id=[r[0] for r in rows], batch_id=["b"] * len(rows),
        customer=[r[1] for r in rows], meter=["active_users"] * len(rows),
        quantity_nano=[SCALE] * len(rows), timestamp_ms=[r[2] for r in rows],
        dimensions=[r[3] for r in rows], source=["usage"] * len(rows),
        ingested_at_ms=[day0] * len(rows), source_partition=[r[4] for r in rows],
        source_offset=[r[5] for r in rows], position=[0] * len(rows)))
    db = chdb_storage.database
    via_view = sorted(chdb_storage.query_rows(
        "SELECT customer, meter, uniqExact(dimensions['user_id'])\n"
        f"FROM {db}.raw_events_deduplicated\n"
        "WHERE meter = 'active_users' AND timestamp_ms >= {start:Int64}\n"
        "  AND timestamp_ms < {end:Int64} AND mapContains(dimensions, 'user_id')\n"
        "GROUP BY customer, meter", {"start": start, "end": end}))
    for customers in (None, ("c", "d")):
        got = sorted(chdb_storage.query_rows(*unique_count_sql(
            db, start, end, ("active_users",), customers, "user_id")))
        assert got == via_view == [("c", "active_users", 1), ("d", "active_users", 2)]


def test_decimal_read_back_fast_path_is_the_nano_conversion() -> None:
    """rated_usage._decimal quantizes instead of going through nano-unit ints; it must
    give the same value and exponent, and refuse the same values."""
    from meterline.core.quantity import QuantityError, to_decimal, to_nanos
    from meterline.sinks.rated_usage import _decimal

    rng = random.Random(3)
    values = [Decimal(v) for v in ("0", "-0", "0E-9", "0E+5", "1E+3", "-2.5", "1E-9",
                                   "1E-10", "99999999999999999999999999999.999999999",
                                   "1E+29", "123.4560000000000", "NaN", "Infinity")]
    values += [Decimal(rng.randint(-10**20, 10**20)).scaleb(-rng.randint(0, 12))
               for _ in range(2000)]

    def outcome(fn: Any, value: Decimal) -> Any:
        try:
            return repr(fn(value))
        except (QuantityError, ArithmeticError) as exc:
            return type(exc).__name__, str(exc)

    for value in values:
        assert outcome(_decimal, value) == outcome(
            lambda v: to_decimal(to_nanos(v)), value), value
