"""A target that remembers idempotency keys for a while only (Stripe: 24 h): an item first
attempted longer ago is never resent blindly, whatever state a run or a crash left it in.

The clock is fake; the window is this file's own constant, and every expectation is
written from when the test made the first attempt, not from the ledger's arithmetic.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
from export_factories import FakeClock

from meterline.export.build import content_hash, item_to_dict
from meterline.export.engine import EngineSettings, Exporter
from meterline.export.items import ExportItem, SendResult
from meterline.export.ledger import HOLD_WINDOW, ExportLedger, RetryPolicy

HOUR_MS = 3_600_000
WINDOW_MS = 24 * HOUR_MS
T0 = 1_800_000_000_000


class WindowTarget:
    """Answers ``retry`` for keys in ``down`` and ``sent`` otherwise; counts the wire."""

    name = "windowed"
    idempotency_window_ms = WINDOW_MS

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.wire: dict[str, int] = {}

    @staticmethod
    def remote_key(key: str) -> str:
        return "remote:" + key

    def send(self, items: Sequence[ExportItem]) -> list[SendResult]:
        out = []
        for it in items:
            self.wire[it.key] = self.wire.get(it.key, 0) + 1
            outcome = "retry" if it.key in self.down else "sent"
            out.append(SendResult(it.key, outcome, 503 if outcome == "retry" else 200,  # type: ignore[arg-type]
                                  "http 503" if outcome == "retry" else "ok"))
        return out

    def received(self, keys: Sequence[str]) -> set[str] | None:
        return None


def _setup(tmp_path: Path, clock: FakeClock) -> tuple[Exporter, ExportLedger, WindowTarget]:
    ledger = ExportLedger(tmp_path / "ledger.db", rng=random.Random(5),
                          policy=RetryPolicy(max_attempts=1000, backoff_base_s=1.0,
                                             backoff_max_s=60.0))
    target = WindowTarget()
    return (Exporter(ledger, target, settings=EngineSettings(10, 2), clock_ms=clock.now,
                     sleep=clock.sleep), ledger, target)


def test_retry_inside_the_window_then_held_once_it_passed(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    clock = FakeClock(T0)
    exporter, ledger, target = _setup(tmp_path, clock)
    items = make_items(6)
    down = {it.key for it in items[:3]}
    target.down = set(down)
    exporter.enqueue(items)
    first = exporter.run()  # the first attempt of every item is at T0
    assert (first.sent, first.retried, first.held) == (3, 3, 0)

    clock.ms = T0 + WINDOW_MS - 60_000  # a minute inside the window: still resent
    inside = exporter.run()
    assert (inside.retried, inside.held) == (3, 0)
    assert {k: target.wire[k] for k in down} == dict.fromkeys(down, 2)

    clock.ms = T0 + WINDOW_MS + 1  # past it: held, nothing goes on the wire
    target.down.clear()  # even with the target up again
    past = exporter.run()
    assert (past.sent, past.held, past.failed) == (0, 3, 3)
    assert sorted(past.failed_keys) == sorted(down)
    assert {k: target.wire[k] for k in down} == dict.fromkeys(down, 2)
    entries = {e.key: e for e in ledger.entries("windowed")}
    for key in down:
        e = entries[key]
        assert (e.state, e.hold, e.attempts) == ("failed", HOLD_WINDOW, 2)
        assert e.last_response.startswith(
            f"idempotency window passed: check windowed for remote:{key} before replaying")
        assert "last answer: http 503" in e.last_response
    assert ledger.held_past_window("windowed") == 3

    # A plain replay leaves them; only the explicit one re-queues them (a new window).
    assert ledger.replay("windowed", clock.ms) == 0
    assert exporter.run().sent == 0
    assert ledger.replay("windowed", clock.ms, past_window=True) == 3
    again = exporter.run()
    assert (again.sent, again.held) == (3, 0)
    assert {k: target.wire[k] for k in down} == dict.fromkeys(down, 3)
    assert ledger.counts("windowed") == {"pending": 0, "sending": 0, "sent": 6, "failed": 0}
    assert ledger.held_past_window("windowed") == 0


def test_the_window_counts_from_the_first_attempt_not_the_last(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    clock = FakeClock(T0)
    exporter, ledger, target = _setup(tmp_path, clock)
    [item] = make_items(1)
    target.down = {item.key}
    exporter.enqueue([item])
    exporter.run()  # first attempt at T0
    for hours in (6, 12, 18, 23):  # later attempts do not restart Stripe's clock
        clock.ms = T0 + hours * HOUR_MS
        assert exporter.run().retried == 1
    clock.ms = T0 + WINDOW_MS
    assert exporter.run().held == 1
    assert target.wire[item.key] == 5


def test_never_attempted_items_are_sent_however_old(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    clock = FakeClock(T0)
    exporter, ledger, target = _setup(tmp_path, clock)
    items = make_items(4)
    exporter.enqueue(items)  # enqueued at T0, never sent: no key was ever used
    clock.ms = T0 + 3 * WINDOW_MS
    report = exporter.run()
    assert (report.sent, report.held) == (4, 0)


def test_items_a_crash_left_sending_are_held_after_the_window(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    clock = FakeClock(T0)
    exporter, ledger, target = _setup(tmp_path, clock)
    items = make_items(3)
    exporter.enqueue(items)
    claimed = ledger.claim("windowed", T0, 2)  # a run claimed two, then was killed
    assert len(claimed) == 2
    ledger.close()
    clock.ms = T0 + 25 * HOUR_MS  # the exporter is restarted the next day
    reopened = ExportLedger(tmp_path / "ledger.db")
    restarted = Exporter(reopened, target, clock_ms=clock.now, sleep=clock.sleep)
    report = restarted.run()
    assert (report.recovered, report.held, report.sent) == (2, 2, 1)
    assert sorted(report.failed_keys) == sorted(it.key for it in claimed)
    # Only the never-claimed item went on the wire; the two caught mid-call did not.
    assert set(target.wire) == {it.key for it in items} - {it.key for it in claimed}
    reopened.close()


def test_a_ledger_written_before_first_attempt_ms_existed_is_migrated(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    # The table as the first release created it (no first_attempt_ms, no hold), with one
    # item attempted once: its window is judged from created_ms, which is not later.
    [item] = make_items(1)
    db = sqlite3.connect(tmp_path / "ledger.db")
    db.executescript("""
        CREATE TABLE export_items (target TEXT NOT NULL, key TEXT NOT NULL,
            content_hash TEXT NOT NULL, period_start_ms INTEGER NOT NULL, item BLOB NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending','sending','sent','failed')),
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_ms INTEGER NOT NULL,
            last_status INTEGER, last_response TEXT NOT NULL DEFAULT '',
            remote_id TEXT NOT NULL DEFAULT '', created_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL, sent_ms INTEGER, PRIMARY KEY (target, key))
            WITHOUT ROWID;""")
    db.execute("INSERT INTO export_items VALUES (?,?,?,?,?,'pending',1,?,503,'http 503','',"
               "?,?,NULL)", ("windowed", item.key, content_hash(item), item.period_start_ms,
                             orjson.dumps(item_to_dict(item)), T0, T0, T0))
    db.commit()
    db.close()
    clock = FakeClock(T0)
    clock.ms = T0 + WINDOW_MS
    exporter, ledger, target = _setup(tmp_path, clock)
    assert exporter.run().held == 1
    assert target.wire == {}
