"""Where partition checkpoints live: one small interface and three drivers.

A checkpoint is an opaque, self-contained blob (see ``processor.py``): the newest one of a
partition is all a worker needs to resume it, on any machine. Drivers only have to store
"the last blob saved under this key" durably.

- ``KafkaCheckpointStore``: a compacted Kafka topic, so workers on different machines
  share checkpoints through the broker they already depend on. ``load`` reads the topic
  to its end and keeps the last blob per key (compaction bounds how much that is).
- ``SqliteCheckpointStore``: one file, for the embedded runner (next to its local log).
- ``MemoryCheckpointStore``: unit tests.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "CheckpointStore",
    "KafkaCheckpointStore",
    "MemoryCheckpointStore",
    "SqliteCheckpointStore",
    "checkpoint_key",
]

log = logging.getLogger(__name__)


def checkpoint_key(group: str, source: str, partition: int | str) -> str:
    return f"{group}/{source}/{partition}"


class CheckpointStore(Protocol):
    def load(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The newest blob of each key that has one."""
        ...

    def load_prefixed(self, prefix: str) -> dict[str, bytes]:
        """The newest blob of every key that starts with ``prefix``."""
        ...

    def save(self, blobs: Mapping[str, bytes | None]) -> None:
        """Store the blobs durably, in order; ``None`` deletes the key. Returns only once
        they would survive a crash."""
        ...

    def close(self) -> None: ...


class MemoryCheckpointStore:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.saves = 0

    def load(self, keys: Iterable[str]) -> dict[str, bytes]:
        return {k: self.blobs[k] for k in keys if k in self.blobs}

    def load_prefixed(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, v in self.blobs.items() if k.startswith(prefix)}

    def save(self, blobs: Mapping[str, bytes | None]) -> None:
        for key, blob in blobs.items():
            if blob is None:
                self.blobs.pop(key, None)
            else:
                self.blobs[key] = blob
        self.saves += 1

    def close(self) -> None:
        pass


class SqliteCheckpointStore:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives kill -9; fsync is the log's
        self._db.execute("CREATE TABLE IF NOT EXISTS checkpoints "
                         "(key TEXT PRIMARY KEY, blob BLOB NOT NULL) WITHOUT ROWID")
        self._lock = threading.Lock()

    def load(self, keys: Iterable[str]) -> dict[str, bytes]:
        out = {}
        with self._lock:
            for key in keys:
                row = self._db.execute("SELECT blob FROM checkpoints WHERE key=?",
                                       (key,)).fetchone()
                if row is not None:
                    out[key] = bytes(row[0])
        return out

    def load_prefixed(self, prefix: str) -> dict[str, bytes]:
        with self._lock:
            rows = self._db.execute("SELECT key, blob FROM checkpoints WHERE substr(key, 1, ?)"
                                    " = ?", (len(prefix), prefix)).fetchall()
        return {k: bytes(b) for k, b in rows}

    def save(self, blobs: Mapping[str, bytes | None]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM checkpoints WHERE key = ?",
                                 [(k,) for k, b in blobs.items() if b is None])
            self._db.executemany("INSERT OR REPLACE INTO checkpoints VALUES (?, ?)",
                                 [(k, b) for k, b in blobs.items() if b is not None])
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


# Compaction keeps the newest blob per key; small segments make it run often, so a
# restore reads little more than one blob per key. 64 MiB leaves room for large states.
CHECKPOINT_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": "60000",
    "min.cleanable.dirty.ratio": "0.1",
    "max.message.bytes": str(64 << 20),
}


class KafkaCheckpointStore:
    def __init__(self, bootstrap_servers: str, topic: str, *, timeout_s: float = 30.0) -> None:
        from confluent_kafka import Producer

        self._bootstrap = bootstrap_servers
        self.topic = topic
        self._timeout_s = timeout_s
        self._producer = Producer({
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "message.max.bytes": 64 << 20,
            "linger.ms": 0,
        }, logger=logging.getLogger("meterline.checkpoints.kafka"))
        self._errors: list[str] = []

    def ensure_topic(self, replication_factor: int = 1) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self._bootstrap})
        futures = admin.create_topics([NewTopic(self.topic, 1, replication_factor,
                                                config=CHECKPOINT_TOPIC_CONFIG)])
        for fut in futures.values():
            try:
                fut.result(self._timeout_s)
            except Exception as exc:  # TOPIC_ALREADY_EXISTS is the normal case
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise

    def save(self, blobs: Mapping[str, bytes | None]) -> None:
        def report(err: Any, msg: Any) -> None:
            if err is not None:
                self._errors.append(str(err))

        for key, blob in blobs.items():
            self._producer.produce(self.topic, blob, key.encode(), on_delivery=report)
        remaining = self._producer.flush(self._timeout_s)
        if remaining or self._errors:
            errors, self._errors = self._errors, []
            raise RuntimeError(f"checkpoint save failed ({remaining} undelivered): {errors}")

    def load(self, keys: Iterable[str]) -> dict[str, bytes]:
        wanted = {k.encode() for k in keys}
        if not wanted:
            return {}
        return self._read(wanted.__contains__)

    def load_prefixed(self, prefix: str) -> dict[str, bytes]:
        raw = prefix.encode()
        return self._read(lambda key: key.startswith(raw))

    def _read(self, wanted: Callable[[bytes], bool]) -> dict[str, bytes]:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

        consumer = Consumer({
            "bootstrap.servers": self._bootstrap,
            "group.id": "meterline-checkpoint-reader",  # never commits; assign() only
            "enable.auto.commit": False,
            "fetch.max.bytes": 128 << 20,
            "max.partition.fetch.bytes": 64 << 20,
            "isolation.level": "read_committed",
        }, logger=logging.getLogger("meterline.checkpoints.kafka"))
        found: dict[bytes, bytes] = {}
        try:
            deadline = time.monotonic() + self._timeout_s
            meta = consumer.list_topics(self.topic, timeout=self._timeout_s)
            parts = sorted(meta.topics[self.topic].partitions)
            ends = {}
            for p in parts:
                while True:
                    try:
                        _, high = consumer.get_watermark_offsets(
                            TopicPartition(self.topic, p), timeout=self._timeout_s)
                        break
                    except KafkaException:
                        # Right after a broker restart or a topic's creation the client may
                        # not know the partition yet (_UNKNOWN_PARTITION): ask again until
                        # the deadline rather than crash the worker's assignment.
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.2)
                if high > 0:
                    ends[p] = high
            if not ends:
                return {}
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in ends])
            while ends:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading checkpoints from {self.topic} took over "
                                       f"{self._timeout_s}s")
                for msg in consumer.consume(500, 1.0):
                    err = msg.error()
                    if err is not None:
                        if err.code() == -191:  # _PARTITION_EOF
                            continue
                        raise KafkaException(err)
                    key = msg.key()
                    if key is not None and wanted(key):
                        value = msg.value()
                        if value is None:
                            found.pop(key, None)  # tombstone
                        else:
                            found[key] = value
                # Position, not the last message's offset: compaction leaves gaps.
                for tp in consumer.position([TopicPartition(self.topic, p) for p in ends]):
                    if tp.offset >= ends[tp.partition]:
                        del ends[tp.partition]
        finally:
            consumer.close()
        return {k.decode(): v for k, v in found.items()}

    def close(self) -> None:
        self._producer.flush(self._timeout_s)
