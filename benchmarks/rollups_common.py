"""Shared pieces of the rollup benchmarks (benchmarks/e2e_rollups.py): the workload, its
topics, the committed-lag probe, chDB storage, small helpers."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # faust_naive

PARTITIONS = 4
CUSTOMERS = 1_000
HOUR_MS = 3_600_000
# Throughput worker: the worker's default. Committed lag reaches 0 only after a checkpoint,
# so the "full" boundary includes up to one interval (+ Faust's 1 s commit interval).
CHECKPOINT_INTERVAL_S = 5.0
FLUSH_INTERVAL_S = 0.5  # both workers (the default): the freshness budget's main term
LAG_POLL_S = 0.1
PROBE_EVERY_S = 0.05
FRESH_WARMUP_S = 3.0
USAGE_TOPIC = "usage"  # the envelopes: read by the worker and by the raw consume loop


log = logging.getLogger("e2e_rollups")

# Shared with the baseline harness (benchmarks/ is on sys.path above).
from faust_naive import _quiet_logger as _quiet  # noqa: E402
from faust_naive import _tail  # noqa: E402,F401


# --------------------------------------------------------------------------- helpers
def _records(events: int, *, truth: Any = None, cardinality: str = "high") -> list[Any]:
    """usage_log records: batches of 4 x ~500 events (one envelope per partition), event
    times spread over ~3 h ending an hour before now (recent for the TTLs, never in the
    future of the log clock). ``cardinality``: "high", each envelope spread over its
    partition's ~250 customers; "low", one customer per envelope."""
    from meterline.testing.usage_log import usage_records

    now = time.time_ns() // 1_000_000
    batches = max(1, events // (500 * PARTITIONS))
    span_ms = 3 * HOUR_MS
    start = now - now % HOUR_MS - 4 * HOUR_MS
    return list(usage_records(events, CUSTOMERS, PARTITIONS, start_ms=start,
                              events_per_batch=500 * PARTITIONS,
                              ms_per_batch=max(1, span_ms // batches), truth=truth,
                              one_customer_per_envelope=cardinality == "low"))


def _produce(bootstrap: str, topic: str, records: list[Any]) -> float:
    """The SDK's producer settings (idempotent, acks=all, lz4); returns seconds."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all", "compression.type": "lz4", "linger.ms": 5,
                         "message.max.bytes": 16 << 20},
                        logger=_quiet("e2e_rollups.producer"))
    errors: list[str] = []

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    t0 = time.perf_counter()
    deadline = time.monotonic() + 300
    for rec in records:
        while True:
            try:
                producer.produce(topic, rec.payload, partition=rec.partition,
                                 on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
                if time.monotonic() > deadline:
                    raise RuntimeError("producing the backlog took over 300 s") from None
        producer.poll(0)
    if producer.flush(120) or errors:
        raise RuntimeError(f"backlog not delivered: {errors[:3]}")
    return time.perf_counter() - t0


def _create_topics(broker: Any, topic: str) -> None:
    """The usage topic and the worker's output topics, all LogAppendTime, so record
    timestamps are the broker's append times (the worker finds the outputs existing)."""
    from meterline.aggregators.outputs_io import output_topics

    cfg = {"message.timestamp.type": "LogAppendTime"}
    broker.create_topic(topic, PARTITIONS, config=cfg)
    for name in output_topics(topic).values():
        broker.create_topic(name, PARTITIONS, config=cfg)


class LagProbe:
    """Committed lag of a consumer group on one topic (one consumer, never subscribes)."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        from confluent_kafka import Consumer

        self.topic = topic
        self._c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                            "enable.auto.commit": False},
                           logger=_quiet("e2e_rollups.lag"))

    def lag(self) -> int:
        from confluent_kafka import TopicPartition

        tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        lag = 0
        for tp in self._c.committed(tps, timeout=10):
            _, high = self._c.get_watermark_offsets(tp, timeout=10)
            lag += high - max(tp.offset, 0)
        return lag

    def high_watermarks(self, topics: list[str]) -> int:
        from confluent_kafka import TopicPartition

        return sum(self._c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                   for t in topics for p in range(PARTITIONS))

    def close(self) -> None:
        self._c.close()


def _open_storage(data_dir: Path, database: str) -> Any:
    from meterline.sinks.schema import migrate
    from meterline.sinks.storage import StorageConfig, open_storage

    storage = open_storage(StorageConfig(data_dir=str(data_dir), database=database))
    migrate(storage, database)
    return storage


def _git_head() -> str:
    """Short commit of the working tree, "+dirty" when tracked code differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "aggregators", "meterline", "sinks", "ingest", "sdk"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout
        return (head or "unknown") + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))  # nearest rank
    return s[k]


