"""Prometheus export of the rollup worker's counters, read at scrape time.

The counters are activity metrics of this process: records replayed after a crash are
counted again (the exact numbers are in ClickHouse). Alert on ``rejected``/``late`` rates
(abusive or broken clients), on ``meterline_rollup_checkpoint_age_seconds`` (a stuck
worker) and on ``meterline_consumer_lag_records{stage="rollup"}`` (the group's committed
offsets against the log end, for the partitions this worker owns; see
``meterline.ingest.metrics.KafkaGroupLag``). dashboards/alerts.yml has the rules.

``meterline_rollup_flush_seconds{writer}`` times each ``OutputWriter.write`` (outputs_io):
how long making one flush durable takes, in ClickHouse or on the output topics.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from meterline.aggregators.log_probe import KafkaLogProbe, LocalLogProbe
from meterline.ingest.metrics import (
    DEFAULT_METRICS_ADDR,
    KafkaGroupLag,
    LagCollector,
    LagSource,
    LocalLogLag,
    MetricsEndpoint,
    histogram,
    serve,
)

if TYPE_CHECKING:
    from meterline.aggregators.runner import RollupWorker

OUTCOMES = ("accepted", "duplicate", "late", "late_allowed", "rejected")

# A flush writes the windows changed since the last one: ~10 ms at steady load, up to a
# few seconds after a backlog (FLUSH_COST_FACTOR in runner.py spaces those out), and the
# Kafka writer waits for acks (60 s timeout). Buckets 5 ms .. 60 s, about x2.5 apart.
FLUSH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0,
                   60.0)
FLUSH_SECONDS = histogram(
    "meterline_rollup_flush_seconds",
    "Duration of writing one rollup flush (window totals, late events, dead letters)",
    ["writer"], FLUSH_BUCKETS_S)


class RollupCollector:
    def __init__(self, worker: RollupWorker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        w = self._worker
        totals = w.totals()
        events = CounterMetricFamily("meterline_rollup_events",
                                     "Events by what the rollup stage did with them",
                                     labels=["outcome"])
        for outcome in OUTCOMES:
            events.add_metric([outcome], getattr(totals, outcome))
        yield events
        reasons = CounterMetricFamily("meterline_rollup_rejected_events",
                                      "Dead-lettered events and records by reason",
                                      labels=["reason"])
        for reason, n in sorted(totals.by_reason.items()):
            reasons.add_metric([reason], n)
        yield reasons
        records = CounterMetricFamily("meterline_rollup_records",
                                      "Kafka records (envelopes) by processing",
                                      labels=["kind"])
        records.add_metric(["processed"], totals.records)
        records.add_metric(["skipped_replay"], totals.skipped_records)
        # Past the checkpoint's position: refused, then re-read after a seek. A steady rise
        # outside rebalances means a consumer keeps running ahead of the state.
        records.add_metric(["refused_gap"], totals.gap_records)
        yield records
        yield CounterMetricFamily("meterline_rollup_absent_offsets",
                                  "Offsets the log confirmed hold no record (transaction "
                                  "markers, compaction), moved past",
                                  value=totals.absent_offsets)
        yield CounterMetricFamily("meterline_rollup_flushes", "Flushes written", value=w.flushes)
        yield CounterMetricFamily("meterline_rollup_checkpoints", "Checkpoints saved",
                                  value=w.checkpoints)
        yield GaugeMetricFamily("meterline_rollup_checkpoint_age_seconds",
                                "Seconds since the last checkpoint was saved",
                                value=w.checkpoint_age_s(time.monotonic()))
        windows = GaugeMetricFamily("meterline_rollup_open_windows",
                                    "Windows held in memory", labels=["partition"])
        for tp, proc in sorted(list(w.processors.items())):
            windows.add_metric([f"{tp.topic}/{tp.partition}"], len(proc.state))
        yield windows


def worker_lag(worker: RollupWorker) -> LagSource | None:
    """The lag of the partitions ``worker`` owns, from what its log probe reads.

    The two known probes say where they read from (``KafkaLogProbe.bootstrap_servers``,
    ``LocalLogProbe.log``). None when the worker has no probe it knows: then no lag is
    exported by this process.
    """
    probe = worker.probe

    def owned_partitions() -> list[tuple[str, int]]:
        return [(tp.topic, tp.partition) for tp in list(worker.processors)]

    if isinstance(probe, KafkaLogProbe):
        return KafkaGroupLag(probe.bootstrap_servers, worker.group, [], stage="rollup",
                             partitions=owned_partitions)
    if isinstance(probe, LocalLogProbe):
        return LocalLogLag(probe.log, worker.group, stage="rollup", partitions=owned_partitions)
    return None


def serve_metrics(worker: RollupWorker, port: int, addr: str | None = None, *,
                  lag: LagSource | None = None, registry: Any = None) -> Any:
    """Serve the worker's counters, its partitions' consumer lag and the process-wide
    histograms on ``addr:port`` (``addr`` default: ``METERLINE_METRICS_ADDR``, else
    loopback). Returns prometheus-client's (server, thread)."""
    endpoint = MetricsEndpoint(
        addr or os.environ.get("METERLINE_METRICS_ADDR", "").strip() or DEFAULT_METRICS_ADDR,
        port)
    lag = lag or worker_lag(worker)
    collectors: list[Any] = [RollupCollector(worker)]
    if lag is not None:
        collectors.append(LagCollector([lag]))
    return serve(collectors, endpoint, registry)
