"""`meterline anomalies` on a real broker, SIGKILLed twice while it works and restarted:
every episode event reaches ``<topic>.anomalies``, none is lost, and every copy of a key
is identical (a replay writes the same event again; consumers dedupe on the key).

Input: rollup rows as the rollup worker writes them (growing versions, late updates,
replayed records), produced to ``<topic>.rollups`` keyed by source partition. The truth is
an uninterrupted in-process ``RollupFeed`` over the same records (the feed itself is
checked against one plain detector per series over the final totals in
tests/core/anomaly/test_anomaly_feed.py). Kills follow the stage's checkpointed progress,
not wall time; waits fail only when their measure stops moving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from meterline.anomaly_demo import rollup_rows, synthetic_usage
from meterline.core.anomaly import AnomalySettings
from meterline.core.anomaly.feed import FeedSettings, RollupFeed
from meterline.core.outputs import RollupRecord
from meterline.testing.kafka import KafkaBroker

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

PARTITIONS = 3
GROUP = "meterline-anomalies-kill9"
STALL_S = 120.0
SETTINGS = AnomalySettings(min_abs_deviation=20)


def _records() -> list[list[RollupRecord]]:
    usage = synthetic_usage(16, 15, seed=21)
    for i, key in enumerate(sorted(usage)[:6]):
        h = 9 * 24 + 10 + 19 * i
        usage[key][h] = usage[key][h] * 30 + 1500
    return list(rollup_rows(usage, partitions=5, replay_every=11))


def _done(bootstrap: str, topic: str) -> int:
    """Records of the rollups topic covered by the stage's saved checkpoints (-1: the
    broker cannot say yet)."""
    from meterline.aggregators.checkpoints import KafkaCheckpointStore, checkpoint_key

    store = KafkaCheckpointStore(bootstrap, f"{topic}.anomaly-checkpoints", timeout_s=10)
    try:
        keys = [checkpoint_key(GROUP, f"{topic}.rollups", p) for p in range(PARTITIONS)]
        blobs = store.load(keys)
        return sum(json.loads(zlib.decompress(b))["next_offset"] for b in blobs.values())
    except Exception:
        return -1
    finally:
        store.close()


def _wait(measure: Callable[[], int], done: Callable[[int], bool], what: str,
          alive: Callable[[], None]) -> None:
    last, moved = None, time.monotonic()
    while True:
        value = measure()
        if done(value):
            return
        alive()
        if value != last:
            last, moved = value, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            raise AssertionError(f"{what}: no progress for {STALL_S:.0f}s (at {value})")
        time.sleep(0.5)


def _read_all(bootstrap: str, topic: str) -> list[tuple[bytes, bytes]]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "kill9-reader",
                  "enable.auto.commit": False})
    out: list[tuple[bytes, bytes]] = []
    try:
        for p in range(PARTITIONS):
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if not high:
                continue
            c.assign([TopicPartition(topic, p, 0)])
            got = 0
            while got < high:
                for msg in c.consume(500, 2.0):
                    if msg.error() is None:
                        out.append((msg.key(), msg.value()))
                        got = msg.offset() + 1
    finally:
        c.close()
    return out


def test_kill9_neither_loses_nor_changes_an_episode_event(tmp_path: Path) -> None:
    from confluent_kafka import Producer

    records = _records()
    feed = RollupFeed(SETTINGS, FeedSettings(early_warning=False))
    want = {e.key: e.to_dict() for r in records for e in feed.apply(r).events}
    assert sum(1 for v in want.values() if v["kind"] == "open") >= 4

    broker = KafkaBroker(tmp_path / "kafka", partitions=PARTITIONS)
    broker.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        topic = "usage"
        broker.create_topic(f"{topic}.rollups", partitions=PARTITIONS)
        producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})

        def produce(part: list[list[RollupRecord]]) -> None:
            for rec in part:  # keyed like KafkaOutputWriter: one source partition per key
                producer.produce(f"{topic}.rollups",
                                 orjson.dumps({"rollups": [r.to_dict() for r in rec]}),
                                 f"{rec[0].source}/{rec[0].partition}".encode())
                producer.poll(0)
            assert producer.flush(60) == 0

        half = len(records) // 2
        produce(records[:half])
        settings = tmp_path / "anomalies.toml"
        settings.write_text(f'[detector]\nmin_abs_deviation = 20\n[stage]\ngroup_id = "{GROUP}"\n'
                            "early_warning = false\nflush_interval_s = 0.2\n"
                            "checkpoint_interval_s = 0.5\n")
        env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": broker.bootstrap,
               "METERLINE_TOPIC": topic}

        def start(n: int) -> None:
            log = open(tmp_path / f"anomalies-{n}.log", "wb")  # noqa: SIM115
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "meterline.cli", "anomalies", "--settings",
                 str(settings)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**env, "METERLINE_FAUST_DATADIR": str(tmp_path / f"faust-{n}")}))

        def alive() -> None:
            assert procs[-1].poll() is None, f"exited: see {tmp_path}/anomalies-*.log"

        def kill9() -> None:
            os.killpg(procs[-1].pid, signal.SIGKILL)
            procs[-1].wait(30)

        def measure() -> int:
            return _done(broker.bootstrap, topic)

        start(1)
        _wait(measure, lambda n: n >= half // 2, "first quarter", alive)
        kill9()
        produce(records[half:])
        start(2)
        _wait(measure, lambda n: n >= half + (len(records) - half) // 3, "second kill", alive)
        kill9()
        start(3)
        _wait(measure, lambda n: n >= len(records), "all records", alive)
        os.killpg(procs[-1].pid, signal.SIGTERM)
        procs[-1].wait(60)
        got: dict[str, Any] = {}
        copies = 0
        for key, value in _read_all(broker.bootstrap, f"{topic}.anomalies"):
            doc = orjson.loads(value)
            assert key.decode() == doc["key"]
            assert got.setdefault(doc["key"], doc) == doc, f"two versions of {doc['key']}"
            copies += 1
        assert got == want  # nothing lost, nothing invented, every copy identical
        print(f"{len(want)} events, {copies} copies written across 2 kills")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        broker.stop(timeout_s=15)
