"""kill -9 the embedded rollup runner three times while records are still arriving; the
totals stay exact.

The runner runs in a subprocess with its own chDB data directory (pytest never opens it:
one chDB engine per process). The workload holds ~300k events from 200 customers with
resent batches (the same bytes appended twice), duplicate explicit event ids, invalid
events, garbage records and too-late events; it is appended to the log in four parts, each
*while* a runner reads it. Each runner is killed once it has committed about half of the
part being appended - a point measured from what is left to do, so a fast machine cannot
finish the log before the kill and a slow one is never failed for being slow: waits fail
only when the committed offsets stop moving for ``STALL_S``. A last run goes until idle and
dumps every (customer, meter, hour) and (customer, meter, day) total plus the dead-letter
and late counts, which must equal the ground truth computed here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterline.config import DEFAULT_METERS
from meterline.core.envelope import Batch, encode_batch
from meterline.core.meters import Aggregation, MeterRegistry
from meterline.core.partitioning import partition_for
from meterline.core.quantity import to_nanos
from meterline.ingest.local_log import LocalLog
from meterline.workload import GroundTruth

pytest.importorskip("chdb")
pytestmark = pytest.mark.slow

HOUR_MS = 3_600_000
PARTITIONS = 4
# Late events of these meters are counted, not added to values (docs/rollups.md).
RESTATED_ELSEWHERE = (Aggregation.UNIQUE_COUNT, Aggregation.LATEST)
CUSTOMERS = [f"k-{i:03d}" for i in range(200)]
EVENTS = 300_000
GARBAGE = [b"\x00garbage", b"{}", b'{"v":1}', b"[1,2]", b"not json at all"]
KILLS = 3
STALL_S = 120.0  # no committed progress for this long while a runner lives: a failure
PART_S = 5.0  # each part of the workload is appended over about this long


@dataclass
class Expected:
    truth: GroundTruth
    dead_letters: dict[str, int] = field(default_factory=dict)
    late: int = 0
    records: int = 0
    appends: list[tuple[int, bytes]] = field(default_factory=list)  # in append order
    # (granularity, customer, meter, window start) that only late, not restated events
    # touch: the views show them with value 0 and their events as pending.
    pending: set[tuple[str, str, str, int]] = field(default_factory=set)


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
    """Plan the workload (``Expected.appends``, appended by the test) and compute what the
    rollups must say. Creates the empty log."""
    rng = random.Random(seed)
    registry = MeterRegistry.load(DEFAULT_METERS)
    exp = Expected(GroundTruth(registry=registry))
    LocalLog(path, partitions=PARTITIONS).close()
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
        exp.appends.append((p, payload))
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
            exp.appends.append((p, rng.choice(sent[p][-20:])))
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
                # In no rollup row, but restated into what readers see (hours late: well
                # inside the 35-day horizon) for meters whose total can take it.
                if registry.get(meter).aggregation not in RESTATED_ELSEWHERE:
                    exp.truth.add(customer, meter, to_nanos(qty), ts, dims)
                else:
                    exp.pending.add(("hour", customer, meter, ts - ts % HOUR_MS))
                    exp.pending.add(("day", customer, meter, ts - ts % (24 * HOUR_MS)))
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
        exp.appends.insert(rng.randrange(len(exp.appends)), (rng.randrange(PARTITIONS), junk))
        exp.records += 1
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


def wait_committed(log_path: Path, child: subprocess.Popen[bytes], goal: int,
                   log_file: Path) -> int:
    """Until the committed offsets reach ``goal`` (or the child exits); fails only when
    they stop moving for ``STALL_S``."""
    last, moved = -1, time.monotonic()
    while True:
        done = committed(log_path)
        if done >= goal or child.poll() is not None:
            return done
        if done != last:
            last, moved = done, time.monotonic()
        assert time.monotonic() - moved < STALL_S, (
            f"the runner committed nothing for {STALL_S:.0f}s (at {done}, waiting for {goal}):"
            f"\n{log_file.read_text()[-3000:]}")
        time.sleep(0.05)


def append_slowly(log_path: Path, appends: list[tuple[int, bytes]],
                  over_s: float = PART_S) -> threading.Thread:
    """Append like traffic: a few records at a time, spread over ``over_s``, while a
    runner reads (this paces the traffic; no assertion depends on it)."""
    def run() -> None:
        log = LocalLog(log_path)
        started = time.monotonic()
        try:
            for i in range(0, len(appends), 4):
                for p, payload in appends[i:i + 4]:
                    log.append(p, [payload])
                ahead = started + over_s * (i + 4) / len(appends) - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        finally:
            log.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_kill9_three_times_while_records_arrive_then_exact(tmp_path: Path) -> None:
    log_path = tmp_path / "log.db"
    exp = write_log(log_path)
    assert exp.late > 0 and sum(exp.dead_letters.values()) > 0
    cmd = [sys.executable, "-m", "meterline.aggregators.embedded", "--log", str(log_path),
           "--data-dir", str(tmp_path / "chdb"), "--checkpoint", str(tmp_path / "ck.db"),
           "--flush-interval", "0.2", "--checkpoint-interval", "0.7"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = random.Random(int(os.environ.get("KILL9_SEED", "5")))
    parts = [exp.appends[len(exp.appends) * k // (KILLS + 1):
                         len(exp.appends) * (k + 1) // (KILLS + 1)] for k in range(KILLS + 1)]
    children: list[subprocess.Popen[bytes]] = []
    appended = 0
    try:
        kill_points = []
        for k in range(KILLS):
            before = committed(log_path)
            log_file = tmp_path / f"run{k}.log"
            child = subprocess.Popen(cmd, stdout=log_file.open("wb"), stderr=subprocess.STDOUT,
                                     env=env)
            children.append(child)
            writer = append_slowly(log_path, parts[k])
            appended += len(parts[k])
            # Kill after the runner has committed something of this part, at a random
            # point while it is still being appended: what is left to do sets the moment.
            wait_committed(log_path, child, before + 1, log_file)
            time.sleep(rng.uniform(0, PART_S / 3))
            assert child.poll() is None, log_file.read_text()
            child.send_signal(signal.SIGKILL)  # anywhere: mid-batch, -write, -checkpoint
            child.wait(10)
            kill_points.append((committed(log_path), appended))
            writer.join()
        print(f"killed at (committed, appended) {kill_points} of {exp.records} records; "
              f"late {exp.late}, dead letters {exp.dead_letters}")
        assert all(done < total for done, total in kill_points), kill_points

        dump = tmp_path / "dump.json"
        append_slowly(log_path, parts[-1]).join()
        log_file = tmp_path / "final.log"
        final = subprocess.Popen([*cmd, "--until-idle", "1", "--dump", str(dump)],
                                 stdout=log_file.open("wb"), stderr=subprocess.STDOUT, env=env)
        children.append(final)
        wait_committed(log_path, final, exp.records + 1, log_file)  # until it exits
        assert final.wait(STALL_S) == 0, log_file.read_text()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)

    doc = json.loads(dump.read_text())
    for granularity in ("hour", "day"):
        got = {(c, m, start): value for c, m, start, value in doc[granularity]}
        want = exp.truth.window_totals(granularity)  # type: ignore[arg-type]
        wrong = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k)
                       and not (k not in want and got[k] == 0 and (granularity, *k)
                                in exp.pending))
        assert not wrong, (f"{len(wrong)} of {len(want)} {granularity} totals differ, e.g. "
                           f"{[(k, got.get(k), want.get(k)) for k in wrong[:5]]}")
    dead = doc["dead_letters"]
    envelope = {code: n for code, n in dead.items() if code.startswith("envelope.")}
    assert {code: n for code, n in dead.items() if code.startswith("event.")} == exp.dead_letters
    assert sum(envelope.values()) == len(GARBAGE), envelope
    assert doc["late_events"] == exp.late
    assert committed(log_path) == exp.records, "the final run committed the whole log"
