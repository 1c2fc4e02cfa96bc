"""Prometheus export shared by every stage: ClickHouse insert latency, consumer lag, loader
throughput, and serving ``/metrics`` on a loopback address.

Collectors read the components' own counters at scrape time (as the SDK's and the rollup
worker's do), so the hot path pays nothing for them. No metric carries a customer label:
a SaaS has 10^5+ customers and per-customer numbers live in ClickHouse, not Prometheus.

Where ``/metrics`` is served: ``METERLINE_METRICS_PORT`` (unset: not served) on
``METERLINE_METRICS_ADDR`` (default ``127.0.0.1``; set ``0.0.0.0`` when Prometheus scrapes
from another host or container). ``meterline worker|load-raw|load-rollups --metrics-port N
--metrics-addr A`` set the same two values.

prometheus-client comes with the ``server`` extra; without it the histograms are no-ops and
``serve`` raises an error that names the extra.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meterline.core.errors import ConfigError

__all__ = [
    "CLICKHOUSE_INSERT_SECONDS",
    "DEFAULT_METRICS_ADDR",
    "INSERT_BUCKETS_S",
    "KafkaGroupLag",
    "LagCollector",
    "LagSource",
    "LoaderCollector",
    "LoaderTotals",
    "LocalLogLag",
    "MetricsEndpoint",
    "PartitionLag",
    "TimedStorage",
    "histogram",
    "metrics_endpoint",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_METRICS_ADDR = "127.0.0.1"

# chDB inserts of a flush or a poll's worth of raw events take ~5 ms (a few rows) to ~5 s
# (a backlog's 100k-row batches on 2 cores): buckets from 1 ms to 10 s, about x2.5 apart,
# so p50 and p99 are each within one bucket of the truth across that whole span.
INSERT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)


class _NoopChild:
    def observe(self, amount: float) -> None:
        pass


class _NoopHistogram:
    """Stands in when prometheus-client is not installed (it is a ``server`` extra)."""

    def labels(self, *values: str) -> _NoopChild:
        return _NoopChild()


_PROCESS_HISTOGRAMS: list[Any] = []  # what serve() adds to a registry of the caller's


def histogram(name: str, documentation: str, labels: Sequence[str],
              buckets: Sequence[float]) -> Any:
    """A process-wide histogram in prometheus-client's default registry (a no-op without
    prometheus-client)."""
    try:
        from prometheus_client import Histogram
    except ImportError:
        return _NoopHistogram()
    made = Histogram(name, documentation, list(labels), buckets=tuple(buckets))
    _PROCESS_HISTOGRAMS.append(made)
    return made


CLICKHOUSE_INSERT_SECONDS = histogram(
    "meterline_clickhouse_insert_seconds",
    "Duration of one non-empty insert into a ClickHouse table (chDB or server)",
    ["table"], INSERT_BUCKETS_S)


class TimedStorage:
    """A :class:`~meterline.sinks.storage.Storage` that times its inserts.

    Every non-empty ``insert_columns`` that returns is observed in
    ``meterline_clickhouse_insert_seconds{table}`` (the table without its database: a
    handful of values). Everything else is passed through unchanged.
    """

    def __init__(self, storage: Any) -> None:
        self._storage = storage

    @property
    def database(self) -> str:
        return str(self._storage.database)

    @property
    def wrapped(self) -> Any:
        return self._storage

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._storage.execute(sql, params)

    def query_rows(self, sql: str, params: Mapping[str, Any] | None = None,
                   ) -> list[tuple[Any, ...]]:
        return list(self._storage.query_rows(sql, params))

    def insert_columns(self, table: str, columns: Mapping[str, Sequence[Any]],
                       column_types: Mapping[str, str],
                       settings: Mapping[str, Any] | None = None) -> None:
        rows = len(next(iter(columns.values()), ()))
        started = time.perf_counter()
        self._storage.insert_columns(table, columns, column_types, settings)
        if rows:
            CLICKHOUSE_INSERT_SECONDS.labels(table.rpartition(".")[2]).observe(
                time.perf_counter() - started)

    def insert_arrow(self, table: str, data: Any, column_types: Mapping[str, str],
                     settings: Mapping[str, Any] | None = None) -> None:
        started = time.perf_counter()
        self._storage.insert_arrow(table, data, column_types, settings)
        if data.num_rows:
            CLICKHOUSE_INSERT_SECONDS.labels(table.rpartition(".")[2]).observe(
                time.perf_counter() - started)

    def close(self) -> None:
        self._storage.close()


# --------------------------------------------------------------------------- consumer lag


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    records: int  # log end (high watermark) minus the group's committed offset


class LagSource(Protocol):
    stage: str  # "rollup" | "raw" | "output_loader"
    group: str

    def lag(self) -> list[PartitionLag]:
        """Lag per partition now (blocking; called from the scrape thread)."""
        ...


class LocalLogLag:
    """Lag of one consumer of the embedded local log: end offset minus committed offset.

    ``partitions``: which (topic, partition) to report (default: every partition, under
    ``topic``, the name the embedded runner gives the log)."""

    def __init__(self, log: Any, consumer: str, *, stage: str, topic: str = "local",
                 partitions: Callable[[], Iterable[tuple[str, int]]] | None = None) -> None:
        self._log = log
        self.group = consumer
        self.stage = stage
        self._topic = topic
        self._partitions = partitions

    def lag(self) -> list[PartitionLag]:
        parts = ([(self._topic, p) for p in range(self._log.partitions)]
                 if self._partitions is None else self._partitions())
        return [PartitionLag(t, p,
                             max(0, self._log.end_offset(p) - self._log.committed(self.group, p)))
                for t, p in sorted(parts)]


class KafkaGroupLag:
    """Lag of a Kafka consumer group: each partition's high watermark minus the group's
    committed offset, as ``kafka-consumer-groups --describe`` shows it.

    Committed offsets, not the consumer's position: they are what a restart resumes from
    and what "caught up" means in docs/rollups.md (the rollup group commits at each
    checkpoint, so its lag saw-tooths by up to one checkpoint interval of records).
    A partition the group never committed counts from the log start.

    Reads with its own consumer that never subscribes (so it never joins the group and
    causes no rebalance). Answers are cached for ``max_age_s`` so several scrapers cost
    the broker one round of requests; each request is bounded by ``timeout_s``.
    ``partitions``: which (topic, partition) to report (default: every partition of
    ``topics``), e.g. only the partitions a worker owns.
    """

    def __init__(self, bootstrap_servers: str, group: str, topics: Sequence[str], *,
                 stage: str,
                 partitions: Callable[[], Iterable[tuple[str, int]]] | None = None,
                 timeout_s: float = 2.0, max_age_s: float = 5.0) -> None:
        self.group = group
        self.stage = stage
        self._bootstrap = bootstrap_servers
        self._topics = list(topics)
        self._partitions = partitions
        self._timeout_s = timeout_s
        self._max_age_s = max_age_s
        self._consumer: Any = None
        self._lock = threading.Lock()
        self._cached: tuple[float, list[PartitionLag]] | None = None

    def _reader(self) -> Any:
        from confluent_kafka import Consumer

        if self._consumer is None:
            self._consumer = Consumer({
                "bootstrap.servers": self._bootstrap,
                "group.id": self.group,  # committed() reads this group's offsets
                "enable.auto.commit": False,
            }, logger=logging.getLogger("meterline.metrics.lag"))
        return self._consumer

    def _wanted(self, consumer: Any) -> list[tuple[str, int]]:
        if self._partitions is not None:
            return sorted(self._partitions())
        wanted = []
        for topic in self._topics:
            meta = consumer.list_topics(topic, timeout=self._timeout_s).topics.get(topic)
            if meta is not None and meta.error is None:
                wanted += [(topic, p) for p in meta.partitions]
        return sorted(wanted)

    def lag(self) -> list[PartitionLag]:
        from confluent_kafka import TopicPartition

        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self._max_age_s:
                return self._cached[1]
            consumer = self._reader()
            wanted = self._wanted(consumer)
            committed = {
                (tp.topic, tp.partition): tp.offset
                for tp in (consumer.committed([TopicPartition(t, p) for t, p in wanted],
                                              timeout=self._timeout_s) if wanted else [])
            }
            out = []
            for topic, partition in wanted:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                           timeout=self._timeout_s)
                done = committed.get((topic, partition), -1)
                start = done if done >= 0 else low  # negative: nothing committed yet
                out.append(PartitionLag(topic, partition, max(0, int(high) - int(start))))
            self._cached = (now, out)
            return out

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None


class LagCollector:
    """``meterline_consumer_lag_records{stage, group, topic, partition}`` from lag sources.

    A source that fails (broker away) is left out of this scrape and logged; the alert on
    lag then sees the series go stale rather than a made-up number.
    """

    def __init__(self, sources: Iterable[LagSource]) -> None:
        self._sources = list(sources)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(
            "meterline_consumer_lag_records",
            "Records in the log past the consumer group's committed offset",
            labels=["stage", "group", "topic", "partition"])
        for source in self._sources:
            try:
                lags = source.lag()
            except Exception:
                log.warning("consumer lag of %s (%s) unavailable", source.group, source.stage,
                            exc_info=log.isEnabledFor(logging.DEBUG))
                continue
            for lag in lags:
                gauge.add_metric([source.stage, source.group, lag.topic, str(lag.partition)],
                                 lag.records)
        yield gauge


# --------------------------------------------------------------------------- loaders


@dataclass(frozen=True, slots=True)
class LoaderTotals:
    records: int  # source records whose rows are in ClickHouse and whose offsets committed
    rows: int  # rows handed to ClickHouse (raw: events; output loader: flush rows)
    dead_letters_by_reason: Mapping[str, int]


class LoaderCollector:
    """A loader's throughput counters, labelled ``loader="raw"|"rollups"``."""

    def __init__(self, loader: str, totals: Callable[[], LoaderTotals]) -> None:
        self._loader = loader
        self._totals = totals

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        t = self._totals()
        records = CounterMetricFamily("meterline_loader_records",
                                      "Source records loaded into ClickHouse and committed",
                                      labels=["loader"])
        records.add_metric([self._loader], t.records)
        yield records
        rows = CounterMetricFamily("meterline_loader_rows", "Rows inserted into ClickHouse",
                                   labels=["loader"])
        rows.add_metric([self._loader], t.rows)
        yield rows
        dead = CounterMetricFamily("meterline_loader_dead_letters",
                                   "Records and events the loader dead-lettered, by reason",
                                   labels=["loader", "reason"])
        for reason, n in sorted(t.dead_letters_by_reason.items()):
            dead.add_metric([self._loader, reason], n)
        yield dead


