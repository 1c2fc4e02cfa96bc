"""Exactly once under fire, driven only through the SDK and the `meterline` CLI.

The SDK emits events *while* `meterline worker` processes are SIGKILLed and restarted,
workers join (rebalances), the broker stops and starts, and `meterline load-rollups` is
SIGKILLed too: every fault lands while records are still arriving, which is where the
worker used to skip records appended during a rebalance (1.5-4.8 % of events lost in 3 of
5 runs, silently). Then every (customer, meter, group, hour) and (customer, meter, group,
day) total in ClickHouse must equal the ground truth, folded here from what was emitted
(``meterline.testing.usage_log.Truth``, independent of the rollup code), and the rollup
group's committed offsets must reach the log end - and stay there once the workers stop.

Size: ``METERLINE_CRASH_EVENTS`` events (300,000 in `make test`; the issue's full run is
``METERLINE_CRASH_EVENTS=1000000 METERLINE_CRASH_EMIT_S=90``), 500 customers, the five
default meters, 10 % with explicit ids, 2 % emitted again with the same id.

Nothing here waits on wall time alone: faults are placed by how many events were emitted,
and every wait fails only when its measure (lag, rows) stops moving for ``STALL_S``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meterline.aggregators.outputs_io import output_topics
from meterline.core.quantity import SCALE
from meterline.testing.kafka import KafkaBroker
from meterline.testing.usage_log import DIMENSIONS, METERS, Truth

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

EVENTS = int(os.environ.get("METERLINE_CRASH_EVENTS", 300_000))
EMIT_S = float(os.environ.get("METERLINE_CRASH_EMIT_S", 40))  # emission spread over this
CUSTOMERS = 500
PARTITIONS = 6
GROUP = "meterline-rollups-crash"
LOADER_GROUP = "meterline-raw-output-loader"  # [kafka] group_id + "-output-loader"
STALL_S = 180.0  # a wait fails when its measure has not moved for this long
SEED = int(os.environ.get("METERLINE_CRASH_SEED") or random.randrange(1 << 30))


class Procs:
    """`meterline` subprocesses, each in its own process group, logs kept for failures."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started = 0

    def start(self, name: str, *args: str) -> None:
        self.started += 1
        log = open(self.logs / f"{name}-{self.started}.log", "wb")  # noqa: SIM115
        env = {**self.env, "METERLINE_FAUST_DATADIR": str(self.logs / f"faust-{self.started}")}
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "meterline.cli", *args], env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop(self, *names: str) -> None:
        procs = [self.procs.pop(n) for n in names if n in self.procs]
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"exited on their own: {dead}; see {self.logs}"

    def stop_all(self) -> None:
        self.stop(*list(self.procs))


class Emission:
    """The application: emits through the SDK at a steady rate in a thread and folds the
    ground truth of what it emitted."""

    def __init__(self, bootstrap: str, topic: str, spool: Path, rng: random.Random) -> None:
        from meterline.sdk import Emitter, EmitterConfig

        self.truth = Truth()
        self.emitted = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.stats: Any = None
        self._rng = rng
        self._emitter = Emitter(EmitterConfig(bootstrap_servers=bootstrap, topic=topic,
                                              spool_dir=spool))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def resets(self) -> int:
        return getattr(self._emitter._delivery._transport, "resets", 0)

    def _event(self, i: int, now_ms: int) -> tuple[str, str, int, int, dict[str, str]]:
        rng = self._rng
        customer = f"cust-{rng.randrange(CUSTOMERS):04d}"
        meter = rng.choice(tuple(METERS))
        ts = now_ms - rng.randrange(20 * 60_000)  # up to 20 min old: inside the lateness
        if meter in ("api_calls", "active_users"):
            nanos = SCALE
        elif meter == "compute_seconds":
            nanos = rng.randrange(1, 120_000) * 10**6  # 0.001 s steps: exact decimals
        else:
            nanos = rng.randrange(1, 5_000) * SCALE
        if meter == "active_users":
            dims = {"user_id": f"u{rng.randrange(300)}"}
        else:
            dim, values = DIMENSIONS[meter]
            dims = {dim: rng.choice(values)}
            if meter == "api_calls":
                dims["region"] = rng.choice(("eu", "us"))
        return customer, meter, nanos, ts, dims

    def _run(self) -> None:
        rng, emit = self._rng, self._emitter.emit
        with_ids: list[tuple[str, str, int, int, dict[str, str], str]] = []
        started = time.monotonic()
        try:
            for i in range(EVENTS):
                if i % 1000 == 0:  # pace: EVENTS spread over EMIT_S
                    ahead = started + EMIT_S * i / EVENTS - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                now_ms = time.time_ns() // 1_000_000
                if with_ids and rng.random() < 0.02:
                    # The same event again under its idempotency key (a client retry).
                    customer, meter, nanos, ts, dims, eid = rng.choice(with_ids)
                    emit(customer, meter, _units(nanos), timestamp_ms=ts, dimensions=dims, id=eid)
                else:
                    customer, meter, nanos, ts, dims = self._event(i, now_ms)
                    eid = f"{customer}|{meter}|e{i}" if rng.random() < 0.10 else None
                    emit(customer, meter, _units(nanos), timestamp_ms=ts, dimensions=dims,
                         id=eid)
                    self.truth.add(customer, meter, nanos, ts, dims)
                    if eid is not None:
                        with_ids.append((customer, meter, nanos, ts, dims, eid))
                self.emitted = i + 1
            self._deliver_everything()
            self._emitter.close()
            self.stats = self._emitter.stats()
        except BaseException as exc:  # reported by the test thread
            self.error = exc
        finally:
            self.done.set()


    def _deliver_everything(self) -> None:
        """What an application that must not exit with undelivered usage does: flush until
        the spool is empty, giving up only when it stops shrinking for a minute (longer
        than the transport's stuck-producer reset, 30 s)."""
        stats, best, stalled_since = self._emitter.stats, None, time.monotonic()
        while not self._emitter.flush(5):
            s = stats()
            left = s.buffered + s.held + s.pending_in_spool
            if best is None or left < best:
                best, stalled_since = left, time.monotonic()
            elif time.monotonic() - stalled_since > 60:
                return  # close() counts what is left; the test reports it


