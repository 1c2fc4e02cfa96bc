"""Prometheus export of the rollup worker's counters, read at scrape time.

The counters are activity metrics of this process: records replayed after a crash are
counted again (the exact numbers are in ClickHouse). Alert on ``rejected``/``late`` rates
(abusive or broken clients), on ``meterline_rollup_checkpoint_age_seconds`` (a stuck
worker) and on consumer-group lag from the broker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meterline.aggregators.runner import RollupWorker

OUTCOMES = ("accepted", "duplicate", "late", "late_allowed", "rejected")


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


def serve_metrics(worker: RollupWorker, port: int, addr: str = "0.0.0.0") -> None:
    from prometheus_client import REGISTRY, start_http_server

    REGISTRY.register(RollupCollector(worker))
    start_http_server(port, addr)
