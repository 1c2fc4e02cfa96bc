"""The anomaly detectors inside the embedded rollup runner (aggregators/anomaly_embedded.py).

The truth is computed here, not by the runner: the workload knows every series' hourly
totals, and one plain ``AnomalyEngine`` per partition scores them window by window over the
windows the docs call final (``end + allowed_lateness + watermark_delay <= newest window
start`` of the partition). The runner must produce exactly those episode events: in one
run, and across crashes at any step (in process here; a real SIGKILL of
``meterline rollup-local`` in the slow test at the end).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meterline.aggregators.anomaly_embedded import ENGINE_SUFFIX, EmbeddedAnomalies
from meterline.aggregators.anomaly_stage import MemoryEventWriter
from meterline.aggregators.checkpoints import MemoryCheckpointStore
from meterline.aggregators.embedded import EmbeddedRollups
from meterline.anomaly import AnomalyEngine, AnomalySettings, SeriesKey
from meterline.config import DEFAULT_METERS
from meterline.core.anomaly.feed import FeedSettings
from meterline.core.anomaly.model import EpisodeEvent
from meterline.core.envelope import Batch, encode_batch
from meterline.core.lateness import DEFAULT_ALLOWED_LATENESS_MS, DEFAULT_WATERMARK_DELAY_MS
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush
from meterline.core.partitioning import partition_for
from meterline.core.quantity import SCALE
from meterline.core.windows import HOUR_MS
from meterline.ingest.local_log import LocalLog

METER = "llm_tokens"  # a sum meter of the demo registry (the subprocesses use that one)
REGISTRY = MeterRegistry.load(DEFAULT_METERS)
GROUP = (("model", "m"),)
PARTITIONS = 3
DAYS = 16  # a week of warm-up, then incidents
DAY_MS = 24 * HOUR_MS
# A Monday 00:00 UTC three weeks back (1970-01-05 was a Monday): recent enough for the
# tables' retention (the subprocess test writes real tables with TTLs).
START = (time.time_ns() // 1_000_000 - 4 * DAY_MS) // (7 * DAY_MS) * 7 * DAY_MS + 4 * DAY_MS \
    - 3 * 7 * DAY_MS
SETTLE_MS = DEFAULT_ALLOWED_LATENESS_MS + DEFAULT_WATERMARK_DELAY_MS
SETTINGS = AnomalySettings(min_abs_deviation=20)


@dataclass
class Workload:
    customers: list[str]
    hourly: dict[tuple[str, int], int] = field(default_factory=dict)  # (customer, hour) -> units
    appends: list[tuple[int, bytes]] = field(default_factory=list)
    incidents: list[tuple[str, str, int]] = field(default_factory=list)  # (customer, kind, hour)


def make_workload(customers: int = 12, seed: int = 4, events_per_hour: int = 3,
                  record_ms: int = 3 * HOUR_MS) -> Workload:
    """Hourly usage with a daily shape and noise; a few spikes (x8-x15 for 1-2 hours) and
    outages (8 hours of nothing) after the first week. Each hour's usage is split into
    1..``events_per_hour`` events at random minutes; a log record holds one partition's
    events of ``record_ms``."""
    rng = random.Random(seed)
    w = Workload([f"cust-{i:02d}" for i in range(customers)])
    base = {c: rng.randint(300, 4000) for c in w.customers}
    spikes = {(c, 24 * rng.randint(8, DAYS - 2) + rng.randint(9, 17)): rng.randint(8, 15)
              for c in w.customers[:4]}
    outages = {(c, 24 * rng.randint(8, DAYS - 2) + 10) for c in w.customers[4:7]}
    for c, h in spikes:
        w.incidents.append((c, "spike", h))
    for c, h in outages:
        w.incidents.append((c, "outage", h))
    for h in range(DAYS * 24):
        shape = 1.6 if 8 <= h % 24 < 20 else 0.5
        for c in w.customers:
            value = round(base[c] * shape * rng.uniform(0.9, 1.1))
            for (sc, sh), factor in spikes.items():
                if sc == c and sh <= h < sh + 2:
                    value *= factor
            if any(oc == c and oh <= h < oh + 8 for oc, oh in outages):
                value = 0
            if value:
                w.hourly[(c, h)] = value
    events: dict[int, list[tuple[str, int, int]]] = {p: [] for p in range(PARTITIONS)}
    for (c, h), value in sorted(w.hourly.items()):
        parts = rng.randint(1, min(events_per_hour, value))
        cuts = sorted(rng.sample(range(1, value), parts - 1)) if parts > 1 else []
        for lo, hi in zip([0, *cuts], [*cuts, value], strict=True):
            ts = START + h * HOUR_MS + rng.randrange(HOUR_MS)
            events[partition_for(c, PARTITIONS)].append((c, hi - lo, ts))
    batches: list[tuple[int, int, list[tuple[str, int, int]]]] = []
    for p, evs in events.items():
        evs.sort(key=lambda x: x[2])
        by_record: dict[int, list[tuple[str, int, int]]] = {}
        for e in evs:
            by_record.setdefault(e[2] // record_ms, []).append(e)
        batches += [(slot, p, r) for slot, r in by_record.items()]
    for n, (_slot, p, r) in enumerate(sorted(batches, key=lambda b: (b[0], b[1]))):
        w.appends.append((p, encode_batch(Batch(
            batch_id=f"b{n}", created_ms=r[-1][2], customers=[x[0] for x in r],
            meters=[METER] * len(r), quantities=[x[1] * SCALE for x in r],
            timestamps_ms=[x[2] for x in r], dimensions=[{"model": "m"}] * len(r),
            ids=[None] * len(r)))))
    return w


def truth(w: Workload, settings: AnomalySettings = SETTINGS) -> list[EpisodeEvent]:
    """Episode events of one plain engine per partition over the final windows."""
    out: list[EpisodeEvent] = []
    for p in range(PARTITIONS):
        mine = sorted(c for c in w.customers if partition_for(c, PARTITIONS) == p)
        hours = sorted({h for (c, h) in w.hourly if c in mine})
        if not hours:
            continue
        newest_start = START + hours[-1] * HOUR_MS
        engine = AnomalyEngine(settings)
        for h in range(hours[0], hours[-1] + 1):
            start = START + h * HOUR_MS
            if start + HOUR_MS + SETTLE_MS > newest_start:
                break  # not final yet
            for c in mine:
                value = w.hourly.get((c, h), 0)
                if value:
                    out += engine.observe(SeriesKey(c, METER, GROUP), start, float(value))
            out += engine.advance(start)
    return out


def episodes(events: list[EpisodeEvent]) -> list[EpisodeEvent]:
    return sorted((e for e in events if e.kind != "early"), key=lambda e: e.key)


def produced(stage: EmbeddedAnomalies) -> int:
    """Episode events the detectors of this process produced so far."""
    return sum(n for kind, n in stage.counters.events.items() if kind != "early")


def assert_each_key_identical(events: list[EpisodeEvent]) -> None:
    by_key: dict[str, EpisodeEvent] = {}
    for e in events:
        if e.kind == "early":
            continue
        assert by_key.setdefault(e.key, e) == e, f"two different events under {e.key}"


class NullSink:
    def write(self, flush: Flush) -> None:
        pass


def write_log(path: Path, w: Workload) -> LocalLog:
    log = LocalLog(path, partitions=PARTITIONS)
    for p, payload in w.appends:
        log.append(p, [payload])
    return log


def runner(log: LocalLog, store: MemoryCheckpointStore, events: MemoryEventWriter,
           settings: AnomalySettings = SETTINGS, on_written: Any = None,
           **options: object) -> EmbeddedRollups:
    stage = EmbeddedAnomalies(events, settings, FeedSettings(), group="rollups",
                              topic="local", on_written=on_written)
    options = {"max_records": 2, "flush_interval_s": 0.0, "checkpoint_interval_s": 1e9,
               "idle_sleep_s": 0.001, **options}
    return EmbeddedRollups(log, NullSink(), store, REGISTRY, anomalies=stage,
                           **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def workload() -> Workload:
    return make_workload()


@pytest.fixture(scope="module")
def expected(workload: Workload) -> list[EpisodeEvent]:
    want = episodes(truth(workload))
    # The workload is only a test if the detectors have something to find in it.
    assert {e.kind for e in want} >= {"open", "resolve"}
    assert {e.anomaly.direction for e in want} == {"up", "down"}
    return want


def test_one_run_gives_the_episodes_of_a_plain_engine(tmp_path: Path, workload: Workload,
                                                      expected: list[EpisodeEvent]) -> None:
    log = write_log(tmp_path / "log.db", workload)
    events = MemoryEventWriter()
    r = runner(log, MemoryCheckpointStore(), events, checkpoint_interval_s=0.0)
    r.run(until_idle_s=0.01)
    assert episodes(events.events) == expected
    assert len({e.key for e in events.events}) == len(events.events), "no event twice"
    assert r.anomalies is not None and r.anomalies.series_count() == len(workload.customers)
    # Each spike is caught at its own window (the workload's incidents, not the engine).
    opened = {(e.series.customer, e.window_start_ms) for e in expected if e.kind == "open"}
    for c, kind, h in workload.incidents:
        if kind == "spike":
            assert (c, START + h * HOUR_MS) in opened, (c, h)


@pytest.mark.parametrize("seed", range(6))
def test_crashes_at_random_steps_neither_lose_nor_duplicate_episodes(
        tmp_path: Path, workload: Workload, expected: list[EpisodeEvent], seed: int) -> None:
    """Runners die (no final flush, no checkpoint) after a random number of steps, and
    half the time right after a step that wrote episode events, before a checkpoint
    covered them; checkpoints at random steps. The events written, replays included,
    hold exactly the expected episodes, each key always with the same content."""
    rng = random.Random(seed)
    log = write_log(tmp_path / "log.db", workload)
    store, events = MemoryCheckpointStore(), MemoryEventWriter()
    crashes = 0
    while True:
        r = runner(log, store, events, max_records=rng.randint(1, 5))
        r.start()
        crash = False
        assert r.anomalies is not None
        for _ in range(rng.randint(5, 80)):
            made = produced(r.anomalies)
            if not r.step().records:
                break
            # Flush every step (the runner spaces flushes by their measured cost, which
            # would make where replays happen depend on the machine's speed).
            r.worker.flush(checkpoint=False)
            if produced(r.anomalies) > made and rng.random() < 0.6:
                # Die right after the detectors produced episode events: before a
                # checkpoint covered them (they must come again), or right after one did
                # (they must be durable already).
                if rng.random() < 0.5:
                    r.checkpoint()
                crash = True
                break
            if rng.random() < 0.15:
                r.checkpoint()
        else:
            crash = True
        if crash:
            crashes += 1
            continue  # the process dies here
        r.checkpoint()
        break
    assert crashes >= 2
    assert_each_key_identical(events.events)
    assert sorted({e.key: e for e in episodes(events.events)}.values(),
                  key=lambda e: e.key) == expected
    assert len(episodes(events.events)) > len(expected), "a replay wrote some events again"


def test_events_are_handed_to_the_webhook_only_once_a_checkpoint_covers_them(
        tmp_path: Path, workload: Workload, expected: list[EpisodeEvent]) -> None:
    log = write_log(tmp_path / "log.db", workload)
    store, events = MemoryCheckpointStore(), MemoryEventWriter()
    handed: list[tuple[int, list[EpisodeEvent]]] = []
    r = runner(log, store, events, on_written=lambda evs: handed.append((store.saves, evs)))
    while r.step().records:
        r.worker.flush(checkpoint=False)  # written now, handed on only at the checkpoint
        assert sum(len(evs) for _, evs in handed) <= len(events.events)
        if len(events.events) > sum(len(evs) for _, evs in handed):
            saves = store.saves
            r.checkpoint()
            assert handed[-1][0] == saves + 1, "handed on right after the save"
    r.checkpoint()
    assert [e for _, evs in handed for e in evs] == events.events
    assert episodes(events.events) == expected


def test_checkpoints_rewrite_detector_state_only_when_a_window_closed(
        tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.db", make_workload(customers=6, record_ms=20 * 60_000))
    store = MemoryCheckpointStore()
    saved: list[list[str]] = []
    inner_save = store.save

    def spy(blobs):  # type: ignore[no-untyped-def]
        saved.append(sorted(k for k in blobs if k.startswith("rollups.anomalies/")))
        inner_save(blobs)

    store.save = spy  # type: ignore[method-assign]
    r = runner(log, store, MemoryEventWriter(), max_records=1, checkpoint_interval_s=0.0)
    r.run(until_idle_s=0.01)
    feed_saves = sum(1 for keys in saved for k in keys if not k.endswith(ENGINE_SUFFIX))
    engine_saves = sum(1 for keys in saved for k in keys if k.endswith(ENGINE_SUFFIX))
    # A record holds 20 minutes of one partition: one checkpoint in three closes a window.
    assert feed_saves > 2.5 * engine_saves > 0, (feed_saves, engine_saves)
    assert all(not k.endswith(ENGINE_SUFFIX) or k[:-len(ENGINE_SUFFIX)] in keys
               for keys in saved for k in keys)


def test_state_from_another_rollup_position_or_a_damaged_one_is_not_used(
        tmp_path: Path, workload: Workload, caplog: pytest.LogCaptureFixture) -> None:
    """Detectors switched off for a while (rollups moved on without them): the saved state
    would score the gap as silence; the detectors start afresh instead and say so. A
    damaged state likewise: detection restarts, the rollups are not stopped."""
    log = write_log(tmp_path / "log.db", workload)
    store, events = MemoryCheckpointStore(), MemoryEventWriter()
    half = len(workload.appends) // 2
    r = runner(log, store, events)
    while sum(log.committed("rollups", p) for p in range(PARTITIONS)) < half:
        assert r.step().records
        r.checkpoint()
    # Now the rollups run on without detectors, then with them again.
    plain = EmbeddedRollups(log, NullSink(), store, REGISTRY, max_records=4,
                            flush_interval_s=0.0, checkpoint_interval_s=0.0)
    plain.run(until_idle_s=0.01)
    assert [k for k in store.blobs if k.startswith("rollups.anomalies/")], "state was saved"
    with caplog.at_level(logging.WARNING, "meterline.aggregators.anomaly_embedded"):
        again = runner(log, store, MemoryEventWriter())
        again.start()
    assert again.anomalies is not None and not any(again.anomalies.restored.values())
    assert "start afresh" in caplog.text and "switched off" in caplog.text

    # A damaged blob: the detectors start afresh, the rollups go on.
    for key in [k for k in store.blobs if k.startswith("rollups.anomalies/")]:
        store.blobs[key] = b"not zlib"
    caplog.clear()
    with caplog.at_level(logging.WARNING, "meterline.aggregators.anomaly_embedded"):
        r3 = runner(log, store, MemoryEventWriter())
        r3.run(until_idle_s=0.01)
    assert r3.anomalies is not None and not any(r3.anomalies.restored.values())
    assert "not used" in caplog.text


def test_a_failed_event_write_stops_the_runner_before_any_checkpoint(
        tmp_path: Path, workload: Workload, expected: list[EpisodeEvent]) -> None:
    """The events of a flush could not be written: no checkpoint may cover those rows
    (the runner refuses to go on); a restart re-derives and writes them."""
    log = write_log(tmp_path / "log.db", workload)
    store, events = MemoryCheckpointStore(), MemoryEventWriter()
    r = runner(log, store, events, checkpoint_interval_s=0.0)
    while not events.events:
        assert r.step().records
    events.fail = True
    while True:
        before = dict(store.blobs)
        try:
            assert r.step().records, "the log ended without another event"
        except RuntimeError as exc:
            assert "injected" in str(exc)
            break
    assert store.blobs == before, "nothing was saved by the step whose events failed"
    with pytest.raises(RuntimeError, match="restart"):
        r.checkpoint()
    events.fail = False
    again = runner(log, store, events)
    again.run(until_idle_s=0.01)
    assert_each_key_identical(events.events)
    assert sorted({e.key: e for e in episodes(events.events)}.values(),
                  key=lambda e: e.key) == expected


# --------------------------------------------------------------------------- kill -9


STALL_S = 120.0  # no committed progress for this long while a runner lives: a failure


def _committed(log_path: Path) -> int:
    db = sqlite3.connect(log_path, timeout=5)
    try:
        row = db.execute("SELECT coalesce(sum(next_offset), 0) FROM offsets "
                         "WHERE consumer = 'rollups'").fetchone()
        return int(row[0])
    except sqlite3.OperationalError:
        return -1
    finally:
        db.close()


def _wait_committed(log_path: Path, child: subprocess.Popen[bytes], goal: int,
                    out: Path) -> int:
    last, moved = -1, time.monotonic()
    while True:
        done = _committed(log_path)
        if done >= goal or child.poll() is not None:
            return done
        if done != last:
            last, moved = done, time.monotonic()
        assert time.monotonic() - moved < STALL_S, (
            f"nothing committed for {STALL_S:.0f}s (at {done}, waiting for {goal}):\n"
            f"{out.read_text()[-3000:]}")
        time.sleep(0.02)


def _append_slowly(log_path: Path, appends: list[tuple[int, bytes]],
                   over_s: float) -> threading.Thread:
    """Append like traffic, a few records at a time over ``over_s``, while a runner reads
    (this paces the traffic; no assertion depends on it)."""
    def run() -> None:
        log = LocalLog(log_path)
        started = time.monotonic()
        try:
            for i in range(0, len(appends), 2):
                for p, payload in appends[i:i + 2]:
                    log.append(p, [payload])
                ahead = started + over_s * (i + 2) / len(appends) - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        finally:
            log.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_kill9_of_rollup_local_neither_loses_nor_duplicates_an_episode_event(
        tmp_path: Path, expected: list[EpisodeEvent]) -> None:
    """`meterline rollup-local` is SIGKILLed twice while the log is being appended; each
    kill is placed by its committed progress (a random share of the part being appended,
    never by wall time). A last run goes until idle and dumps the anomalies table. The
    distinct episode events equal the truth, and every row ever written under an episode
    key has the same content. (Replays of already written events are forced and checked
    deterministically by the in-process crash test above; here the point is a real
    SIGKILL anywhere: mid-write, mid-save.)"""
    pytest.importorskip("chdb")
    workload = make_workload(events_per_hour=30)  # the same usage as ``expected``, more events
    assert episodes(truth(workload)) == expected
    log_path = tmp_path / "log.db"
    LocalLog(log_path, partitions=PARTITIONS).close()
    records = len(workload.appends)
    parts = [workload.appends[records * k // 3:records * (k + 1) // 3] for k in range(3)]
    config = tmp_path / "meterline.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "chdb"}"\n'
                      "[rollups]\nflush_interval_s = 0.05\ncheckpoint_interval_s = 0.3\n")
    settings = tmp_path / "anomalies.toml"
    settings.write_text("[detector]\nmin_abs_deviation = 20\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "meterline.cli", "--config", str(config), "rollup-local",
           "--log", str(log_path), "--anomaly-settings", str(settings)]
    rng = random.Random(int(os.environ.get("KILL9_SEED", "8")))
    children: list[subprocess.Popen[bytes]] = []
    kills = []
    appended = 0
    try:
        for k in range(2):
            before = _committed(log_path)
            out = tmp_path / f"run{k}.log"
            child = subprocess.Popen(cmd, stdout=out.open("wb"), stderr=subprocess.STDOUT,
                                     env=env)
            children.append(child)
            writer = _append_slowly(log_path, parts[k], over_s=4.0)
            appended += len(parts[k])
            goal = before + int(len(parts[k]) * rng.uniform(0.2, 0.8))
            done = _wait_committed(log_path, child, goal, out)
            assert child.poll() is None, out.read_text()
            child.send_signal(signal.SIGKILL)  # anywhere: mid-batch, -write, -save
            child.wait(10)
            kills.append((done, appended))
            writer.join()
        assert all(done < total for done, total in kills), kills
        _append_slowly(log_path, parts[2], over_s=0.0).join()
        dump = tmp_path / "dump.json"
        out = tmp_path / "final.log"
        final = subprocess.run(
            [sys.executable, "-m", "meterline.aggregators.embedded", "--log", str(log_path),
             "--data-dir", str(tmp_path / "chdb"), "--until-idle", "0.5",
             "--anomaly-settings", str(settings), "--dump", str(dump)],
            stdout=out.open("wb"), stderr=subprocess.STDOUT, env=env, timeout=600)
        assert final.returncode == 0, out.read_text()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)
    assert _committed(log_path) == records
    doc = json.loads(dump.read_text())
    got = sorted((key, kind, start) for key, kind, start, *_ in doc["anomalies"]
                 if kind != "early")
    want = sorted((e.key, e.kind, e.window_start_ms) for e in expected)
    assert got == want
    # Observed/expected as the table stores them (9 decimals) equal the plain engine's.
    by_key = {key: (obs, exp) for key, _kind, _s, _d, _sev, obs, exp, _x in doc["anomalies"]}
    for e in expected:
        assert by_key[e.key] == pytest.approx((e.anomaly.observed, e.anomaly.expected),
                                              abs=1e-6)
    copies = doc["anomaly_copies"]
    assert all(distinct == 1 for kind, _n, distinct in copies.values() if kind != "early"), \
        {k: v for k, v in copies.items() if v[2] != 1}
    print(f"killed at (committed, appended) {kills} of {records} records; "
          f"{sum(n for _k, n, _d in copies.values())} rows for {len(copies)} keys")