# --------------------------------------------------------------------------- workload
class EventLog:
    """``usage_log.Truth`` that also keeps every *distinct* event, compactly (arrays of
    small ints: ~25 bytes per event), for the one-event-per-message topic of the peers,
    and folds each peer's own truth: sum and count of the nano-quantities per
    (customer, meter, group, hour), computed here from the generator's events, never from
    the envelopes or any code under test."""

    def __init__(self) -> None:
        from array import array

        from meterline.testing.usage_log import Truth

        self.truth = Truth()
        self.names: dict[str, int] = {}
        self.customer, self.meter, self.group = array("i"), array("i"), array("i")
        self.quantity, self.ts = array("q"), array("q")
        self.windows: dict[tuple[str, str, str, int], list[int]] = {}  # -> [sum, count]

    def _id(self, name: str) -> int:
        i = self.names.get(name)
        if i is None:
            i = self.names[name] = len(self.names)
        return i

    def add(self, customer: str, meter: str, nanos: int, ts: int,
            dims: dict[str, str]) -> None:
        self.truth.add(customer, meter, nanos, ts, dims)
        # The peers key by the dimensions as sent (k=v joined by &, in the event's order).
        group = "&".join(f"{k}={v}" for k, v in dims.items())
        self.customer.append(self._id(customer))
        self.meter.append(self._id(meter))
        self.group.append(self._id(group))
        self.quantity.append(nanos)
        self.ts.append(ts)
        w = self.windows.setdefault((customer, meter, group, ts - ts % HOUR_MS), [0, 0])
        w[0] += nanos
        w[1] += 1

    def __len__(self) -> int:
        return len(self.ts)

    def messages(self, limit: int | None = None) -> Any:
        """(key, value, customer) per distinct event, in generation order."""
        import orjson

        names = list(self.names)
        dumps = orjson.dumps
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(n):
            c, m, g = names[self.customer[i]], names[self.meter[i]], names[self.group[i]]
            value = dumps({"customer": c, "meter": m, "group": g,
                           "quantity": self.quantity[i], "timestamp_ms": self.ts[i]})
            yield f"{c}|{m}|{g}".encode(), value, c


class Workload:
    """The run's events, generated once: the envelopes every consumer reads and, with
    ``keep_events``, the distinct events for the one-event-per-message peers."""

    def __init__(self, events: int, *, verify: bool, keep_events: bool,
                 cardinality: str = "high") -> None:
        self.events = events
        self.cardinality = cardinality
        self.log = EventLog() if keep_events else None
        truth: Any = self.log if self.log is not None else None
        if truth is None and verify:
            from meterline.testing.usage_log import Truth

            truth = Truth()
        t0 = time.perf_counter()
        self.records = _records(events, truth=truth, cardinality=cardinality)
        self.gen_s = time.perf_counter() - t0
        self.truth = self.log.truth if self.log is not None else truth


def _produce_messages(bootstrap: str, topic: str, messages: Any) -> tuple[int, float]:
    """One Kafka message per (key, value, customer), in the customer's partition (the SDK's
    murmur2 placement: the same partition as the envelope it came in); returns (messages,
    seconds). Producer settings as the naive baseline's: acks=all, idempotent, linger 5."""
    from confluent_kafka import Producer

    from meterline.core.partitioning import partition_for

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "acks": "all", "linger.ms": 5,
                         "queue.buffering.max.messages": 1_000_000},
                        logger=_quiet("e2e_rollups.events-producer"))
    errors: list[str] = []

    def report(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    part: dict[str, int] = {}
    n = 0
    t0 = time.perf_counter()
    for key, value, customer in messages:  # customer: a name, or a partition number
        p = customer if isinstance(customer, int) else part.get(customer)
        if p is None:
            p = part[customer] = partition_for(customer, PARTITIONS)
        while True:
            try:
                producer.produce(topic, value, key=key, partition=p, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        n += 1
    if producer.flush(120) or errors:
        raise RuntimeError(f"per-event topic not delivered: {errors[:3]}")
    return n, time.perf_counter() - t0


# Benchmark engine names -> the worker's ``[rollups] engine`` and METERLINE_NATIVE:
# "columnar" runs with the compiled column builder (native/) as shipped, "columnar-numpy"
# without it (the numpy builder), "per-event" is the reference fold.
ENGINES = {"columnar": ("columnar", "1"), "columnar-numpy": ("columnar", "0"),
           "per-event": ("per-event", "1")}


def engine_env(engine: str) -> dict[str, str]:
    rollup_engine, native = ENGINES[engine]
    return {"METERLINE_ROLLUP_ENGINE": rollup_engine, "METERLINE_NATIVE": native}
