"""Shared fixtures: a real Kafka broker (see meterline.testing.kafka)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from meterline.testing.kafka import KafkaBroker


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One broker for the whole session; tests isolate themselves with their own topics."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_topic(kafka_broker: KafkaBroker) -> Callable[..., str]:
    """Factory: ``kafka_topic(partitions=4) -> name`` of a new, empty topic on kafka_broker."""

    def make(partitions: int = 4) -> str:
        return kafka_broker.create_topic(f"t-{uuid.uuid4().hex[:12]}", partitions=partitions)

    return make


@pytest.fixture
def fresh_kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A broker of the test's own, free to stop, kill or restart."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka-fresh"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop(timeout_s=15)
