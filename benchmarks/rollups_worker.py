"""The Meterline worker under test (benchmarks/e2e_rollups.py): the worker subprocess, the
output loader thread, and measurement 1, throughput (see e2e_rollups' docstring)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rollups_common import (
    CHECKPOINT_INTERVAL_S,
    FLUSH_INTERVAL_S,
    LAG_POLL_S,
    PARTITIONS,
    USAGE_TOPIC,
    LagProbe,
    Workload,
    _create_topics,
    _open_storage,
    _produce,
    _tail,
    engine_env,
    log,
)


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
                # -v: the worker is quiet by default since f2b4446, and the boundaries
                # come from its INFO lines ("assigned ...", "checkpoint ...").
                [sys.executable, "-m", "meterline.cli", "-v", "worker"], env=self.env,
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



# --------------------------------------------------------------------------- 1. throughput
def run_throughput(broker: Any, workdir: Path, data_dir: Path, events: int,
                   verify: bool, *, checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
                   loader_mode: str = "concurrent",
                   workload: Workload | None = None, engine: str = "columnar",
                   topic: str | None = None) -> dict[str, Any]:
    """``workload``: generated by the caller (shared with the peers); else made here.
    ``engine``: the worker's ``[rollups] engine``; ``topic``: another usage topic (and
    group and database) for a second worker run in the same broker."""
    topic = topic or USAGE_TOPIC
    storage = _open_storage(data_dir, _database(topic))
    try:
        if workload is None:
            workload = Workload(events, verify=verify, keep_events=False)
        result = _throughput(storage, broker, workdir, workload, verify,
                             checkpoint_interval_s, loader_mode, engine, topic)
        result["engine"] = engine
        return result
    finally:
        storage.close()


def _database(topic: str) -> str:
    return "tp" if topic == USAGE_TOPIC else "tp_" + topic.replace("-", "_").replace(".", "_")


def create_and_fill_usage_topic(broker: Any, topic: str, records: list[Any]) -> float:
    """The usage topic (+ the worker's output topics) with the whole backlog; seconds."""
    _create_topics(broker, topic)
    return _produce(broker.bootstrap, topic, records)


def _throughput(storage: Any, broker: Any, workdir: Path, workload: Workload, verify: bool,
                checkpoint_interval_s: float, loader_mode: str, engine: str,
                topic: str) -> dict[str, Any]:
    group = "bench-rollups" if topic == USAGE_TOPIC else f"bench-rollups-{topic}"
    events, records, gen_s = workload.events, workload.records, workload.gen_s
    truth = workload.truth if verify else None
    total_bytes = sum(len(r.payload) for r in records)
    resends = sum(r.resend for r in records)
    produce_s = create_and_fill_usage_topic(broker, topic, records)
    log.info("produced %d records (%d resent, %.1f MB) in %.1fs", len(records), resends,
             total_bytes / 1e6, produce_s)
    loader = LoaderThread(storage, broker.bootstrap, topic, _database(topic))
    lag = LagProbe(broker.bootstrap, topic, group)
    worker = Worker(broker.bootstrap, topic, group, workdir, {
        "METERLINE_CHECKPOINT_INTERVAL_S": str(checkpoint_interval_s),
        "METERLINE_FLUSH_INTERVAL_S": str(FLUSH_INTERVAL_S), **engine_env(engine)})
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
        result["verify"] = _verify(storage, _database(topic), truth)
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
