"""Emitter configuration. ``validate()`` reports every problem at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meterline.core.errors import ConfigError
from meterline.core.events import MAX_SOURCE_LEN, is_utf8

Durability = Literal["buffered", "durable", "fsync"]


@dataclass(frozen=True)
class EmitterConfig:
    """Settings of an :class:`~meterline.sdk.Emitter`.

    Durability modes (what survives what is spelled out in docs/sdk.md):

    - ``buffered``: ``emit()`` appends to memory; batches reach Kafka within ``linger_ms``
      and go to the disk spool when Kafka is unreachable or slow. A kill -9 of the app loses
      what was still in memory (at most about one linger interval of events).
    - ``durable``: ``emit()`` returns after the event is committed to the SQLite spool
      (WAL, synchronous=NORMAL): it survives a kill -9 of the app.
    - ``fsync``: as ``durable`` plus an fsync per commit (synchronous=FULL): survives an
      OS crash or power loss too, at the cost of a disk flush per ``emit()``.
    """

    topic: str = "meterline.usage"
    bootstrap_servers: str | None = "127.0.0.1:9092"
    spool_dir: str | Path | None = None  # default: ./.meterline-spool
    durability: Durability = "buffered"
    batch_max_events: int = 2_000
    batch_max_bytes: int = 900_000  # stays below Kafka's default 1 MiB max.message.bytes
    linger_ms: int = 50
    max_buffered_events: int = 1_000_000
    # How long emit() may wait for room when the in-memory buffer is full. The background
    # thread spools to disk when Kafka is slow, so the buffer is only full when even the
    # disk cannot keep up; then we push back on the caller instead of dropping.
    enqueue_timeout_s: float = 5.0
    delivery_timeout_ms: int = 30_000
    compression: str = "lz4"
    replay_in_flight: int = 32
    # How often the background thread re-reads the topic's partition count. It keeps routing
    # with the count it started with (a customer is never split within one process); a
    # change is logged, counted and passed to on_error (docs/sdk.md, "Changing the partition
    # count"). Each check is one metadata request, at most 1 s on the background thread.
    metadata_refresh_s: float = 60.0
    source: str | None = None
    producer_config: Mapping[str, Any] = field(default_factory=dict)
    on_error: Callable[[BaseException], None] | None = None
    sync: bool = False  # every emit() is flushed before it returns (scripts and tests)

    def validate(self) -> None:
        errors: list[str] = []
        if not self.topic or not isinstance(self.topic, str):
            errors.append("topic: must be a non-empty string")
        if self.durability not in ("buffered", "durable", "fsync"):
            errors.append(f"durability: {self.durability!r} is not buffered, durable or fsync")
        positive = {
            "batch_max_events": self.batch_max_events,
            "batch_max_bytes": self.batch_max_bytes,
            "max_buffered_events": self.max_buffered_events,
            "delivery_timeout_ms": self.delivery_timeout_ms,
            "replay_in_flight": self.replay_in_flight,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                errors.append(f"{name}: must be a positive int, got {value!r}")
        if not isinstance(self.linger_ms, int) or self.linger_ms < 0:
            errors.append(f"linger_ms: must be an int >= 0, got {self.linger_ms!r}")
        refresh = self.metadata_refresh_s
        if (
            isinstance(refresh, bool)
            or not isinstance(refresh, int | float)
            or not math.isfinite(refresh)
            or refresh <= 0
        ):
            errors.append(f"metadata_refresh_s: must be a positive number, got {refresh!r}")
        if self.enqueue_timeout_s < 0:
            errors.append("enqueue_timeout_s: must be >= 0")
        if self.compression not in ("none", "gzip", "snappy", "lz4", "zstd"):
            errors.append(f"compression: unknown codec {self.compression!r}")
        if self.on_error is not None and not callable(self.on_error):
            errors.append("on_error: must be callable")
        # source goes into every envelope's header; one the decoder refuses (bad_source)
        # would dead-letter every batch this emitter sends.
        if self.source is not None and (
            not isinstance(self.source, str)
            or not 0 < len(self.source) <= MAX_SOURCE_LEN
            or not is_utf8(self.source)
        ):
            errors.append(f"source: must be None or a str of 1..{MAX_SOURCE_LEN} characters")
        if errors:
            raise ConfigError(errors, "EmitterConfig")

    def resolved_spool_dir(self) -> Path:
        return Path(self.spool_dir if self.spool_dir is not None else ".meterline-spool")
