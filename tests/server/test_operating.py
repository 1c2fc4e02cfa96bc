"""Operating it (issue 11): Kafka unreachable is one line, demo arguments are checked,
`meterline topics create` makes the topics the pipeline needs and refuses what it must not
run on, and the worker is quiet by default and refuses a usage topic without
LogAppendTime. Real processes, a real broker (meterline.testing.kafka)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from meterline.testing.kafka import KafkaBroker, free_ports

CLI = [sys.executable, "-m", "meterline.cli"]
STALL_S = 60  # a worker that makes no progress for this long fails the test


def _run(*args: str, env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_kafka_unreachable_is_one_line_for_every_kafka_command() -> None:
    """Before: load-raw retried for ever printing librdkafka errors, worker and
    load-rollups ended in a traceback after 30 s. Now: one line naming the address, exit 2,
    as soon as librdkafka gives up on the broker."""
    [port] = free_ports(1)  # nothing listens there
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": address}
    commands = [["load-raw"], ["worker"], ["load-rollups"], ["anomalies"], ["serve", "--kafka"],
                ["topics", "create"]]
    procs = [subprocess.Popen([*CLI, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for c in commands]
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (command, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (command, err)
        assert lines[0].startswith(f"error: cannot reach Kafka at {address}: "), (command, err)
        assert "Traceback" not in err + out


def test_demo_refuses_counts_below_one(tmp_path: Path) -> None:
    cases = [(["--events", "-5"], "argument --events: must be at least 1, got -5"),
             (["--customers", "0"], "argument --customers: must be at least 1, got 0"),
             (["--events", "ten"], "argument --events: 'ten' is not a whole number")]
    procs = [subprocess.Popen([*CLI, "demo", *args, "--no-progress", "--workdir",
                               str(tmp_path / "demo")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for (args, message), proc in zip(cases, procs, strict=True):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, args
        assert message in err, err
    assert not (tmp_path / "demo").exists()  # refused before anything was made


def _admin(broker: KafkaBroker) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": broker.bootstrap})


def _topic_settings(broker: KafkaBroker, name: str) -> tuple[int, str, str]:
    """(partitions, timestamp type, retention.ms) as the broker reports them."""
    from confluent_kafka.admin import ConfigResource

    admin = _admin(broker)
    meta = admin.list_topics(name, timeout=30)
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    config = admin.describe_configs([resource])[resource].result(30)
    return (len(meta.topics[name].partitions), config["message.timestamp.type"].value,
            config["retention.ms"].value)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_topics_create_then_check_and_refuse(kafka_broker: KafkaBroker,
                                             tmp_path: Path) -> None:
    topic = f"ops-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "meterline.toml"
    config.write_text("[server]\ntopic_partitions = 3\ntopic_retention_ms = 86400000\n")
    env = {"METERLINE_KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "METERLINE_TOPIC": topic}
    made = _run("topics", "create", "--config", str(config), env=env)
    assert made.returncode == 0, made.stderr
    names = [topic, f"{topic}.rollups", f"{topic}.dead-letters", f"{topic}.late-events"]
    assert sorted(line.split()[1] for line in made.stdout.splitlines()) == sorted(names)
    for name in names:  # what the broker holds, asked independently of the command
        assert _topic_settings(kafka_broker, name) == (3, "LogAppendTime", "86400000")

    again = _run("topics", "create", "--config", str(config), env=env)
    assert again.returncode == 0, again.stderr
    assert all(line.startswith("exists ") for line in again.stdout.splitlines()), again.stdout

    # A --partitions flag that contradicts the existing topics: refused, nothing changed.
    other = _run("topics", "create", "--partitions", "5", "--config", str(config), env=env)
    assert other.returncode == 2
    assert f"topic {topic!r} has 3 partitions, not 5" in other.stderr
    assert _topic_settings(kafka_broker, topic)[0] == 3


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_createtime_usage_topic_is_refused_by_topics_and_worker(
        kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    topic = kafka_broker.create_topic(f"ct-{uuid.uuid4().hex[:8]}", 2)  # CreateTime
    env = {"METERLINE_KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "METERLINE_TOPIC": topic}
    refused = _run("topics", "create", "--partitions", "2", env=env)
    assert refused.returncode == 2, refused.stdout
    assert (f"topic {topic!r} has message.timestamp.type=CreateTime, not LogAppendTime"
            in refused.stderr)
    assert "--add-config message.timestamp.type=LogAppendTime" in refused.stderr
    meta = _admin(kafka_broker).list_topics(timeout=30)
    assert f"{topic}.rollups" not in meta.topics  # nothing created beside a refused topic

    worker = _run("worker", env=env)
    assert worker.returncode == 2
    [line] = worker.stderr.strip().splitlines()[-1:]
    assert "has message.timestamp.type=CreateTime, not LogAppendTime" in line

    missing = _run("worker", env={**env, "METERLINE_TOPIC": f"{topic}-missing"})
    assert missing.returncode == 2
    assert "not found" in missing.stderr and "meterline topics create" in missing.stderr


def _lag(bootstrap: str, topic: str, group: str) -> int:
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    try:
        [tp] = c.committed([TopicPartition(topic, 0)], timeout=10)
        _, high = c.get_watermark_offsets(tp, timeout=10)
        return high - max(tp.offset, 0)
    except KafkaException:
        return -1
    finally:
        c.close()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_worker_is_quiet_by_default(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    """Before: Faust's banner-less INFO lines and the periodic checkpoint logs on every
    run. Now nothing below WARNING without -v (tests/aggregators/test_worker_routing.py
    runs it with -v)."""
    from meterline.sdk import Emitter, EmitterConfig

    topic = f"quiet-{uuid.uuid4().hex[:8]}"
    group = f"{topic}-rollups"
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
           "METERLINE_TOPIC": topic, "METERLINE_ROLLUP_GROUP": group,
           "METERLINE_CHECKPOINT_INTERVAL_S": "0.5",
           "METERLINE_FAUST_DATADIR": str(tmp_path / "faust")}
    made = _run("topics", "create", "--partitions", "1", env=env)
    assert made.returncode == 0, made.stderr
    with Emitter(EmitterConfig(bootstrap_servers=kafka_broker.bootstrap, topic=topic,
                               spool_dir=tmp_path / "spool")) as emitter:
        for i in range(10):
            emitter.emit("acme", "api_calls", 1, dimensions={"endpoint": f"/{i}"})
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([*CLI, "worker"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        best, since = None, time.monotonic()
        while (lag := _lag(kafka_broker.bootstrap, topic, group)) != 0:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            if lag >= 0 and (best is None or lag < best):
                best, since = lag, time.monotonic()
            assert time.monotonic() - since < STALL_S, f"no progress for {STALL_S}s"
            time.sleep(0.5)
        time.sleep(2)  # a few checkpoint intervals: their log lines would be here by now
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(60)
    text = log_path.read_text()
    assert " INFO " not in text and "[^Worker]" not in text, text[:3000]
