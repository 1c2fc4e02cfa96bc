"""The export ledger: every item's state per target, durable across kill -9 (SQLite, WAL).

Why SQLite and not ClickHouse: the ledger is a small OLTP workload of per-item state
transitions that must be durable *before* a network call (``sending`` + attempt) and
exact afterwards. SQLite gives transactions with ``synchronous=FULL`` (a committed claim
survives kill -9 and power loss), row updates in place, and a file an operator can copy
and query. ClickHouse (a ReplacingMergeTree) has no transactions and is eventually
deduplicated, so "was this claimed before the crash" would be a merge away from true.
The file lives beside the storage data dir (``var/export-ledger.db`` next to
``var/chdb``) and is read by ``meterline export --status`` and ``meterline reconcile``.

**The protocol** (one exporter per target at a time: :meth:`ExportLedger.lock`):

1. ``enqueue``: new items are inserted ``pending``; an item already known with the same
   content hash is left alone (a re-run is a no-op); the same key with a *different*
   hash is a conflict, reported and not touched (a changed line needs a correction).
2. ``claim``: due ``pending`` items become ``sending`` with ``attempts + 1`` in one
   committed transaction, BEFORE the call to the target.
3. The engine calls the target.
4. ``apply``: each result moves its item to ``sent`` (with the remote id), ``failed``
   (with the reason: a 4xx, or ``max_attempts`` used up) or back to ``pending`` with the
   next attempt time (exponential backoff with full jitter).

**An idempotency window** (a target that keeps keys for a while only: Stripe, 24 hours):
``claim_within`` does not claim an item whose *first* attempt is older than the target's
window. A resend then would no longer be recognised by key and could bill twice, so such
an item becomes ``failed`` with the hold ``idempotency_window`` and a reason naming the key
to look for; a plain ``replay`` leaves it alone, ``replay(past_window=True)`` (the CLI's
``--replay-past-window``, after checking the target) re-queues it.

A crash between 2 and 4 leaves items ``sending``: the target may or may not hold them.
``recover`` (run first by every exporter) turns them back into ``pending`` and they are
sent again **with the same idempotency key**, so delivery is at-least-once on the wire and
exactly-once at the target by key (Stripe's ``identifier``, the webhook receiver's dedupe,
the files target's rewrite of the same rows). An item is never skipped: it is ``sent``
only after the target said so, and ``failed`` only with a reason that ``--replay`` can
re-queue.

Secrets never enter the ledger: it stores the item (line data), HTTP status, a short
response text that targets redact, and the remote id.
"""

from __future__ import annotations

import fcntl
import os
import random
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from meterline.core.errors import MeterlineError
from meterline.export.build import content_hash, item_from_dict, item_to_dict
from meterline.export.items import ExportItem, SendResult
from meterline.export.signed_http import backoff_s
from meterline.logs import redact

__all__ = ["HOLD_WINDOW", "Applied", "Claim", "EnqueueResult", "ExportLedger", "LedgerEntry",
           "LedgerError", "RetryPolicy", "State", "window_reason"]

State = Literal["pending", "sending", "sent", "failed"]
STATES: tuple[State, ...] = ("pending", "sending", "sent", "failed")
_RESPONSE_MAX = 300  # characters of a target's answer kept per item: enough for a reason

_SCHEMA = """
CREATE TABLE IF NOT EXISTS export_items (
    target          TEXT    NOT NULL,
    key             TEXT    NOT NULL,
    content_hash    TEXT    NOT NULL,
    period_start_ms INTEGER NOT NULL,
    item            BLOB    NOT NULL,   -- the item as JSON, re-sent as stored
    state           TEXT    NOT NULL CHECK (state IN ('pending','sending','sent','failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_status     INTEGER,
    last_response   TEXT    NOT NULL DEFAULT '',
    remote_id       TEXT    NOT NULL DEFAULT '',
    created_ms      INTEGER NOT NULL,
    updated_ms      INTEGER NOT NULL,
    sent_ms         INTEGER,
    first_attempt_ms INTEGER,           -- the first claim: a key's idempotency window starts
    hold            TEXT    NOT NULL DEFAULT '',  -- why a failed item needs a human first
    PRIMARY KEY (target, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS export_items_due ON export_items (target, state, next_attempt_ms);
"""
# Columns added after the first ledgers were written: ALTER TABLE on open (SQLite adds a
# column in place; existing rows get the default).
_ADDED_COLUMNS = {"first_attempt_ms": "INTEGER", "hold": "TEXT NOT NULL DEFAULT ''"}
HOLD_WINDOW = "idempotency_window"


