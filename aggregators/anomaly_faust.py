"""`meterline anomalies`: the anomaly stage as its own faust-streaming app.

**Why a separate command and not inside the rollup worker.** The detector state is ~1.6 KB
per series; the rollup checkpoint is one blob per partition rewritten every 5 s, so a
million series would add gigabytes to every rollup checkpoint. Billing totals must not wait
for (or crash with) a detector, anomaly detection can be switched off, scaled or restarted
on its own, and its checkpoints can be rarer (state changes when windows close, hourly).
And the rollup stage's windows are closed per source partition by its watermark, which
its rows let the feed reproduce exactly (``meterline.core.anomaly.feed``). The price: a
second consumer group reading ``<topic>.rollups`` (small: rows, not events).

The adapter follows ``faust_worker.py`` and uses only Faust's public hooks: partitions get
their state in ``on_partitions_assigned`` (sent while they are paused), the agent iterates
``stream.noack()`` and acks a record only once a saved checkpoint covers it, gaps are
settled against the log and repaired with ``Consumer.seek`` after ``SEEK_SETTLE_S``, and a
partition quiet for ``STALL_S`` while behind its log end is sought back to its position.
Blocking work (writes, checkpoints, log probes) runs in a thread under one lock.

``meterline anomalies --load`` is the loader from ``<topic>.anomalies`` into the table.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterline.aggregators.anomaly_config import AnomalyStageConfig, load_anomaly_config
from meterline.aggregators.anomaly_io import (
    KafkaEventWriter,
    anomalies_topic,
    rollups_topic,
)
from meterline.aggregators.anomaly_stage import AnomalyWorker, EventWriter
from meterline.aggregators.checkpoints import KafkaCheckpointStore
from meterline.aggregators.log_probe import KafkaLogProbe
from meterline.aggregators.runner import LogGapError, TopicPartition
from meterline.core.anomaly.feed import FeedSettings
from meterline.core.anomaly.model import EpisodeEvent
from meterline.core.anomaly.settings import AnomalySettings
from meterline.ingest.sources import SourceRecord
from meterline.logs import where

__all__ = ["AnomalyAppSettings", "build_app", "ensure_topics", "run_anomalies",
           "run_anomaly_loader"]

log = logging.getLogger(__name__)

SEEK_SETTLE_S = 0.05  # see faust_worker.SEEK_SETTLE_S
STALL_S = 3.0  # see faust_worker.STALL_S


@dataclass(frozen=True)
class AnomalyAppSettings:
    bootstrap_servers: str
    usage_topic: str
    group: str = "meterline-anomalies"
    flush_interval_s: float = 1.0
    checkpoint_interval_s: float = 30.0

    @property
    def source_topic(self) -> str:
        return rollups_topic(self.usage_topic)

    @property
    def checkpoint_topic(self) -> str:
        return f"{self.usage_topic}.anomaly-checkpoints"


def ensure_topics(settings: AnomalyAppSettings, timeout_s: float = 30.0) -> None:
    """Create ``<topic>.anomalies`` (as many partitions as the rollups topic) and the
    compacted checkpoint topic if missing. The rollups topic must exist (the rollup
    worker creates it)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    meta = admin.list_topics(settings.source_topic, timeout=timeout_s)
    found = meta.topics.get(settings.source_topic)
    if found is None or found.error is not None or not found.partitions:
        raise RuntimeError(f"rollups topic {settings.source_topic!r} not found on "
                           f"{settings.bootstrap_servers}: start `meterline worker` first")
    new = [NewTopic(anomalies_topic(settings.usage_topic), len(found.partitions), 1)]
    for fut in admin.create_topics(new, request_timeout=timeout_s).values():
        try:
            fut.result(timeout_s)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    KafkaCheckpointStore(settings.bootstrap_servers, settings.checkpoint_topic).ensure_topic()


