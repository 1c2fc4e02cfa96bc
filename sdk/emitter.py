"""The emitter: ``emit()`` on the caller's thread, everything else on one background thread.

Hot path (``emit``): validate cheaply, append one tuple to a deque, return. No locks, no
I/O, no id generation (buffered mode). The background thread (``meterline.sdk.delivery``)
wakes every ``linger_ms``, cuts what was buffered into per-partition envelopes, sends them to
Kafka or the disk spool, and replays the spool. This module is the application's side:
validation, the buffer, ``flush``/``close`` and ``stats``.
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
from meterline.core.meters import Aggregation, Meter, MeterRegistry
from meterline.core.quantity import MAX_UNITS, SCALE, QuantityError, to_nanos
from meterline.sdk.batching import Item
from meterline.sdk.config import EmitterConfig
from meterline.sdk.delivery import Delivery
from meterline.sdk.spool import Spool
from meterline.sdk.transport import KafkaTransport, Transport

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
    held: int  # cut into batches, in memory until Kafka or the spool takes them
    errors: int  # background failures survived (retried, nothing dropped); see errors_by_cause
    errors_by_cause: Mapping[str, int]  # keys: meterline.sdk.failures.CAUSES
    lost: int  # events close() could neither deliver nor spool; 0 unless the disk failed too
    undelivered_at_close: int  # not acknowledged when close() returned (spooled or lost)
    partition_count_changes: int  # topic partition count changes seen (docs/sdk.md)


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
        self._buffer: deque[Item] = deque()
        self._max_buffered = config.max_buffered_events
        # The fast path in emit() is only sound when no registry rule, durable write or
        # sync flush applies to a call.
        fast = registry is None and not self._durable and not config.sync
        self._known_meters: set[str] = set()
        # Same set object when the fast path applies, an always-empty one when it doesn't.
        self._fast_meters: set[str] = self._known_meters if fast else set()
        self._delivery = Delivery(config, transport, self._spool, self._buffer,
                                  durable=self._durable)
        self._rejected = 0
        self._durable_emitted = 0
        self._count_lock = threading.Lock()
        self._wake = self._delivery.wake
        self._stop = self._delivery.stopping
        self._closed = False
        self._delivery.start()
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
            self._rejected += 1

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
        problem = registry_problem(spec, q, dims)
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
            if self._delivery.drained():
                settled += 1
                if settled >= 2:  # twice in a row: no callback was mid-flight between checks
                    return True
            else:
                settled = 0
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if not self._delivery.alive():
                return self._delivery.drained()
            time.sleep(0.005)

    async def aflush(self, timeout: float | None = 30.0) -> bool:
        """``flush`` for asyncio code: waits in a worker thread, not on the event loop."""
        import asyncio

        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then stop the background thread. True when Kafka acknowledged every event.

        What Kafka did not acknowledge in time is written to the spool and replayed by the
        next emitter on this ``spool_dir``: counted in ``stats().undelivered_at_close`` and
        logged as a warning. Events that could not even be spooled (the disk failed too) are
        counted in ``stats().lost`` as well and logged as an error.
        """
        if self._closed:
            return True
        delivered = self.flush(timeout)
        undelivered = self._delivery.stop(timeout)
        self._closed = True
        self._spool.close()
        _live_emitters.discard(self)
        return delivered and undelivered == 0

    def __enter__(self) -> Emitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> EmitterStats:
        d = self._delivery.counts()
        errors = self._delivery.failures.counts()
        with self._count_lock:
            rejected = self._rejected
            durable_emitted = self._durable_emitted
        buffered = len(self._buffer)
        return EmitterStats(
            emitted=durable_emitted if self._durable else d["drained"] + buffered,
            delivered=d["delivered"],
            spooled=d["spooled"],
            replayed=d["replayed"],
            rejected=rejected,
            buffered=buffered,
            pending_in_spool=d["pending_in_spool"],
            held=d["held"],
            errors=sum(errors.values()),
            errors_by_cause=errors,
            lost=d["lost"],
            undelivered_at_close=d["undelivered_at_close"],
            partition_count_changes=d["partition_count_changes"],
        )


def registry_problem(spec: Meter, q: int, dims: Mapping[str, str] | None
                     ) -> tuple[str, str] | None:
    """``(field, message)`` when an event breaks its meter's rules, else None.

    Module-level so that every entry point (this emitter, the HTTP ingest server) applies
    the same registry rules to an event before it is batched.
    """
    meter = spec.name
    if q < 0 and not spec.allow_negative:
        return ("quantity", f"meter {meter!r} does not allow negative quantities")
    if dims:
        extra = [k for k in dims if k not in spec.dimensions]
        if extra:
            return (
                "dimensions",
                f"{', '.join(map(repr, extra))} not allowed for meter {meter!r} "
                f"(allowed: {', '.join(spec.dimensions) or 'none'})",
            )
    if spec.aggregation is Aggregation.UNIQUE_COUNT and not (dims and spec.value_property in dims):
        return (f"dimensions.{spec.value_property}", f"required by unique_count meter {meter!r}")
    return None


_live_emitters: weakref.WeakSet[Emitter] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # Flush at interpreter exit, like analytics-python and OpenTelemetry's BatchSpanProcessor.
    for emitter in list(_live_emitters):
        with contextlib.suppress(Exception):
            emitter.close(timeout=10.0)

