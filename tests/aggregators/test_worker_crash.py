"""Exactly once under fire: real broker, real `meterline worker` processes, real kills.

2,000,000 events over 1,000 customers and the five default meters, with resent batches and
reused idempotency keys, go through a real Kafka broker into worker processes that are
SIGKILLed three times at random points, share the topic for a while (a rebalance each
time one joins or leaves), and live through a broker restart. Then the output topics are
loaded into chDB, and every (customer, meter, group, hour) and (customer, meter, group,
day) total must equal the ground truth computed here, independently of the rollup code.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meterline.aggregators.outputs_io import OutputLoader, output_topics
from meterline.core.quantity import SCALE
from meterline.core.windows import HOUR_MS
from meterline.ingest.sources import KafkaSource
from meterline.sinks.storage import Storage
from meterline.testing.kafka import KafkaBroker
from meterline.testing.usage_log import Record, Truth, usage_records

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

EVENTS = int(os.environ.get("METERLINE_CRASH_EVENTS", 2_000_000))
CUSTOMERS = 1_000
PARTITIONS = 4
GROUP = "meterline-rollups-crash"
# Event times: recent (older rows would fall to the tables' TTL at insert), spanning
# ~11 hours that end well before now (so no event is in the future of the log clock).
_NOW = time.time_ns() // 1_000_000
START_MS = _NOW - _NOW % HOUR_MS - 14 * HOUR_MS


class Workers:
    """`meterline worker` subprocesses, each in its own process group."""

    def __init__(self, bootstrap: str, topic: str, logs: Path) -> None:
        self.env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": bootstrap,
                    "METERLINE_TOPIC": topic, "METERLINE_ROLLUP_GROUP": GROUP,
                    "METERLINE_CHECKPOINT_INTERVAL_S": "1.0"}
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started = 0

    def start(self, name: str) -> None:
        self.started += 1
        log = open(self.logs / f"{name}-{self.started}.log", "wb")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "meterline.cli", "worker"], env=self.env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs.clear()


def produce(bootstrap: str, topic: str, records: list[Record], done: threading.Event,
            errors: list[str]) -> None:
    """The SDK's producer settings (idempotent, acks=all); long delivery timeout so a
    broker restart is ridden out, as the SDK's spool would."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all", "compression.type": "lz4", "linger.ms": 5,
                         "delivery.timeout.ms": 300_000})

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    try:
        for i, rec in enumerate(records):
            while True:
                try:
                    producer.produce(topic, rec.payload, partition=rec.partition,
                                     on_delivery=report)
                    break
                except BufferError:
                    producer.poll(0.05)
            if i % 200 == 0:
                producer.poll(0)
                time.sleep(0.01)  # a steady stream rather than one burst
        if producer.flush(300):
            errors.append("undelivered records at the end")
    finally:
        done.set()


def committed_lag(bootstrap: str, topic: str) -> int:
    """Records not yet covered by a committed offset; -1 while the broker cannot say."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP,
                  "enable.auto.commit": False})
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        lag = 0
        for tp in c.committed(tps, timeout=10):
            _, high = c.get_watermark_offsets(tp, timeout=10)
            lag += high - max(tp.offset, 0)
        return lag
    except KafkaException:  # NOT_COORDINATOR and friends around a broker restart
        return -1
    finally:
        c.close()


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.5)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    b = KafkaBroker(tmp_path / "kafka", partitions=PARTITIONS)
    b.start()
    try:
        yield b
    finally:
        b.stop(timeout_s=15)


def test_kill9_rebalance_and_broker_restart_keep_totals_exact(
        broker: KafkaBroker, tmp_path: Path, migrated_storage: Storage) -> None:
    rng = random.Random(2026)
    topic = broker.create_topic("usage", PARTITIONS,
                                config={"message.timestamp.type": "LogAppendTime"})
    truth = Truth()
    records = list(usage_records(EVENTS, CUSTOMERS, PARTITIONS, start_ms=START_MS,
                                 ms_per_batch=10_000, truth=truth))
    assert sum(r.resend for r in records) > EVENTS // 20_000 and truth.events < EVENTS
    quarter = len(records) // 4
    chunks = [records[i * quarter:(i + 1) * quarter if i < 3 else None] for i in range(4)]
    workers = Workers(broker.bootstrap, topic, tmp_path)
    errors: list[str] = []

    def send(chunk: list[Record]) -> threading.Event:
        done = threading.Event()
        threading.Thread(target=produce, args=(broker.bootstrap, topic, chunk, done, errors),
                         daemon=True).start()
        return done

    try:
        workers.start("a")
        sent = send(chunks[0])
        time.sleep(rng.uniform(4, 8))
        workers.kill9("a")  # kill 1: mid-stream, probably mid-batch
        workers.start("a")
        assert sent.wait(300), "producer stuck"
        sent = send(chunks[1])
        workers.start("b")  # rebalance: the partitions are split between a and b
        time.sleep(rng.uniform(5, 10))
        workers.kill9("b")  # kill 2: b's partitions move back to a
        workers.start("b")
        assert sent.wait(300)
        sent = send(chunks[2])
        time.sleep(rng.uniform(1, 4))
        broker.restart()  # producer and workers must ride it out
        assert sent.wait(300)
        sent = send(chunks[3])
        time.sleep(rng.uniform(2, 6))
        workers.kill9(rng.choice(["a", "b"]))  # kill 3
        assert sent.wait(300)
        assert not errors, errors[:5]
        end = committed_lag(broker.bootstrap, topic)
        workers.start("c")  # back to two or three members: one more rebalance
        wait_for(lambda: committed_lag(broker.bootstrap, topic) == 0, 300,
                 f"the workers to catch up (lag was {end})")
    finally:
        workers.stop_all()

    source = KafkaSource(broker.bootstrap, list(output_topics(topic).values()), "loader")
    try:
        loader = OutputLoader(migrated_storage, source)
        loader.run(until_idle_s=15)  # includes joining the consumer group
        assert loader.rows > 0
        assert not loader.problems
    finally:
        source.close()
    for window, expected in (("hourly", truth.hourly), ("daily", truth.daily)):
        got = _totals(migrated_storage, window)
        missing = {k: v for k, v in expected.items() if got.get(k) != v}
        extra = {k: v for k, v in got.items() if k not in expected}
        assert not missing and not extra, (
            f"{window}: {len(missing)} wrong/missing, {len(extra)} unexpected; e.g. "
            f"{list(missing.items())[:3]} got {[got.get(k) for k in list(missing)[:3]]}")
    assert sum(v for (_, m, _, _), v in truth.hourly.items() if m == "api_calls") > SCALE


def _totals(storage: Storage, window: str) -> dict[tuple[str, str, str, int], int]:
    from meterline.sinks.raw_events import nano_from_decimal

    view = "hourly_usage" if window == "hourly" else "daily_usage"
    rows = storage.query_rows(
        f"SELECT customer, meter, group_key, window_start_ms, value FROM "
        f"{storage.database}.{view}")
    return {(c, m, g, int(s)): nano_from_decimal(v) for c, m, g, s, v in rows}
