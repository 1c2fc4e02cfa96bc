"""``meterline serve``: the composition root of the server.

Embedded (``[server] pipeline = "embedded"``, the default): ONE process runs the whole
single-machine pipeline, because chDB allows one process per data directory:

    HTTP ingest -> local log (SQLite) -> raw-events stage (thread)  -> chDB raw_events
                                      -> rollup stage (thread)      -> chDB rollups
    HTTP reads  <- chDB hourly_usage / daily_usage

The stages are the existing ones (``RawEventLoader``, ``EmbeddedRollups``) with the same
consumer names and checkpoint file as ``meterline demo`` / ``meterline rollup-local``, so
the log can be handed between them. They share the process's one chDB engine through a
lock (``LockedStorage``); the rollup writer bumps a generation after every write so quota
totals cached before it are not served again.

Kafka (``pipeline = "kafka"``): the HTTP front only. Events go to the usage topic with
acks=all; the stages run as today's separate workers; reads go to the configured storage
(a ClickHouse server: chDB could not be shared with the loaders' processes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meterline.server.app import AsgiAdapter, Limits, ServerApp
from meterline.server.keys import KeyStore
from meterline.server.metrics import LazyCollector, ServerMetrics
from meterline.server.openapi import document
from meterline.server.quota_totals import MIN_RETENTION_DAYS, RollupTotals
from meterline.server.settings import ServerSettings
from meterline.server.usage import (
    ConfigLimits,
    Generation,
    QuotaCollector,
    QuotaService,
    RollupGeneration,
    TimeGeneration,
    UsageReader,
    month_start_ms,
)
from meterline.server.writers import EventWriter, KafkaWriter, LocalLogWriter

log = logging.getLogger(__name__)

RAW_CONSUMER = "raw-events"  # as meterline demo: the log can move between them
RAW_MAX_RECORDS = 64  # local-log records (envelopes) per raw-events insert, at most


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("meterline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


class LockedStorage:
    """A Storage whose calls are serialised: the embedded chDB engine is shared by the
    raw stage, the rollup stage and the read API of one process."""

    def __init__(self, storage: Any, lock: threading.RLock) -> None:
        self._storage = storage
        self._lock = lock

    @property
    def database(self) -> str:
        return str(self._storage.database)

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            self._storage.execute(sql, params)

    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None
                   ) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._storage.query_rows(sql, params))

    def insert_columns(self, table: str, columns: Mapping[str, Sequence[Any]],
                       column_types: Mapping[str, str],
                       settings: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            self._storage.insert_columns(table, columns, column_types, settings)

    def insert_arrow(self, table: str, data: Any, column_types: Mapping[str, str],
                     settings: Mapping[str, Any] | None = None) -> None:
        with self._lock:
            self._storage.insert_arrow(table, data, column_types, settings)

    def close(self) -> None:
        with self._lock:
            self._storage.close()


class GenerationWriter:
    """An OutputWriter that, once a flush is written, applies it to the in-memory quota
    ``totals`` and then bumps ``generation``: both move only after the write is durable,
    and the totals before the generation, so nothing answers older than the rollups."""

    def __init__(self, inner: Any, generation: RollupGeneration,
                 totals: RollupTotals | None = None) -> None:
        self._inner = inner
        self._generation = generation
        self._totals = totals

    def write(self, flush: Any) -> None:
        refused = getattr(self._inner, "refused", {})
        refused_before = sum(refused.values())
        try:
            self._inner.write(flush)
        except BaseException:
            if self._totals is not None:  # part of it may be in the tables: read them
                self._totals.invalidate()
            raise
        if self._totals is not None:
            self._totals.apply(flush, all_written=sum(refused.values()) == refused_before)
        self._generation.bump()


@dataclass
class _Stage:
    name: str
    thread: threading.Thread | None = None
    error: str | None = None


@dataclass
class EmbeddedPipeline:
    """The raw and rollup stages over the local log, in threads of this process."""

    log: Any
    storage: LockedStorage
    registry: Any
    config: Any
    generation: RollupGeneration = field(default_factory=RollupGeneration)
    totals: RollupTotals | None = None  # loaded before start(): the writer updates them
    anomalies: Any = None  # AnomalyStageConfig: run the detectors on the rollups
    raw_insert_interval_ms: int = 500  # [server] raw_insert_interval_ms
    stop_event: threading.Event = field(default_factory=threading.Event)
    stages: dict[str, _Stage] = field(default_factory=dict)
    # Set by each stage's thread once built, for the metrics collectors (read-only there).
    loader: Any = None
    rollups: Any = None

    def start(self) -> None:
        for name, target in (("raw", self._run_raw), ("rollups", self._run_rollups)):
            stage = self.stages[name] = _Stage(name)
            stage.thread = threading.Thread(target=self._guard, args=(stage, target),
                                            name=f"meterline-{name}", daemon=True)
            stage.thread.start()

    def _guard(self, stage: _Stage, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # reported by /healthz and the log; ingest goes on:
            stage.error = f"{type(exc).__name__}: {exc}"  # the log keeps every event
            log.exception("the %s stage stopped; restart the server to resume it", stage.name)

    def _run_raw(self) -> None:
        from meterline.ingest.raw_loader import RawEventLoader
        from meterline.ingest.sources import LocalLogRecordSource

        loader = RawEventLoader(self.storage, LocalLogRecordSource(self.log, RAW_CONSUMER),
                                self.registry, max_records=RAW_MAX_RECORDS,
                                retention=self.config.retention_policy())
        self.loader = loader
        # A caught-up stage inserts at most once per interval: each chDB insert, however
        # small, costs ~14 ms and holds the GIL in stretches of up to ~5 ms, which the HTTP
        # answers of this process wait behind (docs/server.md, quota checks). A full poll
        # is inserted at once, so a backlog drains at full speed.
        interval_s = self.raw_insert_interval_ms / 1000
        while not self.stop_event.is_set():
            started = time.monotonic()
            got = loader.run_once().records
            if not got:
                self.stop_event.wait(0.05)
            elif got < RAW_MAX_RECORDS:
                self.stop_event.wait(max(0.0, interval_s - (time.monotonic() - started)))

    def _run_rollups(self) -> None:
        from meterline.aggregators.checkpoints import SqliteCheckpointStore
        from meterline.aggregators.embedded import (
            DEFAULT_GROUP,
            DEFAULT_TOPIC,
            EmbeddedRollups,
            build_detectors,
            default_checkpoint_path,
        )
        from meterline.aggregators.outputs_io import StorageWriter
        from meterline.aggregators.processor import RollupSettings

        r = self.config.rollups
        settings = RollupSettings(r.allowed_lateness_ms, r.watermark_delay_ms,
                                  r.dedupe_horizon_ms)
        checkpoint = default_checkpoint_path(self.log.path)
        store = SqliteCheckpointStore(checkpoint)
        sender = None
        try:
            options: dict[str, Any] = {}
            if self.anomalies is not None:
                # The same detectors as `rollup-local`, checkpointed with the rollups.
                options["anomalies"], sender = build_detectors(
                    self.anomalies, self.storage, self.storage.database, DEFAULT_GROUP,
                    settings, DEFAULT_TOPIC)
            writer = GenerationWriter(StorageWriter(self.storage, database=self.storage.database),
                                      self.generation, self.totals)
            runner = EmbeddedRollups(
                self.log, writer, store, self.registry, settings=settings,
                flush_interval_s=r.flush_interval_s,
                checkpoint_interval_s=r.checkpoint_interval_s, engine=r.engine,
                id_store_dir=checkpoint.with_name(checkpoint.name + ".ids"), **options)
            self.rollups = runner
            runner.run(stop=self.stop_event.is_set)
        finally:
            store.close()
            if sender is not None:
                sender.close()

    def collectors(self) -> list[Any]:
        """What ``load-raw`` and ``rollup-local`` export, for this process's /metrics:
        loader throughput and dead letters, the rollup worker's counters, and the lag of
        both consumers of the local log."""
        from meterline.aggregators.metrics import RollupCollector, worker_lag
        from meterline.ingest.metrics import LagCollector, LoaderCollector, LocalLogLag

        def loader() -> Any:
            built = self.loader
            return None if built is None else LoaderCollector("raw", built.metric_totals)

        def rollups() -> Any:
            built = self.rollups
            return None if built is None else RollupCollector(built.worker)

        def rollup_lag() -> Any:
            built = self.rollups
            lag = None if built is None else worker_lag(built.worker)
            return None if lag is None else LagCollector([lag])

        return [LazyCollector(loader), LazyCollector(rollups), LazyCollector(rollup_lag),
                LagCollector([LocalLogLag(self.log, RAW_CONSUMER, stage="raw")])]

    def health(self) -> dict[str, str]:
        out = {}
        for name, stage in self.stages.items():
            alive = stage.thread is not None and stage.thread.is_alive()
            out[name] = "running" if alive else f"stopped: {stage.error or 'by request'}"
        return out

    def stop(self) -> None:
        self.stop_event.set()
        for stage in self.stages.values():
            if stage.thread is not None:
                stage.thread.join(timeout=60)


@dataclass
class Server:
    """Everything ``serve`` opened, to be closed in reverse order."""

    asgi: AsgiAdapter
    app: ServerApp
    closers: list[Callable[[], None]]
    metrics_url: str | None = None

    def close(self) -> None:
        if not self.closers:
            return
        for close in reversed(self.closers):
            try:
                close()
            except Exception:  # keep closing the rest: each one releases something
                log.exception("error while shutting down")
        self.closers.clear()
        print("meterline serve: stopped (stages checkpointed, log and storage closed)",
              flush=True)


def build(config: Any, settings: ServerSettings) -> Server:
    """Open storage, keys, the writer and (embedded) the stages; nothing listens yet."""
    from meterline.sinks.schema import migrate
    from meterline.sinks.storage import open_storage

    registry = config.registry()
    closers: list[Callable[[], None]] = []
    try:
        keys = KeyStore(settings.keys_file)
        closers.append(keys.close)
        storage = open_storage(config.storage_config())
        closers.append(storage.close)
        migrate(storage, storage.database, config.retention_policy())
        locked = LockedStorage(storage, threading.RLock())
        writer: EventWriter
        generation: Generation
        totals: RollupTotals | None = None
        health: Callable[[], dict[str, str]]
        collectors: list[Any] = []
        if settings.pipeline == "embedded":
            from meterline.ingest.local_log import LocalLog

            local_log = LocalLog(settings.local_log, fsync=settings.local_log_fsync)
            closers.append(local_log.close)
            anomalies = None
            if settings.anomalies:  # a bad anomalies.toml is an error before anything runs
                from meterline.aggregators.anomaly_config import load_anomaly_config

                anomalies = load_anomaly_config(settings.anomaly_settings,
                                                known_meters={m.name for m in registry})
            totals = quota_totals(locked, registry, config)
            pipeline = EmbeddedPipeline(
                local_log, locked, registry, config, anomalies=anomalies, totals=totals,
                raw_insert_interval_ms=settings.raw_insert_interval_ms)
            pipeline.start()
            closers.append(pipeline.stop)
            writer = LocalLogWriter(local_log, max_pending_events=settings.max_pending_events)
            generation = pipeline.generation
            health = pipeline.health
            collectors = pipeline.collectors()
        else:
            from meterline.sdk.transport import KafkaTransport

            transport = KafkaTransport(config.kafka.bootstrap_servers,
                                       delivery_timeout_ms=10_000)
            # "0": each request its own envelope and produce (the benchmark's baseline).
            coalesce = os.environ.get("METERLINE_SERVER_COALESCE", "1") != "0"
            writer = KafkaWriter(transport, config.kafka.topic,
                                 max_pending_events=settings.max_pending_events,
                                 coalesce=coalesce)
            generation = TimeGeneration(config.rollups.flush_interval_s)

            def health() -> dict[str, str]:
                return {"ingest": f"kafka topic {config.kafka.topic}"}
        closers.append(writer.close)
        reader = UsageReader(locked, registry, database=storage.database)
        quotas = QuotaService(reader, ConfigLimits(settings.quotas), generation,
                              totals=totals)
        metrics = ServerMetrics()
        collectors.append(QuotaCollector(quotas))
        app = ServerApp(registry=registry, keys=keys, writer=writer, reader=reader,
                        quotas=quotas, openapi=document(registry, version()),
                        limits=Limits(settings.max_body_bytes, settings.max_events_per_request),
                        health=health, metrics=metrics)
        metrics_url = _serve_metrics([metrics, *collectors], closers)
    except BaseException:
        for close in reversed(closers):
            try:
                close()
            except Exception:
                log.exception("error while cleaning up a failed start")
        raise
    server = Server(AsgiAdapter(app), app, closers, metrics_url)
    server.asgi = AsgiAdapter(app, on_shutdown=server.close)
    return server


def quota_totals(storage: LockedStorage, registry: Any, config: Any) -> RollupTotals | None:
    """The in-memory quota totals of the current month, loaded before the stages write.
    ``METERLINE_QUOTA_TOTALS=0``: none, every quota reads the views (the comparison
    benchmarks/server_quota.py measures)."""
    if os.environ.get("METERLINE_QUOTA_TOTALS", "").strip() == "0":
        return None
    now = time.time_ns() // 1_000_000
    retention = config.retention_policy()
    short = [m.name for m in registry
             if retention.days_for("daily_rollups_days", m.name) < MIN_RETENTION_DAYS]
    totals = RollupTotals(month_start_ms(now), short_retention_meters=short)
    totals.load(storage, storage.database, now)
    return totals


def _serve_metrics(collectors: list[Any], closers: list[Callable[[], None]]) -> str | None:
    """/metrics on ``METERLINE_METRICS_PORT`` / ``_ADDR`` (``--metrics-port`` /
    ``--metrics-addr``), loopback by default, as every other long-running command; None
    (not served) without a port. Why not a route on the API port: server/metrics.py."""
    import meterline.aggregators.metrics  # noqa: F401  (its flush histogram, for serve())
    from meterline.ingest.metrics import metrics_endpoint
    from meterline.ingest.metrics import serve as serve_collectors

    endpoint = metrics_endpoint()
    if endpoint is None:
        return None
    from prometheus_client import CollectorRegistry

    http, _ = serve_collectors(collectors, endpoint, registry=CollectorRegistry())

    def close() -> None:
        http.shutdown()
        http.server_close()

    closers.append(close)
    host = endpoint.addr if ":" not in endpoint.addr else f"[{endpoint.addr}]"
    url = f"http://{host}:{http.server_port}/metrics"
    print(f"meterline serve: metrics on {url}", flush=True)
    return url


def serve(config: Any, settings: ServerSettings, *,
          on_listening: Callable[[str], None] | None = None) -> None:
    """Bind, print where, serve until SIGINT/SIGTERM, then stop the stages cleanly (each
    checkpoints) and close everything. The closing happens in the ASGI lifespan shutdown:
    uvicorn re-raises the signal once it has shut down (exit status -15 for SIGTERM), so
    code after ``run`` is not reached then."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    server = build(config, settings)
    from meterline.server.gc_tuning import tune_for_serving

    tune_for_serving()  # startup done: freeze it, and let request garbage go by refcount
    try:
        host, port = sock.getsockname()[:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        if os.environ.get("METERLINE_SERVER_HTTP", "").strip() == "granian":
            _serve_granian(server, sock, lambda: on_listening and on_listening(url))
            return
        if on_listening is not None:
            on_listening(url)
        uv = uvicorn.Server(uvicorn.Config(server.asgi, loop="uvloop", http="httptools",
                                           lifespan="on", log_level="warning",
                                           access_log=False, timeout_keep_alive=30))
        uv.run(sockets=[sock])
    finally:
        server.close()
        sock.close()


def _serve_granian(server: Server, sock: socket.socket, listening: Callable[[], Any]
                   ) -> None:
    """The same ASGI app on granian's embedded server (Rust HTTP, experimental upstream),
    for benchmarks/server_ingest.py --servers granian only (``METERLINE_SERVER_HTTP``;
    granian is not a dependency: ``pip install granian`` first). Granian binds its own
    socket, so the port already chosen is handed over: a short window where another
    process could take it, acceptable for a benchmark, not for production."""
    import signal

    import uvloop
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server as Granian

    host, port = sock.getsockname()[:2]
    sock.close()
    granian = Granian(server.asgi, address=host, port=port, interface=Interfaces.ASGI,
                      log_level=LogLevels.warning, backlog=2048)
    granian.on_startup(listening)  # once its socket listens, not before

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, granian.stop)
        await granian.serve()

    uvloop.run(main())
