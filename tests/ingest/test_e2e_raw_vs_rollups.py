"""Issue 8 end to end on a real broker: invalid, overflowing, out-of-range, too-late and
out-of-retention events, events the meter registry refuses (unknown meter, negative
quantity, undeclared dimension, unique_count without its value), and ids reused across
customers and meters, through a real ``meterline worker`` + output loader and the
raw-events stage (with the worker's registry). Raw totals equal the rollup totals readers
see (late usage restated into them), and both equal a truth written down from what was
sent; the one difference is an event only a window can refuse (its total overflows).

The truth below is the test's own account of each event (the issue's rules in words:
ids are scoped to customer and meter, a resend counts once as its first copy, ...),
not a call into the code under test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from meterline.aggregators.outputs_io import OutputLoader, output_topics
from meterline.config import load_config
from meterline.ingest.raw_loader import RawEventLoader
from meterline.ingest.sources import KafkaSource
from meterline.sinks.raw_events import UsageSummaryQuery
from meterline.sinks.rollups import (
    DeadLetterCountsQuery,
    LateEventsQuery,
    LateRestatementQuery,
    LateTotals,
    RollupTotalsQuery,
)
from meterline.sinks.storage import Storage
from meterline.testing.kafka import KafkaBroker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

UNIT = 10**9
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
STALL_S = 60  # no progress for this long fails the test (the machine is shared and slow)


def _envelope(batch_id: str, created_ms: int,
              events: list[tuple[str, str, int | str, int, str | None]],
              dimensions: list[dict[str, str] | None] | None = None) -> bytes:
    """Raw envelope JSON, so the test can send what the SDK would refuse."""
    customers, meters, quantities, stamps, ids = (list(c) for c in zip(*events, strict=True))
    doc: dict[str, Any] = {"v": 1, "batch_id": batch_id, "created_ms": created_ms,
                           "count": len(events), "customer": customers, "meter": meters,
                           "quantity": quantities, "timestamp_ms": stamps, "id": ids}
    if dimensions is not None:
        doc["dimensions"] = dimensions
    return orjson.dumps(doc)


def _lag(bootstrap: str, topic: str, group: str) -> int:
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        [tp] = c.committed([TopicPartition(topic, 0)], timeout=10)
        _, high = c.get_watermark_offsets(tp, timeout=10)
        return high - max(tp.offset, 0)
    except KafkaException:
        return -1
    finally:
        c.close()


def _until_caught_up(bootstrap: str, topic: str, group: str, worker: Any, log: Path) -> None:
    best, since = None, time.monotonic()
    while (lag := _lag(bootstrap, topic, group)) != 0:
        assert worker.poll() is None, log.read_text()[-3000:]
        if lag >= 0 and (best is None or lag < best):
            best, since = lag, time.monotonic()
        assert time.monotonic() - since < STALL_S, f"no progress for {STALL_S}s (lag {lag})"
        time.sleep(0.5)


def test_raw_totals_equal_rollup_totals_plus_late(
        kafka_broker: KafkaBroker, tmp_path: Path, migrated_storage: Storage) -> None:
    from confluent_kafka import Producer

    topic = kafka_broker.create_topic(f"e2e8-{os.getpid()}-{time.monotonic_ns()}", 1,
                                      config={"message.timestamp.type": "LogAppendTime"})
    group = f"{topic}-rollups"
    now = time.time_ns() // 1_000_000
    on_time = now - 10 * 60_000
    big = "6" + "0" * 37  # 6e28 units: fits Decimal(38, 9), two in one window do not
    records = [
        # one request id used by two meters and by two customers: three different events
        _envelope("r0", now, [("acme", "llm_tokens", 5 * UNIT, on_time, "req-1"),
                              ("acme", "compute_seconds", 7 * UNIT, on_time, "req-1"),
                              ("beta", "llm_tokens", 11 * UNIT, on_time, "req-1"),
                              ("acme", "llm_tokens", 3 * UNIT, on_time + 1, None),
                              ("beta", "compute_seconds", UNIT // 2, on_time + 2, None)]),
        # invalid events around a valid one; none may take the batch down
        _envelope("r1", now, [("", "llm_tokens", UNIT, on_time, None),
                              ("acme", "Bad Meter", UNIT, on_time, None),
                              ("acme", "llm_tokens", "9" * 60, on_time, None),
                              ("gamma", "llm_tokens", 2 * UNIT, on_time, None),
                              ("acme", "llm_tokens", UNIT, 5_000_000_000_000, None),  # 2128
                              ("acme", "llm_tokens", UNIT, 900_000_000_000, None),  # 1998
                              ("acme", "llm_tokens", UNIT, now + HOUR_MS, None)]),
        # a window total beyond Decimal(38, 9): the second event overflows it
        _envelope("r2", now, [("huge", "llm_tokens", big, on_time, None),
                              ("huge", "llm_tokens", big, on_time + 1, None),
                              ("delta", "llm_tokens", 3 * UNIT, on_time, None)]),
        # a retry of req-1 with a new timestamp and (wrongly) another quantity
        _envelope("r3", now, [("acme", "llm_tokens", 500 * UNIT, now - 5 * 60_000, "req-1")]),
        # too late (window closed), and older than raw (35 d) / late-table (400 d) retention
        _envelope("r4", now, [("acme", "llm_tokens", 13 * UNIT, now - 5 * HOUR_MS, None),
                              ("acme", "llm_tokens", 17 * UNIT, now - 40 * DAY_MS, None),
                              ("acme", "llm_tokens", 19 * UNIT, now - 500 * DAY_MS, None)]),
        # what the default meter registry refuses (default_meters.toml), around a valid one
        _envelope("r5", now, [("acme", "mystery_meter", 23 * UNIT, on_time, None),
                              ("acme", "llm_tokens", -29 * UNIT, on_time, None),
                              ("acme", "llm_tokens", 31 * UNIT, on_time, None),
                              ("acme", "active_users", UNIT, on_time, None),
                              ("acme", "active_users", UNIT, on_time, None),
                              ("epsilon", "llm_tokens", 37 * UNIT, on_time, None)],
                  [None, None, {"region": "eu"}, None, {"user_id": ""}, {"model": "m"}]),
    ]
    # What counts, per (customer, meter), in units - from the list above:
    counted = Counter({("acme", "llm_tokens"): 5 + 3, ("acme", "compute_seconds"): 7,
                       ("beta", "llm_tokens"): 11, ("gamma", "llm_tokens"): 2,
                       ("delta", "llm_tokens"): 3, ("epsilon", "llm_tokens"): 37})
    counted_nanos = {k: v * UNIT for k, v in counted.items()}
    counted_nanos[("beta", "compute_seconds")] = UNIT // 2
    late_recent = {("acme", "llm_tokens"): 13 * UNIT}  # within raw retention
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for payload in records:
        producer.produce(topic, payload, partition=0)
        producer.flush(10)  # one by one: the order is the point

    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
           "METERLINE_TOPIC": topic, "METERLINE_ROLLUP_GROUP": group,
           "METERLINE_CHECKPOINT_INTERVAL_S": "0.5"}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "meterline.cli", "worker"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _until_caught_up(kafka_broker.bootstrap, topic, group, worker, log)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    for stage_topics, make in (
            (list(output_topics(topic).values()),
             lambda s: OutputLoader(migrated_storage, s)),
            ([topic], lambda s: RawEventLoader(migrated_storage, s,
                                               load_config(env=env).registry()))):
        source = KafkaSource(kafka_broker.bootstrap, stage_topics, f"{group}-{len(stage_topics)}")
        try:
            make(source).run(until_idle_s=5)
        finally:
            source.close()

    db = migrated_storage.database
    since = now - 30 * DAY_MS  # inside raw_events' retention
    raw = {(r.customer, r.meter): r.quantity_nano
           for r in UsageSummaryQuery(start_ms=since, database=db).run(migrated_storage)}
    rollups: Counter[tuple[str, str]] = Counter()
    for (customer, meter, start), value in RollupTotalsQuery(
            "hour", database=db).run(migrated_storage).items():
        if start >= since - since % HOUR_MS:
            rollups[(customer, meter)] += value
    late = {k: v.quantity_nanos for k, v in LateEventsQuery(
        start_ms=since - since % HOUR_MS, database=db).run(migrated_storage).items()}

    huge = ("huge", "llm_tokens")
    assert rollups.pop(huge) == int(big)  # the first one; the overflowing one is refused
    assert raw.pop(huge) == 2 * int(big)  # raw keeps both: each fits its column
    expected_raw = Counter(counted_nanos) + Counter(late_recent)
    # The 5 h late event is restated into the totals readers see (within the 35-day
    # restatement horizon): rollup totals are what was counted plus it, and equal raw.
    assert dict(rollups) == dict(expected_raw)
    assert late == late_recent
    assert raw == dict(expected_raw)
    assert Counter(raw) == Counter(rollups)

    # every event that counts nowhere is visible with its reason, the same in both stages
    # but for what only one can see: a window's total (rollup) and raw_events' retention
    refused = {"event.missing_customer": 1, "event.unknown_meter": 2,
               "event.quantity_out_of_range": 1, "event.timestamp_out_of_range": 3,
               "event.negative_quantity": 1, "event.dimension_not_allowed": 1,
               "event.missing_unique_value": 2}
    assert DeadLetterCountsQuery(stage="raw", database=db).run(migrated_storage) == {
        **refused, "event.outside_retention": 2}
    assert DeadLetterCountsQuery(stage="rollup", database=db).run(migrated_storage) == {
        **refused, "event.window_total_out_of_range": 1}
    assert DeadLetterCountsQuery(stage="load", database=db).run(migrated_storage) == {
        "event.outside_retention": 1}  # too late and past the late table's 400 days
    all_late = LateEventsQuery(database=db).run(migrated_storage)[("acme", "llm_tokens")]
    assert (all_late.events, all_late.quantity_nanos) == (2, (13 + 17) * UNIT)
    # The 40-day-old one arrived beyond the restatement horizon: out of the totals, visible.
    assert LateRestatementQuery(database=db).run(migrated_storage) == {
        ("acme", "llm_tokens", ""): LateTotals(1, 13 * UNIT),
        ("acme", "llm_tokens", "beyond_restatement_horizon"): LateTotals(1, 17 * UNIT)}
