"""Crash-safe local spool on SQLite (WAL).

Two tables, one file:
- ``events``: events accepted by ``emit()`` in durable mode, not yet cut into batches.
- ``batches``: encoded envelopes waiting for Kafka (outage, backpressure, durable mode).

Cutting events into a batch is one transaction (insert batch, delete its events), so after
a crash every event is in exactly one place, and a batch keeps its id across restarts:
resends are exact duplicates that downstream dedupe removes by batch id.

SQLite rather than a hand-written log: atomic, durable appends and crash recovery for free.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from meterline.core.errors import MeterlineError
from meterline.sdk.batching import EncodedBatch, Item

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    customer TEXT NOT NULL, meter TEXT NOT NULL, quantity, timestamp_ms INTEGER NOT NULL,
    dimensions BLOB, id TEXT, source TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    partition INTEGER, batch_id TEXT NOT NULL, count INTEGER NOT NULL,
    payload BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0
);
"""


class SpoolLockedError(MeterlineError):
    """Another live process owns this spool directory."""


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    seq: int
    batch: EncodedBatch


class Spool:
    """Thread-safe: one connection behind a lock (SQLite serialises writers anyway)."""

    def __init__(self, directory: str | Path, *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # An exclusive lock on a side file: two emitters sharing a spool would replay each
        # other's batches. The OS drops the lock when the process dies, even on kill -9.
        self._lock_fd = os.open(self.directory / "spool.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLockedError(f"spool {self.directory} is in use by another process") from None
        self._db = sqlite3.connect(
            self.directory / "spool.db", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a process crash (it is in
        # the OS page cache); FULL adds an fsync per commit for power loss.
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._closed = False

    # -- events (durable mode) ---------------------------------------------------------
    def append_event(self, item: Item) -> None:
        customer, meter, qty, ts, dims, eid, source = item
        row = (customer, meter, _q_to_db(qty), ts, orjson.dumps(dims) if dims else None, eid,
               source)
        with self._lock:
            self._db.execute(
                "INSERT INTO events(customer, meter, quantity, timestamp_ms, dimensions, id, "
                "source) VALUES (?,?,?,?,?,?,?)",
                row,
            )

    def append_events(self, items: Sequence[Item]) -> None:
        """Many events in one transaction: all of them are stored, or none."""
        rows = [
            (c, m, _q_to_db(q), ts, orjson.dumps(d) if d else None, eid, src)
            for c, m, q, ts, d, eid, src in items
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO events(customer, meter, quantity, timestamp_ms, dimensions, "
                    "id, source) VALUES (?,?,?,?,?,?,?)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def take_events(self, limit: int) -> tuple[int, list[Item]]:
        """Oldest events not yet batched: (highest seq taken, items)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, customer, meter, quantity, timestamp_ms, dimensions, id, source "
                "FROM events ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        if not rows:
            return 0, []
        items: list[Item] = [
            (c, m, int(q), ts, orjson.loads(d) if d else None, eid, src)
            for _, c, m, q, ts, d, eid, src in rows
        ]
        return rows[-1][0], items

    def seal_events(self, up_to_seq: int, batches: Sequence[EncodedBatch]) -> list[SpooledBatch]:
        """Atomically move events (seq <= up_to_seq) into the given batches."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                spooled = self._insert_batches(batches)
                self._db.execute("DELETE FROM events WHERE seq <= ?", (up_to_seq,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return spooled

    # -- batches -----------------------------------------------------------------------
    def append_batches(self, batches: Sequence[EncodedBatch]) -> list[SpooledBatch]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                spooled = self._insert_batches(batches)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return spooled

    def _insert_batches(self, batches: Sequence[EncodedBatch]) -> list[SpooledBatch]:
        out = []
        for b in batches:
            cur = self._db.execute(
                "INSERT INTO batches(partition, batch_id, count, payload) VALUES (?,?,?,?)",
                (b.partition, b.batch_id, b.count, b.payload),
            )
            assert cur.lastrowid is not None
            out.append(SpooledBatch(cur.lastrowid, b))
        return out

    def oldest_batches(self, limit: int, after_seq: int = 0) -> list[SpooledBatch]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, partition, batch_id, count, payload FROM batches "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [
            SpooledBatch(seq, EncodedBatch(p, bid, n, bytes(pl))) for seq, p, bid, n, pl in rows
        ]

    def delete_batch(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM batches WHERE seq = ?", (seq,))

    def replace_batch(self, seq: int, parts: Sequence[EncodedBatch]) -> list[SpooledBatch]:
        """Swap one unpartitioned batch for its per-partition parts, atomically."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM batches WHERE seq = ?", (seq,))
                spooled = self._insert_batches(parts)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return spooled

    def counts(self) -> tuple[int, int]:
        """(events waiting to be batched, events in spooled batches)."""
        with self._lock:
            (events,) = self._db.execute("SELECT count(*) FROM events").fetchone()
            (batched,) = self._db.execute("SELECT coalesce(sum(count), 0) FROM batches").fetchone()
        return int(events), int(batched)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)


def _q_to_db(q: int) -> int | str:
    # SQLite integers are 64-bit; larger exact quantities are stored as text.
    return q if -(2**63) <= q < 2**63 else str(q)
