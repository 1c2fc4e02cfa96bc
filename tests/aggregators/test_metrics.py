"""The worker's Prometheus collector reports what the processors counted."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from meterline.aggregators.checkpoints import MemoryCheckpointStore
from meterline.aggregators.metrics import RollupCollector
from meterline.aggregators.runner import RollupWorker, TopicPartition
from meterline.core.envelope import Batch, encode_batch
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush
from meterline.core.quantity import SCALE
from meterline.ingest.sources import SourceRecord

REGISTRY = MeterRegistry.from_mapping({"meters": {"calls": {"aggregation": "count"}}})
T = 1_795_000_000_000


class Sink:
    def __init__(self) -> None:
        self.flushes: list[Flush] = []

    def write(self, flush: Flush) -> None:
        self.flushes.append(flush)


def test_collector_exports_outcomes_reasons_and_windows() -> None:
    worker = RollupWorker(REGISTRY, Sink(), MemoryCheckpointStore(), group="g")
    assert worker.assign([TopicPartition("usage", 0)]) == {TopicPartition("usage", 0): None}
    batch = Batch("b1", T, ["a", "a", ""], ["calls", "nope", "calls"], [SCALE] * 3, [T] * 3)
    worker.process(SourceRecord("usage", 0, 0, encode_batch(batch), T))
    worker.process(SourceRecord("usage", 0, 1, encode_batch(batch), T))  # resent
    worker.process(SourceRecord("usage", 0, 2, b"junk", T))
    assert worker.flush(checkpoint=True) == {TopicPartition("usage", 0): 3}
    registry = CollectorRegistry()
    registry.register(RollupCollector(worker))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'meterline_rollup_events_total{outcome="accepted"} 1.0' in text
    assert 'meterline_rollup_events_total{outcome="duplicate"} 3.0' in text
    assert 'meterline_rollup_events_total{outcome="rejected"} 3.0' in text
    assert 'meterline_rollup_rejected_events_total{reason="event.unknown_meter"} 1.0' in text
    assert 'meterline_rollup_open_windows{partition="usage/0"} 2.0' in text
    assert "meterline_rollup_checkpoints_total 1.0" in text
    assert 'meterline_rollup_records_total{kind="refused_gap"} 0.0' in text
    assert "meterline_rollup_absent_offsets_total 0.0" in text
