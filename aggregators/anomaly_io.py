"""Where the anomaly stage's events go: ``<usage topic>.anomalies``, the ``anomalies``
table, or both; and the loader from the topic into the table.

- ``KafkaEventWriter``: one record per event, keyed by ``EpisodeEvent.key`` (so every copy
  of an event lands in one partition, and a compacted topic would keep one), value the
  event as JSON (``EpisodeEvent.to_dict``). ``write`` returns once all are acked.
- ``StorageEventWriter``: straight into ClickHouse (the embedded runner, or a worker with a
  ClickHouse server); idempotent per key.
- ``AnomalyLoader`` (``meterline anomalies --load``): topic -> table, committing after
  each insert, like ``load-rollups``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from meterline.core.anomaly.model import EpisodeEvent
from meterline.ingest.sources import RecordSource, SourceRecord

__all__ = ["AnomalyLoader", "KafkaEventWriter", "StorageEventWriter", "TeeWriter",
           "anomalies_topic", "decode_events", "encode_event", "rollups_topic"]

log = logging.getLogger(__name__)


def rollups_topic(usage_topic: str) -> str:
    return f"{usage_topic}.rollups"  # outputs_io.output_topics()["rollups"]


def anomalies_topic(usage_topic: str) -> str:
    return f"{usage_topic}.anomalies"


def encode_event(event: EpisodeEvent) -> bytes:
    return orjson.dumps(event.to_dict())


def decode_events(records: Sequence[SourceRecord]) -> tuple[list[EpisodeEvent], list[str]]:
    """Topic records -> events; unreadable ones are reported, not raised."""
    events, problems = [], []
    for rec in records:
        try:
            events.append(EpisodeEvent.from_dict(orjson.loads(rec.payload)))
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, IndexError,
                AttributeError) as exc:
            problems.append(f"{rec.topic}[{rec.partition}]@{rec.offset}: {exc!r}")
    return events, problems


class KafkaEventWriter:
    def __init__(self, bootstrap_servers: str, usage_topic: str, *, timeout_s: float = 60.0,
                 **extra: Any) -> None:
        from confluent_kafka import Producer

        self.topic = anomalies_topic(usage_topic)
        self._timeout_s = timeout_s
        conf: dict[str, Any] = {"bootstrap.servers": bootstrap_servers,
                                "enable.idempotence": True, "acks": "all",
                                "compression.type": "lz4", "linger.ms": 5}
        conf.update(extra)
        self._producer = Producer(conf, logger=logging.getLogger("meterline.anomalies.kafka"))
        self._errors: list[str] = []

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def write(self, events: Sequence[EpisodeEvent]) -> None:
        for event in events:
            while True:
                try:
                    self._producer.produce(self.topic, encode_event(event), event.key.encode(),
                                           on_delivery=self._report)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    self._producer.poll(0.1)
        remaining = self._producer.flush(self._timeout_s)
        if remaining or self._errors:
            errors, self._errors = self._errors, []
            # The caller must not checkpoint: the events are re-derived after a restart.
            raise RuntimeError(f"anomaly write failed ({remaining} undelivered): {errors[:5]}")

    def close(self) -> None:
        self._producer.flush(self._timeout_s)


class StorageEventWriter:
    def __init__(self, storage: Any, *, database: str | None = None) -> None:
        self._storage = storage
        self._database = database

    def write(self, events: Sequence[EpisodeEvent]) -> None:
        from meterline.sinks.anomalies import write_events

        write_events(self._storage, events, database=self._database)


class TeeWriter:
    """Writes to every writer in turn; durable when all returned."""

    def __init__(self, *writers: Any) -> None:
        self.writers = writers

    def write(self, events: Sequence[EpisodeEvent]) -> None:
        for writer in self.writers:
            writer.write(events)


class AnomalyLoader:
    """``<topic>.anomalies`` -> the anomalies table, committing after each insert."""

    def __init__(self, storage: Any, source: RecordSource, *, max_records: int = 2000,
                 database: str | None = None) -> None:
        self._writer = StorageEventWriter(storage, database=database)
        self._source = source
        self._max_records = max_records
        self.records = 0
        self.rows = 0
        self.problems: list[str] = []

    def run_once(self, timeout_s: float = 0.2) -> int:
        records = self._source.poll_records(self._max_records, timeout_s)
        if not records:
            return 0
        events, problems = decode_events(records)
        for p in problems:
            log.error("unreadable anomaly record %s", p)
        self.problems += problems
        if events:
            self._writer.write(events)
        self._source.commit(records)
        self.records += len(records)
        self.rows += len(events)
        return len(records)

    def run(self, *, until_idle_s: float | None = None,
            stop: Callable[[], bool] | None = None) -> int:
        idle_since = time.monotonic()
        while stop is None or not stop():
            if self.run_once():
                idle_since = time.monotonic()
            elif until_idle_s is not None and time.monotonic() - idle_since >= until_idle_s:
                break
        return self.rows