class LedgerError(MeterlineError):
    """The ledger refused an operation (locked by another exporter, bad result)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8  # then dead-lettered (state failed), `--replay` re-queues
    backoff_base_s: float = 1.0  # attempt n waits up to base * 2**(n-1) (full jitter) ...
    backoff_max_s: float = 300.0  # ... capped: a target down for minutes is retried often

    def errors(self) -> list[str]:
        out = []
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            out.append(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        for name in ("backoff_base_s", "backoff_max_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                out.append(f"{name} must be a number >= 0 (seconds), got {value!r}")
        return out


@dataclass(frozen=True)
class EnqueueResult:
    new: int
    known: int
    conflicts: list[str]  # keys whose content changed after they were enqueued


@dataclass
class Applied:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    failed_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LedgerEntry:
    target: str
    key: str
    content_hash: str
    period_start_ms: int
    state: State
    attempts: int
    next_attempt_ms: int
    last_status: int | None
    last_response: str
    remote_id: str
    created_ms: int
    updated_ms: int
    sent_ms: int | None
    first_attempt_ms: int | None = None
    hold: str = ""  # HOLD_WINDOW: failed because the idempotency window passed


_ENTRY_COLUMNS = ("target, key, content_hash, period_start_ms, state, attempts, "
                  "next_attempt_ms, last_status, last_response, remote_id, created_ms, "
                  "updated_ms, sent_ms, first_attempt_ms, hold")


@dataclass(frozen=True)
class Claim:
    items: list[ExportItem]  # now ``sending``
    held: list[str]  # keys moved to ``failed``: their idempotency window passed


def window_reason(target: str, remote_key: str, first_attempt_ms: int, attempts: int,
                  last_response: str) -> str:
    import time

    first = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(first_attempt_ms // 1000))
    return (f"idempotency window passed: check {target} for {remote_key} before "
            f"replaying (first attempt {first}, {attempts} attempt(s); last answer: "
            f"{last_response or '-'})")


class ExportLedger:
    def __init__(self, path: str | Path, *, policy: RetryPolicy | None = None,
                 rng: random.Random | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.policy = policy or RetryPolicy()
        self._rng = rng or random.Random()
        # isolation_level=None: explicit BEGIN IMMEDIATE ... COMMIT around each transition.
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed claim is on disk before the call it announces (kill -9 alone
        # would be safe with NORMAL; a power cut would not).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(export_items)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE export_items ADD COLUMN {name} {decl}")
        self._lock_files: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._lock_files.values():
            os.close(fd)
        self._lock_files.clear()
        self._db.close()

    # -- one exporter per target ---------------------------------------------------------

    def lock(self, target: str) -> None:
        """Take the target's run lock (released on close or when the process dies, kill
        -9 included): two exporters of one target would each claim and send."""
        if target in self._lock_files:
            return
        lock_path = self.path.with_name(f"{self.path.name}.{target}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerError(f"another export to {target!r} is running (lock {lock_path})"
                              ) from None
        self._lock_files[target] = fd

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- transitions -----------------------------------------------------------------------

    def enqueue(self, target: str, items: Iterable[ExportItem], now_ms: int) -> EnqueueResult:
        new = known = 0
        conflicts: list[str] = []
        with self._tx() as db:
            for item in items:
                digest = content_hash(item)
                row = db.execute("SELECT content_hash FROM export_items WHERE target=? AND "
                                 "key=?", (target, item.key)).fetchone()
                if row is None:
                    db.execute(
                        "INSERT INTO export_items (target, key, content_hash, period_start_ms,"
                        " item, state, attempts, next_attempt_ms, created_ms, updated_ms) "
                        "VALUES (?,?,?,?,?,'pending',0,?,?,?)",
                        (target, item.key, digest, item.period_start_ms,
                         orjson.dumps(item_to_dict(item)), now_ms, now_ms, now_ms))
                    new += 1
                elif row[0] == digest:
                    known += 1
                else:
                    conflicts.append(item.key)
        return EnqueueResult(new, known, conflicts)

    def recover(self, target: str, now_ms: int) -> int:
        """Items a crashed run left ``sending``: pending again, due now, attempts kept."""
        with self._tx() as db:
            cur = db.execute("UPDATE export_items SET state='pending', next_attempt_ms=?, "
                             "updated_ms=? WHERE target=? AND state='sending'",
                             (now_ms, now_ms, target))
            return cur.rowcount

    def claim(self, target: str, now_ms: int, limit: int | None) -> list[ExportItem]:
        """Due pending items, now ``sending`` with one more attempt (committed)."""
        return self.claim_within(target, now_ms, limit).items

    def claim_within(self, target: str, now_ms: int, limit: int | None,
                     window_ms: int | None = None,
                     remote_key: Callable[[str], str] = str) -> Claim:
        """:meth:`claim`, for a target whose keys protect a resend for ``window_ms`` only:
        first, in the same transaction, pending items attempted before and first
        attempted ``window_ms`` or longer ago become ``failed`` (hold
        ``idempotency_window``) instead of being claimed. ``remote_key`` names the key as
        the target knows it, for the reason. A crash's ``sending`` items count too:
        :meth:`recover` has made them pending before the first claim."""
        held: list[str] = []
        with self._tx() as db:
            if window_ms is not None:
                stale = db.execute(
                    "SELECT key, COALESCE(first_attempt_ms, created_ms), attempts, "
                    "last_response FROM export_items WHERE target=? AND state='pending' "
                    "AND attempts > 0 AND COALESCE(first_attempt_ms, created_ms) <= ?",
                    (target, now_ms - window_ms)).fetchall()
                db.executemany(
                    "UPDATE export_items SET state='failed', hold=?, last_response=?, "
                    "updated_ms=? WHERE target=? AND key=?",
                    [(HOLD_WINDOW, window_reason(target, remote_key(k), first, n, last
                                                 )[:_RESPONSE_MAX], now_ms, target, k)
                     for k, first, n, last in stale])
                held = sorted(k for k, *_ in stale)
            rows = db.execute(
                "SELECT key, item FROM export_items WHERE target=? AND state='pending' AND "
                "next_attempt_ms <= ? ORDER BY next_attempt_ms, key LIMIT ?",
                (target, now_ms, -1 if limit is None else limit)).fetchall()
            # A legacy row (before first_attempt_ms) that was attempted keeps NULL and is
            # judged by created_ms, which is earlier: the window closes sooner, never later.
            db.executemany("UPDATE export_items SET state='sending', attempts=attempts+1, "
                           "first_attempt_ms=CASE WHEN attempts=0 THEN ? "
                           "ELSE first_attempt_ms END, updated_ms=? "
                           "WHERE target=? AND key=?",
                           [(now_ms, now_ms, target, k) for k, _ in rows])
        return Claim([item_from_dict(orjson.loads(blob)) for _, blob in rows], held)

    def apply(self, target: str, results: Sequence[SendResult], now_ms: int) -> Applied:
        """Record the target's answers for claimed (``sending``) items: one read of the
        batch's states and one statement per kind of transition (not per item)."""
        out = Applied()
        p = self.policy
        sent: list[tuple[object, ...]] = []
        retry: list[tuple[object, ...]] = []
        failed: list[tuple[object, ...]] = []
        with self._tx() as db:
            known = self._states(db, target, [r.key for r in results])
            for r in results:
                state, attempts = known.get(r.key, ("unknown", 0))
                if state != "sending":
                    raise LedgerError(f"result for {r.key!r}, which is not being sent to "
                                      f"{target!r} (state {state})")
                known[r.key] = ("answered", attempts)  # a second answer for it is refused
                response = redact(r.response)[:_RESPONSE_MAX]
                if r.outcome == "sent":
                    sent.append((r.status, response, r.remote_id, now_ms, now_ms, target,
                                 r.key))
                    out.sent += 1
                elif r.outcome == "retry" and attempts < p.max_attempts:
                    delay_ms = int(backoff_s(attempts, p.backoff_base_s, p.backoff_max_s,
                                             self._rng) * 1000)
                    retry.append((r.status, response, now_ms + delay_ms, now_ms, target,
                                  r.key))
                    out.retried += 1
                else:
                    reason = (f"rejected: {response}" if r.outcome == "failed"
                              else f"gave up after {attempts} attempt(s): {response}")
                    failed.append((r.status, reason[:_RESPONSE_MAX], now_ms, target, r.key))
                    out.failed += 1
                    out.failed_keys.append(r.key)
            db.executemany("UPDATE export_items SET state='sent', last_status=?, "
                           "last_response=?, remote_id=?, updated_ms=?, sent_ms=? "
                           "WHERE target=? AND key=?", sent)
            db.executemany("UPDATE export_items SET state='pending', last_status=?, "
                           "last_response=?, next_attempt_ms=?, updated_ms=? "
                           "WHERE target=? AND key=?", retry)
            db.executemany("UPDATE export_items SET state='failed', last_status=?, "
                           "last_response=?, updated_ms=? WHERE target=? AND key=?", failed)
        return out

    @staticmethod
    def _states(db: sqlite3.Connection, target: str, keys: Sequence[str]
                ) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {}
        unique = sorted(set(keys))
        for i in range(0, len(unique), 500):  # SQLite's parameter limit is 999 by default
            chunk = unique[i:i + 500]
            out.update((str(k), (str(s), int(n))) for k, s, n in db.execute(
                "SELECT key, state, attempts FROM export_items WHERE target=? AND key IN "
                f"({','.join('?' * len(chunk))})", (target, *chunk)))
        return out

    def replay(self, target: str, now_ms: int, keys: Sequence[str] | None = None, *,
               past_window: bool = False) -> int:
        """Dead letters (``failed``) back to ``pending``, due now, attempts from zero (a new
        idempotency window). Items held because their window passed only with
        ``past_window``: whoever asks for it has checked the target does not hold them."""
        with self._tx() as db:
            sql = ("UPDATE export_items SET state='pending', attempts=0, next_attempt_ms=?, "
                   "updated_ms=?, first_attempt_ms=NULL, hold='' "
                   "WHERE target=? AND state='failed'")
            if not past_window:
                sql += f" AND hold != '{HOLD_WINDOW}'"
            if keys is None:
                return db.execute(sql, (now_ms, now_ms, target)).rowcount
            return sum(db.execute(sql + " AND key=?", (now_ms, now_ms, target, k)).rowcount
                       for k in keys)

    # -- reads ---------------------------------------------------------------------------

    def counts(self, target: str) -> dict[str, int]:
        found = dict(self._db.execute("SELECT state, count(*) FROM export_items WHERE "
                                      "target=? GROUP BY state", (target,)).fetchall())
        return {s: int(found.get(s, 0)) for s in STATES}

    def held_past_window(self, target: str) -> int:
        """Failed items a plain replay leaves alone (their idempotency window passed)."""
        row = self._db.execute("SELECT count(*) FROM export_items WHERE target=? AND "
                               "state='failed' AND hold=?", (target, HOLD_WINDOW)).fetchone()
        return int(row[0])

    def next_due_ms(self, target: str) -> int | None:
        row = self._db.execute("SELECT min(next_attempt_ms) FROM export_items WHERE target=? "
                               "AND state='pending'", (target,)).fetchone()
        return None if row[0] is None else int(row[0])

    def entries(self, target: str, *, period_range: tuple[int, int] | None = None,
                states: Sequence[State] | None = None) -> list[LedgerEntry]:
        sql = f"SELECT {_ENTRY_COLUMNS} FROM export_items WHERE target=?"
        params: list[object] = [target]
        if period_range is not None:
            sql += " AND period_start_ms >= ? AND period_start_ms < ?"
            params += list(period_range)
        if states is not None:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            params += list(states)
        return [LedgerEntry(*row) for row in self._db.execute(sql + " ORDER BY key", params)]

    def items(self, target: str, *, period_range: tuple[int, int],
              states: Sequence[State]) -> list[ExportItem]:
        rows = self._db.execute(
            "SELECT item FROM export_items WHERE target=? AND period_start_ms >= ? AND "
            f"period_start_ms < ? AND state IN ({','.join('?' * len(states))}) ORDER BY key",
            (target, *period_range, *states)).fetchall()
        return [item_from_dict(orjson.loads(blob)) for (blob,) in rows]