# --------------------------------------------------------------------------- serving


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    addr: str
    port: int


def metrics_endpoint(env: Mapping[str, str] | None = None) -> MetricsEndpoint | None:
    """Where to serve /metrics: ``METERLINE_METRICS_PORT`` on ``METERLINE_METRICS_ADDR``
    (default loopback); None when no port is set."""
    env = os.environ if env is None else env
    port = env.get("METERLINE_METRICS_PORT", "").strip()
    if not port:
        return None
    number = int(port) if port.isdigit() else -1
    if not 0 <= number <= 65535:
        raise ConfigError([f"METERLINE_METRICS_PORT must be a port number 0..65535, "
                           f"got {port!r}"], "metrics")
    return MetricsEndpoint(env.get("METERLINE_METRICS_ADDR", "").strip() or DEFAULT_METRICS_ADDR,
                           number)


def serve(collectors: Iterable[Any], endpoint: MetricsEndpoint, registry: Any = None) -> Any:
    """Register ``collectors`` and serve them with the process-wide histograms on
    ``endpoint`` (port 0: any free port). ``registry`` defaults to prometheus-client's
    default one, which holds the histograms already. Returns (server, thread)."""
    try:
        from prometheus_client import REGISTRY, start_http_server
    except ImportError:
        raise RuntimeError("serving metrics needs prometheus-client: "
                           "pip install 'meterline[server]'") from None
    if registry is None or registry is REGISTRY:
        registry = REGISTRY
    else:
        collectors = [*_PROCESS_HISTOGRAMS, *collectors]
    for collector in collectors:
        registry.register(collector)
    server, thread = start_http_server(endpoint.port, endpoint.addr, registry=registry)
    log.info("metrics on http://%s:%d/metrics", endpoint.addr, server.server_port)
    return server, thread
