"""Rollup stage end to end: `meterline worker` throughput, naive Faust baseline, freshness.

    make bench-rollups     # or: .venv/bin/python benchmarks/e2e_rollups.py \\
                           #       [--events N] [--naive-events M] [--freshness-seconds S]

One local Kafka broker (meterline.testing.kafka: temp dir, free port, stopped at exit)
serves all three measurements of one run:

1. **Worker throughput.** ``--events`` events from ``meterline.testing.usage_log`` (1,000
   customers, the five default meters, resent batches and reused idempotency keys; ~500
   events per envelope, lz4, SDK producer settings) are produced into a 4-partition usage
   topic with ``message.timestamp.type=LogAppendTime`` *before* one ``python -m
   meterline.cli worker`` subprocess starts. An ``OutputLoader`` runs concurrently in a
   thread of this process (its own chDB data dir) and inserts the worker's output topics.
   The worker runs with METERLINE_FLUSH_INTERVAL_S=0.5 and METERLINE_CHECKPOINT_INTERVAL_S=5
   (both its defaults; ``--checkpoint-interval-s`` changes the latter).
   Boundaries (wall clock of this machine; the broker stamps LogAppendTime):

   - start: the worker's log line for the last of its 4 partition assignments ("assigned
     usage[p], resuming at ..."): process start, imports and the group join are excluded,
     fetching the first records is included;
   - ``outputs``: the broker's append time of the last record in the output topics (all
     rollups written; the worker's last flush is at most one flush interval after its last
     record); events/s = generated events / (outputs - start);
   - ``full``: the later of "committed lag of the worker's group is 0" (seen by polling
     every 0.1 s; commits follow checkpoints) and "the loader has inserted and committed
     every output record" into chDB; events/s = generated events / (full - start).

   ``--loader after`` keeps the loader paused (but in its group) until the lag is 0, so the
   worker has the machine to itself and ``full`` = worker + a sequential load.
   The chDB totals of every (customer, meter, group, hour/day) are then checked against
   ``usage_log.Truth`` (``--no-verify`` skips it: building the truth costs ~40 s at 2M).
2. **Naive baseline**, same broker: ``benchmarks/faust_naive.py``'s ``run_naive`` (a Faust
   agent, one JSON event per message; rate from first to last message processed).
3. **Freshness.** A second worker (flush interval 0.5 s) on a fresh topic; the real SDK
   ``Emitter`` (KafkaTransport, linger 50 ms) emits ``--freshness-rate`` events/s for
   ``--freshness-seconds`` plus one probe event every 50 ms for a unique ``probe-NNNNN``
   customer. The harness loader (``OutputLoader.run_once`` with its defaults) inserts into
   chDB and after every insert queries ``hourly_usage`` for probe customers; a probe's
   latency is (insert returned) - (wall time just before its ``emit()``).

``--inprocess {noop,json}`` skips Kafka entirely and folds the same records through
``RollupWorker`` + ``MemoryCheckpointStore`` in this process (``noop``: outputs dropped;
``json``: outputs serialized the way ``KafkaOutputWriter`` does, not sent); run it under
``python -m cProfile`` to see where the worker's time goes, or with ``--phases`` for a
wall-time split (decode, apply_batch, take_flush, checkpoint, output JSON).

Prints one JSON summary line, then a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
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

log = logging.getLogger("e2e_rollups")

# Shared with the baseline harness (benchmarks/ is on sys.path above).
from faust_naive import _quiet_logger as _quiet  # noqa: E402
from faust_naive import _tail  # noqa: E402


# --------------------------------------------------------------------------- helpers
def _records(events: int, *, truth: Any = None) -> list[Any]:
    """usage_log records: batches of 4 x ~500 events (one envelope per partition), event
    times spread over ~3 h ending an hour before now (recent for the TTLs, never in the
    future of the log clock)."""
    from meterline.testing.usage_log import usage_records

    now = time.time_ns() // 1_000_000
    batches = max(1, events // (500 * PARTITIONS))
    span_ms = 3 * HOUR_MS
    start = now - now % HOUR_MS - 4 * HOUR_MS
    return list(usage_records(events, CUSTOMERS, PARTITIONS, start_ms=start,
                              events_per_batch=500 * PARTITIONS,
                              ms_per_batch=max(1, span_ms // batches), truth=truth))


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


class Worker:
    """One `python -m meterline.cli worker` subprocess in its own process group."""

    def __init__(self, bootstrap: str, topic: str, group: str, workdir: Path,
                 env: dict[str, str]) -> None:
        self.topic = topic
        self.log_file = workdir / f"worker-{group}.log"
        datadir = workdir / f"faust-{group}"
        datadir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": bootstrap,
                    "METERLINE_TOPIC": topic, "METERLINE_ROLLUP_GROUP": group,
                    "METERLINE_FAUST_DATADIR": str(datadir), **env}
        self.reported_env = env
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    def start(self) -> None:
        with self.log_file.open("wb") as fh:
            self.spawned_at = time.time()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meterline.cli", "worker"], env=self.env,
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:\n"
                               f"{_tail(self.log_file)}")

    def stop(self, grace_s: float = 30) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    # ---- log
    _TS = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]? ")  # Faust: [ts]; ours: ts
    _CKPT = re.compile(r"checkpoint (\d+) of \d+ partitions: records=(\d+) accepted=(\d+) "
                       r"duplicate=(\d+) late=(\d+) rejected=(\d+)")

    @classmethod
    def _time(cls, line: str) -> float | None:
        m = cls._TS.match(line)
        if not m:
            return None
        return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()

    def assigned_times(self) -> list[float]:
        """Wall times of the "assigned <topic>[p], resuming at" log lines."""
        out = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            if f"assigned {self.topic}[" in line:
                t = self._time(line)
                if t is not None:
                    out.append(t)
        return out

    def checkpoints(self) -> list[dict[str, float]]:
        out = []
        for line in self.log_file.read_text(errors="replace").splitlines():
            m = self._CKPT.search(line)
            t = self._time(line)
            if m and t is not None:
                n, records, accepted, dup, late, rejected = map(int, m.groups())
                out.append({"t": t, "n": n, "records": records, "accepted": accepted,
                            "duplicate": dup, "late": late, "rejected": rejected})
        return out

    def wait_assigned(self, n: int, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            times = self.assigned_times()
            if len(times) >= n:
                return max(times)
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not assigned {n} partitions in {timeout_s:.0f}s:"
                                   f"\n{_tail(self.log_file)}")
            time.sleep(0.05)


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


class TimedSource:
    """A KafkaSource that remembers the output records' broker timestamps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.first_ts_ms: int | None = None
        self.last_ts_ms: int | None = None

    def poll_records(self, max_records: int, timeout_s: float) -> list[Any]:
        records = self.inner.poll_records(max_records, timeout_s)
        for r in records:
            if r.timestamp_ms > 0:
                if self.first_ts_ms is None or r.timestamp_ms < self.first_ts_ms:
                    self.first_ts_ms = r.timestamp_ms
                if self.last_ts_ms is None or r.timestamp_ms > self.last_ts_ms:
                    self.last_ts_ms = r.timestamp_ms
        return records

    def commit(self, records: Any) -> None:
        self.inner.commit(records)

    def assigned(self) -> bool:
        return bool(self.inner._consumer.assignment())

    def pause(self, paused: bool) -> None:
        consumer = self.inner._consumer
        (consumer.pause if paused else consumer.resume)(consumer.assignment())

    def close(self) -> None:
        self.inner.close()


