"""Shared fixtures: a real Kafka broker (meterline.testing.kafka) and the one chDB engine."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meterline.sinks.raw_events import RawEventColumns
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


# --------------------------------------------------------------------------- chDB
# chDB hosts ONE engine per process, bound to one data directory. So the whole pytest
# session shares one data directory (``chdb_engine``) and each test gets a fresh *database*
# in it (``chdb_storage``), dropped afterwards. Every test folder that needs chDB in-process
# must use these fixtures: opening a second directory raises ``StorageOpenError`` (and a
# bare ``chdb.query()`` opens an in-memory engine, which also conflicts).

HOUR_MS = 3_600_000


@pytest.fixture(scope="session")
def chdb_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A ChdbStorage that keeps the process-wide chDB engine open for the session."""
    pytest.importorskip("chdb")
    from meterline.sinks.chdb_backend import ChdbStorage

    data_dir: Path = tmp_path_factory.mktemp("chdb")
    storage = ChdbStorage(str(data_dir), "default")
    yield storage
    storage.close()


@pytest.fixture
def chdb_storage(chdb_engine: Any) -> Iterator[Any]:
    """A ChdbStorage on the shared engine with its own, initially absent, database."""
    from meterline.sinks.chdb_backend import ChdbStorage

    database = f"test_{uuid.uuid4().hex[:12]}"
    storage = ChdbStorage(chdb_engine.data_dir, database)
    yield storage
    storage.execute(f"DROP DATABASE IF EXISTS {database} SYNC")
    storage.close()


@pytest.fixture
def migrated_storage(chdb_storage: Any) -> Any:
    from meterline.sinks.schema import migrate

    migrate(chdb_storage)
    return chdb_storage


@pytest.fixture
def now_ms() -> int:
    # Test data must be recent: rows older than the raw-events TTL (35 days by default)
    # are dropped by ClickHouse at insert time or hidden by FINAL.
    return time.time_ns() // 1_000_000 - HOUR_MS


@pytest.fixture
def make_raw_events(now_ms: int) -> Callable[..., RawEventColumns]:
    """Factory: ``make_raw_events(3, customer="acme", quantity_nano=5)``.

    Scalars are repeated for every row, lists are used as given; event ids are unique and
    timestamps one millisecond apart unless overridden.
    """

    def make(count: int, **overrides: Any) -> RawEventColumns:
        defaults: dict[str, Any] = {
            "event_id": [f"evt-{i}" for i in range(count)],
            "batch_id": "batch-1",
            "customer": "acme",
            "meter": "api_calls",
            "quantity_nano": 100_000_000,
            "timestamp_ms": [now_ms + i for i in range(count)],
            "dimensions": {"region": "eu"},
            "source": "usage-events",
            "ingested_at_ms": now_ms + HOUR_MS // 2,
        }
        defaults.update(overrides)
        columns = {
            name: value if isinstance(value, list) else [value] * count
            for name, value in defaults.items()
        }
        return RawEventColumns(**columns)

    return make
