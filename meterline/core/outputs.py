"""What the rollup stage writes: window totals, dead letters and too-late events.

These records are the contract between the aggregation worker and the ClickHouse writer.
The worker may send them through Kafka topics (several worker processes, one writer) or
hand them to a writer in the same process (the embedded runner), so each record turns
into a plain dict and back (``to_dict``/``from_dict``, orjson-friendly: ints stay ints,
no floats anywhere).

Every record carries the position it came from, ``(source, partition, offset, position)``:
replaying a partition after a crash produces the same records again, and the tables
collapse them on that identity (rollups on their window key with ``version``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["DeadLetterRecord", "Flush", "LateRecord", "RollupRecord", "group_key"]

WHOLE_RECORD = -1  # DeadLetterRecord.position when the whole Kafka record was unreadable


def group_key(group: tuple[tuple[str, str], ...]) -> str:
    """Canonical text of a dimension group, used in sorting keys: ``k=v`` joined by '&'.
    Names are ``[a-z0-9_]`` (meter registry); values escape '%', '&' and '='."""
    return "&".join(f"{k}={_esc(v)}" for k, v in group)


def _fields(record: Any) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies recursively, ~40 us a record, which at tens
    # of thousands of window rows a second was most of a worker's flush time.
    return {name: getattr(record, name) for name in record.__slots__}


def _esc(value: str) -> str:
    return value.replace("%", "%25").replace("&", "%26").replace("=", "%3D")


@dataclass(frozen=True, slots=True)
class RollupRecord:
    """The total of one window of one source partition, as of ``version`` events."""

    window: str  # "hourly" | "daily"
    customer: str
    meter: str
    group: tuple[tuple[str, str], ...]
    window_start_ms: int
    window_end_ms: int
    aggregation: str
    value_nanos: int
    events: int
    version: int
    source: str
    partition: int

    def to_dict(self) -> dict[str, Any]:
        d = _fields(self)
        d["group"] = [list(p) for p in self.group]
        # Beyond int64 (orjson's limit) a total travels as a decimal string.
        if not -(2**63) <= self.value_nanos < 2**63:
            d["value_nanos"] = str(self.value_nanos)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RollupRecord:
        d = dict(d)
        d["group"] = tuple((str(k), str(v)) for k, v in d["group"])
        d["value_nanos"] = int(d["value_nanos"])
        return cls(**d)


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    source: str
    partition: int
    offset: int
    position: int  # event index in the batch, or WHOLE_RECORD
    batch_id: str
    event_id: str
    reason: str
    # The event as JSON, or the undecodable record as UTF-8 with bad bytes shown as \\xNN
    # escapes (readable, first MiB); the exact bytes stay in the topic at (partition, offset).
    payload: str
    received_at_ms: int  # the Kafka record timestamp: the same on every replay

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeadLetterRecord:
        return cls(**d)


@dataclass(frozen=True, slots=True)
class LateRecord:
    """An event that came after its window closed: kept, counted, not in any rollup."""

    source: str
    partition: int
    offset: int
    position: int
    event_id: str
    customer: str
    meter: str
    group: tuple[tuple[str, str], ...]
    quantity_nanos: int
    timestamp_ms: int
    window_start_ms: int  # the hourly window it belonged to
    received_at_ms: int

    def to_dict(self) -> dict[str, Any]:
        d = _fields(self)
        d["group"] = [list(p) for p in self.group]
        if not -(2**63) <= self.quantity_nanos < 2**63:
            d["quantity_nanos"] = str(self.quantity_nanos)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LateRecord:
        d = dict(d)
        d["group"] = tuple((str(k), str(v)) for k, v in d["group"])
        d["quantity_nanos"] = int(d["quantity_nanos"])
        return cls(**d)


@dataclass(slots=True)
class Flush:
    """Everything one flush of the rollup stage must make durable, in one bundle."""

    rollups: list[RollupRecord] = field(default_factory=list)
    dead_letters: list[DeadLetterRecord] = field(default_factory=list)
    late: list[LateRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rollups) + len(self.dead_letters) + len(self.late)

    def extend(self, other: Flush) -> None:
        self.rollups += other.rollups
        self.dead_letters += other.dead_letters
        self.late += other.late