class LoaderThread:
    """``OutputLoader.run_once`` in a loop on a thread of this process; ``after_insert``
    (called with the wall time the insert+commit returned) runs on the same thread."""

    def __init__(self, storage: Any, bootstrap: str, topic: str, database: str,
                 after_insert: Callable[[float], None] | None = None) -> None:
        from meterline.aggregators.outputs_io import OutputLoader, output_topics
        from meterline.ingest.sources import KafkaSource

        self.topics = list(output_topics(topic).values())
        self.source = TimedSource(KafkaSource(bootstrap, self.topics,
                                              f"bench-loader-{uuid.uuid4().hex[:8]}"))
        self.loader = OutputLoader(storage, self.source, database=database)
        self.after_insert = after_insert
        self.inserts: list[tuple[float, float, int]] = []  # (returned at, seconds, records)
        self.last_insert_at = 0.0
        self.error: BaseException | None = None
        self._paused = False
        self._resume = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loader", daemon=True)

    def start_and_wait_assigned(self, timeout_s: float = 60, *, paused: bool = False) -> None:
        """Join the group before any output exists; ``paused``: stay in the group (polling)
        but read nothing until ``resume()``."""
        deadline = time.monotonic() + timeout_s
        while not self.source.assigned():
            self.source.poll_records(1, 0.2)  # nothing to read yet: topics are empty
            if time.monotonic() > deadline:
                raise RuntimeError("output loader not assigned its partitions in time")
        if paused:
            self.source.pause(True)
            self._paused = True
        self._thread.start()

    def resume(self) -> None:
        # Done by the loader thread: a consumer call from another thread while it sits in
        # consume() deadlocks (seen with confluent-kafka 2.16).
        self._resume.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self._paused and self._resume.is_set():
                    self.source.pause(False)
                    self._paused = False
                t0 = time.perf_counter()
                n = self.loader.run_once()
                if n:
                    now = time.time()
                    self.inserts.append((now, time.perf_counter() - t0, n))
                    self.last_insert_at = now
                    if self.after_insert is not None:
                        self.after_insert(now)
        except BaseException as exc:  # reported by check()
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"output loader failed: {self.error!r}") from self.error

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        with contextlib.suppress(Exception):
            self.source.close()


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


