"""Rollups: exactly-once totals per window, whatever the batching, order or replays."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.core.aggregations import aggregator_for
from meterline.core.dedupe import scoped_id
from meterline.core.envelope import Batch
from meterline.core.lateness import PartitionWatermark
from meterline.core.meters import MeterRegistry
from meterline.core.quantity import MAX_NANOS, SCALE
from meterline.core.rollup import (
    MAX_FUTURE_SKEW_MS,
    REJECTION_REASONS,
    BatchOutcome,
    DeadLetter,
    Dedupers,
    LateEvent,
    RollupRow,
    RollupState,
    WindowKey,
)
from meterline.core.windows import DAY_MS, HOUR_MS

DAY0 = 1_699_920_000_000  # 2023-11-14T00:00:00Z
H0 = DAY0 + 10 * HOUR_MS
NOW = DAY0 + 3 * DAY_MS  # processing time, comfortably after every event below

REGISTRY = MeterRegistry.from_mapping({"meters": {
    "api_calls": {"aggregation": "count", "dimensions": ["endpoint", "region"]},
    "tokens": {"aggregation": "sum", "dimensions": ["model"]},
    "credits": {"aggregation": "sum", "allow_negative": True},
    "peak": {"aggregation": "max"},
    "low": {"aggregation": "min", "allow_negative": True},
    "seats": {"aggregation": "latest"},
    "users": {"aggregation": "unique_count", "value_property": "user_id",
              "dimensions": ["user_id", "plan"]},
}})


def ev(meter: str = "tokens", qty: int = SCALE, ts: int = H0, customer: str = "acme",
       id: str | None = None, dims: dict[str, str] | None = None) -> dict[str, Any]:
    return {"meter": meter, "qty": qty, "ts": ts, "customer": customer, "id": id, "dims": dims}


def make_batch(batch_id: str, events: list[dict[str, Any]]) -> Batch:
    return Batch(
        batch_id=batch_id, created_ms=NOW,
        customers=[e["customer"] for e in events], meters=[e["meter"] for e in events],
        quantities=[e["qty"] for e in events], timestamps_ms=[e["ts"] for e in events],
        ids=[e["id"] for e in events], dimensions=[e["dims"] for e in events],
    )


class Harness:
    """One partition's rollup state with its dedupers and watermark."""

    def __init__(self, allowed_lateness_ms: int = 2 * HOUR_MS, delay_ms: int = 0) -> None:
        self.state = RollupState(allowed_lateness_ms)
        self.dedupers = Dedupers.in_memory()
        self.watermark = PartitionWatermark(delay_ms)
        self.dirty: set[WindowKey] = set()

    def apply(self, batch: Batch, now_ms: int = NOW) -> BatchOutcome:
        out = self.state.apply_batch(batch, REGISTRY, self.dedupers, self.watermark, now_ms)
        assert out.accepted + out.duplicate + out.late + out.rejected == len(batch)
        self.dirty |= out.dirty
        return out

    def rows(self) -> dict[WindowKey, RollupRow]:
        rows = self.state.snapshot(self.state.window_keys())
        return {WindowKey(r.window, r.customer, r.meter, r.group, r.window_start_ms): r
                for r in rows}

    def totals(self) -> dict[WindowKey, int]:
        return {k: r.value_nanos for k, r in self.rows().items()}


@pytest.fixture
def harness() -> Callable[..., Harness]:
    return Harness


def key(window: str, meter: str, group: tuple[tuple[str, str], ...], start: int,
        customer: str = "acme") -> WindowKey:
    return WindowKey(window, customer, meter, group, start)


