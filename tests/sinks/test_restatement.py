"""Late usage is restated into hourly_usage / daily_usage (docs/rollups.md).

Every expectation is computed here from the records the test writes, with plain integer
arithmetic over what was emitted: never read back from a view to build its own truth.
"""

from __future__ import annotations

from typing import Any

import pytest

from meterline.core.outputs import Flush, LateRecord, RollupRecord
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.sinks.exceptions import SinkConfigError
from meterline.sinks.raw_events import RawEventColumns, insert_raw_events
from meterline.sinks.retention import RetentionPolicy
from meterline.sinks.rollups import (
    LateEventsQuery,
    LateRestatementQuery,
    LateTotals,
    RollupTotalsQuery,
    RollupUsageQuery,
    RollupUsageRow,
    write_flush,
)
from meterline.sinks.schema import migrate as run_migrate
from meterline.sinks.schema import plan_migration, read_schema_state

GROUP = (("region", "eu"),)
NANO = 10**9
HORIZON_MS = 35 * DAY_MS  # the documented default, written out independently


def _hour(now_ms: int, offset: int = 0) -> int:
    return now_ms - now_ms % HOUR_MS + offset * HOUR_MS


def _rollup(start_ms: int, value_nanos: int, events: int, *, window: str = "hourly",
            meter: str = "llm_tokens", aggregation: str = "sum",
            group: tuple[tuple[str, str], ...] = GROUP, partition: int = 0) -> RollupRecord:
    span = HOUR_MS if window == "hourly" else DAY_MS
    return RollupRecord(window=window, customer="acme", meter=meter, group=group,
                        window_start_ms=start_ms, window_end_ms=start_ms + span,
                        aggregation=aggregation, value_nanos=value_nanos, events=events,
                        version=events, source="usage", partition=partition)


def _late(start_ms: int, event_id: str, quantity_nanos: int, *, delay_ms: int = 3 * HOUR_MS,
          meter: str = "llm_tokens", offset: int = 100, position: int = 0,
          group: tuple[tuple[str, str], ...] = GROUP) -> LateRecord:
    """A too-late event of the hourly window at ``start_ms`` that arrived ``delay_ms`` after
    the window ended."""
    return LateRecord(source="usage", partition=0, offset=offset, position=position,
                      event_id=event_id, customer="acme", meter=meter, group=group,
                      quantity_nanos=quantity_nanos, timestamp_ms=start_ms + 7,
                      window_start_ms=start_ms, received_at_ms=start_ms + HOUR_MS + delay_ms)


def _day(ms: int) -> int:
    return ms - ms % DAY_MS


def _usage(storage: Any, start_ms: int, granularity: str = "hour",
           meter: str = "llm_tokens") -> list[RollupUsageRow]:
    return RollupUsageQuery("acme", meter, start_ms - 2 * DAY_MS, start_ms + 2 * DAY_MS,
                            granularity, database=storage.database).run(storage)  # type: ignore[arg-type]


def _view_row(storage: Any, view: str, start_ms: int, meter: str = "llm_tokens") -> dict[str, Any]:
    cols = ("value", "events", "late_events", "restated", "late_pending",
            "late_beyond_horizon", "rollup_value", "rollup_events", "aggregation")
    rows = storage.query_rows(
        f"SELECT {', '.join(cols)} FROM {storage.database}.{view} "
        "WHERE customer = 'acme' AND meter = {m:String} AND window_start_ms = {s:Int64}",
        {"m": meter, "s": start_ms})
    assert len(rows) == 1, rows
    return dict(zip(cols, rows[0], strict=True))


