"""Prometheus export of emitter counters, when prometheus-client is installed.

A custom collector reads ``Emitter.stats()`` at scrape time, so the hot path pays nothing
for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from meterline.sdk.failures import CAUSES

if TYPE_CHECKING:
    from meterline.sdk.emitter import Emitter


class EmitterCollector:
    def __init__(self, emitter: Emitter, name: str = "default") -> None:
        self._emitter = emitter
        self._name = name

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._emitter.stats()
        events = CounterMetricFamily(
            "meterline_sdk_events",
            "Usage events by what happened to them in the emitter",
            labels=["emitter", "state"],
        )
        for state in (
            "emitted", "delivered", "spooled", "replayed", "rejected", "lost",
            "undelivered_at_close",
        ):
            events.add_metric([self._name, state], getattr(stats, state))
        yield events
        errors = CounterMetricFamily(
            "meterline_sdk_errors",
            "Failures the emitter's background thread survived (events kept and retried)",
            labels=["emitter", "cause"],
        )
        # Every cause from the first scrape on, so rate() and alerts see a series at 0.
        for cause in CAUSES:
            errors.add_metric([self._name, cause], stats.errors_by_cause.get(cause, 0))
        yield errors
        changes = CounterMetricFamily(
            "meterline_sdk_partition_count_changes",
            "Changes of the topic's partition count seen by the emitter (see docs/sdk.md)",
            labels=["emitter"],
        )
        changes.add_metric([self._name], stats.partition_count_changes)
        yield changes
        pending = GaugeMetricFamily(
            "meterline_sdk_pending_events",
            "Events not yet acknowledged by Kafka, by where they wait",
            labels=["emitter", "where"],
        )
        pending.add_metric([self._name, "memory"], stats.buffered + stats.held)
        pending.add_metric([self._name, "spool"], stats.pending_in_spool)
        yield pending


def register_metrics(emitter: Emitter, name: str = "default", registry: Any = None) -> Any:
    """Export ``emitter``'s counters; returns the collector (unregister it when done).

    Returns None when prometheus-client is not installed (it is optional for the SDK).
    """
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return None
    collector = EmitterCollector(emitter, name)
    (registry or REGISTRY).register(collector)
    return collector
