"""unique_count and latest windows with late events are re-aggregated from raw events
(docs/rollups.md, "Late usage is restated"; sinks/reaggregation.py).

The test seeds events as plain Python records. The rollup rows are what the fold would
have written from the on-time ones, and the truth is the same meaning (distinct users /
the newest event's quantity) applied to every counted event, on time or late. Both are
plain Python over the seeded events and are never read back from a view. No two events of
a window share a timestamp, so the truth needs no tie-break rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from meterline.core.meters import Aggregation, Meter, MeterRegistry
from meterline.core.outputs import Flush, LateRecord, RollupRecord
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.sinks.exceptions import SinkConfigError
from meterline.sinks.raw_events import RawEventColumns, insert_raw_events
from meterline.sinks.rollups import RollupTotalsQuery, RollupUsageQuery, write_flush

NANO = 10**9
USERS = {"users": "user_id"}  # the unique_count meter and the dimension it counts
REGISTRY = MeterRegistry([
    Meter("users", Aggregation.UNIQUE_COUNT, value_property="user_id",
          dimensions=("user_id", "plan")),
    Meter("gauge", Aggregation.LATEST, dimensions=("region",)),
])


@dataclass(frozen=True)
class Ev:
    event_id: str
    meter: str
    ts: int
    qty: int
    dims: tuple[tuple[str, str], ...]
    offset: int
    late: bool = False


def _group(ev: Ev) -> tuple[tuple[str, str], ...]:
    # The group a window is keyed by: the meter's dimensions minus what unique_count counts.
    return tuple((k, v) for k, v in ev.dims if k != "user_id")


def _truth(events: list[Ev], span: int) -> dict[tuple[str, tuple[tuple[str, str], ...], int],
                                               tuple[int, int]]:
    """{(meter, group, window_start): (value_nanos, events)} over ``events``."""
    windows: dict[Any, list[Ev]] = {}
    for ev in events:
        windows.setdefault((ev.meter, _group(ev), ev.ts - ev.ts % span), []).append(ev)
    out = {}
    for (meter, group, start), evs in windows.items():
        if meter == "users":
            value = len({dict(e.dims)["user_id"] for e in evs}) * NANO
        else:
            value = max(evs, key=lambda e: e.ts).qty
        out[(meter, group, start)] = (value, len(evs))
    return out


def _seed(storage: Any, events: list[Ev], *, raw: list[Ev] | None = None) -> None:
    on_time = [e for e in events if not e.late]
    rollups = [
        RollupRecord(window=window, customer="acme", meter=meter, group=group,
                     window_start_ms=start, window_end_ms=start + span,
                     aggregation="unique_count" if meter == "users" else "latest",
                     value_nanos=value, events=n, version=n, source="usage", partition=0)
        for window, span in (("hourly", HOUR_MS), ("daily", DAY_MS))
        for (meter, group, start), (value, n) in _truth(on_time, span).items()
    ]
    late = [
        LateRecord(source="usage", partition=0, offset=e.offset, position=0,
                   event_id=e.event_id, customer="acme", meter=e.meter, group=_group(e),
                   quantity_nanos=e.qty, timestamp_ms=e.ts,
                   window_start_ms=e.ts - e.ts % HOUR_MS,
                   received_at_ms=e.ts - e.ts % HOUR_MS + 4 * HOUR_MS)
        for e in events if e.late
    ]
    for e in events if raw is None else raw:
        insert_raw_events(storage, RawEventColumns(
            event_id=[e.event_id], batch_id=["b"], customer=["acme"], meter=[e.meter],
            quantity_nano=[e.qty], timestamp_ms=[e.ts], dimensions=[dict(e.dims)],
            source=["usage"], ingested_at_ms=[e.ts], source_partition=[0],
            source_offset=[e.offset], position=[0]))
    write_flush(storage, Flush(rollups=rollups, late=late))


def _read(storage: Any, meter: str, start_ms: int, granularity: str,
          registry: Any = REGISTRY) -> dict[tuple[tuple[str, str], ...], tuple[int, ...]]:
    rows = RollupUsageQuery("acme", meter, start_ms - 2 * DAY_MS, start_ms + 2 * DAY_MS,
                            granularity, database=storage.database,  # type: ignore[arg-type]
                            registry=registry).run(storage)
    return {(r.window_start_ms, tuple(sorted(r.group.items()))):  # type: ignore[misc]
            (r.value_nanos, r.events, r.late_events, r.late_pending) for r in rows}


def _expected(events: list[Ev], span: int, meter: str) -> dict[Any, tuple[int, ...]]:
    counted = _truth(events, span)
    late_per_window: dict[Any, int] = {}
    for e in events:
        if e.late:
            key = (e.meter, _group(e), e.ts - e.ts % span)
            late_per_window[key] = late_per_window.get(key, 0) + 1
    return {(start, tuple(sorted(group))): (value, n, late_per_window.get((m, group, start), 0), 0)
            for (m, group, start), (value, n) in counted.items() if m == meter}


def _day_start(now_ms: int) -> int:
    # Two days back: every window is closed, well inside raw retention and the horizon.
    return now_ms - now_ms % DAY_MS - 2 * DAY_MS


def _scenario(now_ms: int) -> list[Ev]:
    d = _day_start(now_ms)
    h0, h1 = d + 3 * HOUR_MS, d + 5 * HOUR_MS
    pro, free = ("plan", "pro"), ("plan", "free")
    eu = (("region", "eu"),)
    return [
        # users/pro in h0: u1, u2, u1 on time; late u3 (a new user: +1) and u1 (counted)
        Ev("a1", "users", h0 + 10, NANO, (pro, ("user_id", "u1")), 10),
        Ev("a2", "users", h0 + 20, NANO, (pro, ("user_id", "u2")), 11),
        Ev("a3", "users", h0 + 30, NANO, (pro, ("user_id", "u1")), 12),
        Ev("free1", "users", h0 + 40, NANO, (free, ("user_id", "u1")), 13),
        Ev("L-new", "users", h0 + 50, NANO, (pro, ("user_id", "u3")), 100, late=True),
        Ev("L-old", "users", h0 + 60, NANO, (pro, ("user_id", "u1")), 101, late=True),
        # users/pro in h1: u2 on time, late u2 again (no change, but restated)
        Ev("b1", "users", h1 + 10, NANO, (pro, ("user_id", "u2")), 14),
        Ev("L-h1", "users", h1 + 20, NANO, (pro, ("user_id", "u2")), 102, late=True),
        # gauge/eu h0: newest on time is 7; a late older reading (9) must not win
        Ev("g1", "gauge", h0 + 100, 5 * NANO, eu, 20),
        Ev("g2", "gauge", h0 + 200, 7 * NANO, eu, 21),
        Ev("G-older", "gauge", h0 + 150, 9 * NANO, eu, 103, late=True),
        # gauge/eu h1: a late newer reading (11) wins over the on-time 3
        Ev("g3", "gauge", h1 + 100, 3 * NANO, eu, 22),
        Ev("G-newer", "gauge", h1 + 500, 11 * NANO, eu, 104, late=True),
    ]


@pytest.mark.parametrize("registry", [REGISTRY, USERS], ids=["registry", "mapping"])
def test_unique_count_and_latest_windows_are_re_aggregated_hourly_and_daily(
    migrated_storage: Any, now_ms: int, registry: Any
) -> None:
    events = _scenario(now_ms)
    _seed(migrated_storage, events)
    # A replay after kill -9 writes the flush and the raw rows again: counted once.
    _seed(migrated_storage, events)
    d = _day_start(now_ms)
    for meter in ("users", "gauge"):
        assert _read(migrated_storage, meter, d, "hour", registry) == _expected(
            events, HOUR_MS, meter), meter
        assert _read(migrated_storage, meter, d, "day", registry) == _expected(
            events, DAY_MS, meter), meter
    # The seeded cases are the ones the brief names (not derived from the code's rule):
    got = _read(migrated_storage, "users", d, "hour", registry)
    pro = (("plan", "pro"),)
    assert got[(d + 3 * HOUR_MS, pro)][:2] == (3 * NANO, 5)  # u1, u2 + late u3
    assert got[(d + 5 * HOUR_MS, pro)][:2] == (1 * NANO, 2)  # late u2 already counted
    gauge = _read(migrated_storage, "gauge", d, "hour", registry)
    eu = (("region", "eu"),)
    assert gauge[(d + 3 * HOUR_MS, eu)][0] == 7 * NANO
    assert gauge[(d + 5 * HOUR_MS, eu)][0] == 11 * NANO

    truth_hour = _truth(events, HOUR_MS)
    totals = RollupTotalsQuery("hour", customer="acme", database=migrated_storage.database,
                               registry=registry).run(migrated_storage)
    expected_totals: dict[tuple[str, str, int], int] = {}
    for (meter, _, start), (value, _) in truth_hour.items():
        key = ("acme", meter, start)
        expected_totals[key] = expected_totals.get(key, 0) + value
    assert totals == expected_totals


def test_replayed_and_resent_late_events_count_once(migrated_storage: Any, now_ms: int) -> None:
    events = _scenario(now_ms)
    late_new = next(e for e in events if e.event_id == "L-new")
    # The SDK resent "L-new" later in the log as a retried emit() without a timestamp, so
    # with a new one in another hour: raw and late_events both hold two deliveries, and
    # the first (in h0) is the one that counts.
    resend = Ev(late_new.event_id, "users", late_new.ts + 2 * HOUR_MS, NANO, late_new.dims,
                500, late=True)
    _seed(migrated_storage, [*events, resend], raw=[*events, resend])
    d = _day_start(now_ms)
    got = _read(migrated_storage, "users", d, "hour")
    assert got == _expected(events, HOUR_MS, "users")


def test_the_view_restates_latest_itself_and_leaves_unique_count_pending(
    migrated_storage: Any, now_ms: int
) -> None:
    events = _scenario(now_ms)
    _seed(migrated_storage, events)
    d = _day_start(now_ms)
    pro, eu = (("plan", "pro"),), (("region", "eu"),)
    # Without the registry: latest is re-aggregated by the view, unique_count stays pending.
    gauge = _read(migrated_storage, "gauge", d, "hour", registry=None)
    assert gauge == _expected(events, HOUR_MS, "gauge")
    users = _read(migrated_storage, "users", d, "hour", registry=None)
    assert users[(d + 3 * HOUR_MS, pro)] == (2 * NANO, 3, 0, 2)
    rows = migrated_storage.query_rows(
        f"SELECT meter, window_start_ms, restated, late_pending, reaggregated "
        f"FROM {migrated_storage.database}.hourly_usage WHERE late_events + late_pending > 0 "
        "ORDER BY meter, window_start_ms")
    assert [tuple(int(x) if not isinstance(x, str) else x for x in r) for r in rows] == [
        ("gauge", d + 3 * HOUR_MS, 1, 0, 1), ("gauge", d + 5 * HOUR_MS, 1, 0, 1),
        ("users", d + 3 * HOUR_MS, 0, 2, 0), ("users", d + 5 * HOUR_MS, 0, 1, 0)]
    assert eu  # same group as in the scenario


def test_a_window_raw_cannot_re_aggregate_exactly_stays_pending(
    migrated_storage: Any, now_ms: int
) -> None:
    events = _scenario(now_ms)
    # Raw lacks the on-time "a2" (not loaded yet, or past raw retention) and the late
    # "G-newer": re-aggregating would undercount u2 and miss the newest reading.
    raw = [e for e in events if e.event_id not in ("a2", "G-newer")]
    _seed(migrated_storage, events, raw=raw)
    d = _day_start(now_ms)
    pro, eu = (("plan", "pro"),), (("region", "eu"),)
    users = _read(migrated_storage, "users", d, "hour")
    assert users[(d + 3 * HOUR_MS, pro)] == (2 * NANO, 3, 0, 2)  # rollup value, pending
    assert users[(d + 5 * HOUR_MS, pro)] == (1 * NANO, 2, 1, 0)  # raw complete there
    gauge = _read(migrated_storage, "gauge", d, "hour")
    assert gauge[(d + 5 * HOUR_MS, eu)] == (3 * NANO, 1, 0, 1)
    assert gauge[(d + 3 * HOUR_MS, eu)] == (7 * NANO, 3, 1, 0)


def test_a_bad_value_property_mapping_is_reported() -> None:
    with pytest.raises(SinkConfigError) as info:
        RollupUsageQuery("acme", "users", 0, HOUR_MS, registry={"users": ""}).to_sql()
    assert "value_property" in str(info.value)
