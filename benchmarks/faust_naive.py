"""Naive Faust baseline: one JSON event per Kafka message, hourly sums in a dict, chDB every 1 s.

    .venv/bin/python benchmarks/faust_naive.py --events 200000

What a straightforward Faust implementation of the rollup looks like, measured against a
local broker this script starts (free port, temp dir, stopped at exit):

1. produce ``--events`` messages with confluent-kafka, one JSON object per message, keyed
   by customer: ``{"id", "customer", "meter", "quantity", "timestamp_ms"}``;
2. run a Faust worker in a subprocess (``faust worker``, one agent, auto-ack) that
   json-decodes each message, adds it to an in-memory dict of hourly sums keyed by
   (customer, meter, hour), and every second writes the changed totals to chDB
   (``ReplacingMergeTree``: the latest total of a key wins);
3. when the agent has seen every event it flushes once more, checks the stored totals,
   writes its counters to a JSON file and stops itself.

The rate is events / (last message processed - first message processed): worker start-up
and the backlog production are not counted. ``run_naive()`` is the entry point for other
harnesses; ``main()`` prints its result as one JSON line.

Naive on purpose (no dedupe, no exactly-once, acks after the dict update rather than after
the write), but not sabotaged: raw bytes + orjson, default Faust fetch/buffer settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

HOUR_MS = 3_600_000
CUSTOMERS = 1000
METERS = ("api_calls", "storage_gb", "compute_ms")
_WORKER_FLAG = "--faust-worker"  # argv marker: run as the Faust worker subprocess


# --------------------------------------------------------------------------- parent side
def _produce(bootstrap: str, topic: str, events: int, compression: str) -> tuple[int, float]:
    """Produce ``events`` JSON messages; returns (sum of quantities, seconds taken)."""
    import orjson
    from confluent_kafka import Producer

    producer = Producer({
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": compression,
        "queue.buffering.max.messages": 1_000_000,
    }, logger=_quiet_logger("faust_naive.producer"))
    rng = random.Random(42)
    # Recent timestamps over 4 hours: old ones would fall to the broker's 24 h retention.
    base = (time.time_ns() // 1_000_000 // HOUR_MS - 4) * HOUR_MS
    dumps = orjson.dumps
    total = 0
    t0 = time.perf_counter()
    for i in range(events):
        customer = f"cust-{rng.randrange(CUSTOMERS)}"
        quantity = rng.randint(1, 10)
        total += quantity
        value = dumps({
            "id": f"evt-{i}",
            "customer": customer,
            "meter": METERS[i % len(METERS)],
            "quantity": quantity,
            "timestamp_ms": base + rng.randrange(4 * HOUR_MS),
        })
        while True:
            try:
                producer.produce(topic, value, key=customer)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("producer did not deliver every event within 120 s")
    return total, time.perf_counter() - t0


def _quiet_logger(name: str) -> logging.Logger:
    # librdkafka's transient warnings on a fresh broker ("Coordinator load in progress")
    # would go to stderr; route them to a logger that drops them.
    logger = logging.getLogger(name)
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return logger


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    with path.open(errors="replace") as fh:
        return "".join(deque(fh, maxlen=lines))


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()  # Faust worker: clean shutdown on SIGTERM
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def run_naive(
    events: int,
    partitions: int = 4,
    *,
    compression: str = "none",
    timeout_s: float | None = None,
    bootstrap: str | None = None,
    topic: str | None = None,
    expected_quantity: int | None = None,
) -> dict[str, Any]:
    """Run the naive Faust baseline on ``events`` events; returns the measured counters.

    ``bootstrap`` reuses a running broker instead of starting one. ``compression`` is the
    producer's codec: aiokafka decodes lz4/zstd/snappy only when ``cramjam`` is installed.
    ``topic`` (with ``bootstrap`` and ``expected_quantity``): read an existing topic of
    exactly ``events`` JSON events with at least these fields instead of producing random
    ones (benchmarks/e2e_rollups.py: the same events its other peers read); the stored
    total must then equal ``expected_quantity``.
    """
    if topic is not None and (bootstrap is None or expected_quantity is None):
        raise ValueError("topic needs bootstrap and expected_quantity")
    from meterline.testing.kafka import KafkaBroker

    if events <= 0:
        raise ValueError("events must be positive")
    if timeout_s is None:
        timeout_s = 120 + events / 2_000  # generous: the naive rate is a few 10k/s
    with tempfile.TemporaryDirectory(prefix="faust-naive-") as tmp_name:
        tmp = Path(tmp_name)
        broker = None
        if bootstrap is None:
            broker = KafkaBroker(tmp / "kafka", partitions=partitions).start()
            bootstrap = broker.bootstrap
        try:
            produce_s = 0.0
            if topic is None:
                topic = f"naive-usage-{uuid.uuid4().hex[:8]}"
                _create_topic(bootstrap, topic, partitions, broker)
                expected_quantity, produce_s = _produce(bootstrap, topic, events, compression)
            result = _run_worker(tmp, bootstrap, topic, events, timeout_s)
        finally:
            if broker is not None:
                broker.stop()
    if result["stored_quantity"] != expected_quantity:
        raise RuntimeError(
            f"chDB holds {result['stored_quantity']} units, {expected_quantity} were produced"
        )
    result.update(partitions=partitions, compression=compression,
                  produce_seconds=round(produce_s, 3))
    return result


def _create_topic(bootstrap: str, topic: str, partitions: int, broker: Any) -> None:
    if broker is not None:
        broker.create_topic(topic, partitions=partitions)
        return
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)


def _run_worker(tmp: Path, bootstrap: str, topic: str, events: int,
                timeout_s: float) -> dict[str, Any]:
    result_file = tmp / "result.json"
    log_file = tmp / "worker.log"
    (tmp / "faust-data").mkdir()
    env = dict(
        os.environ,
        NAIVE_BROKER=bootstrap,
        NAIVE_TOPIC=topic,
        NAIVE_GROUP=f"naive-{uuid.uuid4().hex[:8]}",
        NAIVE_EVENTS=str(events),
        NAIVE_RESULT=str(result_file),
        NAIVE_CHDB_DIR=str(tmp / "chdb"),
        NAIVE_DATADIR=str(tmp / "faust-data"),
    )
    t0 = time.monotonic()
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), _WORKER_FLAG],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=tmp,  # anything Faust writes relative to the cwd stays in the temp dir
        )
        try:
            while proc.poll() is None and not result_file.exists():
                if time.monotonic() - t0 > timeout_s:
                    raise RuntimeError(
                        f"naive worker did not finish {events} events in {timeout_s:.0f}s; "
                        f"log tail:\n{_tail(log_file)}"
                    )
                time.sleep(0.05)
            # The worker writes the result file, then stops itself: give it a moment.
            if result_file.exists():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
        finally:
            _stop(proc)
    if not result_file.exists():
        raise RuntimeError(
            f"naive worker exited with {proc.returncode} without a result; "
            f"log tail:\n{_tail(log_file)}"
        )
    result: dict[str, Any] = json.loads(result_file.read_text())
    result["worker_wall_seconds"] = round(time.monotonic() - t0, 3)
    result["worker_returncode"] = proc.returncode
    return result


# --------------------------------------------------------------------------- worker side
def _worker_main() -> None:
    """The Faust worker subprocess (configured through NAIVE_* environment variables)."""
    import faust
    import orjson

    from meterline.sinks.storage import StorageConfig, open_storage

    broker = os.environ["NAIVE_BROKER"]
    n_events = int(os.environ["NAIVE_EVENTS"])
    result_file = Path(os.environ["NAIVE_RESULT"])

    storage = open_storage(StorageConfig(data_dir=os.environ["NAIVE_CHDB_DIR"],
                                         database="naive"))
    storage.execute("CREATE DATABASE IF NOT EXISTS naive")
    storage.execute(
        "CREATE TABLE IF NOT EXISTS naive.hourly ("
        " customer String, meter String, hour_ms Int64,"
        " quantity Int64, events Int64, version Int64"
        ") ENGINE = ReplacingMergeTree(version) ORDER BY (customer, meter, hour_ms)"
    )
    column_types = {"customer": "String", "meter": "String", "hour_ms": "Int64",
                    "quantity": "Int64", "events": "Int64", "version": "Int64"}

    app = faust.App(
        os.environ["NAIVE_GROUP"],
        broker=f"kafka://{broker}",
        store="memory://",
        datadir=os.environ["NAIVE_DATADIR"],
        web_enabled=False,
        autodiscover=False,
        topic_disable_leader=True,   # no <id>-__assignor-__leader topic
        topic_allow_declare=False,   # the source topic exists; declare nothing
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=0.5,
        broker_rebalance_timeout=10.0,
    )
    topic = app.topic(os.environ["NAIVE_TOPIC"], key_serializer="raw", value_serializer="raw")

    sums: dict[tuple[str, str, int], int] = {}
    counts: dict[tuple[str, str, int], int] = {}
    changed: set[tuple[str, str, int]] = set()
    state: dict[str, Any] = {"seen": 0, "first": None, "last": None, "flushes": 0,
                             "rows_written": 0, "flush_seconds": 0.0, "max_flush_seconds": 0.0,
                             "done": False}

    def flush() -> None:
        if not changed:
            return
        t0 = time.perf_counter()
        keys = list(changed)
        changed.clear()
        version = time.time_ns()
        storage.insert_columns("naive.hourly", {
            "customer": [k[0] for k in keys],
            "meter": [k[1] for k in keys],
            "hour_ms": [k[2] for k in keys],
            "quantity": [sums[k] for k in keys],
            "events": [counts[k] for k in keys],
            "version": [version] * len(keys),
        }, column_types)
        state["flushes"] += 1
        state["rows_written"] += len(keys)
        took = time.perf_counter() - t0
        state["flush_seconds"] += took
        state["max_flush_seconds"] = max(state["max_flush_seconds"], took)

    def finish() -> None:
        state["done"] = True
        flush()
        t_flushed = time.perf_counter()
        rows = storage.query_rows("SELECT sum(quantity), sum(events), count() "
                                  "FROM naive.hourly FINAL")
        stored_quantity, stored_events, keys = rows[0]
        seconds = state["last"] - state["first"]
        result = {
            "events": state["seen"],
            "seconds": round(seconds, 3),
            "events_per_s": round(state["seen"] / seconds) if seconds > 0 else None,
            "seconds_incl_final_flush": round(t_flushed - state["first"], 3),
            "flushes": state["flushes"],
            "rows_written": state["rows_written"],
            "flush_seconds": round(state["flush_seconds"], 3),
            "max_flush_seconds": round(state["max_flush_seconds"], 3),
            "keys": int(keys),
            "stored_quantity": int(stored_quantity),
            "stored_events": int(stored_events),
        }
        tmp_file = result_file.with_suffix(".tmp")
        tmp_file.write_text(json.dumps(result))
        tmp_file.replace(result_file)  # atomic: the parent polls for this file
        os.kill(os.getpid(), signal.SIGTERM)  # clean Faust shutdown

    @app.agent(topic)
    async def rollup(stream: Any) -> None:
        loads = orjson.loads
        perf = time.perf_counter
        async for value in stream:
            event = loads(value)
            key = (event["customer"], event["meter"],
                   event["timestamp_ms"] // HOUR_MS * HOUR_MS)
            sums[key] = sums.get(key, 0) + event["quantity"]
            counts[key] = counts.get(key, 0) + 1
            changed.add(key)
            seen = state["seen"] = state["seen"] + 1
            if seen == 1:
                state["first"] = perf()
            if seen == n_events:
                state["last"] = perf()
                finish()

    @app.timer(1.0)
    async def periodic_flush() -> None:
        if not state["done"]:
            flush()

    sys.argv = [sys.argv[0], "worker", "--without-web", "-l", "warn"]
    try:
        app.main()
    finally:
        storage.close()  # idempotent; chDB can crash at exit with an engine still open


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--compression", default="none",
                        help="producer codec (lz4/zstd/snappy need cramjam for aiokafka)")
    parser.add_argument("--timeout", type=float, default=None, help="worker timeout, seconds")
    args = parser.parse_args(argv)
    result = run_naive(args.events, args.partitions, compression=args.compression,
                       timeout_s=args.timeout)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == _WORKER_FLAG:
        _worker_main()
    else:
        sys.exit(main())
