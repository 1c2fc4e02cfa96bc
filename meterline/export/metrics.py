"""Prometheus metrics of the export: backlog per target, outcomes, send latency.

Labelled by target only (a handful of values): per-item detail lives in the ledger.
Each :class:`ExportMetrics` has its own registry unless given one, so tests and several
exporters in one process do not collide; ``meterline export`` serves it on
``METERLINE_METRICS_PORT`` like the other long-running commands.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportMetrics"]

# A local webhook answers in ~1 ms; Stripe and Chargebee in 100 ms - 2 s; a timeout is 10 s+.
SEND_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0)


class ExportMetrics:
    def __init__(self, registry: Any | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.backlog = Gauge("meterline_export_backlog_items",
                             "Items waiting to reach the target (pending or being sent)",
                             ["target"], registry=r)
        self.sent = Counter("meterline_export_sent_items",
                            "Items the target confirmed holding", ["target"], registry=r)
        self.failed = Counter("meterline_export_failed_items",
                              "Items dead-lettered (refused by the target, or attempts used up)",
                              ["target"], registry=r)
        self.retries = Counter("meterline_export_retried_items",
                               "Item sends that will be retried (5xx, 429, timeout, refused)",
                               ["target"], registry=r)
        self.send_seconds = Histogram("meterline_export_send_seconds",
                                      "Time of one batch sent to the target", ["target"],
                                      buckets=SEND_BUCKETS_S, registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr, registry=self.registry)
