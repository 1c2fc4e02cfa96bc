"""KafkaTransport replaces a librdkafka producer that stays stuck (no ack while deliveries
fail), and the emitter above it then delivers every event: nothing lost, nothing left over.

The producers here are stand-ins with confluent-kafka's Producer surface (produce, poll,
purge, flush, len): a stuck idempotent producer cannot be summoned on demand from a real
broker (it showed in 1 of 10 full crash runs). The real-broker behaviour around restarts
is covered by tests/sdk/test_kafka_integration.py and tests/aggregators/test_worker_crash.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from meterline.core.envelope import decode_batch
from meterline.sdk import Emitter, EmitterConfig
from meterline.sdk.transport import KafkaTransport


class FakeProducer:
    """``stuck``: every message times out at the next poll (librdkafka's stuck state)."""

    def __init__(self, stuck: bool, sink: list[bytes]) -> None:
        self.stuck = stuck
        self.sink = sink
        self.pending: list[tuple[bytes, Callable[[Any, Any], None], str | None]] = []

    def produce(self, topic: str, payload: bytes, partition: int,
                on_delivery: Callable[[Any, Any], None]) -> None:
        self.pending.append((payload, on_delivery, "Local: Message timed out"
                             if self.stuck else None))

    def purge(self, in_queue: bool, in_flight: bool, blocking: bool) -> None:
        self.pending = [(p, cb, "Local: Purged in queue") for p, cb, _ in self.pending]

    def poll(self, timeout: float) -> int:
        served, self.pending = self.pending, []
        for payload, callback, err in served:
            if err is None:
                self.sink.append(payload)
            callback(err, None)
        return len(served)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return 0

    def list_topics(self, topic: str, timeout: float) -> Any:
        info = SimpleNamespace(error=None, partitions={p: None for p in range(4)})
        return SimpleNamespace(topics={topic: info})

    def __len__(self) -> int:
        return len(self.pending)


class Factory:
    def __init__(self, stuck_first: int) -> None:
        self.stuck_first = stuck_first  # this many producers are stuck, later ones healthy
        self.made: list[FakeProducer] = []
        self.delivered: list[bytes] = []

    def __call__(self, conf: dict[str, Any]) -> FakeProducer:
        assert conf["enable.idempotence"] is True  # the same settings every time
        producer = FakeProducer(len(self.made) < self.stuck_first, self.delivered)
        self.made.append(producer)
        return producer


def _emitter(tmp_path: Path, transport: KafkaTransport) -> Emitter:
    config = EmitterConfig(bootstrap_servers=None, spool_dir=tmp_path / "spool", linger_ms=5)
    return Emitter(config, transport=transport)


def _delivered_events(payloads: list[bytes]) -> list[int]:
    """Quantities of delivered events, each batch once (downstream dedupes by batch id)."""
    batches = {decode_batch(p).batch_id: p for p in payloads}
    return sorted(ev.quantity // 10**9 for p in batches.values() for ev in decode_batch(p).events())


def _wait(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    # A generous bound: the background thread needs ~0.3 s here on an idle machine.
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"not reached: {what}"
        time.sleep(0.01)


def test_a_stuck_producer_is_replaced_and_every_event_arrives(tmp_path: Path) -> None:
    factory = Factory(stuck_first=1)
    transport = KafkaTransport("127.0.0.1:9", producer_factory=factory, reset_after_s=0.3)
    em = _emitter(tmp_path, transport)
    try:
        for i in range(500):
            em.emit(f"c{i % 5}", "api_calls", i + 1)
        _wait(lambda: transport.resets >= 1, "the stuck producer to be replaced")
        assert em.flush(30)
        assert _delivered_events(factory.delivered) == list(range(1, 501))
        stats = em.stats()
        assert stats.lost == 0 and stats.delivered == stats.emitted == 500
        assert stats.pending_in_spool == 0
    finally:
        em.close(timeout=1)
    assert transport.resets == 1 and len(factory.made) == 2


def test_intermittent_failures_do_not_reset(tmp_path: Path) -> None:
    clock = [0.0]
    factory = Factory(stuck_first=0)
    transport = KafkaTransport("127.0.0.1:9", producer_factory=factory, reset_after_s=30,
                               clock=lambda: clock[0])
    results: list[BaseException | None] = []
    for step in range(10):
        clock[0] += 10  # 100 s in all, failures spread over it, but a success every 20 s
        factory.made[0].stuck = step % 2 == 0
        transport.send("t", 0, b"x", results.append)
        transport.poll(0)
    assert transport.resets == 0
    assert sum(r is None for r in results) == 5


def test_during_an_outage_resets_are_spaced(tmp_path: Path) -> None:
    clock = [0.0]
    factory = Factory(stuck_first=10**6)  # every producer stuck: the broker is away
    transport = KafkaTransport("127.0.0.1:9", producer_factory=factory, reset_after_s=30,
                               clock=lambda: clock[0])
    failures: list[BaseException | None] = []
    for _ in range(100):  # 100 s of failing sends
        clock[0] += 1
        transport.send("t", 0, b"x", failures.append)
        transport.poll(0)
    assert all(f is not None for f in failures) and len(failures) == 100
    assert 2 <= transport.resets <= 3  # about one per 30 s, not one per failure
    assert transport.in_flight() == 0  # replaced producers were drained, not leaked
