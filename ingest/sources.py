"""Where batch records come from: one small interface, a Kafka driver and the local log.

A source hands out records and takes a commit *after* the records' effects are durable in
ClickHouse, which is what makes a crash between the two harmless (records are re-read and
their rows collapse by event id).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class SourceRecord:
    topic: str
    partition: int
    offset: int
    payload: bytes
    # The log's timestamp (Kafka LogAppendTime on Meterline's topics), UTC ms; -1 when the
    # source has none. The rollup stage uses it as its replayable processing clock.
    timestamp_ms: int = -1


class RecordSource(Protocol):
    def poll_records(self, max_records: int, timeout_s: float) -> list[SourceRecord]: ...
    def commit(self, records: Sequence[SourceRecord]) -> None: ...
    def close(self) -> None: ...


class KafkaSource:
    """confluent-kafka consumer; offsets are committed synchronously after processing."""

    def __init__(self, bootstrap_servers: str, topic: str | Sequence[str], group_id: str,
                 **extra: Any) -> None:
        import logging

        from confluent_kafka import Consumer

        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.max.bytes": 64 * 1024 * 1024,
        }
        conf.update(extra)
        self._consumer = Consumer(conf, logger=logging.getLogger("meterline.ingest.kafka"))
        self._consumer.subscribe([topic] if isinstance(topic, str) else list(topic))

    def poll_records(self, max_records: int, timeout_s: float) -> list[SourceRecord]:
        out = []
        for msg in self._consumer.consume(num_messages=max_records, timeout=timeout_s):
            if msg.error():
                continue  # partition EOF and transient errors; librdkafka retries itself
            ts_type, ts = msg.timestamp()
            out.append(
                SourceRecord(str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0),
                             bytes(msg.value() or b""), int(ts) if ts_type else -1)
            )
        return out

    def commit(self, records: Sequence[SourceRecord]) -> None:
        from confluent_kafka import TopicPartition

        if not records:
            return
        nxt: dict[tuple[str, int], int] = {}
        for r in records:
            key = (r.topic, r.partition)
            nxt[key] = max(nxt.get(key, 0), r.offset + 1)
        self._consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in nxt.items()], asynchronous=False
        )

    def close(self) -> None:
        self._consumer.close()


class LocalLogRecordSource:
    """The embedded local log as a RecordSource; record timestamps are append times."""

    def __init__(self, log: Any, consumer: str, topic: str = "local") -> None:
        from meterline.ingest.local_log import LocalLogSource

        self._source = LocalLogSource(log, consumer)
        self._topic = topic

    @property
    def topic(self) -> str:
        return self._topic

    def poll_records(self, max_records: int, timeout_s: float = 0.0) -> list[SourceRecord]:
        return [
            SourceRecord(self._topic, r.partition, r.offset, r.payload, r.timestamp_ms)
            for r in self._source.poll_records(max_records)
        ]

    def seek(self, partition: int, offset: int) -> None:
        self._source.seek(partition, offset)

    def commit(self, records: Sequence[SourceRecord]) -> None:
        from meterline.ingest.local_log import LogRecord

        self._source.commit([LogRecord(r.partition, r.offset, b"") for r in records])

    def commit_offsets(self, next_offsets: dict[int, int]) -> None:
        """Commit ``{partition: next offset}`` as given, e.g. a checkpoint's position."""
        self._source.commit_offsets(next_offsets)

    def lag(self) -> int:
        return self._source.lag()

    def close(self) -> None:
        pass