# --------------------------------------------------------------------------- 1. throughput
def run_throughput(broker: Any, workdir: Path, data_dir: Path, events: int,
                   verify: bool, *, checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
                   loader_mode: str = "concurrent") -> dict[str, Any]:
    storage = _open_storage(data_dir, "tp")
    try:
        return _throughput(storage, broker, workdir, events, verify,
                           checkpoint_interval_s, loader_mode)
    finally:
        storage.close()


def _throughput(storage: Any, broker: Any, workdir: Path, events: int, verify: bool,
                checkpoint_interval_s: float, loader_mode: str) -> dict[str, Any]:
    from meterline.testing.usage_log import Truth

    topic = "usage"
    group = "bench-rollups"
    truth = Truth() if verify else None
    t0 = time.perf_counter()
    records = _records(events, truth=truth)
    gen_s = time.perf_counter() - t0
    total_bytes = sum(len(r.payload) for r in records)
    resends = sum(r.resend for r in records)
    _create_topics(broker, topic)
    produce_s = _produce(broker.bootstrap, topic, records)
    log.info("produced %d records (%d resent, %.1f MB) in %.1fs", len(records), resends,
             total_bytes / 1e6, produce_s)
    loader = LoaderThread(storage, broker.bootstrap, topic, "tp")
    lag = LagProbe(broker.bootstrap, topic, group)
    worker = Worker(broker.bootstrap, topic, group, workdir, {
        "METERLINE_CHECKPOINT_INTERVAL_S": str(checkpoint_interval_s),
        "METERLINE_FLUSH_INTERVAL_S": str(FLUSH_INTERVAL_S)})
    lag0_at = loaded_at = None
    total_outputs = None
    try:
        loader.start_and_wait_assigned(paused=loader_mode == "after")
        worker.start()
        deadline = time.monotonic() + 120 + events / 2_000
        while loaded_at is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"throughput run not done in time (lag0_at={lag0_at}); "
                                   f"log:\n{_tail(worker.log_file)}")
            worker.check()
            loader.check()
            if lag0_at is None:
                if lag.lag() == 0:
                    lag0_at = time.time()
                    # The checkpoint that made lag 0 came after the flush that wrote the
                    # last outputs: the output topics are complete now.
                    total_outputs = lag.high_watermarks(loader.topics)
                    if loader_mode == "after":
                        loader.resume()
            elif loader.loader.records >= (total_outputs or 0):
                loaded_at = loader.last_insert_at or time.time()
            time.sleep(LAG_POLL_S)
        assigned = worker.assigned_times()
        worker.stop()
    finally:
        worker.stop()
        loader.stop()
        lag.close()
    checkpoints = worker.checkpoints()
    start = max(assigned[-PARTITIONS:])
    first_out = (loader.source.first_ts_ms or 0) / 1000
    last_out = (loader.source.last_ts_ms or 0) / 1000
    full_end = max(lag0_at or 0, loaded_at or 0)
    result: dict[str, Any] = {
        "loader": loader_mode,
        "events": events, "records": len(records), "resent_records": resends,
        "mb": round(total_bytes / 1e6, 1), "generate_s": round(gen_s, 1),
        "produce_s": round(produce_s, 2),
        "worker_env": worker.reported_env,
        "startup_to_assigned_s": round(start - worker.spawned_at, 2),
        "assigned_to_first_output_s": round(first_out - start, 3),
        "outputs_s": round(last_out - start, 3),
        "lag0_s": round((lag0_at or 0) - start, 3),
        "loaded_s": round((loaded_at or 0) - start, 3),
        "full_s": round(full_end - start, 3),
        "output_records": total_outputs,
        "loader_rows": loader.loader.rows,
        "loader_inserts": len(loader.inserts),
        "loader_insert_s": round(sum(s for _, s, _ in loader.inserts), 2),
        "checkpoints": len(checkpoints),
    }
    result["events_per_s_outputs"] = round(events / result["outputs_s"])
    result["events_per_s_full"] = round(events / result["full_s"])
    result["events_per_s_from_first_output"] = round(events / (last_out - first_out))
    done = [c for c in checkpoints if c["records"] >= len(records)]
    if done and done[0] is not checkpoints[0]:  # first checkpoint -> first covering all
        a, b = checkpoints[0], done[0]
        if b["t"] > a["t"]:
            def n(c: dict[str, float]) -> float:
                return c["accepted"] + c["duplicate"] + c["late"] + c["rejected"]
            result["events_per_s_between_checkpoints"] = round((n(b) - n(a)) / (b["t"] - a["t"]))
    if checkpoints:
        last = checkpoints[-1]
        result["worker_counters"] = {k: last[k] for k in
                                     ("records", "accepted", "duplicate", "late", "rejected")}
        if done:
            result["checkpoint_all_records_s"] = round(done[0]["t"] - start, 3)
    if verify and truth is not None:
        result["verify"] = _verify(storage, "tp", truth)
    return result


