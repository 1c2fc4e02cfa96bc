"""Raw-events stage: batch records -> decode -> raw_events (or dead letters) -> commit.

The order is what makes it safe: rows are inserted first and the source offsets are
committed after, so a crash in between re-reads the records and re-inserts the same rows,
which ``raw_events`` collapses by event id. A poison record never stalls its partition: it
becomes a dead letter with the decoder's reason and the stream moves on.

Metrics: inserts are timed per table (``TimedStorage``); ``meterline load-raw`` serves the
loader's throughput and its group's consumer lag when ``METERLINE_METRICS_PORT`` is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meterline.core.envelope import decode_batch
from meterline.core.errors import EnvelopeError
from meterline.core.events import METER_NAME_RE
from meterline.core.outputs import WHOLE_RECORD
from meterline.ingest.metrics import LoaderTotals, TimedStorage
from meterline.ingest.sources import RecordSource, SourceRecord
from meterline.sinks.raw_events import (
    DeadLetterColumns,
    RawEventColumns,
    insert_dead_letters,
    insert_raw_events,
)
from meterline.sinks.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class LoadCounters:
    records: int = 0
    events: int = 0
    dead_letters: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def add_reason(self, reason: str, n: int = 1) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + n
        self.dead_letters += n


def build_rows(
    records: Sequence[SourceRecord], now_ms: int
) -> tuple[RawEventColumns, DeadLetterColumns, LoadCounters]:
    """Pure: records -> raw-event columns + dead letters (one per bad record or event)."""
    counters = LoadCounters(records=len(records))
    raw: dict[str, list] = {k: [] for k in (
        "event_id", "batch_id", "customer", "meter", "quantity_nano", "timestamp_ms",
        "dimensions", "source", "ingested_at_ms")}
    dead: dict[str, list] = {k: [] for k in (
        "received_at_ms", "source", "source_partition", "source_offset", "position", "stage",
        "batch_id", "event_id", "reason", "payload")}

    def dead_letter(rec: SourceRecord, position: int, batch_id: str, event_id: str,
                    reason: str, payload: bytes) -> None:
        # The log timestamp keeps a replayed dead letter identical to the first one; only
        # a source without timestamps falls back to the loader's clock.
        dead["received_at_ms"].append(rec.timestamp_ms if rec.timestamp_ms >= 0 else now_ms)
        dead["source"].append(rec.topic)
        dead["source_partition"].append(rec.partition)
        dead["source_offset"].append(rec.offset)
        dead["position"].append(position)
        dead["stage"].append("raw")
        dead["batch_id"].append(batch_id)
        dead["event_id"].append(event_id)
        dead["reason"].append(reason)
        dead["payload"].append(payload)
        counters.add_reason(reason.split(":", 1)[0])

    for rec in records:
        try:
            batch = decode_batch(rec.payload)
        except EnvelopeError as exc:
            dead_letter(rec, WHOLE_RECORD, "", "", f"envelope.{exc.reason}: {exc.detail}"[:500],
                        rec.payload)
            continue
        ids = batch.event_ids()
        sources = [s or "" for s in batch.event_sources()]
        dims = batch.event_dimensions()
        ok = [
            i for i, (c, m) in enumerate(zip(batch.customers, batch.meters, strict=True))
            if c and METER_NAME_RE.match(m)
        ]
        if len(ok) != len(batch):
            # Per-event faults: keep the good events, dead-letter each bad one as JSON.
            import orjson

            bad = sorted(set(range(len(batch))) - set(ok))
            for i in bad:
                reason = "event.missing_customer" if not batch.customers[i] else "event.bad_meter"
                event = {"id": ids[i], "customer": batch.customers[i], "meter": batch.meters[i],
                         "quantity": str(batch.quantities[i]),
                         "timestamp_ms": batch.timestamps_ms[i]}
                dead_letter(rec, i, batch.batch_id, ids[i], reason, orjson.dumps(event))
        n = len(ok)
        take = _identity if n == len(batch) else _picker(ok)
        raw["event_id"] += take(ids)
        raw["batch_id"] += [batch.batch_id] * n
        raw["customer"] += take(batch.customers)
        raw["meter"] += take(batch.meters)
        raw["quantity_nano"] += take(batch.quantities)
        raw["timestamp_ms"] += take(batch.timestamps_ms)
        raw["dimensions"] += take(dims)
        raw["source"] += take(sources)
        raw["ingested_at_ms"] += [now_ms] * n
        counters.events += n
    return RawEventColumns(**raw), DeadLetterColumns(**dead), counters


def _identity(col: list[Any]) -> list[Any]:
    return col


def _picker(indices: list[int]) -> Callable[[list[Any]], list[Any]]:
    return lambda col: [col[i] for i in indices]


class RawEventLoader:
    def __init__(
        self,
        storage: Storage,
        source: RecordSource,
        *,
        max_records: int = 200,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._storage = TimedStorage(storage)
        self._source = source
        self._max_records = max_records
        self._clock_ms = clock_ms
        self.totals = LoadCounters()

    def run_once(self, timeout_s: float = 0.5) -> LoadCounters:
        """Load one poll's worth of records. Returns what this step did."""
        records = self._source.poll_records(self._max_records, timeout_s)
        if not records:
            return LoadCounters()
        rows, dead, counters = build_rows(records, self._clock_ms())
        insert_dead_letters(self._storage, dead)
        insert_raw_events(self._storage, rows)
        self._source.commit(records)
        self.totals.records += counters.records
        self.totals.events += counters.events
        for reason, n in counters.by_reason.items():
            self.totals.add_reason(reason, n)
        return counters

    def metric_totals(self) -> LoaderTotals:
        """For ``meterline_loader_*{loader="raw"}`` (read from the scrape thread)."""
        t = self.totals
        return LoaderTotals(t.records, t.events, dict(t.by_reason))

    def run(self, *, until_idle_s: float | None = None,
            on_step: Callable[[LoadCounters], None] | None = None) -> LoadCounters:
        idle_since = time.monotonic()
        while True:
            step = self.run_once()
            if on_step is not None:
                on_step(step)
            if step.records:
                idle_since = time.monotonic()
            elif until_idle_s is not None and time.monotonic() - idle_since >= until_idle_s:
                return self.totals


def run_kafka_loader(config: Any, *, until_idle_s: float | None = None) -> LoadCounters:
    """`meterline load-raw`: the raw-events stage against Kafka and the configured storage."""
    from meterline.ingest.metrics import (
        KafkaGroupLag,
        LagCollector,
        LoaderCollector,
        metrics_endpoint,
        serve,
    )
    from meterline.ingest.sources import KafkaSource
    from meterline.sinks.schema import migrate
    from meterline.sinks.storage import open_storage

    endpoint = metrics_endpoint()
    kafka = config.kafka
    storage = open_storage(config.storage_config())
    source = KafkaSource(kafka.bootstrap_servers, kafka.topic, kafka.group_id)
    lag = KafkaGroupLag(kafka.bootstrap_servers, kafka.group_id, [kafka.topic], stage="raw")
    try:
        migrate(storage, storage.database, config.retention_policy())
        loader = RawEventLoader(storage, source)
        if endpoint is not None:
            serve([LoaderCollector("raw", loader.metric_totals), LagCollector([lag])], endpoint)
        totals = loader.run(until_idle_s=until_idle_s)
        print(f"loaded {totals.events} events from {totals.records} records; "
              f"dead letters: {totals.dead_letters} {totals.by_reason or ''}")
        return totals
    finally:
        lag.close()
        source.close()
        storage.close()