def test_sum_windows_are_restated_hourly_and_daily_and_replays_count_once(
    migrated_storage: Any, now_ms: int
) -> None:
    h0, h1, h2 = _hour(now_ms, -5), _hour(now_ms, -4), _hour(now_ms, -3)
    rollups = [_rollup(h0, 1_500_000_000, 3), _rollup(h1, 2 * NANO, 2)]
    daily = sorted({_day(h) for h in (h0, h1)})
    # Daily rows as the fold would write them: the emitted hourly totals per day.
    day_totals: dict[int, tuple[int, int]] = {}
    for r in rollups:
        v, n = day_totals.get(_day(r.window_start_ms), (0, 0))
        day_totals[_day(r.window_start_ms)] = (v + r.value_nanos, n + r.events)
    rollups += [_rollup(d, v, n, window="daily") for d, (v, n) in day_totals.items()]
    late = [
        _late(h0, "a", 250_000_000, offset=100),
        _late(h0, "b", 1, offset=101),
        _late(h2, "c", 4 * NANO, offset=102),  # a window with no rollup row at all
    ]
    flush = Flush(rollups=rollups, late=late)
    write_flush(migrated_storage, flush)
    # A replay after kill -9 writes the same flush again; an SDK resend of "a" arrives as
    # a new record later in the log, in another window (a retried emit without timestamp).
    write_flush(migrated_storage, flush)
    write_flush(migrated_storage, Flush(late=[_late(h1, "a", 250_000_000, offset=500)]))

    expected_hour = {h0: (1_500_000_000 + 250_000_000 + 1, 3 + 2, 2),
                     h1: (2 * NANO, 2, 0),
                     h2: (4 * NANO, 1, 1)}
    got = {row.window_start_ms: (row.value_nanos, row.events, row.late_events)
           for row in _usage(migrated_storage, h0)}
    assert got == expected_hour
    for start, (_, _, n_late) in expected_hour.items():
        row = _view_row(migrated_storage, "hourly_usage", start)
        assert row["restated"] == (1 if n_late else 0)
        assert row["late_pending"] == 0 and row["late_beyond_horizon"] == 0

    expected_day: dict[int, tuple[int, int]] = {}
    for start, (value, events, _) in expected_hour.items():
        v, n = expected_day.get(_day(start), (0, 0))
        expected_day[_day(start)] = (v + value, n + events)
    got_day = {row.window_start_ms: (row.value_nanos, row.events)
               for row in _usage(migrated_storage, h0, "day")}
    assert got_day == expected_day
    assert set(daily) <= set(got_day)

    totals = RollupTotalsQuery("hour", database=migrated_storage.database).run(migrated_storage)
    assert totals == {("acme", "llm_tokens", s): v for s, (v, _, _) in expected_hour.items()}
    day_totals_q = RollupTotalsQuery("day", database=migrated_storage.database).run(
        migrated_storage)
    assert day_totals_q == {("acme", "llm_tokens", d): v for d, (v, _) in expected_day.items()}


def test_count_min_max_restate_by_their_own_rule_unique_count_stays_pending(
    migrated_storage: Any, now_ms: int
) -> None:
    h = _hour(now_ms, -6)
    meters = {"calls": "count", "peak": "max", "floor": "min", "users": "unique_count",
              "gauge": "latest"}
    rollups = [_rollup(h, 5 * NANO, 5, meter="calls", aggregation="count"),
               _rollup(h, 7 * NANO, 2, meter="peak", aggregation="max"),
               _rollup(h, 3 * NANO, 2, meter="floor", aggregation="min"),
               _rollup(h, 2 * NANO, 4, meter="users", aggregation="unique_count"),
               _rollup(h, 9 * NANO, 4, meter="gauge", aggregation="latest")]
    late_q = {"calls": [123 * NANO, 1], "peak": [6 * NANO, 11 * NANO],
              "floor": [5 * NANO, 2 * NANO], "users": [NANO], "gauge": [NANO, NANO]}
    late = [_late(h, f"{meter}-{i}", q, meter=meter, offset=200 + i)
            for meter, qs in late_q.items() for i, q in enumerate(qs)]
    write_flush(migrated_storage, Flush(rollups=rollups, late=late))

    expected = {
        "calls": (5 * NANO + 2 * NANO, 2, 0),  # a count adds one per late event
        "peak": (11 * NANO, 2, 0),
        "floor": (2 * NANO, 2, 0),
        "users": (2 * NANO, 0, 1),  # not restated: reported as pending
        "gauge": (9 * NANO, 0, 2),
    }
    for meter, (value, n_late, pending) in expected.items():
        row = _view_row(migrated_storage, "hourly_usage", h, meter)
        assert row["aggregation"] == meters[meter]
        assert (int(row["value"] * NANO), row["late_events"], row["late_pending"]) == (
            value, n_late, pending), meter
        assert row["restated"] == (1 if n_late else 0)
        assert row["rollup_events"] + n_late == row["events"]


def test_a_late_only_window_of_a_meter_without_any_rollup_is_pending_not_guessed(
    migrated_storage: Any, now_ms: int
) -> None:
    h = _hour(now_ms, -8)
    write_flush(migrated_storage, Flush(late=[_late(h, "x", 5 * NANO, meter="brand_new")]))
    row = _view_row(migrated_storage, "hourly_usage", h, "brand_new")
    assert (row["aggregation"], row["value"], row["late_events"], row["late_pending"]) == (
        "", 0, 0, 1)


