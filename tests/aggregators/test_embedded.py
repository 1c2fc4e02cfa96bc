"""The embedded runner with in-memory outputs and checkpoints: exact totals, committed
offsets never ahead of a saved checkpoint, restarts from any point, clean stops."""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meterline.aggregators.checkpoints import MemoryCheckpointStore
from meterline.aggregators.embedded import EmbeddedRollups, default_checkpoint_path
from meterline.core.envelope import Batch, encode_batch
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush
from meterline.core.partitioning import partition_for
from meterline.core.quantity import SCALE
from meterline.core.windows import HOUR_MS
from meterline.ingest.local_log import LocalLog

REGISTRY = MeterRegistry.from_mapping({"meters": {
    "tokens": {"aggregation": "sum", "dimensions": ["model"]},
    "calls": {"aggregation": "count"},
    "users": {"aggregation": "unique_count", "value_property": "user_id",
              "dimensions": ["user_id"]},
}})
PARTITIONS = 3
NOW = 1_700_000_000_000  # the log's clock in these tests
START = NOW - 30 * HOUR_MS


class ReplacingTable:
    """ReplacingMergeTree(version) as readers see it: highest version per key wins."""

    def __init__(self) -> None:
        self.rows: dict[tuple, tuple[int, int]] = {}
        self.dead: set[tuple] = set()
        self.late: set[tuple] = set()
        self.writes = 0

    def write(self, flush: Flush) -> None:
        self.writes += 1
        for r in flush.rollup_rows():
            key = (r.window, r.customer, r.meter, r.group, r.window_start_ms, r.partition)
            old = self.rows.get(key)
            if old is not None and old[0] == r.version:
                assert old[1] == r.value_nanos, f"version {r.version} of {key} changed value"
            if old is None or r.version >= old[0]:
                self.rows[key] = (r.version, r.value_nanos)
        self.dead |= {(d.partition, d.offset, d.position) for d in flush.dead_letters}
        self.late |= {(x.customer, x.meter, x.window_start_ms, x.event_id) for x in flush.late}

    def totals(self, window: str) -> dict[tuple[str, str, int], int]:
        out: dict[tuple[str, str, int], int] = {}
        for (w, customer, meter, _g, start, _p), (_v, value) in self.rows.items():
            if w == window:
                out[(customer, meter, start)] = out.get((customer, meter, start), 0) + value
        return out