def _units(nanos: int) -> str:
    """Nano-units as the exact decimal string the SDK takes."""
    whole, frac = divmod(nanos, SCALE)
    return f"{whole}.{frac:09d}"


def lag(bootstrap: str, group: str, topics: list[str]) -> int:
    """Records not covered by the group's committed offsets; -1 while the broker cannot
    say (around a restart)."""
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    try:
        total = 0
        for topic in topics:
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            for tp in c.committed(tps, timeout=10):
                _, high = c.get_watermark_offsets(tp, timeout=10)
                total += high - max(tp.offset, 0)
        return total
    except KafkaException:
        return -1
    finally:
        c.close()


def checkpoint_lag(bootstrap: str, topic: str) -> int:
    """Records not yet covered by the rollup checkpoints: what the workers have really
    done (the committed offsets are only an indicator, see docs/rollups.md); -1 while the
    broker cannot say."""
    import zlib

    from confluent_kafka import Consumer, KafkaException, TopicPartition

    from meterline.aggregators.checkpoints import KafkaCheckpointStore, checkpoint_key

    keys = {checkpoint_key(GROUP, topic, p): p for p in range(PARTITIONS)}
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "crash-test-probe"})
    store = KafkaCheckpointStore(bootstrap, f"{topic}.checkpoints", timeout_s=10)
    try:
        blobs = store.load(keys)
        done = {keys[k]: json.loads(zlib.decompress(b))["next_offset"] for k, b in blobs.items()}
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                   - done.get(p, 0) for p in range(PARTITIONS))
    except (KafkaException, TimeoutError, RuntimeError):
        return -1
    finally:
        c.close()
        store.close()


def wait_progress(measure: Callable[[], int], done: Callable[[int], bool], what: str,
                  check: Callable[[], None] = lambda: None) -> int:
    """Poll ``measure`` until ``done(value)``; fail only when it stops changing for
    ``STALL_S`` (a busy machine is slow, not stuck)."""
    last, moved = None, time.monotonic()
    while True:
        value = measure()
        if done(value):
            return value
        check()
        if value != last:
            last, moved = value, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            raise AssertionError(f"{what}: no progress for {STALL_S:.0f}s (at {value})")
        time.sleep(0.5)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    b = KafkaBroker(tmp_path / "kafka", partitions=PARTITIONS)
    b.start()
    try:
        yield b
    finally:
        b.stop(timeout_s=15)


