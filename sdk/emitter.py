"""The emitter: ``emit()`` on the caller's thread, everything else on one background thread.

Hot path (``emit``): validate cheaply, append one tuple to a deque, return. No locks, no
I/O, no id generation (buffered mode). The background thread wakes every ``linger_ms``:

1. take what ``emit`` buffered and cut it into per-partition envelopes;
2. send them to Kafka, or append them to the disk spool when Kafka is unreachable,
   pushing back, or when older batches are still spooled (so order is kept);
3. replay spooled batches, oldest first, deleting each only after Kafka acknowledged it.

Every event is at all times in exactly one of: the deque, the thread's hands, librdkafka's
queue, or the spool. Failure of a send moves its batch to the spool, never to the floor.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meterline.core.envelope import decode_batch, encode_batch
from meterline.core.errors import InvalidEventError, MeterlineError
from meterline.core.events import (
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    check_customer,
    check_dimensions,
    check_id,
    check_meter_name,
    check_source,
    check_timestamp_ms,
    is_utf8,
)
from meterline.core.meters import Aggregation, MeterRegistry
from meterline.core.quantity import MAX_UNITS, SCALE, QuantityError, to_nanos
from meterline.sdk.batching import (
    EncodedBatch,
    Item,
    PartitionCache,
    build_batches,
    split_for_partitions,
)
from meterline.sdk.config import EmitterConfig
from meterline.sdk.spool import Spool, SpooledBatch
from meterline.sdk.transport import Backpressure, KafkaTransport, Transport

_METADATA_RETRY_S = 1.0
_REPLAY_BACKOFF_S = 0.5
_time_ns = time.time_ns
_time = time.time


class BufferFullError(MeterlineError):
    """emit() waited ``enqueue_timeout_s`` for room in the in-memory buffer and found none."""


@dataclass(frozen=True, slots=True)
class EmitterStats:
    emitted: int  # accepted by emit()
    delivered: int  # acknowledged by Kafka (direct or from the spool)
    spooled: int  # written to the disk spool (outage, backpressure, durable mode)
    replayed: int  # delivered from the spool
    rejected: int  # emit() calls refused with an error
    buffered: int  # in memory, not yet batched
    pending_in_spool: int  # on disk, not yet acknowledged


class Emitter:
    """Batches usage events into Kafka. Thread-safe; use as a context manager.

    >>> with Emitter(EmitterConfig(bootstrap_servers="127.0.0.1:9092")) as em:
    ...     em.emit("cust-42", "api_calls", 1, dimensions={"endpoint": "/v1/search"})
    """

    def __init__(
        self,
        config: EmitterConfig | None = None,
        *,
        registry: MeterRegistry | None = None,
        transport: Transport | None = None,
        **overrides: Any,
    ) -> None:
        config = config or EmitterConfig()
        if overrides:
            config = EmitterConfig(**{**config.__dict__, **overrides})
        config.validate()
        self.config = config
        self._registry = registry
        self._durable = config.durability != "buffered"
        if transport is None:
            if not config.bootstrap_servers:
                raise InvalidEventError("bootstrap_servers", "needed when no transport is given")
            transport = KafkaTransport(
                config.bootstrap_servers,
                compression=config.compression,
                delivery_timeout_ms=config.delivery_timeout_ms,
                extra=config.producer_config,
            )
        # The spool last: its directory lock must not stay held when construction fails.
        self._spool = Spool(config.resolved_spool_dir(), fsync=config.durability == "fsync")
        self._transport = transport
        self._buffer: deque[Item] = deque()
        self._max_buffered = config.max_buffered_events
        # The fast path in emit() is only sound when no registry rule, durable write or
        # sync flush applies to a call.
        fast = registry is None and not self._durable and not config.sync
        self._known_meters: set[str] = set()
        # Same set object when the fast path applies, an always-empty one when it doesn't.
        self._fast_meters: set[str] = self._known_meters if fast else set()
        self._partitions: PartitionCache | None = None
        self._next_metadata_try = 0.0
        self._replay_inflight: set[int] = set()
        self._unreported: dict[str, EncodedBatch] = {}
        self._replay_after = 0.0
        self._holding = False
        waiting_events, spooled_events = self._spool.counts()
        self._spool_pending = spooled_events  # events in spooled batches, kept in memory
        # Events a durable emitter accepted but had not cut into batches before it stopped:
        # batched and sent by this emitter too, even when it is not durable itself.
        self._adopt_events = waiting_events > 0
        self._counts = {"drained": 0, "delivered": 0, "spooled": 0, "replayed": 0, "rejected": 0}
        self._durable_emitted = 0
        self._count_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="meterline-emitter", daemon=True)
        self._thread.start()
        _live_emitters.add(self)

    # -- hot path ---------------------------------------------------------------------
    def emit(
        self,
        customer: str,
        meter: str,
        quantity: int | float | str | Any = 1,
        *,
        timestamp_ms: int | None = None,
        dimensions: Mapping[str, str] | None = None,
        id: str | None = None,
        source: str | None = None,
    ) -> None:
        """Record that ``customer`` used ``quantity`` of ``meter``. Never blocks on I/O
        (unless durability is durable/fsync, where it returns after the disk commit).

        Raises ``InvalidEventError`` naming the field for a bad call; nothing is dropped
        silently. ``quantity`` may be int, Decimal, decimal str, or a float with at most 9
        fractional digits (exactness is checked, never rounded).
        """
        # Fast path for the common call (known meter, int quantity, no extras): one
        # combined check, one tuple, one append. Everything else takes the full path.
        if (
            type(quantity) is int
            and -MAX_UNITS <= quantity <= MAX_UNITS
            and type(meter) is str  # `in` on an unhashable meter would raise TypeError
            and meter in self._fast_meters
            and type(customer) is str
            and 0 < len(customer) <= 256
            and customer.isascii()  # others: the full path checks they encode as UTF-8
            and timestamp_ms is None
            and dimensions is None
            and id is None
            and source is None
        ):
            buffer = self._buffer
            if len(buffer) >= self._max_buffered:
                self._wait_for_room()
            # Short tuple: whole units and float seconds. Scaling to nano-units and integer
            # ms happens on the background thread (_take_buffered), off the caller's clock.
            buffer.append((customer, meter, quantity, _time()))
            return
        self._emit_checked(customer, meter, quantity, timestamp_ms, dimensions, id, source)

    def _emit_checked(
        self,
        customer: Any,
        meter: Any,
        quantity: Any,
        timestamp_ms: Any,
        dimensions: Any,
        id: Any,
        source: Any,
    ) -> None:
        if (
            type(customer) is not str
            or not customer
            or len(customer) > 256
            or not is_utf8(customer)
        ):
            self._reject(check_customer, customer)
        if type(meter) is not str or meter not in self._known_meters:
            self._learn_meter(meter)
        if type(quantity) is int and -MAX_UNITS <= quantity <= MAX_UNITS:
            q = quantity * SCALE
        else:
            try:
                q = to_nanos(quantity)
            except QuantityError as exc:
                self._count_rejected()
                raise InvalidEventError("quantity", str(exc)) from None
        if timestamp_ms is None:
            timestamp_ms = _time_ns() // 1_000_000
        elif type(timestamp_ms) is not int or not (
            MIN_TIMESTAMP_MS <= timestamp_ms < MAX_TIMESTAMP_MS
        ):
            self._reject(check_timestamp_ms, timestamp_ms)
        if dimensions is not None:
            dimensions = self._check_dimensions(dimensions)
        if id is not None and (
            type(id) is not str or not id or len(id) > 128 or not is_utf8(id)
        ):
            self._reject(check_id, id)
        if source is not None and (
            type(source) is not str or not source or len(source) > 256 or not is_utf8(source)
        ):
            self._reject(check_source, source)
        if self._registry is not None:
            self._check_against_registry(meter, q, dimensions)
        item = (customer, meter, q, timestamp_ms, dimensions, id, source)
        if self._durable:
            self._spool.append_event(item)
            with self._count_lock:
                self._durable_emitted += 1
        else:
            buffer = self._buffer
            if len(buffer) >= self._max_buffered:
                self._wait_for_room()
            buffer.append(item)
        if self.config.sync:
            self.flush()

    def _reject(self, check: Any, value: Any) -> None:
        self._count_rejected()
        check(value)  # raises InvalidEventError with the precise message
        raise AssertionError("unreachable")  # pragma: no cover

    def _count_rejected(self) -> None:
        with self._count_lock:
            self._counts["rejected"] += 1

    def _learn_meter(self, meter: object) -> None:
        try:
            check_meter_name(meter)
            if self._registry is not None and meter not in self._registry:
                raise InvalidEventError(
                    "meter", f"{meter!r} is not defined; known: {', '.join(self._registry.names)}"
                )
        except InvalidEventError:
            self._count_rejected()
            raise
        self._known_meters.add(meter)  # type: ignore[arg-type]

    def _check_dimensions(self, dimensions: Mapping[str, str]) -> dict[str, str]:
        try:
            # Always a private copy: the caller may reuse or mutate its dict after emit()
            # returns, and the batch is encoded later on the background thread.
            return check_dimensions(dict(dimensions))
        except (InvalidEventError, TypeError, ValueError) as exc:
            self._count_rejected()
            if isinstance(exc, InvalidEventError):
                raise
            raise InvalidEventError("dimensions", str(exc)) from None

    def _check_against_registry(self, meter: str, q: int, dims: dict[str, str] | None) -> None:
        spec = self._registry.get(meter)  # type: ignore[union-attr]
        assert spec is not None  # _learn_meter checked it
        problem = None
        if q < 0 and not spec.allow_negative:
            problem = ("quantity", f"meter {meter!r} does not allow negative quantities")
        elif dims:
            extra = [k for k in dims if k not in spec.dimensions]
            if extra:
                problem = (
                    "dimensions",
                    f"{', '.join(map(repr, extra))} not allowed for meter {meter!r} "
                    f"(allowed: {', '.join(spec.dimensions) or 'none'})",
                )
        if (
            problem is None
            and spec.aggregation is Aggregation.UNIQUE_COUNT
            and not (dims and spec.value_property in dims)
        ):
            problem = (
                f"dimensions.{spec.value_property}",
                f"required by unique_count meter {meter!r}",
            )
        if problem is not None:
            self._count_rejected()
            raise InvalidEventError(*problem)

    def _wait_for_room(self) -> None:
        self._wake.set()
        deadline = time.monotonic() + self.config.enqueue_timeout_s
        while len(self._buffer) >= self._max_buffered:
            if time.monotonic() >= deadline or self._stop.is_set():
                self._count_rejected()
                raise BufferFullError(
                    f"{len(self._buffer)} events buffered and the spool is not keeping up"
                )
            time.sleep(0.001)

    # -- public control ---------------------------------------------------------------
    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every event emitted so far is acknowledged by Kafka.

        Returns False on timeout; events not yet acknowledged stay in memory or the spool
        and keep being retried.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        settled = 0
        while True:
            self._wake.set()
            if self._drained():
                settled += 1
                if settled >= 2:  # twice in a row: no callback was mid-flight between checks
                    return True
            else:
                settled = 0
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if not self._thread.is_alive():
                return self._drained()
            time.sleep(0.005)

    async def aflush(self, timeout: float | None = 30.0) -> bool:
        """``flush`` for asyncio code: waits in a worker thread, not on the event loop."""
        import asyncio

        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then stop the background thread. Whatever Kafka did not acknowledge in
        time is written to the spool and replayed by the next emitter on this spool."""
        if self._closed:
            return True
        delivered = self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(1.0, timeout))
        # Anything still in memory goes to disk: close() must not lose events.
        self._spool_leftovers()
        self._transport.close(min(timeout, 5.0))
        unreported = list(self._unreported.values())
        self._unreported.clear()
        if unreported:
            self._to_spool(unreported)
        self._closed = True
        self._spool.close()
        _live_emitters.discard(self)
        return delivered

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> EmitterStats:
        with self._count_lock:
            c = dict(self._counts)
            durable_emitted = self._durable_emitted
        buffered = len(self._buffer)
        emitted = durable_emitted if self._durable else c["drained"] + buffered
        return EmitterStats(
            emitted=emitted,
            delivered=c["delivered"],
            spooled=c["spooled"],
            replayed=c["replayed"],
            rejected=c["rejected"],
            buffered=buffered,
            pending_in_spool=self._spool_pending,
        )

    # -- background thread --------------------------------------------------------------
    def _drained(self) -> bool:
        if self._buffer or self._holding or self._transport.in_flight() or self._spool_pending:
            return False
        if self._durable or self._adopt_events:
            events, batched = self._spool.counts()
            return events == 0 and batched == 0
        return True

    def _run(self) -> None:
        linger_s = self.config.linger_ms / 1000
        while not self._stop.is_set():
            try:
                self._cycle()
            except Exception as exc:  # keep the thread alive; report, never swallow
                self._report(exc)
                time.sleep(0.1)
            if self._transport.in_flight():
                self._transport.poll(min(linger_s, 0.01) if self._wake.is_set() else linger_s)
            else:
                self._wake.wait(linger_s)
            self._wake.clear()

    def _cycle(self) -> None:
        self._transport.poll(0)
        self._refresh_partitions()
        if self._durable or self._adopt_events:
            self._batch_durable_events()
        if not self._durable:
            self._send_buffered()
        self._replay()

    def _refresh_partitions(self) -> None:
        if self._partitions is not None or time.monotonic() < self._next_metadata_try:
            return
        count = self._transport.partition_count(self.config.topic, 1.0)
        if count:
            self._partitions = PartitionCache(count)
        else:
            self._next_metadata_try = time.monotonic() + _METADATA_RETRY_S

    def _take_buffered(self) -> list[Item]:
        buffer = self._buffer
        n = len(buffer)
        popleft = buffer.popleft
        # Fast-path tuples (customer, meter, units, seconds) stay short; build_batches
        # scales them column-wise, which is far cheaper than rebuilding each tuple here.
        return [popleft() for _ in range(n)]

    def _build(self, items: list[Item]) -> list[EncodedBatch]:
        return build_batches(
            items,
            self._partitions,
            max_events=self.config.batch_max_events,
            max_bytes=self.config.batch_max_bytes,
            source=self.config.source,
            now_ms=_time_ns() // 1_000_000,
        )

    def _send_buffered(self) -> None:
        self._holding = True
        try:
            items = self._take_buffered()
            if not items:
                return
            with self._count_lock:
                self._counts["drained"] += len(items)
            batches = self._build(items)
            # Go straight to Kafka only when nothing older waits in the spool, the
            # partition count is known and the broker is not known to be down.
            direct = (
                self._spool_pending == 0
                and self._partitions is not None
                and not getattr(self._transport, "broker_down", _NEVER).is_set()
            )
            for i, batch in enumerate(batches):
                if not direct:
                    self._to_spool(batches[i:])
                    return
                try:
                    assert batch.partition is not None
                    self._transport.send(
                        self.config.topic, batch.partition, batch.payload, self._direct_done(batch)
                    )
                except Backpressure:
                    self._unreported.pop(batch.batch_id, None)  # never reached librdkafka
                    direct = False
                    self._to_spool(batches[i:])
                    return
        finally:
            self._holding = False

    def _direct_done(self, batch: EncodedBatch) -> Any:
        # Remember the batch until librdkafka reports on it: if close() gives up waiting
        # (broker away), the unreported batches are spooled instead of vanishing with the
        # producer. A batch that Kafka did store meanwhile is resent with the same ids.
        self._unreported[batch.batch_id] = batch

        def done(err: BaseException | None) -> None:
            if self._unreported.pop(batch.batch_id, None) is None:
                return  # already spooled by close(); the replay will deliver it
            if err is None:
                with self._count_lock:
                    self._counts["delivered"] += batch.count
            else:
                self._to_spool([batch])
                self._report(err)

        return done

    def _to_spool(self, batches: list[EncodedBatch]) -> None:
        self._spool.append_batches(batches)
        n = sum(b.count for b in batches)
        self._spool_pending += n
        with self._count_lock:
            self._counts["spooled"] += n

    def _batch_durable_events(self) -> None:
        # Bounded per cycle so replay gets its turn; the loop comes back within linger.
        for _ in range(8):
            up_to, items = self._spool.take_events(self.config.batch_max_events * 8)
            if not items:
                self._adopt_events = False
                return
            batches = self._build(items)
            self._spool.seal_events(up_to, batches)
            n = sum(b.count for b in batches)
            self._spool_pending += n
            with self._count_lock:
                self._counts["spooled"] += n

    def _replay(self) -> None:
        if self._spool_pending == 0 or time.monotonic() < self._replay_after:
            return
        room = self.config.replay_in_flight - len(self._replay_inflight)
        if room <= 0:
            return
        rows = self._spool.oldest_batches(room + len(self._replay_inflight))
        for row in rows:
            if row.seq in self._replay_inflight:
                continue
            if row.batch.partition is None:
                if self._partitions is None:
                    return  # cannot split yet; metadata refresh will retry
                self._split_spooled(row)
                return  # the parts replace it; pick them up next cycle, in order
            try:
                self._transport.send(
                    self.config.topic, row.batch.partition, row.batch.payload,
                    self._replay_done(row),
                )
            except Backpressure:
                self._replay_after = time.monotonic() + _REPLAY_BACKOFF_S / 10
                return
            self._replay_inflight.add(row.seq)
            room -= 1
            if room <= 0:
                return

    def _split_spooled(self, row: SpooledBatch) -> None:
        assert self._partitions is not None
        parent = decode_batch(row.batch.payload)
        parts = [
            EncodedBatch(part, sub.batch_id, len(sub), encode_batch(sub))
            for part, sub in split_for_partitions(parent, self._partitions)
        ]
        self._spool.replace_batch(row.seq, parts)

    def _replay_done(self, row: SpooledBatch) -> Any:
        def done(err: BaseException | None) -> None:
            self._replay_inflight.discard(row.seq)
            if err is None:
                self._spool.delete_batch(row.seq)
                self._spool_pending -= row.batch.count
                with self._count_lock:
                    self._counts["delivered"] += row.batch.count
                    self._counts["replayed"] += row.batch.count
            else:
                self._replay_after = time.monotonic() + _REPLAY_BACKOFF_S
                self._report(err)

        return done

    def _spool_leftovers(self) -> None:
        if self._durable:
            return  # every event already is on disk
        items = self._take_buffered()
        if items:
            with self._count_lock:
                self._counts["drained"] += len(items)
            self._to_spool(self._build(items))

    def _report(self, err: BaseException) -> None:
        hook = self.config.on_error
        if hook is not None:
            with contextlib.suppress(Exception):  # a broken hook must not kill delivery
                hook(err)


class _Never:
    def is_set(self) -> bool:
        return False


_NEVER = _Never()
_live_emitters: weakref.WeakSet[Emitter] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # Flush at interpreter exit, like analytics-python and OpenTelemetry's BatchSpanProcessor.
    for emitter in list(_live_emitters):
        with contextlib.suppress(Exception):
            emitter.close(timeout=10.0)