class FailingWriter(ReplacingTable):
    """Raises on the n-th write, as a ClickHouse outage would."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def write(self, flush: Flush) -> None:
        if self.writes + 1 == self.fail_at:
            self.writes += 1
            raise ConnectionError("storage went away")
        super().write(flush)


def make_log(path: Path, n_batches: int = 120, seed: int = 3
             ) -> tuple[LocalLog, dict[tuple[str, str, int], int], int]:
    """A log with resent batches, duplicate explicit ids and a garbage record; returns it
    with the expected hourly totals and the number of dead letters."""
    rng = random.Random(seed)
    log = LocalLog(path, partitions=PARTITIONS, clock_ms=lambda: NOW)
    expected: dict[tuple[str, str, int], int] = {}
    users: dict[tuple[str, int], set[str]] = {}
    sent: dict[int, list[bytes]] = {}
    seen_ids: set[str] = set()
    dead = 0
    for b in range(n_batches):
        customer = f"c{rng.randrange(12)}"
        p = partition_for(customer, PARTITIONS)
        if sent.get(p) and rng.random() < 0.1:
            log.append(p, [rng.choice(sent[p])])  # the same bytes again: a resend
            continue
        clock = START + b * (20 * HOUR_MS // n_batches)
        rows: list[tuple[str, int, int, dict[str, str] | None, str | None]] = []
        for _ in range(rng.randrange(1, 30)):
            ts = clock - rng.randrange(10 * 60_000)
            hour = ts - ts % HOUR_MS
            kind = rng.random()
            eid = f"{customer}-k{rng.randrange(40)}" if kind < 0.2 else None
            if eid is not None and eid in seen_ids:
                rows.append(("tokens", 7, ts, {"model": "m"}, eid))  # a duplicate: ignored
                continue
            if eid is not None:
                seen_ids.add(eid)
            if kind < 0.6:
                q = rng.randrange(1, 5 * SCALE)
                rows.append(("tokens", q, ts, {"model": rng.choice("ab")}, eid))
                key = (customer, "tokens", hour)
                expected[key] = expected.get(key, 0) + q
            elif kind < 0.85:
                rows.append(("calls", 1, ts, None, eid))
                key = (customer, "calls", hour)
                expected[key] = expected.get(key, 0) + SCALE
            else:
                user = f"u{rng.randrange(5)}"
                rows.append(("users", SCALE, ts, {"user_id": user}, None))
                users.setdefault((customer, hour), set()).add(user)
        if rng.random() < 0.1:
            rows.append(("nope", 1, clock, None, None))  # unknown meter: a dead letter
            dead += 1
        payload = encode_batch(Batch(
            batch_id=f"b{b}", created_ms=clock, customers=[customer] * len(rows),
            meters=[r[0] for r in rows], quantities=[r[1] for r in rows],
            timestamps_ms=[r[2] for r in rows], dimensions=[r[3] for r in rows],
            ids=[r[4] for r in rows]))
        log.append(p, [payload])
        sent.setdefault(p, []).append(payload)
    log.append(0, [b"\x00garbage"])
    dead += 1
    for (customer, hour), seen in users.items():
        expected[(customer, "users", hour)] = len(seen) * SCALE
    return log, expected, dead


def saved_offsets(store: MemoryCheckpointStore) -> dict[int, int]:
    """{partition: next_offset} of the main checkpoints (not the id deltas beside them)."""
    docs = [json.loads(zlib.decompress(blob)) for key, blob in store.blobs.items()
            if "/ids/" not in key]
    return {doc["partition"]: doc["next_offset"] for doc in docs}


def runner(log: LocalLog, writer: ReplacingTable, store: MemoryCheckpointStore,
           **options: object) -> EmbeddedRollups:
    options = {"max_records": 4, "flush_interval_s": 0.0, "checkpoint_interval_s": 0.0,
               "idle_sleep_s": 0.001, **options}
    return EmbeddedRollups(log, writer, store, REGISTRY, **options)  # type: ignore[arg-type]


def assert_committed_within_checkpoints(log: LocalLog, store: MemoryCheckpointStore,
                                        group: str = "rollups") -> None:
    saved = saved_offsets(store)
    for p in range(log.partitions):
        assert log.committed(group, p) <= saved.get(p, 0), (p, log.committed(group, p), saved)


def test_runs_to_idle_with_exact_totals(tmp_path: Path) -> None:
    log, expected, dead = make_log(tmp_path / "log.db")
    table, store = ReplacingTable(), MemoryCheckpointStore()
    r = runner(log, table, store, max_records=64, flush_interval_s=0.5,
               checkpoint_interval_s=5.0)
    counters = r.run(until_idle_s=0.05)
    assert table.totals("hourly") == expected
    assert len(table.dead) == dead and counters.rejected == dead
    assert counters.duplicate > 0 and counters.late == 0
    assert counters.by_reason == {"envelope.malformed_json": 1, "event.unknown_meter": dead - 1}
    for p in range(PARTITIONS):  # the idle checkpoint committed everything
        assert log.committed("rollups", p) == log.end_offset(p) == saved_offsets(store)[p]


def test_committed_offsets_never_pass_a_saved_checkpoint(tmp_path: Path) -> None:
    log, expected, _ = make_log(tmp_path / "log.db")
    table, store = ReplacingTable(), MemoryCheckpointStore()
    r = runner(log, table, store, flush_interval_s=0.0, checkpoint_interval_s=0.002)
    steps = 0
    while r.step().records:
        steps += 1
        assert_committed_within_checkpoints(log, store)
    assert steps > 20 and store.saves > 1
    r.checkpoint()
    assert table.totals("hourly") == expected


@pytest.mark.parametrize("crash_after", [1, 5, 17, 40, 90])
def test_restart_after_a_crash_anywhere_is_exact(tmp_path: Path, crash_after: int) -> None:
    log, expected, dead = make_log(tmp_path / "log.db")
    table, store = ReplacingTable(), MemoryCheckpointStore()
    first = runner(log, table, store, checkpoint_interval_s=0.0 if crash_after % 2 else 1e9)
    for _ in range(crash_after):
        first.step()
    # The process dies here: no final flush, no checkpoint. ClickHouse keeps what it got.
    assert_committed_within_checkpoints(log, store)
    second = runner(log, table, store)
    starts = second.start()
    assert starts == saved_offsets(store) | {p: 0 for p in range(PARTITIONS)
                                             if p not in saved_offsets(store)}
    assert {p: log.committed("rollups", p) for p in range(PARTITIONS)} == starts
    second.run(until_idle_s=0.01)
    assert table.totals("hourly") == expected
    assert len(table.dead) == dead


def test_failed_write_is_not_checkpointed(tmp_path: Path) -> None:
    log, expected, _ = make_log(tmp_path / "log.db")
    store = MemoryCheckpointStore()
    table = FailingWriter(fail_at=6)
    with pytest.raises(ConnectionError):
        runner(log, table, store).run(until_idle_s=0.01)
    assert_committed_within_checkpoints(log, store)
    table.fail_at = -1
    runner(log, table, store).run(until_idle_s=0.01)
    assert table.totals("hourly") == expected


def test_no_checkpoint_after_a_failed_flush(tmp_path: Path) -> None:
    log, _, _ = make_log(tmp_path / "log.db")
    store = MemoryCheckpointStore()
    r = runner(log, FailingWriter(fail_at=3), store, checkpoint_interval_s=1e9)
    with pytest.raises(ConnectionError):
        while True:
            r.step()
    with pytest.raises(RuntimeError, match="restart"):
        r.checkpoint()  # the failed flush's changes exist nowhere: never cover them
    with pytest.raises(RuntimeError):
        r.run(until_idle_s=0.01)
    assert store.saves == 0 and all(log.committed("rollups", p) == 0 for p in range(3))


def test_resume_reads_only_new_records(tmp_path: Path) -> None:
    log, _, _ = make_log(tmp_path / "log.db")
    table, store = ReplacingTable(), MemoryCheckpointStore()
    runner(log, table, store).run(until_idle_s=0.01)
    log.append(1, [encode_batch(Batch("late-comer", NOW, ["zz"], ["calls"], [1], [NOW]))])
    again = runner(log, table, store).run(until_idle_s=0.01)
    assert (again.records, again.skipped_records, again.accepted) == (1, 0, 1)
    assert table.totals("hourly")[("zz", "calls", NOW - NOW % HOUR_MS)] == SCALE


def test_committed_offset_without_checkpoint_replays_from_zero(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log, expected, _ = make_log(tmp_path / "log.db")
    log.commit("rollups", {0: log.end_offset(0)})  # e.g. the checkpoint file was deleted
    table = ReplacingTable()
    r = runner(log, table, MemoryCheckpointStore())
    assert r.start() == {p: 0 for p in range(PARTITIONS)}
    assert log.committed("rollups", 0) == 0
    assert "no checkpoint" in caplog.text
    r.run(until_idle_s=0.01)
    assert table.totals("hourly") == expected


def test_stop_checkpoints_and_commits(tmp_path: Path) -> None:
    log, _, _ = make_log(tmp_path / "log.db")
    table, store = ReplacingTable(), MemoryCheckpointStore()
    r = runner(log, table, store, checkpoint_interval_s=1e9, flush_interval_s=1e9)
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 10

    counters = r.run(stop=stop)
    assert counters.records > 0
    assert store.saves == 1, "only the final checkpoint"
    saved = saved_offsets(store)
    assert {p: log.committed("rollups", p) for p in range(PARTITIONS)} == saved
    assert sum(saved.values()) == counters.records


def test_on_step_reports_records_and_events(tmp_path: Path) -> None:
    log, _, _ = make_log(tmp_path / "log.db")
    steps: list[tuple[int, int]] = []
    add: Callable[..., None] = lambda s: steps.append((s.records, s.events))  # noqa: E731
    counters = runner(log, ReplacingTable(), MemoryCheckpointStore()).run(
        until_idle_s=0.01, on_step=add)
    assert sum(r for r, _ in steps) == counters.records
    assert sum(e for _, e in steps) == (counters.accepted + counters.duplicate
                                        + counters.late + counters.rejected)


def test_default_checkpoint_path_sits_next_to_the_log(tmp_path: Path) -> None:
    assert default_checkpoint_path(tmp_path / "log.db") == tmp_path / "log.rollup-checkpoints.db"


def test_dump_reads_late_unique_count_windows_through_the_registry(
        tmp_path: Path, migrated_storage: object, now_ms: int) -> None:
    """`--dump` reads totals the way a reader with the meter registry does: a unique_count
    window whose late event is in raw_events is re-aggregated (3 users), not left with
    the late user pending (2). Truth: the distinct users of the seeded events."""
    from meterline.aggregators.embedded import _dump
    from meterline.core.outputs import LateRecord, RollupRecord
    from meterline.sinks.raw_events import RawEventColumns, insert_raw_events
    from meterline.sinks.rollups import write_flush

    storage: Any = migrated_storage
    hour = now_ms - now_ms % (24 * HOUR_MS) - 2 * 24 * HOUR_MS + 3 * HOUR_MS
    users = [("e1", "u1", 10, False), ("e2", "u2", 11, False), ("e3", "u1", 12, False),
             ("late", "u3", 100, True)]
    for eid, user, offset, _late in users:
        insert_raw_events(storage, RawEventColumns(
            event_id=[eid], batch_id=["b"], customer=["acme"], meter=["users"],
            quantity_nano=[SCALE], timestamp_ms=[hour + offset], dimensions=[{"user_id": user}],
            source=["local"], ingested_at_ms=[hour + offset], source_partition=[0],
            source_offset=[offset], position=[0]))
    on_time = len({u for _e, u, _o, late in users if not late})
    rollups = [RollupRecord(window=window, customer="acme", meter="users", group=(),
                            window_start_ms=start, window_end_ms=start + span,
                            aggregation="unique_count", value_nanos=on_time * SCALE, events=3,
                            version=3, source="local", partition=0)
               for window, start, span in (("hourly", hour, HOUR_MS),
                                           ("daily", hour - 3 * HOUR_MS, 24 * HOUR_MS))]
    late = [LateRecord(source="local", partition=0, offset=100, position=0, event_id="late",
                       customer="acme", meter="users", group=(), quantity_nanos=SCALE,
                       timestamp_ms=hour + 100, window_start_ms=hour,
                       received_at_ms=hour + 4 * HOUR_MS)]
    write_flush(storage, Flush(rollups=rollups, late=late))
    path = tmp_path / "dump.json"
    _dump(storage, storage.database, path, REGISTRY)
    doc = json.loads(path.read_text())
    distinct = len({u for _e, u, _o, _late in users})
    assert doc["hour"] == [["acme", "users", hour, distinct * SCALE]]
    assert doc["anomalies"] == [] and doc["anomaly_copies"] == {}