def test_the_restatement_horizon_keeps_older_late_events_out_with_a_reason(
    migrated_storage: Any, now_ms: int
) -> None:
    h = _hour(now_ms, -10)
    write_flush(migrated_storage, Flush(
        rollups=[_rollup(h, 10 * NANO, 1)],
        late=[_late(h, "edge", 3, delay_ms=HORIZON_MS, offset=1),  # exactly at the horizon
              _late(h, "over", 5, delay_ms=HORIZON_MS + 1, offset=2),
              _late(h - HOUR_MS, "alone", 7, delay_ms=HORIZON_MS + 1, offset=3)]))
    assert _usage(migrated_storage, h) == [RollupUsageRow(h, dict(GROUP), 10 * NANO + 3, 2, 1)]
    row = _view_row(migrated_storage, "hourly_usage", h)
    assert row["late_beyond_horizon"] == 1 and row["rollup_value"] == 10
    # A window whose only late events are beyond the horizon shows no usage row ...
    assert [r.window_start_ms for r in _usage(migrated_storage, h)] == [h]
    # ... but every late event is visible with the reason it is (not) in the totals.
    db = migrated_storage.database
    assert LateRestatementQuery(database=db).run(migrated_storage) == {
        ("acme", "llm_tokens", ""): LateTotals(1, 3),
        ("acme", "llm_tokens", "beyond_restatement_horizon"): LateTotals(2, 12),
    }
    assert LateEventsQuery(database=db).run(migrated_storage) == {
        ("acme", "llm_tokens"): LateTotals(3, 15)}


def test_a_configured_horizon_is_baked_into_the_views_by_migrate(
    chdb_storage: Any, now_ms: int
) -> None:
    one_day = RetentionPolicy(restatement_horizon_days=1)
    run_migrate(chdb_storage, retention=one_day)
    h = _hour(now_ms, -3)
    write_flush(chdb_storage, Flush(rollups=[_rollup(h, NANO, 1)], late=[
        _late(h, "in", 2, delay_ms=DAY_MS, offset=1),
        _late(h, "out", 4, delay_ms=DAY_MS + 1, offset=2)]))
    assert _usage(chdb_storage, h)[0].value_nanos == NANO + 2
    # Changing the policy changes the views' text, so migrate re-creates them.
    state = read_schema_state(chdb_storage, chdb_storage.database)
    default_plan = plan_migration(chdb_storage.database, RetentionPolicy(), state)
    assert any("VIEW" in sql and "late_events_restated" in sql
               for sql in default_plan.statements)
    run_migrate(chdb_storage)
    assert _usage(chdb_storage, h)[0].value_nanos == NANO + 2 + 4


@pytest.mark.parametrize("days", [0, -1, True, 1.5])
def test_a_bad_horizon_is_reported_with_the_other_errors(days: Any) -> None:
    with pytest.raises(SinkConfigError) as info:
        RetentionPolicy(restatement_horizon_days=days, raw_events_days=0).validate()
    text = str(info.value)
    assert "restatement_horizon_days" in text and "raw_events_days" in text


def _raw(event_id: str, ts: int, quantity_nanos: int, offset: int, position: int = 0) -> Any:
    return RawEventColumns(
        event_id=[event_id], batch_id=["b"], customer=["acme"], meter=["llm_tokens"],
        quantity_nano=[quantity_nanos], timestamp_ms=[ts], dimensions=[dict(GROUP)],
        source=["sdk"], ingested_at_ms=[ts], source_partition=[0], source_offset=[offset],
        position=[position])


def test_a_resend_after_the_dedupe_horizon_of_a_counted_event_is_not_restated_again(
    migrated_storage: Any, now_ms: int
) -> None:
    h = _hour(now_ms, -30)
    # "orig" was counted on time (offset 10, in the rollup); its resend at offset 900 came
    # after the fold forgot the id and landed in late_events. "fresh" was never counted
    # before: raw's first delivery of it is the late one itself.
    insert_raw_events(migrated_storage, _raw("orig", h + 7, 4 * NANO, offset=10))
    insert_raw_events(migrated_storage, _raw("orig", h + 7, 4 * NANO, offset=900))
    insert_raw_events(migrated_storage, _raw("fresh", h + 7, 6, offset=901))
    write_flush(migrated_storage, Flush(rollups=[_rollup(h, 4 * NANO, 1)], late=[
        _late(h, "orig", 4 * NANO, offset=900), _late(h, "fresh", 6, offset=901)]))
    assert _usage(migrated_storage, h) == [RollupUsageRow(h, dict(GROUP), 4 * NANO + 6, 2, 1)]
    reasons = LateRestatementQuery(database=migrated_storage.database).run(migrated_storage)
    assert reasons == {("acme", "llm_tokens", ""): LateTotals(1, 6),
                       ("acme", "llm_tokens", "counted_before"): LateTotals(1, 4 * NANO)}


