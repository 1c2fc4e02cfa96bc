"""Moving rollup-stage outputs: straight into ClickHouse, or through Kafka to one loader.

Several worker processes cannot share an embedded chDB (one process owns its data dir), and
a ClickHouse outage should not stall aggregation, so in the distributed setup workers write
their flushes to three topics and ``OutputLoader`` (``meterline load-rollups``) inserts them:

- ``<usage topic>.rollups``: window totals, in chunks of up to ``CHUNK`` records;
- ``<usage topic>.dead-letters`` and ``<usage topic>.late-events``: one record each, keyed
  by customer (or source position), readable by any consumer.

Both hops are at-least-once and every record is idempotent in its table, so the pair is
exactly-once end to end. The loader commits offsets only after the insert returned.

Metrics: both writers time each flush (``meterline_rollup_flush_seconds{writer}``), every
ClickHouse insert is timed per table (``TimedStorage``), and ``meterline load-rollups``
serves its throughput and consumer lag when ``METERLINE_METRICS_PORT`` is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from meterline.aggregators.metrics import FLUSH_SECONDS
from meterline.core.outputs import DeadLetterRecord, Flush, LateRecord, RollupRecord
from meterline.ingest.metrics import LoaderTotals, TimedStorage
from meterline.ingest.sources import RecordSource, SourceRecord

__all__ = ["KafkaOutputWriter", "OutputLoader", "StorageWriter", "output_topics",
           "run_kafka_output_loader"]

log = logging.getLogger(__name__)
CHUNK = 2000


def output_topics(usage_topic: str) -> dict[str, str]:
    return {"rollups": f"{usage_topic}.rollups", "dead_letters": f"{usage_topic}.dead-letters",
            "late": f"{usage_topic}.late-events"}


class StorageWriter:
    """Writes a flush into ClickHouse in this process (embedded runner, the loader).

    ``observe_flushes``: time each write as a rollup flush (the embedded runner's writer);
    the output loader's writes are loads, not flushes, and only their inserts are timed.
    """

    def __init__(self, storage: Any, *, database: str | None = None,
                 observe_flushes: bool = True) -> None:
        self._storage = TimedStorage(storage)
        self._database = database
        self._flush_seconds = FLUSH_SECONDS.labels("clickhouse") if observe_flushes else None

    def write(self, flush: Flush) -> None:
        from meterline.sinks.rollups import write_flush

        started = time.perf_counter()
        write_flush(self._storage, flush, database=self._database)
        if self._flush_seconds is not None:
            self._flush_seconds.observe(time.perf_counter() - started)


class KafkaOutputWriter:
    """Produces flushes to the output topics; ``write`` returns once all are acked."""

    def __init__(self, bootstrap_servers: str, usage_topic: str, *,
                 timeout_s: float = 60.0, **extra: Any) -> None:
        from confluent_kafka import Producer

        self.topics = output_topics(usage_topic)
        self._timeout_s = timeout_s
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": 5,
            "message.max.bytes": 16 << 20,
        }
        conf.update(extra)
        self._producer = Producer(conf, logger=logging.getLogger("meterline.outputs.kafka"))
        self._errors: list[str] = []
        self._flush_seconds = FLUSH_SECONDS.labels("kafka")

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def _send(self, topic: str, key: str, doc: dict[str, Any]) -> None:
        while True:
            try:
                self._producer.produce(topic, orjson.dumps(doc), key.encode(),
                                       on_delivery=self._report)
                return
            except BufferError:  # local queue full: let deliveries drain
                self._producer.poll(0.1)

    def write(self, flush: Flush) -> None:
        started = time.perf_counter()
        rollups = self.topics["rollups"]
        for i in range(0, len(flush.rollups), CHUNK):
            chunk = flush.rollups[i:i + CHUNK]
            self._send(rollups, f"{chunk[0].source}/{chunk[0].partition}",
                       {"rollups": [r.to_dict() for r in chunk]})
        for d in flush.dead_letters:
            self._send(self.topics["dead_letters"], f"{d.source}/{d.partition}/{d.offset}",
                       {"dead_letters": [d.to_dict()]})
        for late in flush.late:
            self._send(self.topics["late"], late.customer, {"late": [late.to_dict()]})
        remaining = self._producer.flush(self._timeout_s)
        if remaining or self._errors:
            errors, self._errors = self._errors, []
            # The caller must not checkpoint: the flush is re-derived after a restart.
            raise RuntimeError(f"output write failed ({remaining} undelivered): {errors[:5]}")
        self._flush_seconds.observe(time.perf_counter() - started)

    def close(self) -> None:
        self._producer.flush(self._timeout_s)


def decode_outputs(records: Sequence[SourceRecord]) -> tuple[Flush, list[str]]:
    """Output-topic records -> one Flush. Unreadable records are reported, not raised:
    only Meterline writes these topics, so one is a bug to look at, not data to lose
    silently (the record stays in the topic)."""
    flush, problems = Flush(), []
    for rec in records:
        try:
            doc = orjson.loads(rec.payload)
            flush.rollups += [RollupRecord.from_dict(d) for d in doc.get("rollups", ())]
            flush.dead_letters += [DeadLetterRecord.from_dict(d)
                                   for d in doc.get("dead_letters", ())]
            flush.late += [LateRecord.from_dict(d) for d in doc.get("late", ())]
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError) as exc:
            problems.append(f"{rec.topic}[{rec.partition}]@{rec.offset}: {exc}")
    return flush, problems


class OutputLoader:
    """Output topics -> ClickHouse, committing after each insert."""

    def __init__(self, storage: Any, source: RecordSource, *, max_records: int = 500,
                 database: str | None = None) -> None:
        self._writer = StorageWriter(storage, database=database, observe_flushes=False)
        self._source = source
        self._max_records = max_records
        self.records = 0
        self.rows = 0
        self.problems: list[str] = []

    def run_once(self, timeout_s: float = 0.2) -> int:
        records = self._source.poll_records(self._max_records, timeout_s)
        if not records:
            return 0
        flush, problems = decode_outputs(records)
        for p in problems:
            log.error("unreadable output record %s", p)
        self.problems += problems
        if len(flush):
            self._writer.write(flush)
        self._source.commit(records)
        self.records += len(records)
        self.rows += len(flush)
        return len(records)

    def totals(self) -> LoaderTotals:
        """For ``meterline_loader_*{loader="rollups"}`` (read from the scrape thread)."""
        return LoaderTotals(self.records, self.rows, {})

    def run(self, *, until_idle_s: float | None = None, stop: Callable[[], bool] | None = None,
            ) -> int:
        idle_since = time.monotonic()
        while stop is None or not stop():
            if self.run_once():
                idle_since = time.monotonic()
            elif until_idle_s is not None and time.monotonic() - idle_since >= until_idle_s:
                break
        return self.rows


def run_kafka_output_loader(config: Any, *, until_idle_s: float | None = None) -> int:
    """`meterline load-rollups`: output topics -> the configured ClickHouse."""
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
    topics = list(output_topics(config.kafka.topic).values())
    group = f"{config.kafka.group_id}-output-loader"
    storage = open_storage(config.storage_config())
    source = KafkaSource(config.kafka.bootstrap_servers, topics, group)
    lag = KafkaGroupLag(config.kafka.bootstrap_servers, group, topics, stage="output_loader")
    try:
        migrate(storage, storage.database, config.retention_policy())
        loader = OutputLoader(storage, source)
        if endpoint is not None:
            serve([LoaderCollector("rollups", loader.totals), LagCollector([lag])], endpoint)
        rows = loader.run(until_idle_s=until_idle_s)
        print(f"loaded {rows} output rows from {loader.records} records"
              + (f"; {len(loader.problems)} unreadable" if loader.problems else ""))
        return rows
    finally:
        lag.close()
        source.close()
        storage.close()

