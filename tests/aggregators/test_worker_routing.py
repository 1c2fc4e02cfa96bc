"""Late, too-late and invalid events through a real `meterline worker`: each lands where
specified, with counts and reasons, and none of them stalls its partition."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from meterline.aggregators.outputs_io import OutputLoader, output_topics
from meterline.core.envelope import Batch, encode_batch
from meterline.core.quantity import SCALE
from meterline.core.windows import HOUR_MS
from meterline.ingest.sources import KafkaSource
from meterline.sinks.rollups import (
    DeadLetterCountsQuery,
    LateEventsQuery,
    RollupTotalsQuery,
)
from meterline.sinks.storage import Storage
from meterline.testing.kafka import KafkaBroker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _lag(bootstrap: str, topic: str, group: str) -> int:
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, 0)], timeout=10)
        _, high = c.get_watermark_offsets(tps[0], timeout=10)
        return high - max(tps[0].offset, 0)
    except KafkaException:  # e.g. NOT_COORDINATOR while the group is being created
        return -1
    finally:
        c.close()


def test_late_too_late_and_invalid_events_are_routed(
        kafka_broker: KafkaBroker, tmp_path: Path, migrated_storage: Storage) -> None:
    from confluent_kafka import Producer

    topic = kafka_broker.create_topic(f"route-{os.getpid()}-{time.monotonic_ns()}", 1,
                                      config={"message.timestamp.type": "LogAppendTime"})
    group = f"{topic}-rollups"
    now = time.time_ns() // 1_000_000
    hour = now - now % HOUR_MS - 5 * HOUR_MS  # 5 hours back: hour + 4 h is still in the past
    records = [
        # 1. on time: opens the hour and moves the watermark to ~hour + 59 min
        encode_batch(Batch("b1", now, ["acme"] * 2, ["llm_tokens"] * 2, [5 * SCALE, 7 * SCALE],
                           [hour + 10, hour + 59 * 60_000], dimensions=[{"model": "s"}] * 2)),
        # 2. late but allowed (an hour and a half behind the watermark): counted
        encode_batch(Batch("b2", now, ["acme"], ["llm_tokens"], [SCALE],
                           [hour - 30 * 60_000], dimensions=[{"model": "s"}])),
        # 3. garbage: a whole record that is no envelope
        b"\x00\x01 definitely not an envelope",
        # 4. invalid events next to a valid one: unknown meter, no customer, negative
        encode_batch(Batch("b4", now, ["acme", "", "acme", "acme"],
                           ["nope", "llm_tokens", "llm_tokens", "llm_tokens"],
                           [SCALE, SCALE, -SCALE, 2 * SCALE], [hour + 20] * 4,
                           dimensions=[None, None, None, {"model": "s"}])),
        # 5. moves the watermark 4 hours on ...
        encode_batch(Batch("b5", now, ["acme"], ["llm_tokens"], [SCALE], [hour + 4 * HOUR_MS],
                           dimensions=[{"model": "s"}])),
        # 6. ... so this event for the first hour is now too late: late table, not rollups
        encode_batch(Batch("b6", now, ["acme"], ["llm_tokens"], [100 * SCALE], [hour + 30],
                           dimensions=[{"model": "l"}])),
    ]
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for payload in records:
        producer.produce(topic, payload, partition=0)
        producer.flush(10)  # one by one: the order is the point
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
           "METERLINE_TOPIC": topic, "METERLINE_ROLLUP_GROUP": group,
           "METERLINE_CHECKPOINT_INTERVAL_S": "0.5"}
    with open(tmp_path / "worker.log", "wb") as log:
        # -v: the worker is quiet by default; its (and Faust's) INFO lines must be JSON too
        worker = subprocess.Popen([sys.executable, "-m", "meterline.cli", "-v", "--log-format",
                                   "json", "worker"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while _lag(kafka_broker.bootstrap, topic, group) != 0:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "worker did not catch up"
            time.sleep(0.5)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    # `--log-format json` holds for Faust's own lines too (it re-configures logging).
    lines = (tmp_path / "worker.log").read_text().splitlines()
    assert lines and all(line.startswith("{") and orjson.loads(line)["level"] for line in lines
                         if line.strip()), lines[:20]
    source = KafkaSource(kafka_broker.bootstrap, list(output_topics(topic).values()),
                         f"{group}-loader")
    try:
        loader = OutputLoader(migrated_storage, source)
        loader.run(until_idle_s=10)
    finally:
        source.close()
    db = migrated_storage.database
    hourly = RollupTotalsQuery("hour", "acme", "llm_tokens", db).run(migrated_storage)
    assert hourly == {
        ("acme", "llm_tokens", hour - HOUR_MS): 1 * SCALE,  # the allowed-late event
        # the too-late 100 is in no rollup row, but restated into what readers see
        ("acme", "llm_tokens", hour): (5 + 7 + 2 + 100) * SCALE,
        ("acme", "llm_tokens", hour + 4 * HOUR_MS): 1 * SCALE,
    }
    folded = migrated_storage.query_rows(
        f"SELECT sum(rollup_value), sum(late_events) FROM {db}.hourly_usage "
        "WHERE window_start_ms = {h:Int64}", {"h": hour})
    assert [(int(v), int(n)) for v, n in folded] == [(5 + 7 + 2, 1)]
    late = LateEventsQuery(database=db).run(migrated_storage)
    assert {k: (v.events, v.quantity_nanos) for k, v in late.items()} == {
        ("acme", "llm_tokens"): (1, 100 * SCALE)}
    late_rows = migrated_storage.query_rows(
        f"SELECT window_start_ms, group_key, source_offset FROM {db}.late_events FINAL")
    assert late_rows == [(hour, "model=l", 5)]
    dead = DeadLetterCountsQuery(stage="rollup", database=db).run(migrated_storage)
    assert dead == {"envelope.malformed_json": 1, "event.unknown_meter": 1,
                    "event.missing_customer": 1, "event.negative_quantity": 1}
