"""The SDK against a real Kafka broker: volume, outage, kill -9."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meterline.core.envelope import Batch
from meterline.core.partitioning import partition_for
from meterline.sdk import Emitter, EmitterConfig
from meterline.testing.consume import consume_batches, event_count
from meterline.testing.kafka import KafkaBroker

pytestmark = pytest.mark.integration
CHILD = Path(__file__).with_name("durable_child.py")


def test_million_events_arrive_exactly(kafka_broker: KafkaBroker, kafka_topic, tmp_path: Path):
    topic = kafka_topic(partitions=4)
    # 250,000 in make test; METERLINE_SDK_EVENTS=1000000 for the full size.
    n_events, n_customers = int(os.environ.get("METERLINE_SDK_EVENTS", 250_000)), 500
    truth: collections.Counter[str] = collections.Counter()
    config = EmitterConfig(topic=topic, bootstrap_servers=kafka_broker.bootstrap,
                           spool_dir=tmp_path / "spool")
    with Emitter(config) as emitter:
        emit = emitter.emit
        for i in range(n_events):
            customer = f"cust-{i % n_customers}"
            q = i % 10 + 1
            emit(customer, "api_calls", q, dimensions={"endpoint": "/v1"} if i % 3 else None)
            truth[customer] += q
        assert emitter.flush(timeout=120)
        stats = emitter.stats()
    assert stats.emitted == stats.delivered == n_events
    assert stats.spooled == 0

    batches = consume_batches(kafka_broker.bootstrap, topic,
                              until=lambda bs: event_count(bs) >= n_events)
    assert event_count(batches) == n_events
    got: collections.Counter[str] = collections.Counter()
    for b in batches:
        for customer, q in zip(b.customers, b.quantities, strict=True):
            got[customer] += q
    assert {c: q // 10**9 for c, q in got.items()} == dict(truth)
    assert all(q % 10**9 == 0 for q in got.values())
    ids = [eid for b in batches for eid in b.event_ids()]
    assert len(set(ids)) == n_events


def _partition_of_records(batches: list[Batch], partitions: int) -> None:
    for b in batches:
        assert len({partition_for(c, partitions) for c in b.customers}) == 1


def test_broker_outage_loses_nothing(fresh_kafka_broker: KafkaBroker, tmp_path: Path):
    broker = fresh_kafka_broker
    topic = broker.create_topic("usage-outage", partitions=4)
    n_events = 200_000
    config = EmitterConfig(
        topic=topic,
        bootstrap_servers=broker.bootstrap,
        spool_dir=tmp_path / "spool",
        delivery_timeout_ms=3_000,  # spool quickly once the broker is gone
        linger_ms=20,
    )
    errors: list[BaseException] = []
    emitter = Emitter(config, on_error=errors.append)

    def produce(start: int, stop: int) -> None:
        for i in range(start, stop):
            emitter.emit(f"cust-{i % 211}", "api_calls", 1, id=f"ev-{i}")
            if i % 5_000 == 0:
                time.sleep(0.01)  # a steady app, not one burst

    produce(0, 50_000)
    assert emitter.flush(timeout=60)
    broker.stop()  # clean shutdown mid-stream
    produce(50_000, 150_000)
    time.sleep(4)  # longer than delivery_timeout_ms: in-flight batches fail and spool
    mid = emitter.stats()
    broker.start()
    produce(150_000, n_events)
    assert emitter.flush(timeout=180), emitter.stats()
    stats = emitter.stats()
    emitter.close()

    assert mid.spooled > 0, "the outage should have sent batches to the spool"
    assert stats.delivered == n_events
    batches = consume_batches(broker.bootstrap, topic,
                              until=lambda bs: event_count(bs) >= n_events, idle_s=2)
    seen: dict[str, tuple[str, int]] = {}
    duplicates = 0
    for b in batches:
        for eid, customer, q in zip(b.event_ids(), b.customers, b.quantities, strict=True):
            if eid in seen:
                duplicates += 1
                assert seen[eid] == (customer, q), "a duplicate must be the same event"
            seen[eid] = (customer, q)
    assert set(seen) == {f"ev-{i}" for i in range(n_events)}
    _partition_of_records(batches, 4)
    print(f"outage: spooled={stats.spooled} replayed={stats.replayed} duplicates={duplicates}")


def _run_child(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("broker_reachable", [True, False], ids=["broker-up", "broker-away"])
def test_kill9_durable_mode_keeps_acknowledged_events(
    kafka_broker: KafkaBroker, kafka_topic, tmp_path: Path, broker_reachable: bool
):
    topic = kafka_topic(partitions=4)
    spool, acks = tmp_path / "spool", tmp_path / "acks.txt"
    # "broker-away" points the first process at a closed port, so every acknowledged event
    # is only in the spool when the process dies.
    bootstrap = kafka_broker.bootstrap if broker_reachable else "127.0.0.1:1"
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), "emit", bootstrap, topic, str(spool), str(acks),
         "0", "1000000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    target = random.Random(7).randint(3_000, 8_000)
    while time.monotonic() < deadline:
        if acks.exists() and acks.stat().st_size > target * 6:
            break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    acked = {f"k{int(line)}" for line in acks.read_text().split()}
    assert len(acked) >= 1_000

    drained = _run_child("drain", kafka_broker.bootstrap, topic, str(spool))
    assert drained.returncode == 0, drained.stdout + drained.stderr

    batches = consume_batches(kafka_broker.bootstrap, topic,
                              until=lambda bs: acked <= {e for b in bs for e in b.event_ids()},
                              timeout_s=60)
    delivered = {e for b in batches for e in b.event_ids()}
    missing = acked - delivered
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"


def test_emit_from_many_threads(kafka_broker: KafkaBroker, kafka_topic, tmp_path: Path):
    topic = kafka_topic(partitions=3)
    config = EmitterConfig(topic=topic, bootstrap_servers=kafka_broker.bootstrap,
                           spool_dir=tmp_path / "spool")
    per_thread, threads = 20_000, 4
    with Emitter(config) as emitter:
        def work(t: int) -> None:
            for i in range(per_thread):
                emitter.emit(f"cust-{t}-{i % 13}", "api_calls", "0.5", id=f"t{t}-{i}")

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        assert emitter.flush(timeout=60)
    batches = consume_batches(kafka_broker.bootstrap, topic,
                              until=lambda bs: event_count(bs) >= per_thread * threads)
    assert event_count(batches) == per_thread * threads
    assert sum(sum(b.quantities) for b in batches) == per_thread * threads * 500_000_000


def test_close_while_broker_down_then_next_emitter_delivers(fresh_kafka_broker: KafkaBroker,
                                                             tmp_path: Path):
    broker = fresh_kafka_broker
    topic = broker.create_topic("usage-close-down", partitions=4)
    config = EmitterConfig(topic=topic, bootstrap_servers=broker.bootstrap,
                           spool_dir=tmp_path / "spool", linger_ms=10)
    first = Emitter(config)
    for i in range(20_000):
        first.emit(f"cust-{i % 17}", "api_calls", 1, id=f"a{i}")
    assert first.flush(timeout=60)
    broker.stop()
    for i in range(30_000):
        first.emit(f"cust-{i % 17}", "api_calls", 1, id=f"b{i}")
    # The app shuts down while Kafka is away: close() gives up waiting, and whatever was in
    # memory or unacknowledged in librdkafka must land in the spool.
    assert first.close(timeout=2) is False
    assert first.stats().pending_in_spool >= 30_000

    broker.start()
    second = Emitter(config)
    assert second.flush(timeout=120), second.stats()
    second.close()
    batches = consume_batches(broker.bootstrap, topic,
                              until=lambda bs: event_count(bs) >= 50_000, idle_s=1)
    ids = {e for b in batches for e in b.event_ids()}
    assert ids == {f"a{i}" for i in range(20_000)} | {f"b{i}" for i in range(30_000)}
