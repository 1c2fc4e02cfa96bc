"""The SDK's seam to the broker: one small interface, a Kafka driver and an in-memory one.

The emitter only ever talks to a ``Transport``; unit tests use ``MemoryTransport`` and
integration tests the real ``KafkaTransport``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meterline.core.errors import MeterlineError

OnDone = Callable[[BaseException | None], None]


class Backpressure(MeterlineError):
    """The transport's own queue is full; the caller should spool and retry later."""


class DeliveryError(MeterlineError):
    """A record was not acknowledged by the broker."""


class Transport(Protocol):
    def partition_count(self, topic: str, timeout_s: float) -> int | None: ...
    def send(self, topic: str, partition: int, payload: bytes, on_done: OnDone) -> None: ...
    def poll(self, timeout_s: float) -> None: ...
    def in_flight(self) -> int: ...
    def close(self, timeout_s: float) -> None: ...


class KafkaTransport:
    """confluent-kafka producer set up for billing: idempotent, acks=all, compressed."""

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        compression: str = "lz4",
        delivery_timeout_ms: int = 30_000,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        from confluent_kafka import Producer

        self.broker_down = threading.Event()
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            # Idempotence gives per-partition ordering and no duplicates from librdkafka's
            # own retries; our batch ids cover the retries it cannot see (spool replays).
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": compression,
            "linger.ms": 5,
            # After this long without an ack the batch is reported failed and goes to the
            # spool, so an outage costs memory for at most this window.
            "message.timeout.ms": delivery_timeout_ms,
            "queue.buffering.max.kbytes": 512 * 1024,
            "message.max.bytes": 4 * 1024 * 1024,
            "error_cb": self._on_error,
        }
        conf.update(extra or {})
        # librdkafka logs to stderr by default; route it through logging so apps control it.
        self._producer: Any = Producer(conf, logger=logging.getLogger("meterline.sdk.kafka"))

    def _on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.broker_down.set()

    def partition_count(self, topic: str, timeout_s: float) -> int | None:
        try:
            meta = self._producer.list_topics(topic, timeout=timeout_s)
        except Exception:
            return None
        info = meta.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            return None
        return len(info.partitions)

    def send(self, topic: str, partition: int, payload: bytes, on_done: OnDone) -> None:
        def report(err: Any, _msg: Any) -> None:
            if err is None:
                self.broker_down.clear()
                on_done(None)
            else:
                on_done(DeliveryError(str(err)))

        try:
            self._producer.produce(topic, payload, partition=partition, on_delivery=report)
        except BufferError:
            raise Backpressure("librdkafka queue full") from None
        self._producer.poll(0)

    def poll(self, timeout_s: float) -> None:
        self._producer.poll(timeout_s)

    def in_flight(self) -> int:
        return len(self._producer)

    def close(self, timeout_s: float) -> None:
        if self._producer is not None:
            self._producer.flush(timeout_s)
            # Dropping the last reference destroys librdkafka's handle and its threads, so a
            # closed emitter stops reconnecting to a broker that went away.
            self._producer = None


class MemoryTransport:
    """In-memory broker stand-in for unit tests. ``fail`` makes sends fail (an outage)."""

    def __init__(self, partitions: int | None = 4) -> None:
        self.partitions = partitions
        self.records: list[tuple[int, bytes]] = []
        self.fail = False
        self.full = False
        self._pending: list[tuple[int, bytes, OnDone]] = []
        self._delivering = 0  # taken from _pending, callbacks not yet finished
        self._lock = threading.Lock()

    def partition_count(self, topic: str, timeout_s: float) -> int | None:
        return self.partitions

    def send(self, topic: str, partition: int, payload: bytes, on_done: OnDone) -> None:
        if self.full:
            raise Backpressure("memory transport full")
        with self._lock:
            self._pending.append((partition, payload, on_done))

    def poll(self, timeout_s: float) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._delivering += len(pending)
        # A record counts as in flight until its callback returned (as in librdkafka), so
        # flush() cannot see "nothing in flight" while a failed batch is being spooled.
        for i, (partition, payload, on_done) in enumerate(pending):
            try:
                if self.fail:
                    on_done(DeliveryError("memory transport is down"))
                else:
                    self.records.append((partition, payload))
                    on_done(None)
            except BaseException:
                # As confluent-kafka: an exception from a callback ends this poll() and
                # propagates from it; the reports not served yet stay queued.
                with self._lock:
                    self._pending[:0] = pending[i + 1 :]
                    self._delivering -= len(pending) - i - 1
                raise
            finally:
                with self._lock:
                    self._delivering -= 1

    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending) + self._delivering

    def close(self, timeout_s: float) -> None:
        self.poll(0)
