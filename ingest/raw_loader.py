"""Raw-events stage: batch records -> decode -> raw_events (or dead letters) -> commit.

The order is what makes it safe: rows are inserted first and the source offsets are
committed after, so a crash in between re-reads the records and re-inserts the same rows,
which readers of ``raw_events`` count once per ``(customer, meter, event_id)``. A poison
record or event never stalls its partition: a record the decoder refuses, every event the
rollup fold would refuse (the meter registry's rules, checked by the fold's own
``MeterPlan.check``), and every event ``raw_events`` would delete at once (past the table's
retention) becomes a dead letter with its reason, and the rest of the poll lands. So raw
totals equal the rollup totals readers see, save one case only the fold can know: an event
that would take its *window's* total out of Decimal(38, 9) (``window_total_out_of_range``)
is in raw_events, where each row fits its column.

Metrics: inserts are timed per table (``TimedStorage``); ``meterline load-raw`` serves the
loader's throughput and its group's consumer lag when ``METERLINE_METRICS_PORT`` is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meterline.core.envelope import Batch, decode_batch
from meterline.core.errors import EnvelopeError
from meterline.core.events import MAX_TIMESTAMP_MS
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import DeadLetterRecord, event_dead_letter, record_dead_letter
from meterline.core.rollup import MAX_FUTURE_SKEW_MS, MISSING_CUSTOMER, UNKNOWN_METER, MeterPlan
from meterline.ingest.metrics import LoaderTotals, TimedStorage
from meterline.ingest.sources import RecordSource, SourceRecord
from meterline.logs import where
from meterline.sinks.raw_events import (
    DeadLetterColumns,
    RawEventColumns,
    insert_dead_letters,
    insert_raw_events,
)
from meterline.sinks.retention import RETENTION_MARGIN_MS, RetentionPolicy
from meterline.sinks.storage import Storage

log = logging.getLogger(__name__)

# Per-event reasons of this stage (``event.<code>`` in dead_letters): the rollup fold's
# codes (``meterline.core.rollup.REJECTION_REASONS``) for the registry's rules, decided by
# the same objects in the same order, plus the one only raw_events has:
OUTSIDE_RETENTION = "outside_retention"  # raw_events' TTL would delete it on insert


@dataclass
class LoadCounters:
    records: int = 0
    events: int = 0
    dead_letters: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def add_reason(self, reason: str, n: int = 1) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + n
        self.dead_letters += n


def _event_faults(batch: Batch, clock_ms: int, now_ms: int, registry: MeterRegistry,
                  plans: dict[str, MeterPlan | None],
                  retention: RetentionPolicy) -> dict[int, str]:
    """``{position: reason}`` for the events of ``batch`` raw_events must not take.

    ``clock_ms`` is the record's log time (the fold's clock for the future-skew rule);
    ``now_ms`` the loader's wall clock (what the table's TTL runs on). ``plans`` caches
    one ``MeterPlan`` per meter name across the batches of a poll.
    """
    bad: dict[int, str] = {}
    newest_ok_ms = min(clock_ms + MAX_FUTURE_SKEW_MS, MAX_TIMESTAMP_MS - 1)
    dimensions = batch.dimensions
    rows = zip(batch.customers, batch.meters, batch.quantities, batch.timestamps_ms,
               strict=True)
    # The fold's order (RollupState.apply_batch): unknown meter, missing customer, then
    # the meter's own rules - so an event with two faults gets the fold's reason.
    for i, (customer, meter, qty, ts) in enumerate(rows):
        if meter in plans:
            plan = plans[meter]
        else:
            found = registry.get(meter)
            plan = plans[meter] = None if found is None else MeterPlan(found)
        if plan is None:
            bad[i] = UNKNOWN_METER
        elif not customer:
            bad[i] = MISSING_CUSTOMER
        else:
            checked = plan.check(qty, ts, dimensions[i] if dimensions is not None else None,
                                 newest_ok_ms)
            if isinstance(checked, str):
                bad[i] = checked
    # Retention: one comparison for the whole batch unless its oldest event is near the
    # edge for the shortest retention any meter has.
    stamps = batch.timestamps_ms
    field_ = "raw_events_days"
    horizon_ms = now_ms + RETENTION_MARGIN_MS
    shortest = min([retention.raw_events_days] + [d for _, d in retention.overrides(field_)])
    if RetentionPolicy(raw_events_days=shortest).expires_at_ms(field_, min(stamps)) <= horizon_ms:
        for i, (ts, meter) in enumerate(zip(stamps, batch.meters, strict=True)):
            if i not in bad and retention.expires_at_ms(field_, ts, meter) <= horizon_ms:
                bad[i] = OUTSIDE_RETENTION
    return bad


def build_rows(
    records: Sequence[SourceRecord], now_ms: int, registry: MeterRegistry,
    retention: RetentionPolicy | None = None,
) -> tuple[RawEventColumns, DeadLetterColumns, LoadCounters]:
    """Pure: records -> raw-event columns + dead letters (one per bad record or event).

    Every event is checked on its own: one the rollup fold would refuse under
    ``registry``, or that raw_events would delete at once (see ``_event_faults``), becomes
    a dead letter with its reason and the rest of its batch, and of the poll, lands.
    ``registry`` must be the one the rollup stage runs with, or the stages disagree.
    ``retention`` defaults to ``RetentionPolicy()``: pass the configured one, or events
    inside a longer configured retention are refused.
    """
    retention = retention or RetentionPolicy()
    plans: dict[str, MeterPlan | None] = {}
    counters = LoadCounters(records=len(records))
    raw: dict[str, list[Any]] = {k: [] for k in (
        "event_id", "batch_id", "customer", "meter", "quantity_nano", "timestamp_ms",
        "dimensions", "source", "ingested_at_ms", "source_partition", "source_offset",
        "position")}
    dead: list[DeadLetterRecord] = []

    for rec in records:
        # The log timestamp keeps a replayed dead letter identical to the first one; only
        # a source without timestamps falls back to the loader's clock.
        received_ms = rec.timestamp_ms if rec.timestamp_ms >= 0 else now_ms
        try:
            batch = decode_batch(rec.payload)
        except EnvelopeError as exc:
            dead.append(record_dead_letter(rec.topic, rec.partition, rec.offset, received_ms,
                                           f"envelope.{exc.reason}: {exc.detail}"[:500],
                                           rec.payload))
            continue
        ids = batch.event_ids()
        clock_ms = rec.timestamp_ms if rec.timestamp_ms >= 0 else batch.created_ms
        bad = _event_faults(batch, clock_ms, now_ms, registry, plans, retention)
        for i, reason in sorted(bad.items()):
            dead.append(event_dead_letter(rec.topic, rec.partition, rec.offset, received_ms,
                                          batch, i, ids[i], "event." + reason))
        ok = range(len(batch)) if not bad else [i for i in range(len(batch)) if i not in bad]
        n = len(ok)
        take = _identity if not bad else _picker(list(ok))
        raw["event_id"] += take(ids)
        raw["batch_id"] += [batch.batch_id] * n
        raw["customer"] += take(batch.customers)
        raw["meter"] += take(batch.meters)
        raw["quantity_nano"] += take(batch.quantities)
        raw["timestamp_ms"] += take(batch.timestamps_ms)
        raw["dimensions"] += take(batch.event_dimensions())
        raw["source"] += take([s or "" for s in batch.event_sources()])
        raw["ingested_at_ms"] += [now_ms] * n
        raw["source_partition"] += [rec.partition] * n
        raw["source_offset"] += [rec.offset] * n
        raw["position"] += list(ok)
        counters.events += n
    for d in dead:
        counters.add_reason(d.reason.split(":", 1)[0])
    return RawEventColumns(**raw), DeadLetterColumns.from_records(dead, "raw"), counters


def _identity(col: list[Any]) -> list[Any]:
    return col


def _picker(indices: list[int]) -> Callable[[list[Any]], list[Any]]:
    return lambda col: [col[i] for i in indices]


class RawEventLoader:
    def __init__(
        self,
        storage: Storage,
        source: RecordSource,
        registry: MeterRegistry,
        *,
        max_records: int = 200,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        retention: RetentionPolicy | None = None,
    ) -> None:
        self._storage = TimedStorage(storage)
        self._retention = retention or RetentionPolicy()
        self._registry = registry
        self._source = source
        self._max_records = max_records
        self._clock_ms = clock_ms
        self.totals = LoadCounters()

    def run_once(self, timeout_s: float = 0.5) -> LoadCounters:
        """Load one poll's worth of records. Returns what this step did."""
        records = self._source.poll_records(self._max_records, timeout_s)
        if not records:
            return LoadCounters()
        rows, dead, counters = build_rows(records, self._clock_ms(), self._registry,
                                           self._retention)
        for reason, n in sorted(counters.by_reason.items()):
            log.warning("raw stage: %d dead letter(s) %s in offsets %d..%d", n, reason,
                        records[0].offset, records[-1].offset,
                        extra=where(records[0].topic, records[0].partition, records[0].offset))
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
        loader = RawEventLoader(storage, source, config.registry(),
                                retention=config.retention_policy())
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
