"""kill -9 the embedded rollup runner three times at random points; the totals stay exact.

The runner runs in a subprocess with its own chDB data directory (pytest never opens it:
one chDB engine per process). The log holds ~300k events from 200 customers with resent
batches (the same bytes appended twice), duplicate explicit event ids, invalid events,
garbage records and too-late events. After the kills, a last run goes until idle and dumps
every (customer, meter, hour) and (customer, meter, day) total plus the dead-letter and
late counts, which must equal the ground truth computed here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterline.config import DEFAULT_METERS
from meterline.core.envelope import Batch, encode_batch
from meterline.core.meters import MeterRegistry
from meterline.core.partitioning import partition_for
from meterline.core.quantity import to_nanos
from meterline.ingest.local_log import LocalLog
from meterline.workload import GroundTruth

pytest.importorskip("chdb")
pytestmark = pytest.mark.slow

HOUR_MS = 3_600_000
PARTITIONS = 4
CUSTOMERS = [f"k-{i:03d}" for i in range(200)]
EVENTS = 300_000
GARBAGE = [b"\x00garbage", b"{}", b'{"v":1}', b"[1,2]", b"not json at all"]
KILLS = 3


@dataclass
class Expected:
    truth: GroundTruth
    dead_letters: dict[str, int] = field(default_factory=dict)
    late: int = 0
    records: int = 0


def _event(rng: random.Random, customer: str, ts: int) -> tuple[str, Any, dict[str, str]]:
    kind = rng.random()
    if kind < 0.5:
        return "api_calls", 1, {"endpoint": rng.choice(["/a", "/b", "/c"]),
                                "region": rng.choice(["eu", "us"])}
    if kind < 0.75:
        return "llm_tokens", rng.randint(1, 5000), {"model": rng.choice(["s", "m", "l"])}
    if kind < 0.85:
        return "compute_seconds", Decimal(rng.randint(1, 90_000)).scaleb(-3), {"tier": "standard"}
    if kind < 0.93:
        return "storage_gb", Decimal(rng.randint(1, 10**6)).scaleb(-4), {
            "region": rng.choice(["eu", "us", "ap"])}
    return "active_users", 1, {"user_id": f"u{rng.randrange(300)}"}


def write_log(path: Path, seed: int = 11) -> Expected:
    """Append the workload to a local log and compute what the rollups must say."""
    rng = random.Random(seed)
    registry = MeterRegistry.load(DEFAULT_METERS)
    exp = Expected(GroundTruth(registry=registry))
    log = LocalLog(path, partitions=PARTITIONS)
    end_ms = time.time_ns() // 1_000_000 - HOUR_MS
    start_ms = end_ms - 30 * HOUR_MS
    weights = [1.0 / (i + 1) ** 0.7 for i in range(len(CUSTOMERS))]
    buffers: dict[int, list[tuple]] = {p: [] for p in range(PARTITIONS)}
    sizes = {p: rng.randint(100, 800) for p in range(PARTITIONS)}
    sent: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    explicit: dict[int, list[tuple]] = {p: [] for p in range(PARTITIONS)}
    max_ts = dict.fromkeys(range(PARTITIONS), start_ms)
    late_batches = dict.fromkeys(range(PARTITIONS), 0)
    batch_no = 0

    def append(p: int, rows: list[tuple], batch_id: str) -> bytes:
        payload = encode_batch(Batch(
            batch_id=batch_id, created_ms=max(r[3] for r in rows),
            customers=[r[0] for r in rows], meters=[r[1] for r in rows],
            quantities=[to_nanos(r[2]) for r in rows], timestamps_ms=[r[3] for r in rows],
            dimensions=[r[4] for r in rows], ids=[r[5] for r in rows]))
        log.append(p, [payload])
        exp.records += 1
        return payload

    def flush(p: int) -> None:
        nonlocal batch_no
        rows, buffers[p] = buffers[p], []
        batch_no += 1
        payload = append(p, rows, f"batch-{batch_no:06d}")
        sent[p].append(payload)
        sizes[p] = rng.randint(100, 800)
        if rng.random() < 0.04:  # an SDK resend: the very same bytes again, later
            log.append(p, [rng.choice(sent[p][-20:])])
            exp.records += 1
        # Now and then a batch of events from long ago (a spool drained after an outage):
        # their hourly windows closed hours ago, so they are too late for the rollups.
        if max_ts[p] > start_ms + 12 * HOUR_MS and late_batches[p] < 2 and rng.random() < 0.02:
            late_batches[p] += 1
            batch_no += 1
            late_rows = []
            for _ in range(rng.randint(5, 40)):
                customer = rng.choice([c for c in CUSTOMERS if partition_for(c, PARTITIONS) == p])
                ts = max_ts[p] - 5 * HOUR_MS - rng.randrange(3 * HOUR_MS)
                meter, qty, dims = _event(rng, customer, ts)
                late_rows.append((customer, meter, qty, ts, dims, None))
            append(p, late_rows, f"late-{batch_no:06d}")
            exp.late += len(late_rows)

    customers = rng.choices(CUSTOMERS, weights=weights, k=EVENTS)
    for i, customer in enumerate(customers):
        p = partition_for(customer, PARTITIONS)
        ts = start_ms + i * (30 * HOUR_MS) // EVENTS - rng.randrange(3 * 60_000)
        roll = rng.random()
        if roll < 0.02 and explicit[p]:
            buffers[p].append(rng.choice(explicit[p][-50:]))  # an event id seen before
        elif roll < 0.022:
            buffers[p].append((customer, "no_such_meter", 1, ts, None, None))
            exp.dead_letters["event.unknown_meter"] = (
                exp.dead_letters.get("event.unknown_meter", 0) + 1)
        elif roll < 0.024:
            buffers[p].append((customer, "active_users", 1, ts, {}, None))
            exp.dead_letters["event.missing_unique_value"] = (
                exp.dead_letters.get("event.missing_unique_value", 0) + 1)
        else:
            meter, qty, dims = _event(rng, customer, ts)
            eid = f"evt-{i}" if roll > 0.9 else None
            row = (customer, meter, qty, ts, dims, eid)
            buffers[p].append(row)
            if eid is not None:
                explicit[p].append(row)
            exp.truth.add(customer, meter, to_nanos(qty), ts, dims)
            max_ts[p] = max(max_ts[p], ts)
        if len(buffers[p]) >= sizes[p]:
            flush(p)
    for p in range(PARTITIONS):
        if buffers[p]:
            flush(p)
    for junk in GARBAGE:
        log.append(rng.randrange(PARTITIONS), [junk])
        exp.records += 1
    log.close()
    return exp


def committed(log_path: Path, group: str = "rollups") -> int:
    db = sqlite3.connect(log_path, timeout=5)
    try:
        row = db.execute("SELECT coalesce(sum(next_offset), 0) FROM offsets WHERE consumer = ?",
                         (group,)).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:  # the runner is writing; try again later
        return -1
    finally:
        db.close()


def test_kill9_three_times_then_exact(tmp_path: Path) -> None:
    log_path = tmp_path / "log.db"
    exp = write_log(log_path)
    assert exp.late > 0 and sum(exp.dead_letters.values()) > 0
    cmd = [sys.executable, "-m", "meterline.aggregators.embedded", "--log", str(log_path),
           "--data-dir", str(tmp_path / "chdb"), "--checkpoint", str(tmp_path / "ck.db"),
           "--flush-interval", "0.2", "--checkpoint-interval", "0.7"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(int(os.environ.get("KILL9_SEED", "5")))
    deadline = time.monotonic() + 150
    children: list[subprocess.Popen[bytes]] = []
    try:
        kill_points = []
        for k in range(1, KILLS + 1):
            target = exp.records * k // (KILLS + 2)  # 20 %, 40 %, 60 % of the records
            before = committed(log_path)
            logf = (tmp_path / f"run{k}.log").open("wb")
            child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
            children.append(child)
            while True:
                assert child.poll() is None, (tmp_path / f"run{k}.log").read_text()
                assert time.monotonic() < deadline, "the runner made no progress"
                done = committed(log_path)
                if done >= max(target, before + 1):
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.6))  # anywhere: mid-batch, mid-write, mid-checkpoint
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            kill_points.append(committed(log_path))
        assert kill_points[-1] < exp.records, f"the kills came too late: {kill_points}"
        print(f"killed at committed records {kill_points} of {exp.records}; late {exp.late}, "
              f"dead letters {exp.dead_letters}")

        dump = tmp_path / "dump.json"
        final = subprocess.run([*cmd, "--until-idle", "1", "--dump", str(dump)],
                               capture_output=True, text=True, env=env,
                               timeout=max(10.0, deadline - time.monotonic()))
        assert final.returncode == 0, final.stdout + final.stderr
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)

    doc = json.loads(dump.read_text())
    for granularity in ("hour", "day"):
        got = {(c, m, start): value for c, m, start, value in doc[granularity]}
        want = exp.truth.window_totals(granularity)  # type: ignore[arg-type]
        wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        assert not wrong, (f"{len(wrong)} of {len(want)} {granularity} totals differ, e.g. "
                           f"{[(k, got.get(k), want.get(k)) for k in wrong[:5]]}")
    dead = doc["dead_letters"]
    envelope = {code: n for code, n in dead.items() if code.startswith("envelope.")}
    assert {code: n for code, n in dead.items() if code.startswith("event.")} == exp.dead_letters
    assert sum(envelope.values()) == len(GARBAGE), envelope
    assert doc["late_events"] == exp.late
    assert committed(log_path) == exp.records, "the final run committed the whole log"
