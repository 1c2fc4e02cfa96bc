"""KafkaWriter against a real broker: a write completes only once Kafka acknowledged it
(acks=all), lands on the customer's partition, and fails with Unavailable (503) when the
broker is gone instead of hanging or dropping."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from meterline.core.envelope import decode_batch
from meterline.core.partitioning import partition_for
from meterline.sdk.transport import KafkaTransport
from meterline.server.writers import KafkaWriter, Unavailable

pytestmark = pytest.mark.integration

NOW = time.time_ns() // 1_000_000


def _read(bootstrap: str, topic: str, expected: int) -> dict[str, int]:
    """event id -> partition, read until ``expected`` events or 60 s without a new one."""
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    seen: dict[str, int] = {}
    last_progress = time.monotonic()
    try:
        while len(seen) < expected and time.monotonic() - last_progress < 60:
            for msg in consumer.consume(num_messages=100, timeout=0.5):
                if msg.error():
                    continue
                for event in decode_batch(msg.value()).events():
                    seen[event.id] = msg.partition()
                    last_progress = time.monotonic()
    finally:
        consumer.close()
    return seen


def test_kafka_writer_acks_and_partitions(kafka_broker: Any,
                                          kafka_topic: Callable[..., str]) -> None:
    topic = kafka_topic(partitions=4)
    writer = KafkaWriter(KafkaTransport(kafka_broker.bootstrap), topic)
    items = [(f"t:c{i % 7}", "api_calls", 10**9, NOW, None, f"t:v{i}", None)
             for i in range(300)]
    try:
        writer.write(items[:100]).result(timeout=60)
        writer.write(items[100:]).result(timeout=60)
    finally:
        writer.close()
    seen = _read(kafka_broker.bootstrap, topic, 300)
    assert seen == {it[5]: partition_for(it[0], 4) for it in items}


def test_kafka_writer_reports_an_outage_as_unavailable(fresh_kafka_broker: Any) -> None:
    topic = fresh_kafka_broker.create_topic("usage-outage", partitions=2)
    writer = KafkaWriter(KafkaTransport(fresh_kafka_broker.bootstrap,
                                        delivery_timeout_ms=3_000), topic)
    try:
        writer.write([("t:c", "api_calls", 1, NOW, None, "t:v0", None)]).result(timeout=60)
        fresh_kafka_broker.stop(timeout_s=15)
        future = writer.write([("t:c", "api_calls", 1, NOW, None, "t:v1", None)])
        # librdkafka gives up after delivery_timeout_ms; the future fails then (bounded
        # by that setting, not by this test's patience).
        with pytest.raises(Unavailable):
            future.result(timeout=60)
    finally:
        writer.close()
