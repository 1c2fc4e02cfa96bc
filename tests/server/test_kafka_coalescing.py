"""KafkaWriter coalescing: requests queued while the sender is busy share envelopes and
produce calls (one partition per envelope), none is acknowledged before Kafka's delivery
report, and a failed delivery fails every request that shared it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from meterline.config import DEFAULT_METERS
from meterline.core.envelope import decode_batch
from meterline.core.meters import MeterRegistry
from meterline.core.partitioning import partition_for
from meterline.sdk.transport import DeliveryError
from meterline.server.app import Request, ServerApp
from meterline.server.keys import KeyStore
from meterline.server.writers import KafkaWriter, Unavailable

NOW = 1_764_576_000_000
PARTITIONS = 4
REGISTRY = MeterRegistry.load(DEFAULT_METERS)


class HeldTransport:
    """Records sends and reports deliveries only when the test says so. ``gate``, when
    set, holds the sender thread inside its next ``send`` until released."""

    def __init__(self) -> None:
        self.sends: list[tuple[int, bytes, Callable[[BaseException | None], None]]] = []
        self.gate: threading.Event | None = None
        self.in_send = threading.Event()
        self._lock = threading.Lock()

    def partition_count(self, topic: str, timeout_s: float) -> int | None:
        return PARTITIONS

    def send(self, topic: str, partition: int, payload: bytes,
             on_done: Callable[[BaseException | None], None]) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            self.in_send.set()
            gate.wait(30)
        with self._lock:
            self.sends.append((partition, payload, on_done))

    def poll(self, timeout_s: float) -> None:
        time.sleep(min(timeout_s, 0.005))  # reports come only from deliver()

    def deliver(self, fail_partition: int | None = None) -> None:
        with self._lock:
            sends, self.sends = self.sends, []
        for partition, _, on_done in sends:
            on_done(DeliveryError("broker said no") if partition == fail_partition else None)

    def close(self, timeout_s: float) -> None:
        pass


def _until(condition: Callable[[], bool]) -> None:
    """Wait for progress another thread makes; the bound only stops a broken test."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.001)


def _item(customer: str, n: int) -> Any:
    return (f"t:{customer}", "api_calls", 10**9, NOW, None, f"t:v{n}", None)


def _held_writer() -> tuple[KafkaWriter, HeldTransport, threading.Event]:
    """A writer whose sender is busy in a first produce, so the next writes queue up."""
    transport = HeldTransport()
    writer = KafkaWriter(transport, "usage", clock_ms=lambda: NOW)
    gate = transport.gate = threading.Event()
    first = writer.write([_item("warmup", 0)])
    transport.in_send.wait(30)
    assert not first.done()
    return writer, transport, gate


def _events_sent(transport: HeldTransport, skip: int = 0) -> int:
    with transport._lock:
        sends = transport.sends[skip:]
    return sum(len(decode_batch(payload).customers) for _, payload, _ in sends)


def test_queued_requests_share_one_produce_per_partition() -> None:
    writer, transport, gate = _held_writer()
    try:
        customers = [f"c{i}" for i in range(12)]
        futures = [writer.write([_item(c, i)]) for i, c in enumerate(customers)]
        gate.set()  # all 12 were queued while the sender was busy: its next pass takes them
        _until(lambda: _events_sent(transport, skip=1) == 12)
        expected = {partition_for(f"t:{c}", PARTITIONS) for c in customers}
        shared = transport.sends[1:]
        # One envelope per partition for the 12 requests, not one per request.
        assert sorted(p for p, _, _ in shared) == sorted(expected)
        for partition, payload, _ in shared:
            batch = decode_batch(payload)
            assert {partition_for(c, PARTITIONS) for c in batch.customers} == {partition}
        # Nothing is acknowledged before Kafka's delivery report.
        assert not any(f.done() for f in futures)
        transport.deliver()
        for future in futures:
            assert future.result(timeout=30) is None
        assert writer.admission.pending == 0
    finally:
        writer.close()


def test_one_failed_delivery_fails_every_request_that_shared_it() -> None:
    writer, transport, gate = _held_writer()
    try:
        futures = [writer.write([_item(f"c{i}", i)]) for i in range(12)]
        gate.set()
        _until(lambda: _events_sent(transport, skip=1) == 12)
        assert len(transport.sends) > 2  # the 12 span several partitions
        # One partition's envelope fails: every request of the pass is refused, also
        # those whose own events were acknowledged (their retries dedupe by id).
        transport.deliver(fail_partition=transport.sends[-1][0])
        for future in futures:
            with pytest.raises(Unavailable, match="did not acknowledge"):
                future.result(timeout=30)
        assert writer.admission.pending == 0
    finally:
        writer.close()


def test_uncoalesced_writer_produces_per_request() -> None:
    transport = HeldTransport()
    writer = KafkaWriter(transport, "usage", clock_ms=lambda: NOW, coalesce=False)
    try:
        futures = [writer.write([_item("c", i)]) for i in range(3)]
        assert len(transport.sends) == 3  # on the caller's thread, one produce each
        transport.deliver()
        assert all(f.result(timeout=30) is None for f in futures)
    finally:
        writer.close()


@pytest.mark.parametrize("fail", [False, True])
def test_concurrent_single_event_requests_answer_only_after_delivery(tmp_path: Path,
                                                                     fail: bool) -> None:
    transport = HeldTransport()
    writer = KafkaWriter(transport, "usage")
    keys = KeyStore(tmp_path / "keys.db")
    key, _ = keys.create("acme", ["ingest"])
    app = ServerApp(registry=REGISTRY, keys=keys, writer=writer, reader=None, quotas=None,
                    openapi={})
    headers = {"authorization": f"Bearer {key}", "content-type": "application/cloudevents+json"}

    async def run() -> list[int]:
        tasks = [asyncio.ensure_future(app.handle(Request(
            "POST", b"/api/v1/events", b"", headers, orjson.dumps({
                "specversion": "1.0", "id": f"e{i}", "source": "test", "type": "api_calls",
                "subject": "cust-1"})))) for i in range(8)]
        while _events_sent(transport) < 8:  # progress: every event produced
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in tasks)  # no answer before the delivery report
        # One customer, one partition: failing it fails every request.
        transport.deliver(partition_for("acme:cust-1", PARTITIONS) if fail else None)
        return [(await t).status for t in tasks]

    try:
        statuses = asyncio.run(asyncio.wait_for(run(), timeout=60))
        assert statuses == [503 if fail else 204] * 8
        assert writer.admission.pending == 0
    finally:
        writer.close()
        keys.close()
