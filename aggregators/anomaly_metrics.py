"""Prometheus export of the anomaly stage, read at scrape time. Low cardinality on purpose:
no customer label anywhere (the customer is in the event, the table and the webhook).

- ``meterline_anomalies_open{meter,direction,severity}``: open episodes, as of each
  partition's last checkpoint (refreshed on the processing thread, read here).
- ``meterline_anomaly_events_total{kind}``: open, update, resolve, early (activity of this
  process: a replay counts again; the exact events are keyed in the table).
- ``meterline_anomaly_rows_total{outcome}``: rollup rows used, stale (for windows already
  final), daily (not used); ``meterline_anomaly_records_total{kind}`` incl. unreadable.
- ``meterline_anomaly_checkpoint_age_seconds``.
- ``meterline_anomaly_webhook_deliveries_total{outcome}`` (delivered, retry,
  dead_letter) and ``meterline_anomaly_webhook_queue`` when a webhook is configured.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from meterline.core.anomaly.model import EVENT_KINDS

if TYPE_CHECKING:
    from meterline.aggregators.anomaly_stage import AnomalyWorker
    from meterline.alerts.webhook import WebhookSender

__all__ = ["AnomalyCollector"]


class AnomalyCollector:
    def __init__(self, worker: AnomalyWorker, sender: WebhookSender | None = None) -> None:
        self._worker = worker
        self._sender = sender

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        w = self._worker
        open_ = GaugeMetricFamily("meterline_anomalies_open",
                                  "Open anomaly episodes (as of the last checkpoint)",
                                  labels=["meter", "direction", "severity"])
        for (meter, direction, severity), n in sorted(w.open_totals().items()):
            open_.add_metric([meter, direction, severity], n)
        yield open_
        t = w.totals()
        events = CounterMetricFamily("meterline_anomaly_events", "Anomaly events emitted",
                                     labels=["kind"])
        for kind in EVENT_KINDS:
            events.add_metric([kind], t.events.get(kind, 0))
        yield events
        rows = CounterMetricFamily("meterline_anomaly_rows", "Rollup rows by what the "
                                   "anomaly stage did with them", labels=["outcome"])
        rows.add_metric(["used"], t.rows)
        rows.add_metric(["stale"], t.stale_rows)
        rows.add_metric(["daily"], t.daily_rows)
        yield rows
        records = CounterMetricFamily("meterline_anomaly_records", "Rollups-topic records",
                                      labels=["kind"])
        records.add_metric(["processed"], t.records)
        records.add_metric(["skipped_replay"], t.skipped_records)
        records.add_metric(["refused_gap"], t.gap_records)
        records.add_metric(["unreadable"], t.unreadable_records)
        yield records
        yield GaugeMetricFamily("meterline_anomaly_checkpoint_age_seconds",
                                "Seconds since the anomaly stage last saved a checkpoint",
                                value=w.checkpoint_age_s(time.monotonic()))
        if self._sender is not None:
            c = self._sender.counters
            hooks = CounterMetricFamily("meterline_anomaly_webhook_deliveries",
                                        "Webhook deliveries by outcome", labels=["outcome"])
            hooks.add_metric(["delivered"], c.delivered)
            hooks.add_metric(["retry"], c.retries)
            hooks.add_metric(["dead_letter"], sum(c.dead_letters.values()))
            yield hooks
            yield GaugeMetricFamily("meterline_anomaly_webhook_queue",
                                    "Events waiting for the webhook thread",
                                    value=self._sender.queued)