def build_app(settings: AnomalyAppSettings, detector: AnomalySettings, feed: FeedSettings,
              writer: EventWriter, *, on_written: Any = None) -> Any:
    import faust
    from faust.types import TP as FaustTP

    datadir = os.environ.get("METERLINE_FAUST_DATADIR",
                             f"/tmp/meterline-anomalies-faust-{os.getpid()}")
    app: Any = faust.App(
        settings.group, broker=f"kafka://{settings.bootstrap_servers}", store="memory://",
        datadir=datadir, web_enabled=False, autodiscover=False, topic_disable_leader=True,
        topic_allow_declare=False, consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0, broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=30.0, broker_commit_interval=1.0, stream_wait_empty=False,
    )
    probe = KafkaLogProbe(settings.bootstrap_servers)
    worker = AnomalyWorker(
        detector, feed, writer,
        KafkaCheckpointStore(settings.bootstrap_servers, settings.checkpoint_topic),
        group=settings.group, probe=probe, flush_interval_s=settings.flush_interval_s,
        checkpoint_interval_s=settings.checkpoint_interval_s, on_written=on_written)
    app.meterline_worker = worker
    lock = asyncio.Lock()
    unacked: dict[TopicPartition, deque[Any]] = {}
    seeks: dict[TopicPartition, asyncio.Future[None]] = {}
    delivered: dict[TopicPartition, float] = {}
    next_stall_check = [0.0]
    streams: list[Any] = []
    topic = app.topic(settings.source_topic, key_serializer="raw", value_serializer="raw")

    def fatal(code: int, message: str, *args: Any, record: SourceRecord | None = None) -> None:
        context = {} if record is None else where(record.topic, record.partition, record.offset)
        log.critical(message, *args, exc_info=True, extra=context)
        logging.shutdown()
        os._exit(code)

    async def ack_through(offsets: Mapping[TopicPartition, int]) -> None:
        if not streams:
            return
        acked = False
        for tp, next_offset in offsets.items():
            queue = unacked.get(tp)
            while queue and queue[0].message.offset < next_offset:
                await streams[0].ack(queue.popleft())
                acked = True
        if acked:
            try:
                await app.consumer.commit()
            except Exception:
                log.warning("offset commit failed; retrying after the next checkpoint",
                            exc_info=True)

    async def flush(*, checkpoint: bool, only: list[TopicPartition] | None = None,
                    ack: bool = True) -> None:
        loop = asyncio.get_running_loop()
        try:
            offsets = await loop.run_in_executor(
                None, lambda: worker.flush(checkpoint=checkpoint, only=only))
        except Exception:
            log.exception("anomaly flush failed; retrying at the next interval")
            return
        if ack:
            await ack_through(offsets)

    def request_seek(tp: TopicPartition) -> None:
        task = seeks.get(tp)
        if task is None or task.done():
            seeks[tp] = asyncio.ensure_future(seek_later(tp))

    async def seek_later(tp: TopicPartition) -> None:
        await asyncio.sleep(SEEK_SETTLE_S)
        async with lock:
            proc = worker.processors.get(tp)
            if proc is None:
                return
            try:
                await app.consumer.seek(FaustTP(tp.topic, tp.partition), proc.next_offset)
            except Exception:
                log.warning("seek of %s[%d] to %d failed", tp.topic, tp.partition,
                            proc.next_offset, exc_info=True)

    async def handle(event: Any, record: SourceRecord) -> None:
        try:
            gap = worker.process(record)
            while gap is not None:
                loop = asyncio.get_running_loop()
                target = await loop.run_in_executor(None, worker.resolve_gap, gap)
                if target is not None:
                    request_seek(gap.tp)
                    return
                gap = worker.process(record)
        except LogGapError as exc:
            fatal(78, "%s", exc, record=record)
        except Exception:
            fatal(70, "unexpected error processing %s[%d]@%d; exiting without flushing",
                  record.topic, record.partition, record.offset, record=record)
        if worker.owns(record):
            unacked.setdefault(TopicPartition(record.topic, record.partition),
                               deque()).append(event)

    @app.agent(topic)
    async def anomalies(stream: Any) -> None:
        streams[:] = [stream]
        async for event in stream.noack().events():
            m = event.message
            record = SourceRecord(m.topic, m.partition, m.offset, event.value or b"")
            delivered[TopicPartition(m.topic, m.partition)] = time.monotonic()
            async with lock:
                await handle(event, record)
                flush_due, checkpoint_due = worker.due()
                if flush_due or checkpoint_due:
                    await flush(checkpoint=checkpoint_due)

    @app.timer(interval=settings.flush_interval_s)
    async def flush_when_idle() -> None:
        async with lock:
            flush_due, checkpoint_due = worker.due()
            if flush_due or checkpoint_due:
                await flush(checkpoint=checkpoint_due)
        await check_stalled()

    async def check_stalled() -> None:
        now = time.monotonic()
        if now < next_stall_check[0]:
            return
        next_stall_check[0] = now + STALL_S / 2
        quiet = [tp for tp in list(worker.processors)
                 if now - delivered.setdefault(tp, now) >= STALL_S]
        if not quiet:
            return
        loop = asyncio.get_running_loop()
        try:
            ends = await loop.run_in_executor(None, lambda: {tp: probe.end_offset(tp)
                                                             for tp in quiet})
        except Exception:
            log.warning("could not read log ends for the stall check", exc_info=True)
            return
        for tp, end in ends.items():
            proc = worker.processors.get(tp)
            if proc is not None and proc.next_offset < end:
                delivered[tp] = now
                request_seek(tp)

    @app.on_partitions_revoked.connect
    async def on_revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
        gone = [TopicPartition(tp.topic, tp.partition) for tp in revoked]
        async with lock:
            mine = [tp for tp in gone if tp in worker.processors]
            if mine:
                await flush(checkpoint=True, only=mine, ack=False)
                worker.drop(mine)
            for tp in gone:
                unacked.pop(tp, None)
                delivered.pop(tp, None)

    @app.on_partitions_assigned.connect
    async def on_assigned(app: Any, assigned: Any, **kwargs: Any) -> None:
        wanted = {TopicPartition(tp.topic, tp.partition) for tp in assigned
                  if tp.topic == settings.source_topic}
        async with lock:
            stale = [tp for tp in worker.processors if tp not in wanted]
            if stale:
                worker.drop(stale)
                for tp in stale:
                    unacked.pop(tp, None)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, lambda: worker.assign(sorted(wanted)))
            except Exception:
                fatal(70, "could not restore the anomaly checkpoints")

    @app.on_before_shutdown.connect
    async def final_flush(app: Any, **kwargs: Any) -> None:
        async with lock:
            if worker.processors:
                await flush(checkpoint=True)

    return app


