"""The anomalies table on chDB: created by migrate with its TTL, replayed writes read
once, the query objects' SQL and results."""

from __future__ import annotations

import time
from typing import Any

import pytest

from meterline.core.anomaly import AnomalyEngine, AnomalySettings, SeriesKey
from meterline.core.anomaly.model import EpisodeEvent
from meterline.sinks.anomalies import (
    ANOMALIES,
    AnomalyEventsQuery,
    OpenEpisodesQuery,
    write_events,
)
from meterline.sinks.exceptions import SinkConfigError
from meterline.sinks.retention import RetentionPolicy
from meterline.sinks.schema import TABLES, VIEWS, migrate

HOUR_MS = 3_600_000
WEEK_MS = 7 * 24 * HOUR_MS
MONDAY_MS = 1_704_067_200_000  # 2024-01-01
# Recent weeks: rows older than the TTL (400 days) would be deleted by ClickHouse.
START_MS = MONDAY_MS + (time.time_ns() // 1_000_000 - 4 * WEEK_MS - MONDAY_MS) // WEEK_MS * WEEK_MS


def _events() -> list[EpisodeEvent]:
    """Two series: a spike that resolves, and a silence still open at the end."""
    engine = AnomalyEngine(AnomalySettings(min_abs_deviation=5))
    spike = SeriesKey("acme", "api_calls", (("region", "eu"),))
    quiet = SeriesKey("o'brien & co", "api_calls")
    out: list[EpisodeEvent] = []
    for h in range(16 * 24):
        weekday = (h // 24) % 7 < 5
        base = 1000 if weekday and 9 <= (h % 24) < 18 else 100
        out += engine.observe(spike, START_MS + h * HOUR_MS,
                              base * 20 if h == 15 * 24 + 11 else base)
        out += engine.observe(quiet, START_MS + h * HOUR_MS,
                              0 if h >= 15 * 24 + 12 else base)
    return out


def test_the_table_is_registered_with_a_ttl() -> None:
    assert ANOMALIES in TABLES and "anomaly_events" in {v.name for v in VIEWS}
    sql = ANOMALIES.create_sql("m", RetentionPolicy(anomalies_days=30))
    assert "ReplacingMergeTree" in sql and "ORDER BY (customer, meter, since_ms, event_key)" in sql
    assert "since_ms" in sql.split("TTL", 1)[1] and "30" in sql.split("TTL", 1)[1]


def test_replayed_writes_read_once_and_open_episodes(chdb_storage: Any) -> None:
    migrate(chdb_storage)
    events = _events()
    kinds = [e.kind for e in events]
    assert "open" in kinds and "resolve" in kinds
    write_events(chdb_storage, events)
    write_events(chdb_storage, events[1:])  # a replay after a crash
    rows = AnomalyEventsQuery(START_MS, START_MS + 30 * 24 * HOUR_MS,
                              database=chdb_storage.database).run(chdb_storage)
    assert sorted(r.event_key for r in rows) == sorted(e.key for e in events)
    by_key = {e.key: e for e in events}
    for row in rows:
        event = by_key[row.event_key]
        assert (row.kind, row.customer, row.since_ms, row.seq, row.observed) == (
            event.kind, event.series.customer, event.since_ms, event.seq,
            event.anomaly.observed)
        assert row.explanation == event.anomaly.explain()
    (spike_row,) = [r for r in rows if r.customer == "acme" and r.kind == "open"]
    assert spike_row.dimensions == {"region": "eu"}
    open_rows = OpenEpisodesQuery(database=chdb_storage.database).run(chdb_storage)
    assert [(r.customer, r.direction) for r in open_rows] == [("o'brien & co", "down")]
    only = AnomalyEventsQuery(START_MS, START_MS + 30 * 24 * HOUR_MS, customer="acme",
                              kinds=("resolve",), database=chdb_storage.database)
    assert [r.kind for r in only.run(chdb_storage)] == ["resolve"]


def test_query_sql_is_exact_and_bad_queries_report_every_problem() -> None:
    sql, params = AnomalyEventsQuery(10, 20, meter="api_calls", database="m").to_sql()
    assert sql == (
        "SELECT event_key, kind, customer, meter, dimensions, since_ms, seq, "
        "window_start_ms, direction, severity, observed, expected, explanation\n"
        "FROM m.anomaly_events\n"
        "WHERE since_ms >= {start_ms:Int64}\n"
        "  AND since_ms < {end_ms:Int64}\n"
        "  AND meter = {meter:String}\n"
        "ORDER BY customer, meter, group_key, since_ms, seq")
    assert params == {"start_ms": 10, "end_ms": 20, "meter": "api_calls"}
    with pytest.raises(SinkConfigError) as info:
        AnomalyEventsQuery(20, 10, kinds=("opened",), database="m;drop").to_sql()
    assert len(info.value.errors) == 3
