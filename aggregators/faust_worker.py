"""`meterline worker`: the rollup stage as a faust-streaming app.

Faust does what it is good at - group membership, partition assignment, fetching,
signals, a worker process with clean shutdown - and nothing else. Everything that decides
a number lives in :class:`~meterline.aggregators.runner.RollupWorker`; this module is the
adapter, and it leans on Faust in three pinned ways (``tests/aggregators/test_faust_probe.py``):

- **Records, not events.** A Kafka record is a whole envelope (hundreds of events), so
  Faust's per-message cost (tens of µs) is paid once per batch.
- **Manual acks.** The agent iterates ``stream.noack()`` and acks a record only once a
  saved checkpoint covers it, so Faust's committed offset never runs ahead of a
  checkpoint. Faust's own ``exactly_once`` (Kafka transactions through aiokafka, with
  open duplicate reports) is not used: correctness comes from deterministic replay and
  idempotent outputs, which no commit protocol can break.
- **Seek on assignment.** After a rebalance the partition resumes at its checkpoint's
  ``next_offset``, wherever the committed offset is. Faust seeks to committed offsets in
  ``perform_seek`` *after* its assignment signals, so we wrap ``perform_seek``.

Blocking work (writing a flush to Kafka, saving checkpoints, loading them) runs in a
thread so the event loop keeps heartbeating; one lock keeps it from overlapping the agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meterline.aggregators.checkpoints import KafkaCheckpointStore
from meterline.aggregators.outputs_io import KafkaOutputWriter, output_topics
from meterline.aggregators.processor import RollupSettings
from meterline.aggregators.runner import RollupWorker, TopicPartition
from meterline.core.meters import MeterRegistry
from meterline.ingest.sources import SourceRecord

__all__ = ["WorkerSettings", "build_app", "ensure_topics", "run_worker"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    bootstrap_servers: str
    topic: str
    group: str = "meterline-rollups"
    flush_interval_s: float = 0.5  # freshness: how often changed windows are written
    checkpoint_interval_s: float = 5.0  # replay after a crash is at most about this long
    rollup: RollupSettings = RollupSettings()

    @property
    def checkpoint_topic(self) -> str:
        return f"{self.topic}.checkpoints"


def ensure_topics(settings: WorkerSettings, timeout_s: float = 30.0) -> None:
    """Create the output and checkpoint topics if missing (same partition count as the
    usage topic, so per-partition order carries over)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    meta = admin.list_topics(settings.topic, timeout=timeout_s)
    usage = meta.topics.get(settings.topic)
    if usage is None or usage.error is not None or not usage.partitions:
        raise RuntimeError(f"usage topic {settings.topic!r} not found on "
                           f"{settings.bootstrap_servers}")
    n = len(usage.partitions)
    new = [NewTopic(t, n, 1) for t in output_topics(settings.topic).values()]
    for fut in admin.create_topics(new, request_timeout=timeout_s).values():
        try:
            fut.result(timeout_s)
        except Exception as exc:  # already there is the normal case
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    KafkaCheckpointStore(settings.bootstrap_servers, settings.checkpoint_topic).ensure_topic()


