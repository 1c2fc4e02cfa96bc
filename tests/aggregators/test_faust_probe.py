"""Pins the faust-streaming behaviour the rollup workers rely on, against a real broker.

One in-process Faust app per phase (no CLI, no web server, no internal topics):

1. an agent over ``stream.noack().events()`` gets raw ``bytes`` values, the partition and
   offset, and the record timestamp as float *seconds* (``round(ts * 1000)`` gives back
   the integer milliseconds exactly);
2. with manual acks, the committed offset is the end of the acked prefix;
3. positions chosen at assignment (one partition rewound before its committed offset,
   one moved past it) stick only when applied *after* Faust's own seek to the committed
   offsets (``Consumer.perform_seek``), and commits move on from there.

If a Faust upgrade breaks one of these, the rollup worker's assumptions need a look.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from meterline.testing.kafka import KafkaBroker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

faust = pytest.importorskip("faust")

PARTITIONS = 4
PER_PARTITION = 10


def make_app(group: str, bootstrap: str, datadir: Path) -> Any:
    return faust.App(
        group,  # the app id is the consumer group
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(datadir),  # Faust creates <datadir> (not its parents); default: ./<id>-data
        web_enabled=False,
        autodiscover=False,
        topic_disable_leader=True,  # else it creates "<id>-__assignor-__leader"
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=0.5,
        broker_rebalance_timeout=10.0,
        broker_commit_interval=0.5,
        # True would make stop() (and every rebalance) wait forever for unacked messages.
        stream_wait_empty=False,
    )


def seek_after_committed(app: Any, positions: Callable[[set[Any]], Mapping[Any, int]]) -> None:
    """Make ``positions(assigned)`` win over Faust's seek to the committed offsets.

    Faust's recovery calls ``consumer.perform_seek()`` *after* the on_partitions_assigned
    and on_rebalance_complete signals, so a seek made in those hooks is overwritten. Wrap
    perform_seek instead; ``seek_wait`` runs in the consumer thread and resets Faust's read
    offsets. Rebasing ``_committed_offset`` matters for a forward seek: Faust only commits
    acked offsets that continue its notion of the committed offset, so it would otherwise
    never commit that partition again.
    """
    consumer = app.consumer
    original = consumer.perform_seek

    async def perform_seek() -> None:
        await original()
        targets = dict(positions(consumer.assignment()))
        if targets:
            await consumer.seek_wait(targets)
            consumer._committed_offset.update(targets)

    consumer.perform_seek = perform_seek


async def consume(
    app: Any,
    topic_name: str,
    expected: int,
    ack: Callable[[int], bool],
    before_start: Callable[[Any], None] | None = None,
) -> list[tuple[int, int, float, bytes]]:
    """Run ``app`` until its agent has seen ``expected`` messages, then stop it."""
    received: list[tuple[int, int, float, bytes]] = []
    done = asyncio.Event()
    topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw")

    @app.agent(topic)
    async def agent(stream: Any) -> None:
        async for event in stream.noack().events():
            message = event.message
            received.append((message.partition, message.offset, message.timestamp, event.value))
            if ack(message.offset):
                await stream.ack(event)
            if len(received) >= expected:
                done.set()

    if before_start is not None:
        before_start(app)
    await app.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=30)
        await asyncio.sleep(0.2)  # would-be extra deliveries show up in `received`
    finally:
        await asyncio.wait_for(app.stop(), timeout=30)  # commits the acked prefix
    return received


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)],
                                 timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


def test_faust_raw_events_manual_ack_and_seek_on_assign(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    from confluent_kafka import Producer

    topic = kafka_broker.create_topic(f"faust-probe-{uuid.uuid4().hex[:8]}", PARTITIONS)
    group = f"faust-probe-{uuid.uuid4().hex[:8]}"
    bootstrap = kafka_broker.bootstrap
    # Recent, odd millisecond timestamps: the broker's 24 h retention would delete old ones.
    base_ms = time.time_ns() // 1_000_000 - 3_600_000
    expected_ts: dict[tuple[int, int], int] = {}
    producer = Producer({"bootstrap.servers": bootstrap})
    for partition in range(PARTITIONS):
        for offset in range(PER_PARTITION):
            ts_ms = base_ms + partition * 1000 + offset * 7 + 1
            expected_ts[(partition, offset)] = ts_ms
            producer.produce(topic, f"{partition}:{offset}".encode(), key=b"k",
                             partition=partition, timestamp=ts_ms)
    assert producer.flush(10) == 0

    # Phase 1: everything is delivered; only offsets < 5 are acked.
    got = asyncio.run(consume(make_app(group, bootstrap, tmp_path / "one"), topic,
                              expected=PARTITIONS * PER_PARTITION, ack=lambda off: off < 5))
    assert len(got) == PARTITIONS * PER_PARTITION
    for partition, offset, ts, value in got:
        assert value == f"{partition}:{offset}".encode()  # raw bytes, untouched
        assert isinstance(ts, float)  # seconds
        assert round(ts * 1000) == expected_ts[(partition, offset)]
    assert committed(bootstrap, group, topic) == {p: 5 for p in range(PARTITIONS)}

    # Phase 2: same group; partition 0 rewound to 2 (< committed 5), partition 1 moved to
    # 8 (> committed), the others resume at 5. Everything is acked.
    targets = {0: 2, 1: 8}

    def positions(assigned: set[Any]) -> dict[Any, int]:
        return {tp: targets[tp.partition] for tp in assigned
                if tp.topic == topic and tp.partition in targets}

    got = asyncio.run(consume(
        make_app(group, bootstrap, tmp_path / "two"), topic,
        expected=(10 - 2) + (10 - 8) + 5 + 5, ack=lambda off: True,
        before_start=lambda app: seek_after_committed(app, positions),
    ))
    offsets: dict[int, list[int]] = {}
    for partition, offset, _ts, _value in got:
        offsets.setdefault(partition, []).append(offset)
    assert {p: sorted(o) for p, o in offsets.items()} == {
        0: list(range(2, 10)),
        1: [8, 9],
        2: list(range(5, 10)),
        3: list(range(5, 10)),
    }
    assert committed(bootstrap, group, topic) == {p: 10 for p in range(PARTITIONS)}
