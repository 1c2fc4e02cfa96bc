"""The usage page reads every meter of a customer in one query (``UsageReader.
usage_by_meter``, over ``CustomerUsageQuery``), and what it reads is what the API's one
meter at a time read returns - the Chromium test compares the page with the API.

Seeded as plain records (rollups from the on-time events, late events, raw events); the
truth is written down from what was seeded, and the per-meter read is checked against it
too, so the two reads cannot agree on a wrong number.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from meterline.config import DEFAULT_METERS
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush, LateRecord, RollupRecord
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.server.usage import UsageReader
from meterline.sinks.exceptions import SinkConfigError
from meterline.sinks.raw_events import RawEventColumns, insert_raw_events
from meterline.sinks.rollup_queries import CustomerUsageQuery
from meterline.sinks.rollups import write_flush

REGISTRY = MeterRegistry.load(DEFAULT_METERS)
NANO = 10**9
CUSTOMER = "acme:c1"


class _Counting:
    """The storage, counting the queries made through it."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.queries = 0

    def query_rows(self, sql: str, params: Any = None) -> Any:
        self.queries += 1
        return self._storage.query_rows(sql, params)


def _rollup(window: str, customer: str, meter: str, group: dict[str, str], start: int,
            agg: str, value: int, events: int) -> RollupRecord:
    span = HOUR_MS if window == "hourly" else DAY_MS
    return RollupRecord(window=window, customer=customer, meter=meter,
                        group=tuple(sorted(group.items())), window_start_ms=start,
                        window_end_ms=start + span, aggregation=agg, value_nanos=value,
                        events=events, version=events, source="usage", partition=0)


@pytest.fixture
def seeded(migrated_storage: Any, now_ms: int) -> tuple[Any, int, int, int]:
    hour = now_ms - now_ms % HOUR_MS - 3 * HOUR_MS  # whole hours, all in the past
    day = hour - hour % DAY_MS
    second = hour + HOUR_MS if (hour + HOUR_MS) % DAY_MS else hour - HOUR_MS  # same day
    rows = [
        _rollup("hourly", CUSTOMER, "llm_tokens", {"model": "m1"}, hour, "sum",
                12_500_000_001, 2),
        _rollup("hourly", CUSTOMER, "llm_tokens", {"model": "m1"}, second, "sum", 5, 1),
        _rollup("daily", CUSTOMER, "llm_tokens", {"model": "m1"}, day, "sum",
                12_500_000_006, 3),
    ]
    for window, start in (("hourly", hour), ("daily", day)):
        rows += [
            _rollup(window, CUSTOMER, "api_calls", {"endpoint": "/a", "region": ""}, start,
                    "count", 3 * NANO, 3),
            _rollup(window, CUSTOMER, "llm_tokens", {"model": "<b>"}, start, "sum", 7 * NANO, 1),
            _rollup(window, CUSTOMER, "storage_gb", {"region": "eu"}, start, "max",
                    3_250_000_000, 2),
            # two distinct users on time; a third arrives late (below)
            _rollup(window, CUSTOMER, "active_users", {}, start, "unique_count", 2 * NANO, 3),
            # not this customer's, and not a registry meter: neither may show
            _rollup(window, "acme:c2", "llm_tokens", {"model": "m1"}, start, "sum", NANO, 1),
            _rollup(window, CUSTOMER, "ghost", {}, start, "sum", NANO, 1),
        ]
    users = [("e1", "u1", 0, False), ("e2", "u2", 1, False), ("e3", "u1", 2, False),
             ("e4", "u3", 3, True)]
    late = [LateRecord(source="usage", partition=0, offset=offset, position=0, event_id=eid,
                       customer=CUSTOMER, meter="active_users", group=(),
                       quantity_nanos=NANO, timestamp_ms=hour + 10 + offset,
                       window_start_ms=hour, received_at_ms=hour + 4 * HOUR_MS)
            for eid, _, offset, is_late in users if is_late]
    for eid, user, offset, _ in users:
        insert_raw_events(migrated_storage, RawEventColumns(
            event_id=[eid], batch_id=["b"], customer=[CUSTOMER], meter=["active_users"],
            quantity_nano=[NANO], timestamp_ms=[hour + 10 + offset],
            dimensions=[{"user_id": user}], source=["usage"], ingested_at_ms=[hour],
            source_partition=[0], source_offset=[offset], position=[0]))
    write_flush(migrated_storage, Flush(rollups=rows, late=late))
    return migrated_storage, hour, day, second


def _plain(points: Any) -> list[tuple[int, dict[str, str], int, int]]:
    return [(p.window_start_ms, p.group, p.value_nanos, p.events) for p in points]


def test_one_query_reads_what_each_meter_reads(seeded: tuple[Any, int, int, int]) -> None:
    storage, hour, day, second = seeded
    counting = _Counting(storage)
    reader = UsageReader(counting, REGISTRY, database=storage.database,
                         lock=threading.Lock())
    truth_hours = {
        "api_calls": [(hour, {"endpoint": "/a", "region": ""}, 3 * NANO, 3)],
        "llm_tokens": sorted([(hour, {"model": "<b>"}, 7 * NANO, 1),
                              (hour, {"model": "m1"}, 12_500_000_001, 2),
                              (second, {"model": "m1"}, 5, 1)], key=lambda r: r[0]),
        "storage_gb": [(hour, {"region": "eu"}, 3_250_000_000, 2)],
        "active_users": [(hour, {}, 3 * NANO, 4)],  # u1, u2 and the late u3
        "compute_seconds": [],
    }
    span = (hour - 2 * HOUR_MS, hour + 2 * HOUR_MS)
    all_hours = reader.usage_by_meter(CUSTOMER, "hour", *span)
    assert counting.queries == 1
    assert {m: _plain(p) for m, p in all_hours.items()} == truth_hours
    one_by_one = {m.name: _plain(reader.usage(CUSTOMER, m, "hour", *span)) for m in REGISTRY}
    assert one_by_one == truth_hours
    assert counting.queries == 1 + len(REGISTRY.names)

    month = (day - 3 * DAY_MS, day + 3 * DAY_MS)
    all_days = {m: _plain(p) for m, p in reader.usage_by_meter(CUSTOMER, "day", *month).items()}
    assert all_days == {m.name: _plain(reader.usage(CUSTOMER, m, "day", *month))
                        for m in REGISTRY}
    assert all_days["llm_tokens"][1] == (day, {"model": "m1"}, 12_500_000_006, 3)
    assert all_days["active_users"] == [(day, {}, 3 * NANO, 4)]


def test_customer_usage_query_binds_everything(seeded: tuple[Any, int, int, int]) -> None:
    storage, hour, _, _ = seeded
    hostile = "x' OR 1=1 --"
    query = CustomerUsageQuery(hostile, hour, hour + HOUR_MS, "hour",
                               database=storage.database)
    sql, params = query.to_sql()
    assert hostile not in sql and params["customer"] == hostile
    assert query.run(storage) == {}
    # every meter of the customer, the unknown one too (the reader keeps the registry's)
    found = CustomerUsageQuery(CUSTOMER, hour, hour + HOUR_MS, "hour",
                               database=storage.database).run(storage)
    assert sorted(found) == ["active_users", "api_calls", "ghost", "llm_tokens", "storage_gb"]
    with pytest.raises(SinkConfigError) as err:
        CustomerUsageQuery(CUSTOMER, 5, 5, "week",  # type: ignore[arg-type]
                           database="a b", registry={"m": ""}).to_sql()
    assert len(err.value.errors) == 4  # every problem at once
