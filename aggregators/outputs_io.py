"""Moving rollup-stage outputs: straight into ClickHouse, or through Kafka to one loader.

Several worker processes cannot share an embedded chDB (one process owns its data dir), and
a ClickHouse outage should not stall aggregation, so in the distributed setup workers write
their flushes to three topics and ``OutputLoader`` (``meterline load-rollups``) inserts them:

- ``<usage topic>.rollups``: window totals, in blocks of up to ``CHUNK`` rows of one
  source partition and window kind as Arrow IPC streams (sinks/rollup_arrow.py), which the
  loader inserts without a Python object per row; the loader and the anomaly stage also
  read the JSON forms of older workers (``{"rollup_columns": ...}`` and ``{"rollups":
  [...]}``, core/outputs.py);
- ``<usage topic>.dead-letters`` and ``<usage topic>.late-events``: one record each, keyed
  by customer (or source position), readable by any consumer.

Both hops are at-least-once and every record is idempotent in its table, so the pair is
exactly-once end to end. The loader commits offsets only after the insert returned.

Nothing is skipped silently and nothing stalls: decoding ignores fields it does not know
(a newer worker in a rolling upgrade), an item or record that cannot be decoded becomes a
``load``-stage dead letter with its exact bytes and the reason, and a row its table cannot
hold (or whose retention has passed) is refused row by row by ``write_flush``. Each is
logged and counted (``meterline_loader_dead_letters_total{loader="rollups",reason}``).

Metrics: both writers time each flush (``meterline_rollup_flush_seconds{writer}``), every
ClickHouse insert is timed per table (``TimedStorage``), and ``meterline load-rollups``
serves its throughput and consumer lag when ``METERLINE_METRICS_PORT`` is set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

from meterline.aggregators.metrics import FLUSH_SECONDS
from meterline.core.outputs import (
    DeadLetterRecord,
    Flush,
    LateRecord,
    RollupBlock,
    RollupRecord,
    record_dead_letter,
)
from meterline.ingest.metrics import LoaderTotals, TimedStorage
from meterline.ingest.sources import RecordSource, SourceRecord
from meterline.logs import where
from meterline.sinks.retention import RetentionPolicy
from meterline.sinks.rollup_arrow import (
    decode_block,
    encode_block,
    encode_rows,
    is_arrow_payload,
    warm_up,
)

__all__ = ["KafkaOutputWriter", "OutputLoader", "StorageWriter", "output_records",
           "output_topics", "run_kafka_output_loader"]

log = logging.getLogger(__name__)
CHUNK = 2000


def output_topics(usage_topic: str) -> dict[str, str]:
    return {"rollups": f"{usage_topic}.rollups", "dead_letters": f"{usage_topic}.dead-letters",
            "late": f"{usage_topic}.late-events"}


class StorageWriter:
    """Writes a flush into ClickHouse in this process (embedded runner, the loader).

    ``observe_flushes``: time each write as a rollup flush (the embedded runner's writer);
    the output loader's writes are loads, not flushes, and only their inserts are timed.
    ``retention``: the configured policy; rows past it are refused (dead letters) rather
    than inserted and deleted unseen. ``refused`` counts refused rows by reason code.
    """

    def __init__(self, storage: Any, *, database: str | None = None,
                 observe_flushes: bool = True, retention: RetentionPolicy | None = None,
                 ) -> None:
        self._storage = TimedStorage(storage)
        self._database = database
        self._retention = retention
        self._flush_seconds = FLUSH_SECONDS.labels("clickhouse") if observe_flushes else None
        self.refused: dict[str, int] = {}

    def write(self, flush: Flush, refused: Sequence[DeadLetterRecord] = ()) -> None:
        """``refused``: what the caller itself could not read, stored as stage ``load``."""
        from meterline.sinks.rollups import write_flush

        started = time.perf_counter()
        counts = write_flush(self._storage, flush, database=self._database,
                             retention=self._retention, refused=refused)
        for reason, n in counts.refused_by_reason.items():
            self.refused[reason] = self.refused.get(reason, 0) + n
        if self._flush_seconds is not None:
            self._flush_seconds.observe(time.perf_counter() - started)


def output_records(flush: Flush) -> Iterator[tuple[str, str, bytes]]:
    """``(topic kind, key, payload)`` of every output record of ``flush``.

    Rollup rows go as Arrow IPC blocks (sinks/rollup_arrow.py) of up to ``CHUNK`` rows of
    one source partition and window kind, keyed by the partition, so they stay in one
    partition of the topic, in order (the anomaly stage reads them per source partition);
    dead letters and late events as JSON, one per record."""
    runs: dict[tuple[str, int, str], list[RollupRecord]] = {}
    for r in flush.rollups:
        runs.setdefault((r.source, r.partition, r.window), []).append(r)
    for (source, partition, _), rows in runs.items():
        for i in range(0, len(rows), CHUNK):
            yield "rollups", f"{source}/{partition}", encode_rows(rows[i:i + CHUNK])
    for block in flush.rollup_blocks:  # the compiled window store's: already columns
        for lo, hi in _kind_runs(block.window):
            for i in range(lo, hi, CHUNK):
                yield "rollups", f"{block.source}/{block.partition}", encode_block(
                    block, i, min(i + CHUNK, hi))
    for d in flush.dead_letters:
        yield "dead_letters", f"{d.source}/{d.partition}/{d.offset}", orjson.dumps(
            {"dead_letters": [d.to_dict()]})
    for late in flush.late:
        yield "late", late.customer, orjson.dumps({"late": [late.to_dict()]})


def _kind_runs(windows: list[str]) -> list[tuple[int, int]]:
    """``[lo, hi)`` runs of one window kind (a block of the store holds one kind)."""
    if len(set(windows)) <= 1:
        return [(0, len(windows))]
    runs, lo = [], 0
    for i in range(1, len(windows)):
        if windows[i] != windows[lo]:
            runs.append((lo, i))
            lo = i
    return [*runs, (lo, len(windows))]


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
        warm_up()  # the Arrow codec loaded before the first flush, not during it
        self._errors: list[str] = []
        self._flush_seconds = FLUSH_SECONDS.labels("kafka")

    def _report(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def _send(self, topic: str, key: str, payload: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, payload, key.encode(),
                                       on_delivery=self._report)
                return
            except BufferError:  # local queue full: let deliveries drain
                self._producer.poll(0.1)

    def write(self, flush: Flush) -> None:
        started = time.perf_counter()
        for kind, key, payload in output_records(flush):
            self._send(self.topics[kind], key, payload)
        remaining = self._producer.flush(self._timeout_s)
        if remaining or self._errors:
            errors, self._errors = self._errors, []
            # The caller must not checkpoint: the flush is re-derived after a restart.
            raise RuntimeError(f"output write failed ({remaining} undelivered): {errors[:5]}")
        self._flush_seconds.observe(time.perf_counter() - started)

    def close(self) -> None:
        self._producer.flush(self._timeout_s)


_KINDS: tuple[tuple[str, Any, str], ...] = (
    ("rollups", RollupRecord, "rollups"),
    ("dead_letters", DeadLetterRecord, "dead_letters"),
    ("late", LateRecord, "late"),
)
_MAX_REASON = 500


def _received_ms(rec: SourceRecord) -> int:
    return rec.timestamp_ms if rec.timestamp_ms >= 0 else time.time_ns() // 1_000_000


def decode_outputs(records: Sequence[SourceRecord]
                   ) -> tuple[Flush, list[DeadLetterRecord]]:
    """Output-topic records -> one Flush, plus dead letters for what could not be decoded.
    Never raises on content and never drops any.

    Unknown fields are ignored (forward compatible). A record that is not a JSON object of
    lists, and each item of one that cannot be decoded, becomes a dead letter (for stage
    ``load``) with the record's exact bytes and the reason (``output.undecodable``); its
    identity is the output record's own position (items: their index in the record), so a
    replay collapses onto it.
    """
    flush, undecodable = Flush(), []
    for rec in records:
        if is_arrow_payload(rec.payload):  # a rollup block (KafkaOutputWriter)
            try:
                flush.arrow_blocks.append(decode_block(rec.payload))
            except ValueError as exc:
                undecodable.append(record_dead_letter(
                    rec.topic, rec.partition, rec.offset, _received_ms(rec),
                    f"output.undecodable: {exc}"[:_MAX_REASON], rec.payload))
            continue
        try:
            doc = orjson.loads(rec.payload)
            if type(doc) is not dict:
                raise TypeError(f"top level is {type(doc).__name__}, not an object")
        except (orjson.JSONDecodeError, TypeError) as exc:
            undecodable.append(record_dead_letter(
                rec.topic, rec.partition, rec.offset, _received_ms(rec),
                f"output.undecodable: {exc}"[:_MAX_REASON], rec.payload))
            continue
        if "rollup_columns" in doc:  # a block of rows as JSON (workers of sessions 20-21)
            try:
                flush.rollup_blocks.append(RollupBlock.from_doc(doc["rollup_columns"]))
            except (TypeError, ValueError) as exc:
                undecodable.append(record_dead_letter(
                    rec.topic, rec.partition, rec.offset, _received_ms(rec),
                    f"output.undecodable: {exc}"[:_MAX_REASON], rec.payload))
        position = 0  # the row form: one object per item (older workers)
        for key, cls, target in _KINDS:
            items = doc.get(key, [])
            if type(items) is not list:
                items = [items]  # decoded below, and refused as one bad item
            for item in items:
                try:
                    getattr(flush, target).append(cls.from_dict(item))
                except (TypeError, KeyError, ValueError, AttributeError) as exc:
                    undecodable.append(record_dead_letter(
                        rec.topic, rec.partition, rec.offset, _received_ms(rec),
                        f"output.undecodable: {key}[{position}]: {exc}"[:_MAX_REASON],
                        rec.payload, position=position))
                position += 1
    return flush, undecodable


class OutputLoader:
    """Output topics -> ClickHouse, committing after each insert.

    A poll's records land together; what cannot be decoded or stored goes to dead_letters
    (logged, counted in ``dead_letters_by_reason``), never back into a retry loop.
    """

    def __init__(self, storage: Any, source: RecordSource, *, max_records: int = 500,
                 database: str | None = None, retention: RetentionPolicy | None = None,
                 ) -> None:
        self._writer = StorageWriter(storage, database=database, observe_flushes=False,
                                     retention=retention)
        self._source = source
        self._max_records = max_records
        self.records = 0
        self.rows = 0
        self.undecodable: dict[str, int] = {}

    @property
    def dead_letters_by_reason(self) -> dict[str, int]:
        """What this loader dead-lettered itself (not the worker's dead letters it loads):
        the writer's count includes the undecodable records handed to it."""
        return dict(self._writer.refused)

    def run_once(self, timeout_s: float = 0.2) -> int:
        records = self._source.poll_records(self._max_records, timeout_s)
        if not records:
            return 0
        flush, undecodable = decode_outputs(records)
        for d in undecodable:
            self.undecodable["output.undecodable"] = (
                self.undecodable.get("output.undecodable", 0) + 1)
            log.error("unreadable output record %s[%d]@%d (dead-lettered, stage load): %s",
                      d.source, d.partition, d.offset, d.reason,
                      extra=where(d.source, d.partition, d.offset))
        if len(flush) or undecodable:
            self._writer.write(flush, undecodable)
        self._source.commit(records)
        self.records += len(records)
        self.rows += len(flush)
        return len(records)

    def totals(self) -> LoaderTotals:
        """For ``meterline_loader_*{loader="rollups"}`` (read from the scrape thread)."""
        return LoaderTotals(self.records, self.rows, self.dead_letters_by_reason)

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
        loader = OutputLoader(storage, source, retention=config.retention_policy())
        if endpoint is not None:
            serve([LoaderCollector("rollups", loader.totals), LagCollector([lag])], endpoint)
        rows = loader.run(until_idle_s=until_idle_s)
        dead = loader.dead_letters_by_reason
        print(f"loaded {rows} output rows from {loader.records} records"
              + (f"; dead-lettered by this loader: {dead}" if dead else ""))
        return rows
    finally:
        lag.close()
        source.close()
        storage.close()

