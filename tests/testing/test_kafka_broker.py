"""The test broker is a real Kafka: records go in, come back out, and survive a restart."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer

from meterline.testing.kafka import FETCH_SCRIPT, KAFKA_VERSION, KafkaBroker

REPO_ROOT = Path(__file__).resolve().parents[2]


def produce(bootstrap_or_producer: str | Producer, topic: str, values: list[bytes]) -> None:
    """Produce ``values`` (key = value) and fail unless every one is acknowledged."""
    producer = (
        Producer({"bootstrap.servers": bootstrap_or_producer, "acks": "all", "linger.ms": 5})
        if isinstance(bootstrap_or_producer, str)
        else bootstrap_or_producer
    )
    errors: list[KafkaError] = []
    acked = 0

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        nonlocal acked
        if err is not None:
            errors.append(err)
        else:
            acked += 1

    for value in values:
        producer.produce(topic, value=value, key=value, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0, "messages still queued after 30 s"
    assert errors == []
    assert acked == len(values)


def consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 60) -> list[bytes]:
    """Read ``topic`` from the start until ``expected`` records (bounded in time and polls)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:12]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    values: list[bytes] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        for _ in range(10_000):
            if len(values) >= expected or time.monotonic() > deadline:
                break
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                assert msg.error() is None, msg.error()
                value = msg.value()
                assert value is not None
                values.append(value)
    finally:
        consumer.close()
    return values


def port_open(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


def test_pinned_version_matches_pom() -> None:
    pom = (FETCH_SCRIPT.parent / "pom.xml").read_text()
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert match is not None
    assert match.group(1) == KAFKA_VERSION


@pytest.mark.integration
def test_produce_and_consume_1000(
    kafka_broker: KafkaBroker, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(partitions=4)
    values = [f"event-{i:04d}".encode() for i in range(1000)]

    produce(kafka_broker.bootstrap, topic, values)
    got = consume(kafka_broker.bootstrap, topic, expected=len(values))

    assert len(got) == len(values)
    assert sorted(got) == values


@pytest.mark.integration
def test_topic_gets_requested_partitions(
    kafka_broker: KafkaBroker, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(partitions=3)
    md = kafka_broker.admin().list_topics(topic=topic, timeout=10)
    assert len(md.topics[topic].partitions) == 3


@pytest.mark.integration
def test_restart_keeps_data_and_clients_reconnect(fresh_kafka_broker: KafkaBroker) -> None:
    broker = fresh_kafka_broker
    topic = broker.create_topic("restart-me", partitions=4)
    bootstrap = broker.bootstrap
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    before = [f"before-{i:03d}".encode() for i in range(200)]
    produce(producer, topic, before)

    broker.restart()

    assert broker.bootstrap == bootstrap
    md = broker.admin().list_topics(topic=topic, timeout=10)
    assert len(md.topics[topic].partitions) == 4
    after = [f"after-{i:03d}".encode() for i in range(200)]
    produce(producer, topic, after)  # the same producer, reconnected
    got = consume(bootstrap, topic, expected=400)
    assert sorted(got) == sorted(before + after)


@pytest.mark.integration
def test_kill_then_start_recovers_acked_data(fresh_kafka_broker: KafkaBroker) -> None:
    broker = fresh_kafka_broker
    topic = broker.create_topic("kill-me", partitions=2)
    values = [f"v-{i:03d}".encode() for i in range(100)]
    produce(broker.bootstrap, topic, values)

    broker.kill()
    assert not broker.is_running()
    assert not port_open(broker.bootstrap)
    broker.start()

    assert sorted(consume(broker.bootstrap, topic, expected=100)) == values


def _start_cli(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterline.testing.kafka", "run", "--data-dir", str(data_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the CLI exits (EOF) if the broker fails
    assert re.fullmatch(r"127\.0\.0\.1:\d+", line), f"CLI printed {line!r}"
    return proc, line


def _kill_jvms_under(path: Path) -> None:
    """SIGKILL any process whose command line names ``path`` (a JVM the test orphaned)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _wait_port_closed(bootstrap: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not port_open(bootstrap):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.integration
def test_cli_runs_until_sigterm(tmp_path: Path) -> None:
    proc, bootstrap = _start_cli(tmp_path / "kafka")
    try:
        assert port_open(bootstrap)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        assert _wait_port_closed(bootstrap, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_no_orphan_jvm_when_parent_is_killed(tmp_path: Path) -> None:
    proc, bootstrap = _start_cli(tmp_path / "kafka")
    try:
        os.kill(proc.pid, signal.SIGKILL)  # no atexit, no finally: only the kernel can help
        proc.wait(timeout=10)
        assert _wait_port_closed(bootstrap, 15), "JVM outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        _kill_jvms_under(tmp_path)
