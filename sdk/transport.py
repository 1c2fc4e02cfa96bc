"""The SDK's seam to the broker: one small interface, a Kafka driver and an in-memory one.

The emitter only ever talks to a ``Transport``; unit tests use ``MemoryTransport`` and
integration tests the real ``KafkaTransport``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from meterline.core.errors import MeterlineError

OnDone = Callable[[BaseException | None], None]

log = logging.getLogger("meterline.sdk")


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
    """confluent-kafka producer set up for billing: idempotent, acks=all, compressed.

    Self-healing: when deliveries have failed for ``reset_after_s`` (default: the delivery
    timeout) without one success, the librdkafka producer is replaced by a new one. An
    idempotent librdkafka producer can stay stuck after a broker restart - it keeps asking
    one broker for a producer id and every message times out (seen in 1 of 10 runs of
    tests/aggregators/test_worker_crash.py; confluent-kafka-python#1335 describes the same
    loop) - and only a new instance recovers. The old producer's messages are purged: their
    delivery reports fail, so the SDK spools and replays those batches, under their batch
    ids and sequence numbers, which the pipeline deduplicates if some had been written
    after all. During a real outage a reset changes nothing and costs one reconnect per
    ``reset_after_s``.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        compression: str = "lz4",
        delivery_timeout_ms: int = 30_000,
        extra: Mapping[str, Any] | None = None,
        reset_after_s: float | None = None,
        producer_factory: Callable[[dict[str, Any]], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
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
        self._conf = conf
        self._make = producer_factory or (
            # librdkafka logs to stderr by default; route it through logging so apps control it.
            lambda c: Producer(c, logger=logging.getLogger("meterline.sdk.kafka")))
        self._producer: Any = self._make(conf)
        # Producers replaced by a reset, still serving the delivery reports of what they
        # held (purged: each comes back as a failure and goes to the spool).
        self._retired: list[Any] = []
        self.reset_after_s = (reset_after_s if reset_after_s is not None
                              else delivery_timeout_ms / 1000)
        self.resets = 0
        self._clock = clock
        self._failing_since: float | None = None
        self._last_reset = clock()

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
                self._failing_since = None
                self.broker_down.clear()
                on_done(None)
            else:
                if self._failing_since is None:
                    self._failing_since = self._clock()
                on_done(DeliveryError(str(err)))

        try:
            self._producer.produce(topic, payload, partition=partition, on_delivery=report)
        except BufferError:
            raise Backpressure("librdkafka queue full") from None
        self._producer.poll(0)

    def poll(self, timeout_s: float) -> None:
        self._producer.poll(timeout_s)
        if self._retired:
            for old in self._retired:
                old.poll(0)
            # Dropping the last reference destroys librdkafka's handle and its threads.
            self._retired = [old for old in self._retired if len(old)]
        self._reset_if_stuck()

    def _reset_if_stuck(self) -> None:
        since, now = self._failing_since, self._clock()
        if since is None or now - since < self.reset_after_s \
                or now - self._last_reset < self.reset_after_s:
            return
        log.warning("meterline emitter: no Kafka acknowledgement for %.0f s while deliveries "
                    "fail; replacing the producer (its %d unacknowledged messages are "
                    "spooled and replayed)", now - since, len(self._producer))
        old, self._producer = self._producer, self._make(self._conf)
        self.resets += 1
        self._last_reset, self._failing_since = now, None
        try:
            old.purge(True, True, False)  # queued and in flight; do not wait
        except Exception:  # a producer that cannot purge still times its messages out
            log.warning("purging the replaced producer failed", exc_info=True)
        old.poll(0)
        if len(old):
            self._retired.append(old)

    def in_flight(self) -> int:
        producer, retired = self._producer, self._retired
        return (len(producer) if producer is not None else 0) + sum(len(r) for r in retired)

    def close(self, timeout_s: float) -> None:
        if self._producer is not None:
            self._producer.flush(timeout_s)
            for old in self._retired:
                old.flush(0.1)
            # Dropping the last reference destroys librdkafka's handle and its threads, so a
            # closed emitter stops reconnecting to a broker that went away.
            self._producer = None
            self._retired = []


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
