"""Explicit event ids (idempotency keys) of one partition: on disk, checkpointed as deltas.

A partition that sees 10 M explicit ids a day would hold ~2.5 GB of ids in a dict and
write all of them into every checkpoint (a few seconds apart). Here the ids live in a
SQLite file (RAM bounded by its page cache) and each checkpoint saves only the ids first
seen since the previous one - a *delta* - beside the small main checkpoint. A restore
loads the partition's live deltas into a fresh file.

Why this is exact without making the file and the checkpoint one atomic thing: every id is
stored with the **offset of the record that first carried it**. The first sighting of an id
is a deterministic function of the partition's records (the processor folds them in log
order), so after restoring a checkpoint at ``next_offset`` K, "seen before K" is exactly
"stored with offset < K": entries at or past K (written by a run that crashed before its
checkpoint, or by a delta saved just before a checkpoint that never made it) are dropped,
and the replay of records K.. re-adds them identically.

Ids are scoped: the processor passes ``dedupe.scoped_id(customer, meter, id)``. Expiry is
the rule of ``meterline.core.dedupe``: an id first seen at ``t`` is a duplicate while
``now < t + horizon`` on the partition's log clock *or* while the window it counted in
(ending at ``until_ms``) is open. A delta is deleted from the checkpoint store (a
tombstone) once every id in it may be forgotten, so the store holds about one horizon of
ids plus those of still-open windows, whatever the traffic did before.

Delta format: ``{"v": 2, "ids": [[scoped id, first_seen_ms, offset, until_ms], ...]}``.
Deltas written before ids were scoped are a bare list of ``[id, first_seen_ms, offset]``;
they decode with ``until_ms`` None, meaning "a bare id of the legacy format" (the processor
restores them as ids matching any scope, see ``processor.py``).
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from meterline.core.dedupe import NO_PIN, InMemoryDeduper

__all__ = ["IdEntry", "IdStore", "MemoryIdStore", "SqliteIdStore", "decode_delta", "encode_delta"]

# (scoped id, first_seen_ms, offset of the record, until_ms); until_ms None: a bare id
# from a delta of the legacy (unscoped) format.
IdEntry = tuple[str, int, int, int | None]
DELTA_FORMAT = 2


def encode_delta(entries: list[IdEntry]) -> bytes:
    doc = {"v": DELTA_FORMAT, "ids": entries}
    return zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 1)


def decode_delta(blob: bytes) -> list[IdEntry]:
    doc = json.loads(zlib.decompress(blob))
    if isinstance(doc, list):  # legacy: bare ids, no window pin
        return [(str(k), int(t), int(o), None) for k, t, o in doc]
    if doc.get("v") != DELTA_FORMAT:
        raise ValueError(f"unknown id delta format {doc.get('v')!r}")
    return [(str(k), int(t), int(o), int(u)) for k, t, o, u in doc["ids"]]


class IdStore:
    """The ``Deduper`` protocol (``seen_or_add``/``forget``/``close_before``/``expire``)
    plus offsets and deltas. ``offset`` is set by the processor to the record being folded."""

    def __init__(self, horizon_ms: int) -> None:
        if type(horizon_ms) is not int or horizon_ms <= 0:
            raise ValueError(f"horizon_ms must be a positive int, got {horizon_ms!r}")
        self.horizon_ms = horizon_ms
        self.offset = 0
        self.now_ms = -(2**63)  # largest clock seen: time never runs backwards here
        self.closed_ms = NO_PIN  # windows ending at or before this are closed
        self._delta: list[IdEntry] = []

    def close_before(self, closed_before_ms: int) -> None:
        if closed_before_ms > self.closed_ms:
            self.closed_ms = closed_before_ms

    def _forget_delta(self, key: str) -> None:
        if self._delta and self._delta[-1][0] == key:
            self._delta.pop()
        else:  # pragma: no cover - the processor forgets only the id it just added
            self._delta = [e for e in self._delta if e[0] != key]

    def _advance(self, now_ms: int) -> int:
        if now_ms > self.now_ms:
            self.now_ms = now_ms
        return self.now_ms

    def take_delta(self) -> list[IdEntry]:
        """Ids first seen since the last call, in first-seen order."""
        delta, self._delta = self._delta, []
        return delta

    def load(self, entries: Iterable[IdEntry], below_offset: int, now_ms: int,
             closed_before_ms: int = NO_PIN) -> int:
        """Restore: keep entries first seen before ``below_offset`` and still held at
        ``now_ms`` with windows closed before ``closed_before_ms``. Streams: entries are
        consumed one by one. Returns how many were kept."""
        self._advance(now_ms)
        self.close_before(closed_before_ms)
        cutoff, closed = self.now_ms - self.horizon_ms, self.closed_ms
        kept = 0

        def keep() -> Iterator[IdEntry]:
            nonlocal kept
            for entry in entries:
                until = NO_PIN if entry[3] is None else entry[3]
                if entry[2] < below_offset and (entry[1] > cutoff or until > closed):
                    kept += 1
                    yield entry

        self._insert(keep())
        return kept

    def _insert(self, entries: Iterable[IdEntry]) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MemoryIdStore(IdStore):
    """The in-memory deduper of ``meterline.core.dedupe``, with offsets and deltas: tests,
    small deployments."""

    def __init__(self, horizon_ms: int) -> None:
        super().__init__(horizon_ms)
        self._ids = InMemoryDeduper(horizon_ms)

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def held_by_windows(self) -> int:
        return self._ids.held_by_windows

    def close_before(self, closed_before_ms: int) -> None:
        super().close_before(closed_before_ms)
        self._ids.close_before(closed_before_ms)

    def seen_or_add(self, key: str, now_ms: int, until_ms: int = NO_PIN) -> bool:
        now = self._advance(now_ms)
        if self._ids.seen_or_add(key, now, until_ms):
            return True
        self._delta.append((key, now, self.offset, until_ms))
        return False

    def forget(self, key: str) -> None:
        self._ids.forget(key)
        self._forget_delta(key)

    def expire(self, now_ms: int) -> int:
        return self._ids.expire(self._advance(now_ms))

    def _insert(self, entries: Iterable[IdEntry]) -> None:
        # The later sighting of an id in two deltas wins, as in the SQLite store; the
        # window pin is the latest of the two.
        newest: dict[str, tuple[int, int]] = {}
        for key, first, _offset, until in entries:
            u = NO_PIN if until is None else until
            old = newest.get(key)
            newest[key] = (first, u) if old is None else (max(first, old[0]), max(u, old[1]))
        clock, held = self._ids.export()
        merged = {k: (t, u) for t, k, u in held}
        for key, (first, until) in newest.items():
            old = merged.get(key)
            merged[key] = ((first, until) if old is None
                           else (max(first, old[0]), max(until, old[1])))
        self._ids.restore(max(clock, self.now_ms),
                          sorted((t, k, u) for k, (t, u) in merged.items()))


COMMIT_EVERY = 20_000  # writes per transaction of the scratch file (see SqliteIdStore._commit)

# Expiry deletes by an index range; running it on every call would cost a query per id.
# Ids expire at most this late, which only means a row lingers a minute longer on disk:
# seen_or_add checks the first-seen time itself, so the answer is exact regardless.
EXPIRE_EVERY_MS = 60_000


class SqliteIdStore(IdStore):
    """One SQLite file per partition. The file is scratch space rebuilt from the deltas on
    every restore, so it needs no fsync and is replaced, never trusted, after a crash."""

    def __init__(self, path: str | Path, horizon_ms: int, *, cache_mib: int = 32) -> None:
        super().__init__(horizon_ms)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(f"PRAGMA cache_size=-{cache_mib * 1024}")
        self._db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, first_ms INTEGER NOT NULL,"
                         " until_ms INTEGER NOT NULL) WITHOUT ROWID")
        self._db.execute("CREATE INDEX ids_first ON ids (first_ms)")
        self._next_expire_ms = -(2**63)
        self._writes = 0
        self._db.execute("BEGIN")

    def __len__(self) -> int:  # a scan: for metrics and tests, not the hot path
        return int(self._db.execute("SELECT count(*) FROM ids").fetchone()[0])

    @property
    def held_by_windows(self) -> int:  # a scan: for metrics and tests
        return int(self._db.execute(
            "SELECT count(*) FROM ids WHERE first_ms <= ? AND until_ms > ?",
            (self.now_ms - self.horizon_ms, self.closed_ms)).fetchone()[0])

    def seen_or_add(self, key: str, now_ms: int, until_ms: int = NO_PIN) -> bool:
        now = self._advance(now_ms)
        if now >= self._next_expire_ms:
            self.expire(now)
        # One statement: insert a new id, or refresh one that may be forgotten (not deleted
        # yet: expiry is lazy); a row still held is left alone (rowcount 0).
        changed = self._db.execute(
            "INSERT INTO ids VALUES (?1, ?2, ?4) ON CONFLICT(id) DO UPDATE "
            "SET first_ms = ?2, until_ms = ?4 WHERE first_ms <= ?3 AND until_ms <= ?5",
            (key, now, now - self.horizon_ms, until_ms, self.closed_ms)).rowcount
        if not changed:
            return True
        self._delta.append((key, now, self.offset, until_ms))
        self._writes += 1
        if self._writes >= COMMIT_EVERY:
            self._commit()
        return False

    def _commit(self) -> None:
        # The file is scratch (rebuilt from deltas on every restore), so one long
        # transaction with no journal is fine; committing now and then only bounds the
        # dirty pages SQLite keeps in memory. Per-statement commits cost ~15 us each.
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        self._writes = 0

    def forget(self, key: str) -> None:
        self._db.execute("DELETE FROM ids WHERE id = ?", (key,))
        self._forget_delta(key)

    def expire(self, now_ms: int) -> int:
        cutoff = self._advance(now_ms) - self.horizon_ms
        # Rows held by open windows stay in the first_ms range and are skipped again at
        # every expiry: bounded by the events of the open hours (see core/dedupe.py).
        dropped = self._db.execute("DELETE FROM ids WHERE first_ms <= ? AND until_ms <= ?",
                                   (cutoff, self.closed_ms)).rowcount
        self._next_expire_ms = self.now_ms + EXPIRE_EVERY_MS
        return dropped

    def _insert(self, entries: Iterable[IdEntry]) -> None:
        for key, first, _offset, until in entries:
            # An id in two deltas (forgotten, then seen again): the later sighting counts.
            self._db.execute("INSERT INTO ids VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE "
                             "SET first_ms=max(first_ms, excluded.first_ms), "
                             "until_ms=max(until_ms, excluded.until_ms)",
                             (key, first, NO_PIN if until is None else until))
        self._commit()

    def close(self) -> None:
        self._db.rollback()
        self._db.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)
