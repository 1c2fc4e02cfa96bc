"""Embedded durable log: Kafka's role on one machine, in one SQLite file.

The embedded runner and `meterline demo` need what Kafka gives the distributed setup:
a partitioned, append-only, durable sequence of batch records with committed consumer
offsets. SQLite in WAL mode gives atomic durable appends and crash recovery for free, so
a kill -9 loses no acknowledged record (see DESIGN.md: don't hand-roll storage formats).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS offsets (
    consumer TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (consumer, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class LogRecord:
    partition: int
    offset: int
    payload: bytes


class LocalLog:
    """A partitioned append-only log. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path, partitions: int = 4, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        row = self._db.execute("SELECT value FROM meta WHERE key='partitions'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('partitions', ?)", (str(partitions),))
            self.partitions = partitions
        else:
            # The partition count is fixed at creation, like a topic's: changing it would
            # move customers between partitions.
            self.partitions = int(row[0])
        self._next = {
            p: n
            for p, n in self._db.execute(
                "SELECT partition, max(offset) + 1 FROM records GROUP BY partition"
            )
        }

    def append(self, partition: int, payloads: list[bytes]) -> list[int]:
        """Durably append records to one partition; returns their offsets."""
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} outside 0..{self.partitions - 1}")
        with self._lock:
            start = self._next.get(partition, 0)
            offsets = list(range(start, start + len(payloads)))
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO records VALUES (?, ?, ?)",
                    [(partition, o, p) for o, p in zip(offsets, payloads, strict=True)],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._next[partition] = start + len(payloads)
        return offsets

    def read(self, partition: int, from_offset: int, limit: int) -> list[LogRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT offset, payload FROM records WHERE partition = ? AND offset >= ? "
                "ORDER BY offset LIMIT ?",
                (partition, from_offset, limit),
            ).fetchall()
        return [LogRecord(partition, o, bytes(p)) for o, p in rows]

    def end_offset(self, partition: int) -> int:
        with self._lock:
            return self._next.get(partition, 0)

    def committed(self, consumer: str, partition: int) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT next_offset FROM offsets WHERE consumer = ? AND partition = ?",
                (consumer, partition),
            ).fetchone()
        return int(row[0]) if row else 0

    def commit(self, consumer: str, next_offsets: dict[int, int]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (consumer, partition) "
                "DO UPDATE SET next_offset = excluded.next_offset",
                [(consumer, p, o) for p, o in next_offsets.items()],
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


class LocalLogTransport:
    """SDK transport writing to a LocalLog: the embedded stand-in for KafkaTransport.

    Appends are synchronous and durable; acknowledgements are delivered on ``poll`` as
    with librdkafka, so the emitter runs the same code path as with Kafka.
    """

    def __init__(self, log: LocalLog) -> None:
        self._log = log
        self._acks: list[Callable[[BaseException | None], None]] = []
        self._lock = threading.Lock()

    def partition_count(self, topic: str, timeout_s: float) -> int | None:
        return self._log.partitions

    def send(
        self,
        topic: str,
        partition: int,
        payload: bytes,
        on_done: Callable[[BaseException | None], None],
    ) -> None:
        self._log.append(partition, [payload])
        with self._lock:
            self._acks.append(on_done)

    def poll(self, timeout_s: float) -> None:
        with self._lock:
            acks, self._acks = self._acks, []
        for ack in acks:
            ack(None)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._acks)

    def close(self, timeout_s: float) -> None:
        self.poll(0)


class LocalLogSource:
    """Consumer side: read uncommitted records across partitions, commit after processing."""

    def __init__(self, log: LocalLog, consumer: str) -> None:
        self._log = log
        self._consumer = consumer
        self._positions = {p: log.committed(consumer, p) for p in range(log.partitions)}

    def poll_records(self, max_records: int) -> list[LogRecord]:
        out: list[LogRecord] = []
        per_partition = max(1, max_records // self._log.partitions)
        for p, pos in self._positions.items():
            out.extend(self._log.read(p, pos, per_partition))
        return out

    def commit(self, records: list[LogRecord]) -> None:
        advanced: dict[int, int] = {}
        for r in records:
            advanced[r.partition] = max(advanced.get(r.partition, 0), r.offset + 1)
        self._positions.update(advanced)
        self._log.commit(self._consumer, advanced)

    def lag(self) -> int:
        return sum(self._log.end_offset(p) - pos for p, pos in self._positions.items())
