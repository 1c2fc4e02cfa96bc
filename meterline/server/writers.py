"""Validated items -> durable, with the SDK's batching and partitioning.

``write(items)`` returns a ``concurrent.futures.Future`` that completes once every item is
durable, or fails with ``Unavailable`` (the caller answers 503 with Retry-After):

- ``LocalLogWriter`` (embedded default): committed to the local log (SQLite WAL; the
  same guarantee as ``meterline demo``'s log: survives kill -9 of the server, and an OS
  crash too with ``fsync``). One writer thread commits what all concurrent requests
  handed it since its last commit (group commit), so a small request does not pay a
  transaction of its own under load.
- ``KafkaWriter``: produced with the SDK's ``KafkaTransport`` (idempotent, acks=all); the
  future completes on the last delivery report. Likewise one sender thread produces what
  all concurrent requests handed it since its last pass as shared envelopes (per
  partition), so a single-event request does not pay an envelope and a produce of its own.

Batches are cut by the SDK's ``build_batches`` (customer -> partition with Kafka's murmur2,
so a customer's events always share a partition) and numbered by one ``Sequencer`` per
server process (batch dedupe in O(producers) state downstream). A batch that fails after
its number was taken leaves a gap in the numbers; the rollups' SequenceDeduper keeps gaps
as separate runs, so a gap costs a little state, never an event.

Backpressure: at most ``max_pending_events`` accepted but not yet durable. Past that a
request is refused at once with ``Unavailable`` instead of queueing without bound (with
Kafka away, deliveries stall until ``delivery_timeout_ms``, so the bound is reached and
clients are told to retry, rather than the server's memory growing).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from meterline.core.errors import MeterlineError
from meterline.sdk.batching import EncodedBatch, Item, PartitionCache, Sequencer, build_batches

log = logging.getLogger(__name__)

# Below Kafka's default max.message.bytes (1 MiB), as the SDK's default.
BATCH_MAX_BYTES = 900_000
BATCH_MAX_EVENTS = 2_000


class Unavailable(MeterlineError):
    """The pipeline cannot take these events now; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EventWriter(Protocol):
    def write(self, items: list[Item]) -> Future[None]: ...
    def close(self) -> None: ...


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Admission:
    """Counts events accepted but not yet durable; refuses past the bound."""

    def __init__(self, max_pending_events: int) -> None:
        self.max_pending = max_pending_events
        self._pending = 0
        self._lock = threading.Lock()

    def admit(self, n: int) -> None:
        with self._lock:
            # A request larger than the whole bound is still admitted when nothing is
            # pending, or it could never be written.
            if self._pending and self._pending + n > self.max_pending:
                raise Unavailable(f"{self._pending} events are waiting to become durable "
                                  f"(limit {self.max_pending}); retry shortly")
            self._pending += n

    def release(self, n: int) -> None:
        with self._lock:
            self._pending -= n

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending


class LocalLogWriter:
    def __init__(self, log_: Any, *, max_pending_events: int = 200_000,
                 clock_ms: Callable[[], int] = _now_ms) -> None:
        self._log = log_
        self._partitions = PartitionCache(log_.partitions)
        self._sequencer = Sequencer()
        self._clock_ms = clock_ms
        self.admission = _Admission(max_pending_events)
        self._queue: list[tuple[list[Item], Future[None]]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="meterline-log-writer",
                                        daemon=True)
        self._thread.start()

    def write(self, items: list[Item]) -> Future[None]:
        future: Future[None] = Future()
        if not items:
            future.set_result(None)
            return future
        self.admission.admit(len(items))
        with self._cond:
            if self._stopping:
                self.admission.release(len(items))
                raise Unavailable("the server is shutting down", retry_after_s=5)
            self._queue.append((items, future))
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                work, self._queue = self._queue, []
            items = [it for chunk, _ in work for it in chunk]
            try:
                self._append(items)
            except Exception as exc:  # disk full, I/O error: tell every waiting request
                log.error("local log append failed: %s", exc)
                error: BaseException | None = Unavailable(f"the local log refused the write: "
                                                          f"{exc}", retry_after_s=5)
            else:
                error = None
            self.admission.release(len(items))
            for _, future in work:
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    def _append(self, items: list[Item]) -> None:
        batches = build_batches(items, self._partitions, max_events=BATCH_MAX_EVENTS,
                                max_bytes=BATCH_MAX_BYTES, source=None,
                                now_ms=self._clock_ms(), sequencer=self._sequencer)
        by_partition: dict[int, list[bytes]] = {}
        for batch in batches:
            assert batch.partition is not None
            by_partition.setdefault(batch.partition, []).append(batch.payload)
        for partition, payloads in by_partition.items():
            self._log.append(partition, payloads)

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)