def _known_meters(config: Any) -> set[str]:
    return set(config.registry().names)


def run_anomalies(config: Any, settings_path: Path | None = None) -> None:
    """Blocking: run the anomaly agent until SIGTERM/SIGINT."""
    import faust

    stage: AnomalyStageConfig = load_anomaly_config(settings_path,
                                                    known_meters=_known_meters(config))
    settings = AnomalyAppSettings(config.kafka.bootstrap_servers, config.kafka.topic,
                                  stage.stage.group_id, stage.stage.flush_interval_s,
                                  stage.stage.checkpoint_interval_s)
    ensure_topics(settings)
    sender = None
    on_written = None
    if stage.webhook is not None:
        from meterline.alerts.webhook import SqliteDeadLetters, WebhookSender

        sender = WebhookSender(stage.webhook,
                               dead_letters=SqliteDeadLetters(stage.dead_letters))

        def on_written(events: list[EpisodeEvent]) -> None:
            sender.submit(events)

    writer = KafkaEventWriter(config.kafka.bootstrap_servers, config.kafka.topic)
    app = build_app(settings, stage.detector, stage.feed_settings(config.rollups), writer,
                    on_written=on_written)
    from meterline.ingest.metrics import metrics_endpoint, serve

    endpoint = metrics_endpoint()
    if endpoint is not None:
        from meterline.aggregators.anomaly_metrics import AnomalyCollector

        serve([AnomalyCollector(app.meterline_worker, sender)], endpoint)
    try:
        # Quiet by default (issue 11): Faust's INFO lines only with `meterline -v`.
        level = "INFO" if logging.getLogger().getEffectiveLevel() <= logging.INFO else "WARNING"
        faust.Worker(app, loglevel=level, quiet=True).execute_from_commandline()
    finally:
        if sender is not None:
            sender.close()


def run_anomaly_loader(config: Any, *, until_idle_s: float | None = None) -> int:
    """`meterline anomalies --load`: ``<topic>.anomalies`` -> the anomalies table."""
    from meterline.aggregators.anomaly_io import AnomalyLoader
    from meterline.ingest.sources import KafkaSource
    from meterline.sinks.schema import migrate
    from meterline.sinks.storage import open_storage

    storage = open_storage(config.storage_config())
    source = KafkaSource(config.kafka.bootstrap_servers, anomalies_topic(config.kafka.topic),
                         f"{config.kafka.group_id}-anomaly-loader")
    try:
        migrate(storage, storage.database, config.retention_policy())
        loader = AnomalyLoader(storage, source)
        rows = loader.run(until_idle_s=until_idle_s)
        print(f"loaded {rows} anomaly events from {loader.records} records"
              + (f"; {len(loader.problems)} unreadable" if loader.problems else ""))
        return rows
    finally:
        source.close()
        storage.close()
