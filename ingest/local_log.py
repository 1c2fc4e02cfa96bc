"""Embedded durable log: Kafka's role on one machine, in one SQLite file.

The embedded runner and `meterline demo` need what Kafka gives the distributed setup:
a partitioned, append-only, durable sequence of batch records with committed consumer
offsets. SQLite in WAL mode gives atomic durable appends and crash recovery for free, so
a kill -9 loses no acknowledged record (see DESIGN.md: don't hand-roll storage formats).

Every record carries its append time (``appended_ms``, UTC ms), the local log's
LogAppendTime: the rollup stage uses it as its replayable processing clock. Records written
before the column existed read as ``-1`` (no timestamp), as from a source without one.

Consumers work like Kafka's: ``LocalLogSource`` has a fetch position per partition that
``poll_records`` advances and ``seek`` moves, and a committed offset that only ``commit``
changes (and a restart resumes from).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    payload BLOB NOT NULL,
    appended_ms INTEGER NOT NULL DEFAULT 0,
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


NO_TIMESTAMP = -1


@dataclass(frozen=True, slots=True)
class LogRecord:
    partition: int
    offset: int
    payload: bytes
    timestamp_ms: int = NO_TIMESTAMP  # append time, UTC ms; -1 for pre-timestamp records


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class LocalLog:
    """A partitioned append-only log. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: str | Path, partitions: int = 4, *, fsync: bool = False,
                 clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        self.path = Path(path)
        self._clock_ms = clock_ms
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        if "appended_ms" not in columns:  # a log from before record timestamps
            self._db.execute("ALTER TABLE records ADD COLUMN "
                             "appended_ms INTEGER NOT NULL DEFAULT 0")
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
            now_ms = self._clock_ms()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO records (partition, offset, payload, appended_ms) "
                    "VALUES (?, ?, ?, ?)",
                    [(partition, o, p, now_ms) for o, p in zip(offsets, payloads, strict=True)],
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
                "SELECT offset, payload, appended_ms FROM records "
                "WHERE partition = ? AND offset >= ? ORDER BY offset LIMIT ?",
                (partition, from_offset, limit),
            ).fetchall()
        # appended_ms 0 is the column default: a record written before it existed.
        return [LogRecord(partition, o, bytes(p), ts if ts > 0 else NO_TIMESTAMP)
                for o, p, ts in rows]

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
    """Consumer side: read records across partitions, commit after processing.

    Starts at the committed offsets; ``poll_records`` moves the fetch position past what it
    returns (as a Kafka consumer does), ``seek`` moves it anywhere, ``commit`` records how
    far a restart may skip.
    """

    def __init__(self, log: LocalLog, consumer: str) -> None:
        self._log = log
        self._consumer = consumer
        self._positions = {p: log.committed(consumer, p) for p in range(log.partitions)}
        self._fetch = dict(self._positions)

    def poll_records(self, max_records: int) -> list[LogRecord]:
        out: list[LogRecord] = []
        per_partition = max(1, max_records // self._log.partitions)
        for p, pos in self._fetch.items():
            records = self._log.read(p, pos, per_partition)
            if records:
                self._fetch[p] = records[-1].offset + 1
                out.extend(records)
        return out

    def seek(self, partition: int, offset: int) -> None:
        """Read ``partition`` from ``offset`` on (the committed offset is not changed)."""
        if partition not in self._fetch:
            raise ValueError(f"partition {partition} outside 0..{self._log.partitions - 1}")
        self._fetch[partition] = offset

    def commit(self, records: list[LogRecord]) -> None:
        advanced: dict[int, int] = {}
        for r in records:
            advanced[r.partition] = max(advanced.get(r.partition, 0), r.offset + 1)
        self.commit_offsets(advanced)

    def commit_offsets(self, next_offsets: dict[int, int]) -> None:
        """Commit ``{partition: next offset to read}`` as given (it may move back)."""
        self._positions.update(next_offsets)
        self._log.commit(self._consumer, next_offsets)

    def lag(self) -> int:
        """Records not committed yet."""
        return sum(self._log.end_offset(p) - pos for p, pos in self._positions.items())
