"""SDK -> real Kafka -> raw-events stage -> chDB, with a poison record in the stream."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import pytest

from meterline.config import AppConfig
from meterline.ingest.raw_loader import RawEventLoader
from meterline.ingest.sources import KafkaSource
from meterline.sdk import Emitter, EmitterConfig
from meterline.sinks.raw_events import UsageSummaryQuery

pytestmark = pytest.mark.integration


def test_kafka_to_clickhouse_raw_events_exact(kafka_broker: Any, kafka_topic: Any,
                                              migrated_storage: Any, tmp_path: Path) -> None:
    from confluent_kafka import Producer

    topic = kafka_topic(partitions=4)
    n = 200_000
    truth: collections.Counter[str] = collections.Counter()
    now = time.time_ns() // 1_000_000
    config = EmitterConfig(topic=topic, bootstrap_servers=kafka_broker.bootstrap,
                           spool_dir=tmp_path / "spool")
    with Emitter(config) as emitter:
        for i in range(n):
            customer = f"cust-{i % 300}"
            emitter.emit(customer, "llm_tokens", "0.1", timestamp_ms=now - i % 3_600_000)
            truth[customer] += 100_000_000
        assert emitter.flush(60)
    poison = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    poison.produce(topic, b"definitely not an envelope", partition=2)
    poison.flush(10)

    source = KafkaSource(kafka_broker.bootstrap, topic, "raw-test")
    loader = RawEventLoader(migrated_storage, source, AppConfig().registry())
    try:
        deadline = time.monotonic() + 120
        while loader.totals.events < n or loader.totals.dead_letters < 1:
            assert time.monotonic() < deadline, loader.totals
            loader.run_once(timeout_s=0.5)
    finally:
        source.close()
    assert loader.totals.by_reason == {"envelope.malformed_json": 1}
    summary = UsageSummaryQuery(database=migrated_storage.database).run(migrated_storage)
    assert {r.customer: r.quantity_nano for r in summary} == dict(truth)
    assert sum(r.events for r in summary) == n
