"""Fault injection on the emitter's background path (sdk/delivery.py), one test per cause.

Whatever fails, each test checks the same four things: the background thread is still
alive, every event is delivered once the fault is gone, nothing is counted as lost, and the
failure is counted (``stats().errors_by_cause``) and logged at ERROR on "meterline.sdk".
In-memory broker: these are unit tests of the SDK's own background thread.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from meterline.core.envelope import decode_batch
from meterline.sdk import Emitter, EmitterConfig, MemoryTransport, register_metrics
from meterline.sdk import delivery as delivery_module
from meterline.sdk import emitter as emitter_module
from meterline.sdk.batching import EncodedBatch
from meterline.sdk.spool import Spool
from meterline.sdk.transport import DeliveryError, OnDone

N_EVENTS = 300


class Fault:
    """Raises ``exc_type(*args)`` at an injection point while ``on``; ``hits`` counts it."""

    def __init__(self, exc_type: type[BaseException], *args: Any) -> None:
        self.exc_type = exc_type
        self.args = args
        self.on = True
        self.hits = 0

    def __call__(self) -> None:
        if self.on:
            self.hits += 1
            raise self.exc_type(*self.args)


class FaultyTransport(MemoryTransport):
    """MemoryTransport whose send() raises while its fault is on, and whose poll() raises
    after serving delivery reports (as confluent-kafka does when a callback raised)."""

    def __init__(self, partitions: int | None = 4) -> None:
        super().__init__(partitions)
        self.send_fault: Fault | None = None
        self.poll_fault: Fault | None = None

    def send(self, topic: str, partition: int, payload: bytes, on_done: OnDone) -> None:
        if self.send_fault is not None:
            self.send_fault()
        super().send(topic, partition, payload, on_done)

    def poll(self, timeout_s: float) -> None:
        serving = self.in_flight() > 0
        super().poll(timeout_s)
        if serving and self.poll_fault is not None:
            self.poll_fault()


class FaultySpool(Spool):
    """Spool whose batch writes and deletes raise while their fault is on (a full disk, a
    read-only directory: what sqlite3 raises then)."""

    write_fault: Fault | None = None
    delete_fault: Fault | None = None
    events_fault: Fault | None = None

    def append_batches(self, batches: Any) -> Any:
        if self.write_fault is not None:
            self.write_fault()
        return super().append_batches(batches)

    def delete_batch(self, seq: int) -> None:
        if self.delete_fault is not None:
            self.delete_fault()
        super().delete_batch(seq)

    def append_events(self, items: Any) -> None:
        if self.events_fault is not None:
            self.events_fault()
        super().append_events(items)


@pytest.fixture
def faulty_spool(monkeypatch: pytest.MonkeyPatch) -> type[FaultySpool]:
    """The Spool class the emitters of this test get; set its faults on the class."""
    cls = type("FaultySpoolOfTest", (FaultySpool,), {})
    monkeypatch.setattr(emitter_module, "Spool", cls)
    return cls


@pytest.fixture
def make_emitter(tmp_path: Path) -> Iterator[Callable[..., Emitter]]:
    made: list[Emitter] = []

    def make(transport: MemoryTransport, spool: Path | None = None, **overrides: Any) -> Emitter:
        config = EmitterConfig(
            bootstrap_servers=None, spool_dir=spool or tmp_path / "spool", linger_ms=5
        )
        em = Emitter(config, transport=transport, **overrides)
        made.append(em)
        return em

    yield make
    for em in made:
        em.close(timeout=0.5)


def emit_events(em: Emitter, n: int = N_EVENTS) -> list[int]:
    """Event i has quantity i + 1 (unique); even ones take emit()'s fast path, odd ones the
    full path with an explicit id. Returns the quantities in whole units."""
    em.emit("warm", "api_calls", n + 1)  # makes the meter known: the fast path is live
    for i in range(n):
        if i % 2:
            em.emit(f"c{i % 7}", "api_calls", i + 1, id=f"e{i}")
        else:
            em.emit(f"c{i % 7}", "api_calls", i + 1)
    return list(range(1, n + 2))


def delivered_quantities(transport: MemoryTransport) -> list[int]:
    """Quantities of the delivered events, each batch counted once (what downstream dedupe
    by batch id does). A batch delivered twice must be the very same bytes."""
    payload_of: dict[str, bytes] = {}
    for _, payload in transport.records:
        batch_id = decode_batch(payload).batch_id
        assert payload_of.setdefault(batch_id, payload) == payload
    events = [ev for p in payload_of.values() for ev in decode_batch(p).events()]
    return sorted(ev.quantity // 10**9 for ev in events)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def background_alive(em: Emitter) -> bool:
    return em._delivery.alive()


def error_logs(caplog: pytest.LogCaptureFixture, cause: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "meterline.sdk"
        and r.levelno == logging.ERROR
        and f"{cause} failure" in r.getMessage()
    ]


def assert_recovered(em: Emitter, transport: MemoryTransport, expected: list[int]) -> None:
    """After the fault is gone: everything delivered, nothing lost, nothing left over."""
    assert em.flush(10)
    assert delivered_quantities(transport) == expected
    stats = em.stats()
    assert stats.lost == 0
    assert stats.delivered == stats.emitted == len(expected)
    assert stats.buffered == stats.held == stats.pending_in_spool == 0


# -- one test per cause --------------------------------------------------------------------
def test_build_error_puts_events_back_and_retries(
    make_emitter: Callable[..., Emitter],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fault = Fault(ValueError, "cannot encode batch")
    build = delivery_module.build_batches

    def flaky_build(*args: Any, **kwargs: Any) -> list[EncodedBatch]:
        fault()
        return build(*args, **kwargs)

    monkeypatch.setattr(delivery_module, "build_batches", flaky_build)
    transport = FaultyTransport()
    em = make_emitter(transport)
    expected = emit_events(em)
    wait_for(lambda: fault.hits >= 3)  # retried (after back-off), not given up
    assert background_alive(em)
    assert transport.records == []

    fault.on = False
    assert_recovered(em, transport, expected)
    assert em.stats().errors_by_cause["build"] >= 3
    assert error_logs(caplog, "build")
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    register_metrics(em, name="faults", registry=registry)
    exported = registry.get_sample_value(
        "meterline_sdk_errors_total", {"emitter": "faults", "cause": "build"}
    )
    assert exported == em.stats().errors_by_cause["build"]


def test_spool_write_error_keeps_batches_in_memory(
    make_emitter: Callable[..., Emitter],
    faulty_spool: type[FaultySpool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = FaultyTransport()
    transport.full = True  # Kafka pushes back: batches must go to the spool, which fails
    fault = faulty_spool.write_fault = Fault(sqlite3.OperationalError, "database or disk is full")
    em = make_emitter(transport)
    expected = emit_events(em)
    wait_for(lambda: fault.hits >= 3)
    assert background_alive(em)
    assert em.stats().pending_in_spool == 0 and transport.records == []

    fault.on = False
    transport.full = False
    assert_recovered(em, transport, expected)
    assert em.stats().errors_by_cause["spool"] >= 3
    # Rate-limited: a persistent failure is one line per interval, not one per attempt.
    assert len(error_logs(caplog, "spool")) == 1


def test_send_raising_spools_the_batch(
    make_emitter: Callable[..., Emitter], caplog: pytest.LogCaptureFixture
) -> None:
    transport = FaultyTransport()
    # What produce() raises for a local error other than a full queue.
    fault = transport.send_fault = Fault(KafkaException, KafkaError(KafkaError._TRANSPORT))
    em = make_emitter(transport)
    expected = emit_events(em)
    wait_for(lambda: fault.hits >= 2)  # the direct send and at least one replay
    assert background_alive(em)
    wait_for(lambda: em.stats().pending_in_spool == len(expected))

    fault.on = False
    assert_recovered(em, transport, expected)
    assert em.stats().errors_by_cause["send"] >= 2
    assert error_logs(caplog, "send")


def test_delivery_callback_failing_to_spool_keeps_the_batch(
    make_emitter: Callable[..., Emitter],
    faulty_spool: type[FaultySpool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Kafka reports the batches failed; the callback's spool write raises inside poll().
    transport = FaultyTransport()
    transport.fail = True
    fault = faulty_spool.write_fault = Fault(sqlite3.OperationalError, "attempt to write a "
                                             "readonly database")
    em = make_emitter(transport)
    expected = emit_events(em)
    wait_for(lambda: fault.hits >= 3)
    assert background_alive(em)

    fault.on = False
    transport.fail = False
    assert_recovered(em, transport, expected)
    by_cause = em.stats().errors_by_cause
    assert by_cause["callback"] >= 3 and by_cause["delivery"] >= 3
    assert error_logs(caplog, "callback")


def test_delivery_callback_failing_to_delete_replays_again(
    make_emitter: Callable[..., Emitter],
    faulty_spool: type[FaultySpool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Spooled batches are replayed; Kafka acknowledges them but the callback's delete from
    # the spool raises inside poll(). The batch must stay spooled and be resent, same id.
    transport = FaultyTransport()
    transport.fail = True
    em = make_emitter(transport)
    expected = emit_events(em)
    wait_for(lambda: em.stats().pending_in_spool == len(expected))
    fault = faulty_spool.delete_fault = Fault(sqlite3.OperationalError, "disk I/O error")
    transport.fail = False
    wait_for(lambda: fault.hits >= 3)
    assert background_alive(em)
    assert em.stats().pending_in_spool == len(expected)  # acknowledged, but still owed

    fault.on = False
    assert_recovered(em, transport, expected)
    assert len(transport.records) > len({decode_batch(p).batch_id for _, p in transport.records})
    assert em.stats().errors_by_cause["callback"] >= 3
    assert error_logs(caplog, "callback")


def test_poll_raising_does_not_stop_the_thread(
    make_emitter: Callable[..., Emitter], caplog: pytest.LogCaptureFixture
) -> None:
    # confluent-kafka re-raises from poll() whatever a callback raised, or a fatal error.
    transport = FaultyTransport()
    fault = transport.poll_fault = Fault(KafkaException, KafkaError(KafkaError._FAIL))
    em = make_emitter(transport)
    expected: list[int] = []
    for round_ in range(3):  # each round's reports are served by a poll() that raises
        for i in range(100):
            quantity = round_ * 100 + i + 1
            em.emit(f"c{quantity % 7}", "api_calls", quantity)
            expected.append(quantity)
        wait_for(lambda r=round_: fault.hits > r)  # type: ignore[misc]
        assert background_alive(em)

    fault.on = False
    assert_recovered(em, transport, expected)
    assert em.stats().errors_by_cause["poll"] >= 3
    assert error_logs(caplog, "poll")


def test_on_error_hook_raising_is_counted_and_ignored(
    make_emitter: Callable[..., Emitter], caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[BaseException] = []

    def broken_hook(exc: BaseException) -> None:
        calls.append(exc)
        raise RuntimeError("the application's hook is broken")

    transport = FaultyTransport()
    transport.fail = True
    em = make_emitter(transport, on_error=broken_hook)
    expected = emit_events(em)
    wait_for(lambda: len(calls) >= 3)
    assert background_alive(em)
    assert isinstance(calls[0], DeliveryError)

    transport.fail = False
    assert_recovered(em, transport, expected)
    by_cause = em.stats().errors_by_cause
    assert by_cause["on_error"] == len(calls)  # each raise counted; never re-reported to it
    assert by_cause["delivery"] >= 3
    assert error_logs(caplog, "on_error")
    assert not any(isinstance(exc, RuntimeError) for exc in calls)


def test_failures_are_logged_without_an_on_error_hook(
    make_emitter: Callable[..., Emitter], caplog: pytest.LogCaptureFixture
) -> None:
    transport = FaultyTransport()
    transport.fail = True
    em = make_emitter(transport)  # on_error is None: the log and counters still tell
    expected = emit_events(em, 50)
    wait_for(lambda: bool(error_logs(caplog, "delivery")))
    assert em.stats().errors_by_cause["delivery"] >= 1
    transport.fail = False
    assert_recovered(em, transport, expected)


# -- close() -------------------------------------------------------------------------------
def test_close_reports_events_it_left_in_the_spool(
    make_emitter: Callable[..., Emitter], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "handover"
    down = FaultyTransport()
    down.fail = True
    em = make_emitter(down, spool=spool)
    expected = emit_events(em, 100)
    assert em.close(timeout=0.3) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and r.name == "meterline.sdk"]
    assert len(warnings) == 1 and str(spool) in warnings[0].getMessage()
    stats = em.stats()
    assert stats.undelivered_at_close == len(expected) and stats.lost == 0

    up = FaultyTransport()
    em2 = make_emitter(up, spool=spool)
    assert em2.flush(10)
    assert delivered_quantities(up) == expected
    assert em2.close(timeout=1) is True
    stats = em2.stats()
    assert stats.replayed == len(expected)
    assert stats.undelivered_at_close == stats.lost == 0


def test_close_counts_events_it_can_neither_deliver_nor_spool_as_lost(
    make_emitter: Callable[..., Emitter],
    faulty_spool: type[FaultySpool],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The only way to lose events: Kafka away AND the disk refusing writes at close().
    down = FaultyTransport()
    down.fail = True
    faulty_spool.write_fault = Fault(sqlite3.OperationalError, "database or disk is full")
    em = make_emitter(down)
    expected = emit_events(em, 100)
    assert em.close(timeout=0.3) is False
    stats = em.stats()
    assert stats.lost == stats.undelivered_at_close == len(expected)
    assert stats.held == stats.buffered == 0
    assert any(r.levelno == logging.ERROR and "lost" in r.getMessage() for r in caplog.records)


def test_close_spools_unencodable_events_raw_for_the_next_emitter(
    make_emitter: Callable[..., Emitter],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    spool = tmp_path / "raw"
    transport = FaultyTransport()
    em = make_emitter(transport, spool=spool)
    em._delivery._send_buffered = lambda: None  # keeps the buffer
    expected = emit_events(em, 100)
    fault = Fault(ValueError, "cannot encode batch")
    build = delivery_module.build_batches

    def flaky_build(*args: Any, **kwargs: Any) -> list[EncodedBatch]:
        fault()
        return build(*args, **kwargs)

    monkeypatch.setattr(delivery_module, "build_batches", flaky_build)
    assert em.close(timeout=0.2) is False
    assert fault.hits == 1
    stats = em.stats()
    assert stats.lost == 0 and stats.undelivered_at_close == len(expected)

    fault.on = False
    up = FaultyTransport()
    em2 = make_emitter(up, spool=spool)
    assert em2.flush(10)
    assert delivered_quantities(up) == expected
    assert em2.stats().lost == 0