def test_sum_lands_in_its_hour_and_day(harness: Callable[..., Harness]) -> None:
    h = harness()
    out = h.apply(make_batch("b1", [
        ev(qty=SCALE // 10, dims={"model": "m1"}),
        ev(qty=SCALE // 10, ts=H0 + HOUR_MS - 1, dims={"model": "m1"}),
        ev(qty=SCALE, ts=H0 + HOUR_MS, dims={"model": "m1"}),  # next hour, same day
    ]))
    assert (out.accepted, out.duplicate, out.late, out.rejected) == (3, 0, 0, 0)
    group = (("model", "m1"),)
    hour, next_hour, day = (key("hourly", "tokens", group, H0),
                            key("hourly", "tokens", group, H0 + HOUR_MS),
                            key("daily", "tokens", group, DAY0))
    assert out.dirty == {hour, next_hour, day}
    assert h.totals() == {hour: SCALE // 5, next_hour: SCALE, day: SCALE * 6 // 5}
    rows = h.rows()
    assert (rows[hour].window_end_ms, rows[day].window_end_ms) == (H0 + HOUR_MS, DAY0 + DAY_MS)
    assert (rows[day].events, rows[day].version, rows[day].aggregation) == (3, 3, "sum")


def test_replaying_a_batch_changes_nothing(harness: Callable[..., Harness]) -> None:
    h = harness()
    batch = make_batch("b1", [ev(), ev(meter="api_calls", id="explicit-1"), ev(meter="nope")])
    first = h.apply(batch)
    before, watermark = h.rows(), h.watermark.max_event_ms
    again = h.apply(batch, now_ms=NOW + HOUR_MS)
    assert again.duplicate_batch
    assert (again.accepted, again.duplicate, again.rejected, again.dirty) == (0, 3, 0, set())
    assert again.dead_letters == [] and first.dead_letters == [DeadLetter(2, "b1-2",
                                                                          "unknown_meter")]
    assert h.rows() == before  # totals *and* versions
    assert h.watermark.max_event_ms == watermark


def test_explicit_event_ids_dedupe_across_batches(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.apply(make_batch("b1", [ev(id="k1"), ev(id="k2")]))
    out = h.apply(make_batch("b2", [ev(id="k2"), ev(id="k3"), ev(id="k3")]))
    assert (out.accepted, out.duplicate) == (1, 2)
    assert h.totals()[key("daily", "tokens", (("model", ""),), DAY0)] == 3 * SCALE


def test_implied_ids_do_not_collide_across_batches(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.apply(make_batch("b1", [ev()]))
    out = h.apply(make_batch("b2", [ev()]))  # both are event 0 of their batch: not dupes
    assert out.accepted == 1


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (ev(customer=""), "missing_customer"),
        (ev(meter="nope"), "unknown_meter"),
        (ev(meter=""), "unknown_meter"),
        (ev(ts=NOW + MAX_FUTURE_SKEW_MS + 1), "timestamp_out_of_range"),
        (ev(ts=1_000_000), "timestamp_out_of_range"),  # seconds sent as ms: 1970
        (ev(qty=-1), "negative_quantity"),
        (ev(meter="api_calls", qty=-1), "negative_quantity"),
        (ev(meter="credits", qty=MAX_NANOS + 1), "quantity_out_of_range"),
        (ev(meter="credits", qty=-MAX_NANOS - 1), "quantity_out_of_range"),
        (ev(dims={"model": "m1", "colour": "red"}), "dimension_not_allowed"),
        (ev(meter="peak", dims={"region": "eu"}), "dimension_not_allowed"),
        (ev(meter="users"), "missing_unique_value"),
        (ev(meter="users", dims={"plan": "pro"}), "missing_unique_value"),
        (ev(meter="users", dims={"user_id": ""}), "missing_unique_value"),
    ],
)
def test_rejections_are_dead_lettered_with_a_reason(
    harness: Callable[..., Harness], event: dict[str, Any], reason: str
) -> None:
    h = harness()
    out = h.apply(make_batch("b1", [ev(), {**event, "id": "bad"}, ev()]))
    assert reason in REJECTION_REASONS
    assert out.dead_letters == [DeadLetter(1, "bad", reason)]
    assert (out.accepted, out.rejected) == (2, 1)  # the good events of the batch still count
    assert h.watermark.max_event_ms == H0  # a rejected timestamp never moves the watermark


def test_allowed_negative_and_limits_accepted(harness: Callable[..., Harness]) -> None:
    h = harness()
    out = h.apply(make_batch("b1", [
        ev(meter="credits", qty=-MAX_NANOS), ev(meter="credits", qty=MAX_NANOS),
        ev(ts=NOW + MAX_FUTURE_SKEW_MS),  # exactly at the skew limit
    ]))
    assert out.accepted == 3
    assert h.totals()[key("daily", "credits", (), DAY0)] == 0


def test_rejected_event_ids_are_not_remembered(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.apply(make_batch("b1", [ev(meter="tokenz", id="k1")]))
    out = h.apply(make_batch("b2", [ev(id="k1")]))  # the corrected resend counts
    assert (out.accepted, out.duplicate) == (1, 0)


def test_too_late_events_are_reported_with_their_hour(harness: Callable[..., Harness]) -> None:
    h = harness(allowed_lateness_ms=HOUR_MS, delay_ms=0)
    h.apply(make_batch("b1", [ev(ts=H0 + 3 * HOUR_MS)]))  # watermark: H0 + 3h
    out = h.apply(make_batch("b2", [
        ev(ts=H0 + HOUR_MS + 5, id="late"),  # hour H0+1h: end + 1h <= watermark -> closed
        ev(ts=H0 + 2 * HOUR_MS + 5, id="ok"),  # hour H0+2h: end passed, within lateness
        ev(ts=H0 + 3 * HOUR_MS + 5, id="on-time"),
    ]))
    assert out.late_events == [LateEvent(0, "late", H0 + HOUR_MS)]
    assert (out.accepted, out.late_allowed, out.late) == (2, 1, 1)
    assert key("hourly", "tokens", (("model", ""),), H0 + HOUR_MS) not in h.totals()
    assert h.totals()[key("daily", "tokens", (("model", ""),), DAY0)] == 3 * SCALE
    again = h.apply(make_batch("b3", [ev(ts=H0 + HOUR_MS + 5, id="late")]))
    assert again.duplicate == 1  # a too-late event is still remembered as seen


def test_watermark_is_frozen_while_a_batch_is_applied(harness: Callable[..., Harness]) -> None:
    h = harness(allowed_lateness_ms=0, delay_ms=0)
    # The newest event comes first; the older one in the same batch is not made too late.
    out = h.apply(make_batch("b1", [ev(ts=H0 + 5 * HOUR_MS), ev(ts=H0)]))
    assert (out.accepted, out.late) == (2, 0)
    assert h.watermark.max_event_ms == H0 + 5 * HOUR_MS
    assert h.apply(make_batch("b2", [ev(ts=H0)])).late == 1


def test_future_event_does_not_poison_the_watermark(harness: Callable[..., Harness]) -> None:
    h = harness(allowed_lateness_ms=0)
    h.apply(make_batch("b1", [ev(ts=NOW + DAY_MS)]))  # a client clock a day ahead
    assert h.watermark.max_event_ms is None
    assert h.apply(make_batch("b2", [ev(ts=NOW - 1)])).accepted == 1


def test_unique_count_groups_without_its_value(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.apply(make_batch("b1", [
        ev(meter="users", dims={"user_id": "u1", "plan": "pro"}),
        ev(meter="users", dims={"user_id": "u1", "plan": "pro"}),
        ev(meter="users", dims={"user_id": "u2", "plan": "pro"}),
        ev(meter="users", ts=H0 + HOUR_MS, dims={"user_id": "u1", "plan": "pro"}),
        ev(meter="users", dims={"user_id": "u3"}),  # no plan: group value ""
    ]))
    pro = (("plan", "pro"),)
    totals = h.totals()
    assert totals[key("hourly", "users", pro, H0)] == 2 * SCALE
    assert totals[key("hourly", "users", pro, H0 + HOUR_MS)] == 1 * SCALE
    assert totals[key("daily", "users", pro, DAY0)] == 2 * SCALE  # u1 once a day, not twice
    assert totals[key("daily", "users", (("plan", ""),), DAY0)] == 1 * SCALE


def test_latest_ignores_arrival_order(harness: Callable[..., Harness]) -> None:
    early, late = ev(meter="seats", qty=5 * SCALE, ts=H0 + 9), ev(meter="seats", qty=3 * SCALE,
                                                                  ts=H0 + 10)
    results = []
    for first, second in ((early, late), (late, early)):
        h = harness()
        h.apply(make_batch("b1", [first]))
        h.apply(make_batch("b2", [second]))
        results.append(h.totals())
    assert results[0] == results[1]
    assert results[0][key("daily", "seats", (), DAY0)] == 3 * SCALE


def test_versions_grow_with_every_change(harness: Callable[..., Harness]) -> None:
    h = harness()
    day = key("daily", "tokens", (("model", ""),), DAY0)
    versions = []
    for i in range(4):
        out = h.apply(make_batch(f"b{i}", [ev()] * (i + 1)))
        versions += [r.version for r in h.state.snapshot(out.dirty) if r.window == "daily"]
    assert versions == [1, 3, 6, 10]
    assert h.rows()[day].value_nanos == 10 * SCALE


def test_evicted_windows_fail_loudly(harness: Callable[..., Harness]) -> None:
    h = harness(allowed_lateness_ms=HOUR_MS)
    h.apply(make_batch("b1", [ev(ts=H0), ev(ts=H0 + 2 * HOUR_MS)]))
    hour = key("hourly", "tokens", (("model", ""),), H0)
    assert h.state.evict_closed(PartitionWatermark(0, H0 + 2 * HOUR_MS - 1)) == []
    assert h.state.evict_closed(h.watermark) == [hour]  # end + lateness <= watermark
    assert h.apply(make_batch("b2", [ev(ts=H0)])).late == 1  # same rule: no new cell
    assert len(h.state) == 2  # the later hour and the still-open day remain
    with pytest.raises(KeyError):
        h.state.snapshot([hour])


def test_export_restore_round_trip(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.apply(make_batch("b1", [ev(meter=m, dims=d) for m, d in [
        ("tokens", None), ("api_calls", {"endpoint": "/x"}), ("peak", None), ("low", None),
        ("seats", None), ("users", {"user_id": "u9"}),
    ]]))
    restored = RollupState()
    for k in h.state.window_keys():
        restored.restore(k, *h.state.export(k))
    assert restored.snapshot(restored.window_keys()) == h.state.snapshot(h.state.window_keys())


def _daily_equals_merged_hours(h: Harness) -> None:
    rows = h.rows()
    for k, row in rows.items():
        if k.window != "daily":
            continue
        assert h.state.daily_from_hours(k) == row.value_nanos
        hours = [r for hk, r in rows.items() if hk.window == "hourly" and hk._replace(
            window="daily", window_start_ms=hk.window_start_ms - hk.window_start_ms % DAY_MS) == k]
        assert sum(r.events for r in hours) == row.events
        if row.aggregation in ("sum", "count"):
            assert sum(r.value_nanos for r in hours) == row.value_nanos


event_st = st.builds(
    lambda meter, qty, hour, ms, customer, endpoint, user, eid: ev(
        meter=meter, qty=qty, ts=DAY0 + hour * HOUR_MS + ms, customer=customer,
        id=None if eid is None else f"e{eid}",
        dims={"users": {"user_id": user}, "api_calls": {"endpoint": endpoint}}.get(meter),
    ),
    meter=st.sampled_from(["tokens", "api_calls", "peak", "low", "seats", "users", "credits"]),
    qty=st.integers(0, 10**15),
    hour=st.integers(0, 47),  # two days
    ms=st.integers(0, 3),  # ties in time are common
    customer=st.sampled_from(["acme", "globex"]),
    endpoint=st.sampled_from(["/a", "/b"]),
    user=st.sampled_from(["u1", "u2", "u3"]),
    eid=st.none() | st.integers(0, 10**9),
)


@given(events=st.lists(event_st, min_size=1, max_size=40, unique_by=lambda e: e["id"] or id(e)),
       data=st.data())
@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_batching_and_order_do_not_change_totals(
    harness: Callable[..., Harness], events: list[dict[str, Any]], data: st.DataObject
) -> None:
    # Implied ids are per batch, so in the reference the ids that differ only by batching
    # are made explicit; lateness is wide enough that nothing is too late.
    events = [{**e, "id": e["id"] or f"implied-{i}"} for i, e in enumerate(events)]
    whole = harness(allowed_lateness_ms=7 * DAY_MS)
    whole.apply(make_batch("all", events))
    _daily_equals_merged_hours(whole)

    shuffled = data.draw(st.permutations(events))
    cuts = sorted(data.draw(st.lists(st.integers(1, len(events)), max_size=6)))
    split = harness(allowed_lateness_ms=7 * DAY_MS)
    for n, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(events)], strict=True)):
        if a < b:
            split.apply(make_batch(f"part-{n}", shuffled[a:b]))
            if data.draw(st.booleans()):  # and some batches arrive twice
                assert split.apply(make_batch(f"part-{n}", shuffled[a:b])).duplicate_batch
    assert split.rows() == whole.rows()  # totals, event counts and versions
    _daily_equals_merged_hours(split)


def test_daily_state_is_the_merge_of_hourly_states(harness: Callable[..., Harness]) -> None:
    h = harness()
    events = [ev(meter="users", ts=DAY0 + hour * HOUR_MS, dims={"user_id": f"u{hour % 5}"})
              for hour in range(24)]
    h.apply(make_batch("b1", events))
    agg = aggregator_for("unique_count")
    hourly = [h.state.export(k)[1] for k in h.state.window_keys() if k.window == "hourly"]
    merged = functools.reduce(agg.merge, (agg.from_plain(p) for p in hourly), agg.initialize())
    daily = key("daily", "users", (("plan", ""),), DAY0)
    assert agg.result(merged) == h.totals()[daily] == 5 * SCALE


@pytest.mark.parametrize("module", ["windows", "aggregations", "dedupe", "lateness", "rollup"])
def test_streaming_core_imports_only_stdlib_and_core(module: str) -> None:
    import ast
    import importlib
    import sys

    path = importlib.import_module(f"meterline.core.{module}").__file__
    assert path is not None
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    for name in names:
        top = name.split(".")[0]
        assert name.startswith("meterline.core") or top in sys.stdlib_module_names or (
            top == "__future__"), f"{module} imports {name}"


# ---------------------------------------------------------------- window totals in range
# Decimal(38, 9) holds |total| <= MAX_NANOS; a window beyond it could never be written and
# would stall every later flush of the partition.

BIG = 6 * 10**37  # nano-units: one fits, two in one window do not


def test_an_event_that_would_overflow_its_window_is_a_dead_letter(
        harness: Callable[..., Harness]) -> None:
    h = harness()
    out = h.apply(make_batch("b1", [ev(qty=BIG, id="first"), ev(qty=BIG, id="second"),
                                    ev(qty=5, id="small")]))
    assert "window_total_out_of_range" in REJECTION_REASONS
    assert out.dead_letters == [DeadLetter(1, "second", "window_total_out_of_range")]
    assert (out.accepted, out.rejected) == (2, 1)
    hour, day = (key("hourly", "tokens", (("model", ""),), H0),
                 key("daily", "tokens", (("model", ""),), DAY0))
    assert h.totals() == {hour: BIG + 5, day: BIG + 5}
    assert h.rows()[day].events == 2
    later = h.apply(make_batch("b2", [ev(qty=7), ev(qty=BIG)]))  # the window still works
    assert (later.accepted, [d.reason for d in later.dead_letters]) == (
        1, ["window_total_out_of_range"])
    assert h.totals() == {hour: BIG + 12, day: BIG + 12}


def test_the_daily_total_is_checked_too_and_nothing_changes_on_rejection(
        harness: Callable[..., Harness]) -> None:
    h = harness()
    h.apply(make_batch("b1", [ev(qty=BIG), ev(qty=3, ts=H0 + HOUR_MS)]))
    before = h.rows()
    # Fits its hour (3 + BIG) but not the day (2 * BIG + 3): neither window takes it, and
    # an hour that had no event yet gets no empty window either.
    out = h.apply(make_batch("b2", [ev(qty=BIG, ts=H0 + HOUR_MS),
                                    ev(qty=BIG, ts=H0 + 2 * HOUR_MS)]))
    assert [d.reason for d in out.dead_letters] == ["window_total_out_of_range"] * 2
    assert out.dirty == set()
    assert h.rows() == before  # totals, events and versions
    assert key("hourly", "tokens", (("model", ""),), H0 + 2 * HOUR_MS) not in h.totals()


def test_negative_totals_are_bounded_as_well(harness: Callable[..., Harness]) -> None:
    h = harness()
    out = h.apply(make_batch("b1", [ev(meter="credits", qty=-BIG), ev(meter="credits", qty=-BIG),
                                    ev(meter="credits", qty=BIG), ev(meter="credits", qty=-BIG)]))
    assert [d.position for d in out.dead_letters] == [1]  # -BIG + BIG brought it back
    assert h.totals()[key("daily", "credits", (), DAY0)] == -BIG


def test_results_that_cannot_leave_the_range_are_never_refused(
        harness: Callable[..., Harness]) -> None:
    h = harness()
    out = h.apply(make_batch("b1", [
        ev(meter=m, qty=MAX_NANOS, dims={"user_id": f"u{i}"} if m == "users" else None)
        for m in ("api_calls", "peak", "seats", "users") for i in range(3)]))
    assert (out.accepted, out.rejected) == (12, 0)
    totals = h.totals()
    assert totals[key("daily", "peak", (), DAY0)] == MAX_NANOS
    assert totals[key("daily", "api_calls", (("endpoint", ""), ("region", "")), DAY0)] == 3 * SCALE


def test_an_overflowing_event_id_is_not_remembered(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.apply(make_batch("b1", [ev(qty=BIG), ev(qty=BIG, id="k")]))
    out = h.apply(make_batch("b2", [ev(qty=SCALE, id="k")]))  # the corrected resend counts
    assert (out.accepted, out.duplicate) == (1, 0)
    again = h.apply(make_batch("b3", [ev(qty=BIG, id="k")]))  # now it is a resend
    assert (again.duplicate, again.rejected) == (1, 0)


def test_merging_hours_is_exact_where_partial_sums_leave_the_range(
        harness: Callable[..., Harness]) -> None:
    # Arrival order +BIG (h1), -BIG (h3), +BIG (h2): every running total of the day fits,
    # but merging hours in time order passes through 2 * BIG. Python ints do not wrap, so
    # the merge still equals the checked daily fold.
    h = harness()
    out = h.apply(make_batch("b1", [ev(meter="credits", qty=BIG, ts=H0),
                                    ev(meter="credits", qty=-BIG, ts=H0 + 2 * HOUR_MS),
                                    ev(meter="credits", qty=BIG, ts=H0 + HOUR_MS)]))
    assert out.accepted == 3
    day = key("daily", "credits", (), DAY0)
    assert h.state.daily_from_hours(day) == h.totals()[day] == BIG


@given(qtys=st.lists(st.tuples(st.integers(-MAX_NANOS, MAX_NANOS), st.integers(0, 2)),
                     min_size=1, max_size=30), cut=st.integers(0, 30))
@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_totals_stay_in_range_and_equal_the_accepted_events(
        harness: Callable[..., Harness], qtys: list[tuple[int, int]], cut: int) -> None:
    events = [ev(meter="credits", qty=q, ts=H0 + hour * HOUR_MS) for q, hour in qtys]
    h = harness()
    rejected: set[int] = set()
    for n, part in enumerate((events[:cut], events[cut:])):
        if part:
            out = h.apply(make_batch(f"b{n}", part))
            assert {d.reason for d in out.dead_letters} <= {"window_total_out_of_range"}
            rejected |= {d.position + (cut if n else 0) for d in out.dead_letters}
    hourly: dict[int, int] = {}
    for i, (q, hour) in enumerate(qtys):
        if i not in rejected:
            hourly[hour] = hourly.get(hour, 0) + q
    totals = h.totals()
    for hour, total in hourly.items():
        assert totals[key("hourly", "credits", (), H0 + hour * HOUR_MS)] == total
    assert totals[key("daily", "credits", (), DAY0)] == sum(hourly.values())
    assert all(-MAX_NANOS <= v <= MAX_NANOS for v in totals.values())
    if all(abs(q) <= MAX_NANOS // 30 for q, _ in qtys):
        assert not rejected  # no false alarms where no total can leave the range


# ---------------------------------------------------------------- idempotency scope


def test_a_key_is_scoped_to_customer_and_meter(harness: Callable[..., Harness]) -> None:
    h = harness()
    out = h.apply(make_batch("b1", [
        ev(id="req-1"), ev(id="req-1", customer="globex"),  # another customer's request
        ev(meter="api_calls", id="req-1"),  # the same request metered twice
        ev(id="req-1", qty=5 * SCALE),  # acme's tokens again under its key: a resend
    ]))
    assert (out.accepted, out.duplicate) == (3, 1)
    totals = h.totals()
    assert totals[key("daily", "tokens", (("model", ""),), DAY0)] == SCALE
    assert totals[key("daily", "tokens", (("model", ""),), DAY0, customer="globex")] == SCALE
    again = h.apply(make_batch("b2", [ev(id="req-1", customer="globex"),
                                      ev(meter="api_calls", id="req-1")]))
    assert again.duplicate == 2


def test_scope_parts_cannot_run_into_each_other(harness: Callable[..., Harness]) -> None:
    # With plain concatenation ("a1" + "b" == "a" + "1b") these would collide.
    h = harness()
    out = h.apply(make_batch("b1", [ev(customer="a1", meter="tokens", id="tokensx"),
                                    ev(customer="a", meter="tokens", id="1tokensx")]))
    assert out.accepted == 2


# ---------------------------------------------------------------- two clocks, one horizon

HORIZON = 86_400_000


def test_a_stalled_watermark_keeps_ids_of_open_windows(harness: Callable[..., Harness]) -> None:
    """A quiet partition: nothing newer arrives, so the watermark stands still while log
    time runs on for two days. Every resend must still be recognised: its window is open."""
    h = harness(allowed_lateness_ms=2 * HOUR_MS)
    t0 = H0 + 5 * 60_000
    first = make_batch("b1", [ev(ts=H0, id="k")])
    assert h.apply(first, now_ms=t0).accepted == 1
    other = Batch("b2", t0, ["acme"], ["tokens"], [SCALE], [H0], producer="sdk-1", seq=0)
    assert h.apply(other, now_ms=t0).accepted == 1
    for later in (t0 + HORIZON, t0 + 2 * HORIZON):
        assert h.apply(make_batch(f"r{later}", [ev(ts=H0, id="k")]), now_ms=later).duplicate == 1
        assert h.apply(first, now_ms=later).duplicate_batch
        assert h.apply(other, now_ms=later).duplicate_batch
    assert h.totals()[key("hourly", "tokens", (("model", ""),), H0)] == 2 * SCALE


def test_where_the_watermark_moved_forgotten_ids_find_their_window_closed(
        harness: Callable[..., Harness]) -> None:
    h = harness(allowed_lateness_ms=2 * HOUR_MS)
    t0 = H0 + 5 * 60_000
    h.apply(make_batch("b1", [ev(ts=H0, id="k")]), now_ms=t0)
    h.apply(make_batch("b2", [ev(ts=H0 + 4 * HOUR_MS)]), now_ms=t0 + 4 * HOUR_MS)  # closes H0
    within = h.apply(make_batch("b3", [ev(ts=H0, id="k")]), now_ms=t0 + HORIZON - 1)
    assert within.duplicate == 1  # within the horizon: a duplicate, not even a late event
    after = h.apply(make_batch("b4", [ev(ts=H0, id="k")]), now_ms=t0 + HORIZON)
    assert (after.duplicate, after.accepted, after.late_events) == (
        0, 0, [LateEvent(0, "k", H0)])  # forgotten: it can only reach the late table
    assert h.totals()[key("hourly", "tokens", (("model", ""),), H0)] == SCALE


def test_ids_go_once_both_the_horizon_passed_and_their_window_closed(
        harness: Callable[..., Harness]) -> None:
    h = harness(allowed_lateness_ms=0)
    t0 = H0
    h.apply(make_batch("b1", [ev(ts=H0, id=f"k{i}") for i in range(50)]), now_ms=t0)
    events = h.dedupers.events
    assert len(events) == 50  # type: ignore[arg-type]
    # Expiry runs as ids are looked up, so every batch here carries one.
    h.apply(make_batch("b2", [ev(ts=H0 + 10, id="x2")]), now_ms=t0 + 2 * HORIZON)
    assert len(events) == 51 and events.held_by_windows == 50  # type: ignore[attr-defined]
    h.apply(make_batch("b3", [ev(ts=H0 + HOUR_MS, id="x3")]), now_ms=t0 + 2 * HORIZON + 1)
    h.apply(make_batch("b4", [ev(ts=H0 + HOUR_MS, id="x4")]), now_ms=t0 + 2 * HORIZON + 2)
    # The watermark passed H0's end: the 50 old ids go; the new ones keep their horizon.
    assert len(events) == 3 and events.held_by_windows == 0  # type: ignore[attr-defined]
    assert scoped_id("acme", "tokens", "x2") in events  # type: ignore[operator]
    assert [k for t, k, u in h.dedupers.batches.export()[1]] == [  # type: ignore[attr-defined]
        "b2", "b3", "b4"]
