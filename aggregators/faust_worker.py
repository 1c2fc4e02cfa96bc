"""`meterline worker`: the rollup stage as a faust-streaming app.

Faust does what it is good at - group membership, partition assignment, fetching,
signals, a worker process with clean shutdown - and nothing else. Everything that decides
a number lives in :class:`~meterline.aggregators.runner.RollupWorker`; this module is the
adapter, and it uses only Faust's public hooks (pinned by
``tests/aggregators/test_faust_probe.py``):

- **Records, not events.** A Kafka record is a whole envelope (hundreds of events), so
  Faust's per-message cost (tens of µs) is paid once per batch.
- **Our checkpoints own the positions, not Faust's offsets.** Faust seeks an assigned
  partition to the group's committed offset, keeps its own "read offset" and drops
  records below it, may still deliver records fetched before a rebalance, and counts
  offsets it never delivered as done (its gap tracking). None of that can decide a total
  here: a processor folds only the record at its checkpointed ``next_offset``, skips what
  its checkpoint already holds, and reports anything past it as a gap, which the runner
  settles against the log (:class:`~meterline.aggregators.log_probe.KafkaLogProbe`) and
  this adapter repairs with ``Consumer.seek``. An earlier version instead rebased Faust's
  private committed-offset map after seeking in a wrapped ``perform_seek``; records
  delivered around a rebalance then slipped past the checkpoint and were lost.
- **Acks follow checkpoints.** The agent iterates ``stream.noack()`` and acks a record
  only once a saved checkpoint covers it, then asks Faust to commit, so the group's
  committed offset (what operators alert on as lag) trails the checkpoint by at most one
  checkpoint interval and reaches the log end when the work is done. Faust's own
  ``exactly_once`` (Kafka transactions through aiokafka, with open duplicate reports) is
  not used: correctness comes from deterministic replay and idempotent outputs.

Blocking work (writing a flush to Kafka, saving and loading checkpoints, asking the log)
runs in a thread so the event loop keeps heartbeating; one lock keeps it from overlapping
the agent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meterline.aggregators.checkpoints import KafkaCheckpointStore
from meterline.aggregators.log_probe import KafkaLogProbe
from meterline.aggregators.outputs_io import KafkaOutputWriter, output_topics
from meterline.aggregators.processor import RollupSettings
from meterline.aggregators.runner import (
    LogGapError,
    PartitionCountChanged,
    RollupWorker,
    TopicPartition,
)
from meterline.core.meters import MeterRegistry
from meterline.ingest.sources import SourceRecord
from meterline.logs import where

__all__ = ["WorkerSettings", "build_app", "ensure_topics", "run_worker"]

log = logging.getLogger(__name__)

# How long a gap repair waits before seeking: Faust's delivery of the record that showed
# the gap must have finished (microseconds), or it overwrites the seek's read offset.
SEEK_SETTLE_S = 0.05
# A partition with no delivery for this long is compared with its log end (see
# check_stalled); a few seconds keeps the probe cheap and a stall short.
STALL_S = 3.0
# Delivered records are folded in runs of up to this many (~500 events each), or sooner
# when a flush is due: the columnar engine's cost per event falls with the run's length,
# and a flush always folds first, so freshness does not change.
FOLD_RECORDS = 64


@dataclass(frozen=True)
class WorkerSettings:
    bootstrap_servers: str
    topic: str
    group: str = "meterline-rollups"
    flush_interval_s: float = 0.5  # freshness: how often changed windows are written
    checkpoint_interval_s: float = 5.0  # replay after a crash is at most about this long
    rollup: RollupSettings = RollupSettings()
    engine: str = "columnar"  # how records are folded (aggregators/runner.py)

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
    from faust.types import TP as FaustTP

    datadir = os.environ.get("METERLINE_FAUST_DATADIR", f"/tmp/meterline-faust-{os.getpid()}")
    app: Any = faust.App(
        settings.group,  # the app id is the consumer group
        broker=f"kafka://{settings.bootstrap_servers}",
        store="memory://",
        datadir=datadir,
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
    probe = KafkaLogProbe(settings.bootstrap_servers)
    worker = RollupWorker(
        registry,
        KafkaOutputWriter(settings.bootstrap_servers, settings.topic),
        KafkaCheckpointStore(settings.bootstrap_servers, settings.checkpoint_topic),
        group=settings.group, settings=settings.rollup,
        flush_interval_s=settings.flush_interval_s,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        probe=probe,
        id_store_dir=os.path.join(datadir, "ids"),  # scratch, rebuilt from the deltas
        engine=settings.engine,
    )
    app.meterline_worker = worker
    lock = asyncio.Lock()
    unacked: dict[TopicPartition, deque[Any]] = {}
    # Delivered but not folded yet: (event, record) per partition, in delivery order.
    pending: dict[TopicPartition, list[tuple[Any, SourceRecord]]] = {}
    seeks: dict[TopicPartition, asyncio.Future[None]] = {}
    delivered: dict[TopicPartition, float] = {}  # last delivery per partition (monotonic)
    next_stall_check = [0.0]
    streams: list[Any] = []
    topic = app.topic(settings.topic, key_serializer="raw", value_serializer="raw")

    def fatal(code: int, message: str, *args: Any, record: SourceRecord | None = None) -> None:
        # The partition's state may hold part of a record, or events that must be counted
        # are missing: never flush or checkpoint it. Exit now; a restart replays from the
        # last checkpoint (or stops here again, loudly, until an operator acts).
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
            except Exception:  # e.g. a rebalance in progress: the next checkpoint retries
                log.warning("offset commit failed; retrying after the next checkpoint",
                            exc_info=True)

    async def flush(*, checkpoint: bool, only: list[TopicPartition] | None = None,
                    ack: bool = True) -> None:
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
        if ack:
            await ack_through(offsets)

    def request_seek(tp: TopicPartition) -> None:
        # One pending seek per partition: a burst of records fetched before a seek is a
        # burst of gaps against the same position.
        task = seeks.get(tp)
        if task is None or task.done():
            seeks[tp] = asyncio.ensure_future(seek_later(tp))

    async def seek_later(tp: TopicPartition) -> None:
        # Faust raises its read offset to a record's offset just *after* handing it to
        # the agent, and drops later-fetched records below it: a seek made while that
        # delivery is in progress is undone (a livelock, pinned by test_faust_probe).
        # Let the delivery finish, then seek to wherever the partition is by then.
        await asyncio.sleep(SEEK_SETTLE_S)
        async with lock:
            proc = worker.processors.get(tp)
            if proc is None:
                return  # not ours any more: its new owner reads from the checkpoint
            try:
                await app.consumer.seek(FaustTP(tp.topic, tp.partition), proc.next_offset)
            except Exception:  # revoked meanwhile, say; a gap after this asks again
                log.warning("seek of %s[%d] to %d failed", tp.topic, tp.partition,
                            proc.next_offset, exc_info=True,
                            extra=where(tp.topic, tp.partition, proc.next_offset))

    async def fold_pending() -> None:
        """Fold every delivered record, one run per partition (the columnar engine folds a
        run column-wise). Faust delivers one record at a time; folding runs instead of
        records is the only change, and the rules are those of one record: a record is
        folded only at its partition's ``next_offset``, acked only once folded (and
        checkpointed, see ack_through), and a gap is settled as before."""
        while pending:
            tp, items = pending.popitem()
            await fold(tp, items)

    async def fold(tp: TopicPartition, items: list[tuple[Any, SourceRecord]]) -> None:
        records = [record for _, record in items]
        start = 0
        try:
            while start < len(records):
                n, gap = worker.process_many(records[start:])
                if tp in worker.processors:
                    unacked.setdefault(tp, deque()).extend(
                        event for event, _ in items[start:start + n])
                if gap is None:
                    return
                loop = asyncio.get_running_loop()
                target = await loop.run_in_executor(None, worker.resolve_gap, gap)
                if target is not None:
                    # Not folded, not acked: the rest of the run comes again after the seek.
                    request_seek(gap.tp)
                    return
                start += n  # nothing in between: fold from the record that showed the gap
        except LogGapError as exc:
            fatal(78, "%s", exc, record=records[min(start, len(records) - 1)])
        except Exception:
            record = records[min(start, len(records) - 1)]
            fatal(70, "unexpected error processing %s[%d]@%d; exiting without flushing",
                  record.topic, record.partition, record.offset, record=record)

    @app.agent(topic)
    async def rollups(stream: Any) -> None:
        streams[:] = [stream]
        async for event in stream.noack().events():
            m = event.message
            ts = m.timestamp
            record = SourceRecord(m.topic, m.partition, m.offset, event.value or b"",
                                  round(ts * 1000) if ts else -1)
            tp = TopicPartition(m.topic, m.partition)
            delivered[tp] = time.monotonic()
            async with lock:
                pending.setdefault(tp, []).append((event, record))
                flush_due, checkpoint_due = worker.due()
                # Counted, not tracked: revocations drop runs from ``pending`` too.
                held = sum(map(len, pending.values()))
                if held >= FOLD_RECORDS or flush_due or checkpoint_due:
                    await fold_pending()
                if flush_due or checkpoint_due:
                    await flush(checkpoint=checkpoint_due)

    @app.timer(interval=settings.flush_interval_s)
    async def flush_when_idle() -> None:
        # Without new records the agent loop does not run, yet the last changes must
        # still reach ClickHouse within the freshness budget.
        async with lock:
            flush_due, checkpoint_due = worker.due()
            if flush_due or checkpoint_due:
                await fold_pending()
                await flush(checkpoint=checkpoint_due)
        await check_stalled()

    async def check_stalled() -> None:
        """Records can stop arriving while a partition is behind its log end: Faust may
        have positioned the consumer past the checkpoint (its committed offset can run
        ahead: it counts offsets it skipped while delivering as done) and at the tail no
        later record comes to show the gap. So a partition that has had no delivery for
        ``STALL_S`` is compared with the log end, and sought back to its position."""
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
        except Exception:  # the broker away, say: the next check asks again
            log.warning("could not read log ends for the stall check", exc_info=True)
            return
        for tp, end in ends.items():
            proc = worker.processors.get(tp)
            if proc is not None and proc.next_offset < end:
                log.info("%s[%d]: no records for %.0f s while at %d of %d; seeking", tp.topic,
                         tp.partition, now - delivered[tp], proc.next_offset, end)
                delivered[tp] = now
                request_seek(tp)

    @app.on_partitions_revoked.connect
    async def on_revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
        gone = [TopicPartition(tp.topic, tp.partition) for tp in revoked]
        async with lock:
            mine = [tp for tp in gone if tp in worker.processors]
            if mine:
                # Checkpoint what we give away so its next owner resumes here. No acks:
                # Faust has already forgotten the revoked partitions' acks at this point;
                # the next owner acks these records when it skips them.
                await flush(checkpoint=True, only=mine, ack=False)
                worker.drop(mine)
            for tp in gone:
                unacked.pop(tp, None)
                delivered.pop(tp, None)
                # Not folded, not acked: the next owner reads them from the checkpoint.
                pending.pop(tp, None)

    @app.on_partitions_assigned.connect
    async def on_assigned(app: Any, assigned: Any, **kwargs: Any) -> None:
        # Faust sends this while the partitions are still paused, before it seeks them to
        # the committed offsets and resumes fetching: every record that reaches the agent
        # afterwards finds its processor. Where Faust starts reading does not matter
        # (see the module docstring), so there is nothing to seek here.
        wanted = {TopicPartition(tp.topic, tp.partition) for tp in assigned
                  if tp.topic == settings.topic}
        async with lock:
            stale = [tp for tp in worker.processors if tp not in wanted]
            if stale:
                worker.drop(stale)
                for tp in stale:
                    unacked.pop(tp, None)
                    pending.pop(tp, None)
            loop = asyncio.get_running_loop()
            try:
                count = await loop.run_in_executor(None, probe.partition_count, settings.topic)
                await loop.run_in_executor(
                    None, lambda: worker.assign(sorted(wanted), source_partitions=count))
            except PartitionCountChanged:
                fatal(78, "refusing the assignment")

    @app.on_before_shutdown.connect
    async def final_flush(app: Any, **kwargs: Any) -> None:
        async with lock:
            if worker.processors:
                await fold_pending()
                await flush(checkpoint=True)

    return app


def run_worker(config: Any) -> None:
    """Blocking: run the worker until SIGTERM/SIGINT."""
    import faust

    r = config.rollups
    settings = WorkerSettings(
        config.kafka.bootstrap_servers, config.kafka.topic, r.group_id, r.flush_interval_s,
        r.checkpoint_interval_s,
        RollupSettings(r.allowed_lateness_ms, r.watermark_delay_ms, r.dedupe_horizon_ms),
        r.engine)
    ensure_topics(settings)
    app = build_app(settings, config.registry())
    from meterline.gc_tuning import tune_gc

    # Startup done (Faust's app, clients, the registry): freeze it and let per-record
    # garbage go by reference counting (meterline/gc_tuning.py says why and what it gave).
    tune_gc("METERLINE_WORKER_GC")
    port = os.environ.get("METERLINE_METRICS_PORT")
    if port:
        from meterline.aggregators.metrics import serve_metrics

        serve_metrics(app.meterline_worker, int(port))
    # Faust re-configures logging when its worker starts: hand it ours (format, secret
    # redaction) so `--log-format json` holds for the worker's own lines too.
    from meterline.logs import logging_config

    log_format = os.environ.get("METERLINE_LOG_FORMAT") or "text"
    # Quiet by default (issue 11): Faust's INFO lines and the checkpoint logs only with
    # `meterline -v`, which set the root level this reads.
    level = "INFO" if logging.getLogger().getEffectiveLevel() <= logging.INFO else "WARNING"
    faust.Worker(app, loglevel=level, quiet=True,
                 logging_config=logging_config(log_format, level)).execute_from_commandline()