def test_sdk_emitting_through_kills_rebalances_and_a_broker_restart_is_exact(
        broker: KafkaBroker, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    print(f"seed {SEED} (METERLINE_CRASH_SEED reproduces the fault schedule)")
    topic = broker.create_topic("usage", PARTITIONS,
                                config={"message.timestamp.type": "LogAppendTime"})
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": broker.bootstrap,
           "METERLINE_TOPIC": topic, "METERLINE_ROLLUP_GROUP": GROUP,
           "METERLINE_CHECKPOINT_INTERVAL_S": "1.0",
           "METERLINE_DATA_DIR": str(tmp_path / "clickhouse")}
    procs = Procs(env, logs)
    emission = Emission(broker.bootstrap, topic, tmp_path / "spool", rng)
    outputs = list(output_topics(topic).values())

    def at(fraction: float) -> None:
        """Wait until this share of the events was emitted (faults follow progress)."""
        goal = int(EVENTS * min(fraction + rng.uniform(-0.03, 0.03), 0.97))
        wait_progress(lambda: emission.emitted, lambda n: n >= goal or emission.done.is_set(),
                      "the SDK emitting", procs.check_alive)
        assert not emission.done.is_set() or emission.error is None, emission.error

    try:
        procs.start("a", "worker")
        procs.start("loader", "load-rollups")
        emission.start()
        at(0.10)
        procs.kill9("a")  # kill 1: mid-stream, the one owner of every partition
        procs.start("a", "worker")
        at(0.20)
        procs.start("b", "worker")  # rebalance while records arrive
        at(0.35)
        procs.kill9("b")  # kill 2: b's partitions go back to a mid-stream
        procs.start("b", "worker")
        at(0.50)
        broker.stop(timeout_s=30)  # the SDK spools, workers and loader ride it out
        time.sleep(rng.uniform(1, 4))
        broker.start()
        at(0.60)
        procs.kill9("loader")  # between an insert and its commit, maybe
        procs.start("loader", "load-rollups")
        at(0.70)
        procs.start("c", "worker")  # a third member: one more rebalance
        at(0.85)
        procs.kill9(rng.choice(["a", "b", "c"]))  # kill 3
        procs.start("d", "worker")
        wait_progress(lambda: emission.emitted, lambda _: emission.done.is_set(),
                      "the SDK to finish", procs.check_alive)
        assert emission.error is None, emission.error
        assert emission.stats.lost == 0 and emission.stats.rejected == 0, emission.stats
        # Events still in the SDK's spool never reached Kafka: not the workers' to count.
        assert emission.stats.undelivered_at_close == 0, (
            f"the SDK could not deliver {emission.stats.undelivered_at_close} events "
            f"(producer resets: {emission.resets()}); {emission.stats}")

        # Everything emitted is in Kafka now; the workers must catch up (checkpoints at
        # the log end), and then their committed offsets must be there too.
        wait_progress(lambda: checkpoint_lag(broker.bootstrap, topic), lambda n: n == 0,
                      "the rollup checkpoints to reach the log end", procs.check_alive)
        wait_progress(lambda: lag(broker.bootstrap, GROUP, [topic]), lambda n: n == 0,
                      "the rollup group's committed lag to drain", procs.check_alive)
        wait_progress(lambda: lag(broker.bootstrap, LOADER_GROUP, outputs),
                      lambda n: n == 0, "the loader's lag to drain", procs.check_alive)
        procs.stop(*[n for n in list(procs.procs) if n != "loader"])
        # A clean stop may flush once more (outputs, never new offsets past the end).
        assert lag(broker.bootstrap, GROUP, [topic]) == 0, "lag came back after the stop"
        wait_progress(lambda: lag(broker.bootstrap, LOADER_GROUP, outputs),
                      lambda n: n == 0, "the loader's lag to drain after the stop")
    finally:
        procs.stop_all()

    dump = tmp_path / "dump.json"
    subprocess.run([sys.executable, "-m", "meterline.testing.dump_rollups", str(dump)],
                   env=env, check=True, timeout=300)
    got = json.loads(dump.read_text())
    truth = emission.truth
    for view, expected in (("hourly_usage", truth.hourly), ("daily_usage", truth.daily)):
        rows = {(c, m, g, s): v for c, m, g, s, v in got[view]}
        wrong = {k: (v, rows.get(k)) for k, v in expected.items() if rows.get(k) != v}
        extra = set(rows) - set(expected)
        short = sum(v - (rows.get(k) or 0) for k, v in expected.items()
                    if k[1] in ("api_calls",) and rows.get(k) != v) // SCALE
        assert not wrong and not extra, (
            f"seed {SEED}, {view}: {len(wrong)} of {len(expected)} windows wrong "
            f"({short} api_calls short), {len(extra)} unexpected; e.g. "
            f"{list(wrong.items())[:3]}; logs in {logs}")
    assert truth.events > EVENTS * 0.9