def _verify(storage: Any, database: str, truth: Any) -> str:
    from meterline.sinks.raw_events import nano_from_decimal

    problems = []
    for view, expected in (("hourly_usage", truth.hourly), ("daily_usage", truth.daily)):
        rows = storage.query_rows(f"SELECT customer, meter, group_key, window_start_ms, value "
                                  f"FROM {database}.{view}")
        got = {(c, m, g, int(s)): nano_from_decimal(v) for c, m, g, s, v in rows}
        wrong = sum(1 for k, v in expected.items() if got.get(k) != v)
        extra = sum(1 for k in got if k not in expected)
        if wrong or extra:
            problems.append(f"{view}: {wrong} wrong/missing, {extra} unexpected "
                            f"of {len(expected)}")
    return "exact" if not problems else "; ".join(problems)


# --------------------------------------------------------------------------- 2. naive
def run_naive_baseline(bootstrap: str, events: int) -> dict[str, Any]:
    from faust_naive import run_naive

    return run_naive(events, PARTITIONS, bootstrap=bootstrap)


# --------------------------------------------------------------------------- 3. freshness
def run_freshness(broker: Any, workdir: Path, data_dir: Path, seconds: float,
                  rate: int) -> dict[str, Any]:
    from meterline.sdk import Emitter, EmitterConfig

    topic = "fresh"
    group = "bench-rollups-fresh"
    _create_topics(broker, topic)
    storage = _open_storage(data_dir, "fresh")
    emitted_at: dict[str, float] = {}
    visible: dict[str, tuple[float, float]] = {}  # probe -> (insert returned, query returned)
    query_s: list[float] = []
    sql = "SELECT customer FROM fresh.hourly_usage WHERE customer LIKE 'probe-%'"

    def after_insert(now: float) -> None:
        t0 = time.perf_counter()
        rows = storage.query_rows(sql)
        query_s.append(time.perf_counter() - t0)
        seen = time.time()
        for (customer,) in rows:
            if customer not in visible:
                visible[customer] = (now, seen)

    loader = LoaderThread(storage, broker.bootstrap, topic, "fresh", after_insert)
    lag = LagProbe(broker.bootstrap, topic, group)
    worker = Worker(broker.bootstrap, topic, group, workdir,
                    {"METERLINE_FLUSH_INTERVAL_S": str(FLUSH_INTERVAL_S)})
    lags: list[int] = []
    stop_sampling = threading.Event()

    def sample_lag() -> None:  # does the worker keep up? (off the emitting thread)
        while not stop_sampling.wait(1.0):
            with contextlib.suppress(Exception):
                lags.append(lag.lag())

    sampler = threading.Thread(target=sample_lag, name="lag", daemon=True)
    sent = 0
    try:
        loader.start_and_wait_assigned()
        worker.start()
        worker.wait_assigned(PARTITIONS, 120)
        sampler.start()
        config = EmitterConfig(topic=topic, bootstrap_servers=broker.bootstrap,
                               spool_dir=workdir / "fresh-spool")
        meters = ("api_calls", "llm_tokens", "compute_seconds", "storage_gb")
        tick = 0.01
        with Emitter(config) as emitter:
            emit = emitter.emit
            t_start = time.monotonic()
            t_probes = t_start + FRESH_WARMUP_S
            t_end = t_probes + seconds
            next_tick = next_probe = t_probes
            next_lag = t_start
            probe = 0
            i = 0
            while True:
                now = time.monotonic()
                if now >= t_end:
                    break
                # Paced by count: catch up after a stall, but never more than 0.1 s worth.
                due = min(round((now - t_start) * rate), i + rate // 10)
                while i < due:
                    emit(f"cust-{i % CUSTOMERS:04d}", meters[i % 4], 1 + i % 7)
                    i += 1
                if now >= next_probe:
                    name = f"probe-{probe:05d}"
                    emitted_at[name] = time.time()
                    emit(name, "api_calls", 1)
                    probe += 1
                    next_probe += PROBE_EVERY_S
                if now >= next_lag:
                    worker.check()
                    loader.check()
                    next_lag = now + 1.0
                next_tick += tick
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_tick = time.monotonic()
            sent = i
            emit_s = time.monotonic() - t_start
            if not emitter.flush(timeout=60):
                raise RuntimeError("emitter did not deliver within 60 s")
            stats = emitter.stats()
        deadline = time.monotonic() + 30
        while len(visible) < len(emitted_at) and time.monotonic() < deadline:
            worker.check()
            loader.check()
            time.sleep(0.1)
    finally:
        stop_sampling.set()
        if sampler.is_alive():
            sampler.join(30)
        worker.stop()
        loader.stop()
        lag.close()
        storage.close()
    lat = [visible[p][0] - t for p, t in emitted_at.items() if p in visible]
    lat_obs = [visible[p][1] - t for p, t in emitted_at.items() if p in visible]
    missing = len(emitted_at) - len(lat)
    q = {f"p{p}": round(_pct(lat, p), 3) for p in (50, 95, 99)}
    return {
        "seconds": seconds, "target_rate": rate,
        "achieved_rate": round(sent / emit_s), "events": sent, "delivered": stats.delivered,
        "probes": len(emitted_at), "probes_visible": len(lat), "probes_missing": missing,
        **q, "max": round(max(lat), 3) if lat else None,
        "mean": round(statistics.fmean(lat), 3) if lat else None,
        "p99_observed": round(_pct(lat_obs, 99), 3),
        "probe_query_p50_s": round(_pct(query_s, 50), 3),
        "probe_query_max_s": round(max(query_s), 3) if query_s else None,
        "loader_inserts": len(loader.inserts),
        "loader_insert_p50_s": round(_pct([s for _, s, _ in loader.inserts], 50), 3),
        "loader_insert_p99_s": round(_pct([s for _, s, _ in loader.inserts], 99), 3),
        "max_committed_lag_records": max(lags) if lags else None,
        "worker_env": worker.reported_env,
        "met_p99_le_2s": bool(lat) and missing == 0 and q["p99"] <= 2.0,
    }


# --------------------------------------------------------------------------- in-process
class _JsonWriter:
    """Serializes a flush exactly as KafkaOutputWriter does, sends nothing."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, flush: Any) -> None:
        import orjson

        from meterline.aggregators.outputs_io import CHUNK

        for i in range(0, len(flush.rollups), CHUNK):
            chunk = flush.rollups[i:i + CHUNK]
            self.bytes += len(orjson.dumps({"rollups": [r.to_dict() for r in chunk]}))
        for d in flush.dead_letters:
            self.bytes += len(orjson.dumps({"dead_letters": [d.to_dict()]}))
        for late in flush.late:
            self.bytes += len(orjson.dumps({"late": [late.to_dict()]}))


class _NoopWriter:
    def write(self, flush: Any) -> None:
        pass


_PHASES = (  # (module, class or None, attribute, label): timed per call, not per event
    ("meterline.aggregators.processor", None, "decode_batch", "decode_batch"),
    ("meterline.core.rollup", "RollupState", "apply_batch", "apply_batch"),
    ("meterline.aggregators.processor", "PartitionProcessor", "_collect", "collect"),
    ("meterline.aggregators.processor", "PartitionProcessor", "take_flush",
     "take_flush (snapshot, records, evict)"),
    ("meterline.core.rollup", "RollupState", "evict_closed", "  of which evict_closed"),
    ("meterline.aggregators.processor", "PartitionProcessor", "checkpoint", "checkpoint"),
    ("meterline.core.rollup", "RollupState", "export_all", "  of which export_all"),
    ("zlib", None, "compress", "  of which zlib.compress"),
    ("e2e_rollups", "_JsonWriter", "write", "output JSON (to_dict + orjson)"),
)


@contextlib.contextmanager
def _timed_phases(totals: dict[str, list[float]]) -> Any:
    """Wrap the per-record / per-flush calls above with a wall clock (cheap: ~10^4 calls)."""
    import importlib

    sys.modules.setdefault("e2e_rollups", sys.modules[__name__])
    undo = []
    for module, cls, attr, label in _PHASES:
        owner = importlib.import_module(module)
        if cls is not None:
            owner = getattr(owner, cls)
        original = getattr(owner, attr)
        slot = totals.setdefault(label, [0.0, 0])

        def timed(*a: Any, _f: Any = original, _slot: list[float] = slot, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                _slot[0] += time.perf_counter() - t0
                _slot[1] += 1

        setattr(owner, attr, timed)
        undo.append((owner, attr, original))
    try:
        yield
    finally:
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)


def run_inprocess(events: int, writer_kind: str,
                  checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
                  phases: bool = False) -> dict[str, Any]:
    """RollupWorker over the same records, no Kafka: what the worker's own code costs."""
    from meterline.aggregators.checkpoints import MemoryCheckpointStore
    from meterline.aggregators.runner import RollupWorker, TopicPartition
    from meterline.config import DEFAULT_METERS
    from meterline.core.meters import MeterRegistry
    from meterline.ingest.sources import SourceRecord

    records = _records(events)
    offsets = [0] * PARTITIONS
    now = time.time_ns() // 1_000_000
    src = []
    for i, rec in enumerate(records):  # LogAppendTime: ~now, non-decreasing
        src.append(SourceRecord("usage", rec.partition, offsets[rec.partition], rec.payload,
                                now + i // 10))
        offsets[rec.partition] += 1
    writer = _JsonWriter() if writer_kind == "json" else _NoopWriter()
    worker = RollupWorker(MeterRegistry.load(DEFAULT_METERS), writer, MemoryCheckpointStore(),
                          group="inprocess", flush_interval_s=FLUSH_INTERVAL_S,
                          checkpoint_interval_s=checkpoint_interval_s)
    worker.assign([TopicPartition("usage", p) for p in range(PARTITIONS)])
    totals: dict[str, list[float]] = {}
    with _timed_phases(totals) if phases else contextlib.nullcontext():
        t0 = time.perf_counter()
        for rec in src:
            worker.process(rec)
            worker.maybe_flush()
        worker.flush(checkpoint=True)
        seconds = time.perf_counter() - t0
    t = worker.totals()
    return {"inprocess": writer_kind, "checkpoint_interval_s": checkpoint_interval_s,
            "events": events, "records": len(src),
            "seconds": round(seconds, 3), "events_per_s": round(events / seconds),
            "flushes": worker.flushes, "checkpoints": worker.checkpoints,
            "accepted": t.accepted, "duplicate": t.duplicate, "rejected": t.rejected,
            "output_bytes": getattr(writer, "bytes", None),
            **({"phases_us_per_event": {k: round(v[0] / events * 1e6, 2)
                                        for k, v in totals.items() if v[1]},
                "phases_share": {k: round(v[0] / seconds, 3)
                                 for k, v in totals.items() if v[1]}} if phases else {})}


# --------------------------------------------------------------------------- main
def _table(s: dict[str, Any]) -> str:
    tp, nv, fr = s["throughput"], s["naive"], s["freshness"]
    lines = [f"{'run':<58}{'events':>11}{'seconds':>9}{'events/s':>12}"]

    def row(name: str, n: int, sec: float, rate: float) -> None:
        lines.append(f"{name:<58}{n:>11,}{sec:>9.2f}{rate:>12,.0f}")

    row("naive Faust (1 event/msg), first..last msg", nv["events"], nv["seconds"],
        nv["events_per_s"])
    row("naive Faust, incl. final chDB flush", nv["events"], nv["seconds_incl_final_flush"],
        nv["events"] / nv["seconds_incl_final_flush"])
    row(f"worker: assigned -> last output in Kafka (loader {tp['loader']})", tp["events"],
        tp["outputs_s"], tp["events_per_s_outputs"])
    row("full: assigned -> lag 0 and all outputs in chDB", tp["events"], tp["full_s"],
        tp["events_per_s_full"])
    lines.append(f"ratio worker/naive: {s['ratio_outputs_vs_naive']:.1f}x (outputs), "
                 f"{s['ratio_full_vs_naive_incl_flush']:.1f}x (full vs naive incl. flush); "
                 f"verify: {tp.get('verify', 'skipped')}")
    lines.append(f"freshness ({fr['achieved_rate']:,} ev/s for {fr['seconds']:.0f}s, "
                 f"{fr['probes_visible']}/{fr['probes']} probes): p50 {fr['p50']:.3f}s  "
                 f"p95 {fr['p95']:.3f}s  p99 {fr['p99']:.3f}s  max {fr['max']:.3f}s  "
                 f"-> p99 <= 2 s {'met' if fr['met_p99_le_2s'] else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--naive-events", type=int, default=200_000)
    parser.add_argument("--freshness-seconds", type=float, default=30.0)
    parser.add_argument("--freshness-rate", type=int, default=20_000, help="events/s")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the exact-totals check against usage_log.Truth")
    parser.add_argument("--inprocess", choices=("noop", "json"),
                        help="only fold the records through RollupWorker in this process")
    parser.add_argument("--phases", action="store_true",
                        help="with --inprocess: wall time per phase (decode, apply, flush...)")
    parser.add_argument("--checkpoint-interval-s", type=float, default=CHECKPOINT_INTERVAL_S,
                        help="METERLINE_CHECKPOINT_INTERVAL_S of the throughput worker")
    parser.add_argument("--loader", choices=("concurrent", "after"), default="concurrent",
                        help="throughput run: load outputs into chDB while the worker runs, "
                             "or only once its lag is 0 (the worker then has the CPU alone)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if args.inprocess:
        result = run_inprocess(args.events, args.inprocess, args.checkpoint_interval_s,
                               args.phases)
        print(json.dumps(result), flush=True)
        for label, us in result.get("phases_us_per_event", {}).items():
            print(f"{label:<40}{us:>8.2f} us/event {result['phases_share'][label]:>7.1%}")
        print(f"{'total':<40}{1e6 / result['events_per_s']:>8.2f} us/event")
        return 0

    from meterline.testing.kafka import KafkaBroker

    summary: dict[str, Any] = {"cpus": os.cpu_count(), "code_at_start": _git_head()}
    with tempfile.TemporaryDirectory(prefix="e2e-rollups-") as tmp_name:
        tmp = Path(tmp_name)
        broker = KafkaBroker(tmp / "kafka", partitions=PARTITIONS)
        try:
            broker.start()
            chdb_dir = tmp / "chdb"  # this process's one chDB data dir
            summary["throughput"] = run_throughput(
                broker, tmp, chdb_dir, args.events, not args.no_verify,
                checkpoint_interval_s=args.checkpoint_interval_s, loader_mode=args.loader)
            log.info("throughput: %s", summary["throughput"])
            summary["naive"] = run_naive_baseline(broker.bootstrap, args.naive_events)
            log.info("naive: %s", summary["naive"])
            summary["freshness"] = run_freshness(broker, tmp, chdb_dir,
                                                 args.freshness_seconds, args.freshness_rate)
        finally:
            broker.stop(timeout_s=15)
    summary["code_at_end"] = _git_head()  # the workers import the tree as it is at start
    tp, nv = summary["throughput"], summary["naive"]
    summary["ratio_outputs_vs_naive"] = round(tp["events_per_s_outputs"] / nv["events_per_s"], 2)
    summary["ratio_full_vs_naive_incl_flush"] = round(
        tp["events_per_s_full"] / (nv["events"] / nv["seconds_incl_final_flush"]), 2)
    print(json.dumps(summary), flush=True)
    print(_table(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
