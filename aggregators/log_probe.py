"""Answers to "which offsets does the log hold?" for the rollup stage's gap check.

``runner.RollupWorker.resolve_gap`` asks these only when a record arrives past its
partition's ``next_offset`` - after a rebalance, a seek or a crash, never per record - so
plain blocking calls are fine.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from meterline.aggregators.runner import TopicPartition
from meterline.ingest.local_log import LocalLog

__all__ = ["KafkaLogProbe", "LocalLogProbe"]


class KafkaLogProbe:
    """A group-less confluent-kafka consumer that reads single records by offset, and
    reads (never commits) the rollup group's offsets."""

    def __init__(self, bootstrap_servers: str, *, timeout_s: float = 30.0) -> None:
        self._bootstrap = bootstrap_servers
        self._timeout_s = timeout_s
        self._consumer: Any = None
        self._lock = threading.Lock()  # one librdkafka call at a time (see docs/rollups.md)

    def _reader(self) -> Any:
        from confluent_kafka import Consumer

        if self._consumer is None:
            self._consumer = Consumer({
                "bootstrap.servers": self._bootstrap,
                "group.id": "meterline-log-probe",  # assign() only, never commits
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
                "isolation.level": "read_uncommitted",
            }, logger=logging.getLogger("meterline.aggregators.log_probe"))
        return self._consumer

    @property
    def bootstrap_servers(self) -> str:
        return self._bootstrap

    def log_start(self, tp: TopicPartition) -> int:
        from confluent_kafka import TopicPartition as KafkaTP

        with self._lock:
            low, _ = self._reader().get_watermark_offsets(KafkaTP(tp.topic, tp.partition),
                                                          timeout=self._timeout_s)
            return int(low)

    def end_offset(self, tp: TopicPartition) -> int:
        """The offset the next record appended to ``tp`` will get (the high watermark)."""
        from confluent_kafka import TopicPartition as KafkaTP

        with self._lock:
            _, high = self._reader().get_watermark_offsets(KafkaTP(tp.topic, tp.partition),
                                                           timeout=self._timeout_s)
            return int(high)

    def first_offset(self, tp: TopicPartition, from_offset: int) -> int | None:
        from confluent_kafka import KafkaException
        from confluent_kafka import TopicPartition as KafkaTP

        with self._lock:
            consumer = self._reader()
            _, high = consumer.get_watermark_offsets(KafkaTP(tp.topic, tp.partition),
                                                     timeout=self._timeout_s)
            if from_offset >= high:
                return None
            consumer.assign([KafkaTP(tp.topic, tp.partition, from_offset)])
            try:
                deadline = time.monotonic() + self._timeout_s
                while time.monotonic() < deadline:
                    msg = consumer.poll(1.0)
                    if msg is None:
                        continue
                    err = msg.error()
                    if err is None:
                        return int(msg.offset())
                    if err.code() == -191:  # _PARTITION_EOF: nothing at or after from_offset
                        return None
                    if not err.retriable():
                        raise KafkaException(err)
                raise TimeoutError(f"reading {tp.topic}[{tp.partition}]@{from_offset} took "
                                   f"over {self._timeout_s}s")
            finally:
                consumer.unassign()

    def partition_count(self, topic: str) -> int:
        with self._lock:
            meta = self._reader().list_topics(topic, timeout=self._timeout_s)
        found = meta.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise RuntimeError(f"topic {topic!r} not found")
        return len(found.partitions)

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        from confluent_kafka import Consumer
        from confluent_kafka import TopicPartition as KafkaTP

        reader = Consumer({"bootstrap.servers": self._bootstrap, "group.id": group,
                           "enable.auto.commit": False},
                          logger=logging.getLogger("meterline.aggregators.log_probe"))
        try:
            (got,) = reader.committed([KafkaTP(tp.topic, tp.partition)],
                                      timeout=self._timeout_s)
            return int(got.offset) if got.offset >= 0 else None
        finally:
            reader.close()

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None


class LocalLogProbe:
    """The embedded local log: offsets start at 0, nothing is ever deleted."""

    def __init__(self, log: LocalLog) -> None:
        self.log = log

    def log_start(self, tp: TopicPartition) -> int:
        return 0

    def first_offset(self, tp: TopicPartition, from_offset: int) -> int | None:
        return from_offset if from_offset < self.log.end_offset(tp.partition) else None

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        return self.log.committed(group, tp.partition) or None