def build_app(settings: WorkerSettings, registry: MeterRegistry) -> Any:
    import faust

    app: Any = faust.App(
        settings.group,  # the app id is the consumer group
        broker=f"kafka://{settings.bootstrap_servers}",
        store="memory://",
        datadir=os.environ.get("METERLINE_FAUST_DATADIR", f"/tmp/meterline-faust-{os.getpid()}"),
        web_enabled=False,
        autodiscover=False,
        topic_disable_leader=True,  # no "<id>-__assignor-__leader" topic
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=30.0,
        broker_commit_interval=1.0,
        stream_wait_empty=False,  # unacked records must not block a rebalance
        consumer_max_fetch_size=16 << 20,
    )
    worker = RollupWorker(
        registry,
        KafkaOutputWriter(settings.bootstrap_servers, settings.topic),
        KafkaCheckpointStore(settings.bootstrap_servers, settings.checkpoint_topic),
        group=settings.group, settings=settings.rollup,
        flush_interval_s=settings.flush_interval_s,
        checkpoint_interval_s=settings.checkpoint_interval_s,
    )
    app.meterline_worker = worker
    lock = asyncio.Lock()
    unacked: dict[TopicPartition, deque[Any]] = {}
    streams: list[Any] = []
    topic = app.topic(settings.topic, key_serializer="raw", value_serializer="raw")

    async def ack_through(offsets: Mapping[TopicPartition, int]) -> None:
        if not streams:
            return
        for tp, next_offset in offsets.items():
            queue = unacked.get(tp)
            while queue and queue[0].message.offset < next_offset:
                await streams[0].ack(queue.popleft())

    async def flush(*, checkpoint: bool, only: list[TopicPartition] | None = None) -> None:
        loop = asyncio.get_running_loop()
        try:
            offsets = await loop.run_in_executor(
                None, lambda: worker.flush(checkpoint=checkpoint, only=only))
        except Exception:
            # Outputs or checkpoint could not be written (e.g. the broker is away longer
            # than the producer's timeout): the records were put back, nothing was acked;
            # the next flush retries.
            log.exception("flush failed; retrying at the next interval")
            return
        await ack_through(offsets)

    def process(record: SourceRecord) -> None:
        try:
            worker.process(record)
        except Exception:
            # A bug, not bad input (bad input becomes dead letters). The partition's state
            # may hold part of this record, so it must never be flushed or checkpointed:
            # exit now and let the restart replay from the last checkpoint.
            log.critical("unexpected error processing %s[%d]@%d; exiting without flushing",
                         record.topic, record.partition, record.offset, exc_info=True)
            logging.shutdown()
            os._exit(70)

    @app.agent(topic)
    async def rollups(stream: Any) -> None:
        streams[:] = [stream]
        async for event in stream.noack().events():
            m = event.message
            ts = m.timestamp
            record = SourceRecord(m.topic, m.partition, m.offset, event.value or b"",
                                  round(ts * 1000) if ts else -1)
            async with lock:
                process(record)
                tp = TopicPartition(m.topic, m.partition)
                if tp in worker.processors:
                    unacked.setdefault(tp, deque()).append(event)
                flush_due, checkpoint_due = worker.due()
                if flush_due or checkpoint_due:
                    await flush(checkpoint=checkpoint_due)

    @app.timer(interval=settings.flush_interval_s)
    async def flush_when_idle() -> None:
        # Without new records the agent loop does not run, yet the last changes must
        # still reach ClickHouse within the freshness budget.
        async with lock:
            flush_due, checkpoint_due = worker.due()
            if flush_due or checkpoint_due:
                await flush(checkpoint=checkpoint_due)

    @app.on_partitions_revoked.connect
    async def on_revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
        gone = [TopicPartition(tp.topic, tp.partition) for tp in revoked]
        async with lock:
            mine = [tp for tp in gone if tp in worker.processors]
            if mine:
                await flush(checkpoint=True, only=mine)
                worker.drop(mine)
            for tp in gone:
                unacked.pop(tp, None)

    original_seek = app.consumer.perform_seek

    async def perform_seek() -> None:
        await original_seek()
        consumer = app.consumer
        assigned = {tp for tp in consumer.assignment() if tp.topic == settings.topic}
        wanted = {TopicPartition(tp.topic, tp.partition): tp for tp in assigned}
        async with lock:
            stale = [tp for tp in worker.processors if tp not in wanted]
            worker.drop(stale)
            for tp in stale:
                unacked.pop(tp, None)
            loop = asyncio.get_running_loop()
            positions = await loop.run_in_executor(None, worker.assign, list(wanted))
        targets = {wanted[tp]: off for tp, off in positions.items() if off is not None}
        if targets:
            await consumer.seek_wait(targets)
            # Faust commits only acked offsets that continue its idea of the committed
            # offset; rebase it so commits resume from the checkpoint.
            consumer._committed_offset.update(targets)

    @app.on_before_shutdown.connect
    async def final_flush(app: Any, **kwargs: Any) -> None:
        async with lock:
            if worker.processors:
                await flush(checkpoint=True)

    app.consumer.perform_seek = perform_seek
    return app


def run_worker(config: Any) -> None:
    """Blocking: run the worker until SIGTERM/SIGINT."""
    import faust

    r = config.rollups
    settings = WorkerSettings(
        config.kafka.bootstrap_servers, config.kafka.topic, r.group_id, r.flush_interval_s,
        r.checkpoint_interval_s,
        RollupSettings(r.allowed_lateness_ms, r.watermark_delay_ms, r.dedupe_horizon_ms))
    ensure_topics(settings)
    app = build_app(settings, config.registry())
    port = os.environ.get("METERLINE_METRICS_PORT")
    if port:
        from meterline.aggregators.metrics import serve_metrics

        serve_metrics(app.meterline_worker, int(port))
    faust.Worker(app, loglevel="INFO", quiet=True).execute_from_commandline()