def test_a_late_event_resent_into_the_same_window_counts_once_after_merges(
    migrated_storage: Any, now_ms: int
) -> None:
    h = _hour(now_ms, -30)
    # "x" was never counted on time: its first delivery (offset 10) was already too late,
    # and an SDK resend (a new record, offset 20) arrived after the fold forgot the id.
    # Both deliveries are in raw and in late_events, in the same window. Keyed by the
    # event alone, late_events kept the later copy after a merge and the view took raw's
    # first delivery for an earlier count: the event vanished from the totals.
    insert_raw_events(migrated_storage, _raw("x", h + 7, 5 * NANO, offset=10))
    insert_raw_events(migrated_storage, _raw("x", h + 7, 5 * NANO, offset=20))
    write_flush(migrated_storage, Flush(rollups=[_rollup(h, 2 * NANO, 1)],
                                        late=[_late(h, "x", 5 * NANO, offset=10)]))
    write_flush(migrated_storage, Flush(late=[_late(h, "x", 5 * NANO, offset=20)]))
    # Force the merges ClickHouse would do in the background some time later.
    migrated_storage.execute(f"OPTIMIZE TABLE {migrated_storage.database}.late_events FINAL")

    assert _usage(migrated_storage, h) == [RollupUsageRow(h, dict(GROUP), 7 * NANO, 2, 1)]
    reasons = LateRestatementQuery(database=migrated_storage.database).run(migrated_storage)
    assert reasons == {("acme", "llm_tokens", ""): LateTotals(1, 5 * NANO)}
    assert LateEventsQuery(database=migrated_storage.database).run(migrated_storage) == {
        ("acme", "llm_tokens"): LateTotals(1, 5 * NANO)}


def test_restated_totals_beyond_2_53_nanos_and_decimal_38_are_exact(
    migrated_storage: Any, now_ms: int
) -> None:
    h = _hour(now_ms, -12)
    big = 10**38 - 1  # the largest window total Decimal(38, 9) holds
    late_q = [2**53 + 1, 10**37 + 3, 7]
    write_flush(migrated_storage, Flush(rollups=[_rollup(h, big, 1)], late=[
        _late(h, f"e{i}", q, offset=i) for i, q in enumerate(late_q)]))
    expected = big + sum(late_q)
    assert expected > 10**38  # beyond what one window's row may hold: the view must not wrap
    assert _usage(migrated_storage, h)[0].value_nanos == expected
    totals = RollupTotalsQuery("day", database=migrated_storage.database).run(migrated_storage)
    # No daily row was written for this day: the late-only daily window is the late sum.
    assert totals[("acme", "llm_tokens", _day(h))] == sum(late_q)


def test_the_horizon_is_read_from_the_config_and_checked_with_the_rest(tmp_path: Any) -> None:
    from meterline.config import load_config
    from meterline.core.errors import ConfigError

    path = tmp_path / "meterline.toml"
    path.write_text("[retention]\nrestatement_horizon_days = 60\n", encoding="utf-8")
    policy = load_config(path, env={}).retention_policy()
    assert policy.restatement_horizon_ms == 60 * DAY_MS
    assert RetentionPolicy().restatement_horizon_ms == HORIZON_MS
    path.write_text("[retention]\nrestatement_horizon_days = 0\nraw_events_days = 'x'\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    errors = " ".join(info.value.errors)
    assert "restatement_horizon_days" in errors and "raw_events_days" in errors


@pytest.mark.parametrize("name", ["m", "l", "u", "r"])
def test_a_database_named_like_a_view_alias_migrates(chdb_engine: Any, name: str) -> None:
    # The views alias subqueries; a one-letter database name equal to an alias made
    # `<db>.late_events_restated` unresolvable (seen with a database named m).
    from meterline.sinks.chdb_backend import ChdbStorage

    storage = ChdbStorage(chdb_engine.data_dir, name)
    try:
        run_migrate(storage)
        assert storage.query_rows(f"SELECT count() FROM {name}.hourly_usage") == [(0,)]
    finally:
        storage.execute(f"DROP DATABASE IF EXISTS {name} SYNC")
        storage.close()
