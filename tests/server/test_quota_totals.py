"""The in-memory quota totals (server/quota_totals.py) answer exactly what the views do.

Flushes are written with the real ``write_flush`` into chDB and applied to the totals, as
the embedded writer does; every answer is compared with ``UsageReader.used`` (the views)
and with the truth written down from what was seeded. Late events, refused rows and a
failed write hand the key back to the views (``None``).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from meterline.config import DEFAULT_METERS
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush, LateRecord, RollupRecord
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.server.quota_totals import RollupTotals
from meterline.server.usage import (
    ConfigLimits,
    NeedsRead,
    QuotaRule,
    QuotaService,
    RollupGeneration,
    UsageReader,
    month_start_ms,
    next_month_ms,
)
from meterline.sinks.rollups import write_flush

REGISTRY = MeterRegistry.load(DEFAULT_METERS)
NANO = 10**9


def _meter(name: str) -> Any:
    meter = REGISTRY.get(name)
    assert meter is not None
    return meter


def _daily(customer: str, meter: str, group: dict[str, str], day: int, agg: str, value: int,
           version: int, partition: int = 0) -> RollupRecord:
    return RollupRecord(window="daily", customer=customer, meter=meter,
                        group=tuple(sorted(group.items())), window_start_ms=day,
                        window_end_ms=day + DAY_MS, aggregation=agg, value_nanos=value,
                        events=version, version=version, source="usage", partition=partition)


def _hourly(record: RollupRecord) -> RollupRecord:
    """The same total in an hourly window (the mirror reads daily rows only)."""
    return RollupRecord(**{**{k: getattr(record, k) for k in record.__slots__},
                           "window": "hourly", "window_end_ms": record.window_start_ms + HOUR_MS})


def _late(customer: str, meter: str, hour: int, offset: int) -> LateRecord:
    return LateRecord(source="usage", partition=0, offset=offset, position=0,
                      event_id=f"late-{offset}", customer=customer, meter=meter,
                      group=(("model", "m1"),), quantity_nanos=NANO, timestamp_ms=hour + 1,
                      window_start_ms=hour, received_at_ms=hour + 3 * HOUR_MS)


@pytest.fixture
def days(now_ms: int) -> tuple[int, int]:
    """Today and the previous day of the same month (or today twice on the 1st)."""
    today = now_ms - now_ms % DAY_MS
    earlier = today - DAY_MS if today - DAY_MS >= month_start_ms(now_ms) else today
    return earlier, today


def test_totals_equal_the_views_through_flushes(migrated_storage: Any, now_ms: int,
                                                days: tuple[int, int]) -> None:
    storage = migrated_storage
    earlier, today = days
    before_month = month_start_ms(now_ms) - DAY_MS  # not in any current period
    first = [
        _daily("t:a", "llm_tokens", {"model": "m1"}, today, "sum", 12_500_000_001, 2),
        _daily("t:a", "llm_tokens", {"model": "m1"}, today, "sum", 4 * NANO, 2, partition=1),
        _daily("t:a", "llm_tokens", {"model": "m2"}, earlier, "sum", 250_000_000, 1),
        _daily("t:a", "llm_tokens", {"model": "m2"}, before_month, "sum", 99 * NANO, 9),
        _daily("t:a", "api_calls", {"endpoint": "/x", "region": ""}, today, "count",
               3 * NANO, 3),
        _daily("t:a", "storage_gb", {"region": "eu"}, today, "max", 3_250_000_000, 2),
        _daily("t:a", "storage_gb", {"region": "us"}, earlier, "max", 7 * NANO, 1),
        _daily("t:b", "llm_tokens", {"model": "m1"}, today, "sum", NANO, 1),
    ]
    write_flush(storage, Flush(rollups=first + [_hourly(r) for r in first]))
    totals = RollupTotals(month_start_ms(now_ms))
    totals.load(storage, storage.database, now_ms)
    # The next flush: newer totals of some windows, an older version arriving after a
    # newer one (the table keeps the highest), a new customer.
    second = [
        _daily("t:a", "llm_tokens", {"model": "m1"}, today, "sum", 20 * NANO + 7, 5),
        _daily("t:a", "llm_tokens", {"model": "m1"}, today, "sum", 1, 1, partition=1),
        _daily("t:a", "storage_gb", {"region": "eu"}, today, "max", 8 * NANO, 3),
        _daily("t:c", "api_calls", {"endpoint": "/y", "region": "eu"}, today, "count",
               NANO, 1),
    ]
    write_flush(storage, Flush(rollups=second + [_hourly(r) for r in second]))
    totals.apply(Flush(rollups=second + [_hourly(r) for r in second]))
    month = month_start_ms(now_ms)
    same_day = earlier == today
    truth = {  # the month, by hand
        ("t:a", "llm_tokens"): 20 * NANO + 7 + 4 * NANO + 250_000_000,
        ("t:a", "api_calls"): 3 * NANO,
        ("t:a", "storage_gb"): 8 * NANO if same_day else max(8 * NANO, 7 * NANO),
        ("t:b", "llm_tokens"): NANO,
        ("t:c", "api_calls"): NANO,
        ("t:c", "llm_tokens"): 0,
    }
    reader = UsageReader(storage, REGISTRY, database=storage.database,
                         lock=threading.Lock())
    reloaded = RollupTotals(month_start_ms(now_ms))
    reloaded.load(storage, storage.database, now_ms)
    # The views' read costs ~0.5 s here: one per aggregation (sum, count, max), the month.
    viewed = {("t:a", "llm_tokens"), ("t:a", "storage_gb"), ("t:c", "api_calls")}
    for (customer, name), value in truth.items():
        meter = _meter(name)
        if (customer, name) in viewed:
            assert reader.used(customer, meter, month, next_month_ms(month)) == value
        assert totals.used(customer, meter, month, next_month_ms(month)) == value
        assert reloaded.used(customer, meter, month, next_month_ms(month)) == value
    today_truth = 20 * NANO + 7 + 4 * NANO + (250_000_000 if same_day else 0)
    for mirror in (totals, reloaded):
        assert mirror.used("t:a", _meter("llm_tokens"), today, today + DAY_MS) == today_truth
        assert mirror.used("t:a", _meter("storage_gb"), today, today + DAY_MS) == 8 * NANO
    # unique_count and latest are not folded here: the reader raises the reason
    assert totals.used("t:a", _meter("active_users"), month, next_month_ms(month)) is None


def test_late_events_refused_rows_and_failures_go_to_the_views(
        migrated_storage: Any, now_ms: int, days: tuple[int, int]) -> None:
    storage = migrated_storage
    _, today = days
    hour = now_ms - now_ms % HOUR_MS - 2 * HOUR_MS
    month = month_start_ms(now_ms)
    period = (month, next_month_ms(month))
    tokens = _meter("llm_tokens")
    rows = [_daily(c, "llm_tokens", {"model": "m1"}, today, "sum", NANO, 1)
            for c in ("t:a", "t:b", "t:c", "t:d")]
    write_flush(storage, Flush(rollups=rows, late=[_late("t:a", "llm_tokens", hour, 1)]))
    totals = RollupTotals(month, short_retention_meters=["storage_gb"])
    totals.load(storage, storage.database, now_ms)
    assert totals.used("t:a", tokens, *period) is None  # late events found by the load
    assert totals.used("t:b", tokens, *period) == NANO
    totals.apply(Flush(late=[_late("t:b", "llm_tokens", hour, 2)]))
    assert totals.used("t:b", tokens, *period) is None  # late events of a flush
    # a late event of an earlier day does not touch the later day's period
    if hour - hour % DAY_MS < today:
        assert totals.used("t:b", tokens, today, today + DAY_MS) == NANO
    totals.apply(Flush(rollups=[_daily("t:c", "llm_tokens", {"model": "m1"}, today, "sum",
                                       2 * NANO, 2)]), all_written=False)
    assert totals.used("t:c", tokens, *period) is None  # the writer refused some rows
    assert totals.used("t:d", tokens, *period) == NANO
    assert totals.used("t:d", _meter("storage_gb"), *period) is None  # short retention
    assert totals.used("t:d", tokens, month - DAY_MS, month) is None  # before the mirror
    totals.invalidate()
    assert totals.used("t:d", tokens, *period) is None
    totals.apply(Flush(rollups=rows[3:]))  # the next flush writes the failed one again
    assert totals.used("t:d", tokens, *period) == NANO
    # A new month: the old days are forgotten, the new month starts from the flushes.
    fresh = RollupTotals(month)
    fresh.load(storage, storage.database, now_ms)
    nxt = next_month_ms(month)
    fresh.prune(nxt)
    assert fresh.since_ms == nxt and fresh.used("t:d", tokens, nxt, next_month_ms(nxt)) == 0
    fresh.apply(Flush(rollups=[_daily("t:d", "llm_tokens", {}, nxt, "sum", 5, 1)]))
    assert fresh.used("t:d", tokens, nxt, next_month_ms(nxt)) == 5


class _Reader:
    def __init__(self) -> None:
        self.calls = 0

    def used(self, customer: str, meter: Any, start_ms: int, end_ms: int) -> int:
        self.calls += 1
        return 42


def test_quota_service_answers_from_memory_and_reads_only_misses(now_ms: int) -> None:
    totals = RollupTotals(month_start_ms(now_ms))
    today = now_ms - now_ms % DAY_MS
    totals.apply(Flush(rollups=[_daily("t:a", "llm_tokens", {}, today, "sum", 7, 1)]))
    reader = _Reader()
    generation = RollupGeneration()
    service = QuotaService(reader, ConfigLimits([QuotaRule("llm_tokens", 100)]),  # type: ignore
                           generation, totals=totals, clock_ms=lambda: now_ms)
    tokens = _meter("llm_tokens")
    status = service.status("t", "a", "t:a", tokens, read=False)
    assert status is not None and status.used_nanos == 7 and reader.calls == 0
    totals.apply(Flush(late=[_late("t:a", "llm_tokens", today, 1)]))
    with pytest.raises(NeedsRead):  # the event loop hands this one to a thread
        service.status("t", "a", "t:a", tokens, read=False)
    # Concurrent misses of one key share one read.
    threads = [threading.Thread(target=service.status, args=("t", "a", "t:a", tokens))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reader.calls == 1
    status = service.status("t", "a", "t:a", tokens, read=False)
    assert status is not None and status.used_nanos == 42
    assert service.counts == {"hit": 9, "miss": 1}
    generation.bump()  # a rollup write: the cached read is stale
    with pytest.raises(NeedsRead):
        service.status("t", "a", "t:a", tokens, read=False)
