"""The rollup stage on one machine, no Kafka: local log -> ``RollupWorker`` -> ClickHouse.

One process owns every partition of the embedded local log (``meterline.ingest.local_log``)
and runs the same ``RollupWorker`` as the Faust agent, with a SQLite checkpoint file next to
the log and the flushes written straight into the configured storage (``StorageWriter``).

The loop, per step: poll records -> ``worker.process`` -> ``worker.maybe_flush()`` -> commit
the offsets it returned to the log. Those offsets come only from a flush that saved
checkpoints, so the log's committed offset never runs ahead of a saved checkpoint (the
exactly-once rule, see ``runner.py``); when the log runs dry, and on a clean stop, a final
flush with checkpoints makes the committed offsets catch up.

At start every partition is read from its checkpoint's ``next_offset`` (from 0 without a
checkpoint: a fresh state must see the partition from its beginning), and that position is
committed too, so ``LocalLog.committed`` always says where a restart resumes.

A crash (kill -9) at any point loses nothing and counts nothing twice: the restart restores
the last checkpoints, re-reads the records after them and writes identical rows again.

The anomaly detectors ride on the same loop when asked (``anomalies=``; on by default in
``meterline rollup-local``): the rows of each flush feed them inside the write and their
state is saved inside the same checkpoint save, so kill -9 neither loses nor duplicates an
episode event (``anomaly_embedded.py``).

``python -m meterline.aggregators.embedded --log L --data-dir D --checkpoint C`` runs it
against an embedded chDB; ``meterline rollup-local`` runs it against the configured storage.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterline.aggregators.anomaly_config import AnomalyStageConfig, load_anomaly_config
from meterline.aggregators.anomaly_embedded import (
    CheckpointingStore,
    EmbeddedAnomalies,
    FeedingWriter,
    StorageEventWriter,
)
from meterline.aggregators.checkpoints import CheckpointStore, SqliteCheckpointStore
from meterline.aggregators.log_probe import LocalLogProbe
from meterline.aggregators.outputs_io import StorageWriter
from meterline.aggregators.processor import Counters, RollupSettings
from meterline.aggregators.runner import OutputWriter, RollupWorker, TopicPartition, by_partition
from meterline.core.meters import MeterRegistry
from meterline.ingest.local_log import LocalLog
from meterline.ingest.metrics import MetricsEndpoint, metrics_endpoint
from meterline.ingest.sources import LocalLogRecordSource
from meterline.logs import where
from meterline.sinks.retention import RetentionPolicy

__all__ = [
    "DEFAULT_GROUP",
    "EmbeddedRollups",
    "Step",
    "default_checkpoint_path",
    "format_counters",
    "run_embedded_rollups",
    "run_rollup_local",
    "stop_on_signals",
]

log = logging.getLogger(__name__)

DEFAULT_GROUP = "rollups"
DEFAULT_TOPIC = "local"


def default_checkpoint_path(log_path: str | Path) -> Path:
    """Where the checkpoints of a local log live unless told otherwise: next to it."""
    path = Path(log_path)
    return path.with_name(path.stem + ".rollup-checkpoints.db")


@dataclass(frozen=True, slots=True)
class Step:
    """What one step of the loop did."""

    records: int  # log records polled (including ones below a checkpoint, skipped)
    events: int  # events in them that were accepted, duplicate, late or rejected
    committed: bool  # a checkpoint was saved and its offsets committed


def _events(c: Counters) -> int:
    return c.accepted + c.duplicate + c.late + c.rejected


class EmbeddedRollups:
    """The rollup loop over every partition of one local log.

    ``writer`` and ``store`` are injected (``StorageWriter`` + ``SqliteCheckpointStore`` in
    production, in-memory ones in tests); see :func:`run_embedded_rollups`.
    """

    def __init__(self, log: LocalLog, writer: OutputWriter, store: CheckpointStore,
                 registry: MeterRegistry, *, group: str = DEFAULT_GROUP,
                 settings: RollupSettings | None = None, topic: str = DEFAULT_TOPIC,
                 max_records: int = 64, flush_interval_s: float = 0.5,
                 checkpoint_interval_s: float = 5.0, idle_sleep_s: float = 0.05,
                 id_store_dir: str | Path | None = None,
                 anomalies: EmbeddedAnomalies | None = None, engine: str = "columnar") -> None:
        self.log = log
        self.group = group
        self.topic = topic
        self.max_records = max_records
        self.idle_sleep_s = idle_sleep_s
        self.source = LocalLogRecordSource(log, consumer=group, topic=topic)
        self.anomalies = anomalies
        self._store = store
        if anomalies is not None:
            # The detectors ride on the worker's two seams (aggregators/anomaly_embedded.py):
            # events are written inside each flush's write, their state inside each save.
            writer = FeedingWriter(writer, anomalies)
            store = CheckpointingStore(store, anomalies, self._rollup_offsets)
        self.worker = RollupWorker(registry, writer, store, group=group, settings=settings,
                                   flush_interval_s=flush_interval_s,
                                   checkpoint_interval_s=checkpoint_interval_s,
                                   probe=LocalLogProbe(log), id_store_dir=id_store_dir,
                                   engine=engine)
        self.start_offsets: dict[int, int] | None = None
        self._checkpointed: dict[int, int] = {}  # partition -> next_offset last saved
        self._failed: BaseException | None = None  # a flush that may not have been written

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> dict[int, int]:
        """Restore checkpoints and position the source; returns ``{partition: offset}``
        where reading starts. Idempotent."""
        if self.start_offsets is not None:
            return self.start_offsets
        tps = [TopicPartition(self.topic, p) for p in range(self.log.partitions)]
        positions = self.worker.assign(tps)
        if self.anomalies is not None:
            self.anomalies.restore(self._store, {tp.partition: positions[tp] for tp in tps})
        start: dict[int, int] = {}
        for tp in tps:
            offset = positions[tp]
            if offset is None:
                committed = self.log.committed(self.group, tp.partition)
                if committed:
                    # Offsets are committed only after a checkpoint, so the checkpoint
                    # file was lost or replaced: rebuild the state from the beginning.
                    log.warning("%s[%d]: committed offset %d but no checkpoint; replaying "
                                "from 0", tp.topic, tp.partition, committed,
                                extra=where(tp.topic, tp.partition, committed))
                offset = 0
            self.source.seek(tp.partition, offset)
            start[tp.partition] = offset
        # The committed offset may only move back here (to the checkpoint's position).
        self.source.commit_offsets(start)
        self._checkpointed = dict(start)
        self.start_offsets = start
        return start

    def _rollup_offsets(self) -> dict[int, int]:
        return {tp.partition: proc.next_offset for tp, proc in self.worker.processors.items()}

    def step(self) -> Step:
        """Poll once, process, flush/checkpoint when due, commit what a checkpoint covers."""
        if self.start_offsets is None:
            self.start()
        records = self.source.poll_records(self.max_records)
        if not records:  # nothing new since the last step: run() checkpoints when idle
            return Step(0, 0, False)
        before = _events(self.worker.totals())
        for run in by_partition(records):
            while run:
                n, gap = self.worker.process_many(run)
                if gap is None:
                    break
                # The source is positioned by us, so a gap is a bug or a damaged log:
                # settle it, loudly.
                target = self.worker.resolve_gap(gap)
                if target is not None:
                    # The rest of this run lies past the gap too: it comes again after the
                    # seek.
                    self.source.seek(gap.tp.partition, target)
                    break
                run = run[n:]  # the log holds nothing in between: fold from the record on
        events = _events(self.worker.totals()) - before
        committed = self._commit(self._guarded(self.worker.maybe_flush))
        return Step(len(records), events, committed)

    def checkpoint(self) -> bool:
        """Flush, checkpoint and commit now if anything was read since the last checkpoint."""
        if self.start_offsets is None:
            return False
        if all(self._checkpointed.get(tp.partition) == proc.next_offset
               for tp, proc in self.worker.processors.items()):
            return False
        return self._commit(self._guarded(lambda: self.worker.flush(checkpoint=True)))

    def _guarded(self, flush: Callable[[], dict[TopicPartition, int]]
                 ) -> dict[TopicPartition, int]:
        # A flush that raised was taken out of the processors but maybe never written: a
        # checkpoint now would cover changes that exist nowhere. Only a restart (which
        # re-derives them from the log) may continue.
        if self._failed is not None:
            raise RuntimeError("a flush failed earlier; restart the runner") from self._failed
        try:
            return flush()
        except BaseException as exc:
            self._failed = exc
            raise

    def _commit(self, offsets: dict[TopicPartition, int]) -> bool:
        if not offsets:
            return False
        next_offsets = {tp.partition: offset for tp, offset in offsets.items()}
        self.source.commit_offsets(next_offsets)
        self._checkpointed.update(next_offsets)
        return True

    def run(self, *, until_idle_s: float | None = None,
            stop: Callable[[], bool] | None = None,
            on_step: Callable[[Step], None] | None = None) -> Counters:
        """Loop until ``stop()`` is true or, with ``until_idle_s``, the log has had nothing
        new for that long; then checkpoint and commit. Returns the counters.

        An exception (a failed write, say) propagates *without* the final checkpoint: a
        flush that was taken but not written must be re-derived from the log after a
        restart, never covered by a checkpoint.
        """
        self.start()
        idle_since = time.monotonic()
        while stop is None or not stop():
            step = self.step()
            if on_step is not None:
                on_step(step)
            if step.records:
                idle_since = time.monotonic()
                continue
            # Caught up: make the committed offsets catch up too, then wait for more.
            self.checkpoint()
            if until_idle_s is not None and time.monotonic() - idle_since >= until_idle_s:
                break
            time.sleep(self.idle_sleep_s)
        self.checkpoint()
        return self.worker.totals()

    def totals(self) -> Counters:
        return self.worker.totals()


def run_embedded_rollups(log: LocalLog, storage: Any, registry: MeterRegistry, *,
                         checkpoint_path: str | Path, group: str = DEFAULT_GROUP,
                         settings: RollupSettings | None = None,
                         until_idle_s: float | None = None,
                         on_step: Callable[[Step], None] | None = None,
                         stop: Callable[[], bool] | None = None,
                         database: str | None = None,
                         retention: RetentionPolicy | None = None,
                         metrics: MetricsEndpoint | None = None,
                         anomalies: AnomalyStageConfig | None = None,
                         **options: Any) -> Counters:
    """The embedded rollup stage over ``log`` into ``storage`` (migrated by the caller).

    ``retention``: the configured policy (rows past it become dead letters instead of
    vanishing on insert). ``metrics``: serve /metrics there (the same families as
    ``meterline worker``, with the local log's consumer lag). ``anomalies``: run the
    anomaly detectors on the rollups (``anomalies`` table, checkpointed with the rollups;
    ``aggregators/anomaly_embedded.py``); ``None``: no detectors. ``options`` go to
    :class:`EmbeddedRollups` (``max_records``, ``flush_interval_s``, ...)."""
    store = SqliteCheckpointStore(checkpoint_path)
    sender = None
    try:
        checkpoint_path = Path(checkpoint_path)
        options.setdefault("id_store_dir",
                           checkpoint_path.with_name(checkpoint_path.name + ".ids"))
        if anomalies is not None:
            stage, sender = build_detectors(anomalies, storage, database, group,
                                       settings or RollupSettings(),
                                       options.get("topic", DEFAULT_TOPIC))
            options["anomalies"] = stage
        writer = StorageWriter(storage, database=database, retention=retention)
        runner = EmbeddedRollups(log, writer, store,
                                 registry, group=group, settings=settings, **options)
        server = None
        if metrics is not None:
            from meterline.aggregators.metrics import serve_metrics

            server, _ = serve_metrics(runner.worker, metrics.port, metrics.addr)
        try:
            return runner.run(until_idle_s=until_idle_s, stop=stop, on_step=on_step)
        finally:
            if server is not None:
                server.shutdown()
    finally:
        store.close()
        if sender is not None:
            sender.close()


def build_detectors(config: AnomalyStageConfig, storage: Any, database: str | None, group: str,
               rollups: RollupSettings, topic: str) -> tuple[EmbeddedAnomalies, Any]:
    """The detectors of ``anomalies.toml`` over this runner's flushes (+ its webhook
    sender, to close after the runner; None without a webhook). Also used by ``serve``."""
    sender = None
    on_written = None
    if config.webhook is not None:
        from meterline.alerts.webhook import SqliteDeadLetters, WebhookSender

        sender = WebhookSender(config.webhook,
                               dead_letters=SqliteDeadLetters(config.dead_letters))
        on_written = sender.submit
    stage = EmbeddedAnomalies(StorageEventWriter(storage, database), config.detector,
                              config.feed_settings(rollups), group=group, topic=topic,
                              on_written=on_written)
    return stage, sender


@contextmanager
def stop_on_signals() -> Iterator[Callable[[], bool]]:
    """SIGINT/SIGTERM ask the loop to stop after its current step (and checkpoint) instead
    of interrupting it half way; a second signal interrupts as usual. Main thread only."""
    requested: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def format_counters(c: Counters) -> str:
    lines = [
        f"records {c.records:,} (already checkpointed, skipped: {c.skipped_records:,}); "
        f"events {_events(c):,}",
        f"  accepted   {c.accepted:>12,}  (of which late but within allowed lateness: "
        f"{c.late_allowed:,})",
        f"  duplicate  {c.duplicate:>12,}",
        f"  late       {c.late:>12,}  (window closed: in late_events, in no rollup)",
        f"  rejected   {c.rejected:>12,}" + ("  (dead letters)" if c.rejected else ""),
    ]
    lines += [f"    {reason:<32}{n:>10,}" for reason, n in sorted(c.by_reason.items())]
    return "\n".join(lines)


def run_rollup_local(config: Any, log_path: Path, *, checkpoint_path: Path | None = None,
                     group: str = DEFAULT_GROUP, until_idle_s: float | None = None,
                     anomaly_settings: Path | None = None,
                     anomalies: bool = True) -> Counters:
    """`meterline rollup-local`: the embedded rollup stage against the configured storage,
    with the anomaly detectors of ``anomaly_settings`` (the ``meterline anomalies
    --settings`` file; built-in defaults without one) unless ``anomalies`` is false."""
    from meterline.core.errors import ConfigError
    from meterline.sinks.schema import migrate
    from meterline.sinks.storage import open_storage

    errors = []
    if not Path(log_path).is_file():
        errors.append(f"no local log at {log_path}")
    if anomaly_settings is not None and not anomalies:
        errors.append("--anomaly-settings and --no-anomalies contradict each other")
    if errors:
        raise ConfigError(errors, "rollup-local")
    registry = config.registry()
    stage = None
    if anomalies:  # before anything is opened: a bad file is an error, not a half start
        stage = load_anomaly_config(anomaly_settings,
                                    known_meters={m.name for m in registry})
    # The application's [rollups] settings, as `meterline worker` and `serve` use them
    # (the detectors' finality rule follows the same lateness).
    r = config.rollups
    settings = RollupSettings(r.allowed_lateness_ms, r.watermark_delay_ms, r.dedupe_horizon_ms)
    storage = open_storage(config.storage_config())
    local_log = LocalLog(log_path)
    try:
        migrate(storage, storage.database, config.retention_policy())
        from meterline.gc_tuning import tune_gc

        tune_gc("METERLINE_WORKER_GC")  # startup done (meterline/gc_tuning.py)
        with stop_on_signals() as stop:
            counters = run_embedded_rollups(
                local_log, storage, registry,
                checkpoint_path=checkpoint_path or default_checkpoint_path(log_path),
                group=group, settings=settings, until_idle_s=until_idle_s, stop=stop,
                database=storage.database, retention=config.retention_policy(),
                metrics=metrics_endpoint(), anomalies=stage,
                flush_interval_s=r.flush_interval_s,
                checkpoint_interval_s=r.checkpoint_interval_s, engine=r.engine)
    finally:
        local_log.close()
        storage.close()
    print(f"rollups of {log_path} (group {group!r}):")
    print(format_counters(counters))
    return counters


# --------------------------------------------------------------------------- module entry


def _dump(storage: Any, database: str, path: Path, registry: MeterRegistry) -> None:
    """Rollup totals, rollup-stage dead-letter / late counts and the anomaly events as JSON
    (for tests). Totals are read with the registry, as readers with one do: a unique_count
    window with late events is then re-aggregated from raw events where raw holds exactly
    its counted events (sinks/rollup_queries.py)."""
    from meterline.sinks.anomalies import AnomalyCopiesQuery, AnomalyEventsQuery
    from meterline.sinks.rollups import DeadLetterCountsQuery, LateEventsQuery, RollupTotalsQuery

    doc: dict[str, Any] = {}
    for granularity in ("hour", "day"):
        totals = RollupTotalsQuery(granularity, database=database,
                                   registry=registry).run(storage)
        doc[granularity] = sorted([c, m, start, value]
                                  for (c, m, start), value in totals.items())
    doc["dead_letters"] = DeadLetterCountsQuery(stage="rollup", database=database).run(storage)
    doc["late_events"] = sum(t.events for t in
                             LateEventsQuery(database=database).run(storage).values())
    doc["anomalies"] = [[e.event_key, e.kind, e.window_start_ms, e.direction, e.severity,
                         e.observed, e.expected, e.explanation]
                        for e in AnomalyEventsQuery(0, 2**62, database=database).run(storage)]
    doc["anomaly_copies"] = AnomalyCopiesQuery(database=database).run(storage)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, default=str))  # stdlib json: totals may exceed 64 bits
    tmp.replace(path)


def _default_meters() -> Path:
    # The demo meters ship as package data of ``meterline``. Read as data, not through
    # meterline.config: an aggregator importing the composition root would point the
    # layering arrow upwards.
    from importlib.resources import files

    return Path(str(files("meterline").joinpath("default_meters.toml")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meterline.aggregators.embedded",
        description="Embedded rollup stage: a local log into an embedded chDB.")
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="chDB data directory")
    parser.add_argument("--database", default="meterline")
    parser.add_argument("--checkpoint", type=Path, help="default: next to the log")
    parser.add_argument("--group", default=DEFAULT_GROUP)
    parser.add_argument("--meters", type=Path, help="meters TOML (default: the demo meters)")
    parser.add_argument("--until-idle", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--flush-interval", type=float, default=0.5, metavar="SECONDS")
    parser.add_argument("--checkpoint-interval", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--dump", type=Path, help="write rollup totals as JSON at the end")
    parser.add_argument("--anomaly-settings", type=Path, default=None,
                        help="anomalies.toml for the detectors (default: built-in defaults)")
    parser.add_argument("--no-anomalies", action="store_true", help="run no detectors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from meterline.sinks.schema import migrate
    from meterline.sinks.storage import StorageConfig, open_storage

    if not args.log.exists():
        parser.error(f"no local log at {args.log}")
    registry = MeterRegistry.load(args.meters or _default_meters())
    stage = None if args.no_anomalies else load_anomaly_config(
        args.anomaly_settings, known_meters={m.name for m in registry})
    storage = open_storage(StorageConfig(data_dir=str(args.data_dir), database=args.database))
    local_log = LocalLog(args.log)
    try:
        migrate(storage, args.database)
        with stop_on_signals() as stop:
            counters = run_embedded_rollups(
                local_log, storage, registry,
                checkpoint_path=args.checkpoint or default_checkpoint_path(args.log),
                group=args.group, until_idle_s=args.until_idle, stop=stop,
                database=args.database, flush_interval_s=args.flush_interval,
                checkpoint_interval_s=args.checkpoint_interval, anomalies=stage)
        print(format_counters(counters), flush=True)
        if args.dump:
            _dump(storage, args.database, args.dump, registry)
    finally:
        local_log.close()
        storage.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