class KafkaWriter:
    """Events into the usage topic with acks=all; futures complete on delivery reports.

    Coalescing (``coalesce=True``, the default): ``write`` only queues the request's items;
    one sender thread takes everything queued since its last pass and produces it as
    shared envelopes, one or more per partition (``build_batches`` never mixes
    partitions). While it builds and produces, and while the event loop holds the GIL
    handling the other requests of its turn, the next requests queue up, so under load
    many single-event requests share one envelope and one ``produce`` instead of paying
    two ULIDs, an encode, a produce and a delivery report each (~200 us; docs/server.md,
    Performance). Every request of a pass waits for every batch of that pass: its future
    completes only when all of them are acknowledged, and the first failed delivery fails
    all of them (each client retries with its own ids, which dedupe). ``coalesce=False``
    builds and produces each request on the caller's thread, as before (the benchmark's
    same-run baseline).
    """

    def __init__(self, transport: Any, topic: str, *, max_pending_events: int = 200_000,
                 clock_ms: Callable[[], int] = _now_ms, metadata_timeout_s: float = 10.0,
                 coalesce: bool = True) -> None:
        partitions = transport.partition_count(topic, metadata_timeout_s)
        if partitions is None:
            raise Unavailable(f"topic {topic!r} not found (or Kafka unreachable)")
        self._transport = transport
        self._topic = topic
        self._partitions = PartitionCache(partitions)
        self._sequencer = Sequencer()
        self._clock_ms = clock_ms
        self.admission = _Admission(max_pending_events)
        self.coalesce = coalesce
        self._lock = threading.Lock()  # numbers are taken in send order (idempotent order)
        self._queue: list[tuple[list[Item], Future[None]]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="meterline-kafka-poll",
                                        daemon=True)
        self._poller.start()
        self._sender: threading.Thread | None = None
        if coalesce:
            self._sender = threading.Thread(target=self._run, name="meterline-kafka-send",
                                            daemon=True)
            self._sender.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._transport.poll(0.05)

    def write(self, items: list[Item]) -> Future[None]:
        future: Future[None] = Future()
        if not items:
            future.set_result(None)
            return future
        self.admission.admit(len(items))
        if not self.coalesce:
            self._send([(items, future)])
            return future
        with self._cond:
            if self._stopping:
                self.admission.release(len(items))
                raise Unavailable("the server is shutting down", retry_after_s=5)
            self._queue.append((items, future))
            self._cond.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                work, self._queue = self._queue, []
            try:
                self._send(work)
            except BaseException as exc:  # a bug: fail these requests (500), keep serving
                log.exception("building Kafka batches failed")
                for _, future in work:
                    if not future.done():
                        future.set_exception(exc)

    def _send(self, work: list[tuple[list[Item], Future[None]]]) -> None:
        """Produce the items of every request in ``work`` as shared per-partition batches;
        each request's future completes when the last of those batches is acknowledged."""
        from meterline.sdk.transport import Backpressure

        items = work[0][0] if len(work) == 1 else [it for chunk, _ in work for it in chunk]
        count = len(items)
        with self._lock:
            try:
                batches = build_batches(items, self._partitions, max_events=BATCH_MAX_EVENTS,
                                        max_bytes=BATCH_MAX_BYTES, source=None,
                                        now_ms=self._clock_ms(), sequencer=self._sequencer)
            except BaseException:
                self.admission.release(count)
                raise
            done = _Countdown(batches, [future for _, future in work],
                              lambda: self.admission.release(count))
            for batch in batches:
                assert batch.partition is not None
                try:
                    self._transport.send(self._topic, batch.partition, batch.payload,
                                         done.report)
                except Backpressure:
                    done.report(Unavailable("Kafka producer queue full", retry_after_s=2))
                    break
                except Exception as exc:  # never leave a request waiting for nothing
                    done.report(exc)
                    break

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._sender is not None:
            self._sender.join(timeout=30)  # what was queued is produced first
        self._stop.set()
        self._poller.join(timeout=5)
        self._transport.close(10.0)


class _Countdown:
    """Completes every future when every batch is acknowledged, or fails them all at the
    first failed delivery (each request is answered 503; its events may partly be written,
    which the client's retry with the same ids dedupes)."""

    def __init__(self, batches: list[EncodedBatch], futures: list[Future[None]],
                 on_settled: Callable[[], None]) -> None:
        self._left = len(batches)
        self._futures = futures
        self._on_settled = on_settled
        self._lock = threading.Lock()
        self._failed = False

    def report(self, error: BaseException | None) -> None:
        with self._lock:
            if self._failed:
                return
            if error is not None:
                self._failed = True
            else:
                self._left -= 1
                if self._left:
                    return
        self._on_settled()
        if error is None:
            for future in self._futures:
                future.set_result(None)
            return
        log.warning("Kafka delivery failed: %s", error)
        retry = error.retry_after_s if isinstance(error, Unavailable) else 5
        for future in self._futures:
            future.set_exception(Unavailable(f"Kafka did not acknowledge: {error}",
                                             retry_after_s=retry))
