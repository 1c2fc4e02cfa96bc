"""What the rollup stage writes: window totals, dead letters and too-late events.

These records are the contract between the aggregation worker and the ClickHouse writer.
The worker may send them through Kafka topics (several worker processes, one writer) or
hand them to a writer in the same process (the embedded runner), so each record turns
into a plain dict and back (``to_dict``/``from_dict``, orjson-friendly: ints stay ints,
no floats anywhere).

Every record carries the position it came from, ``(source, partition, offset, position)``:
replaying a partition after a crash produces the same records again, and the tables
collapse them on that identity (rollups on their window key with ``version``).

Decoding is forward compatible: ``from_dict`` ignores fields it does not know, so during a
rolling upgrade an older loader still reads the records of a newer worker that added one.
A missing or ill-typed field raises (``KeyError``/``TypeError``/``ValueError``); the loader
turns such a record into a dead letter with its bytes, never skips it.

Dead letters of both stages are built here (:func:`event_dead_letter`,
:func:`record_dead_letter`), so a rejected event reads the same whoever rejected it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING, Any, Protocol

from meterline.core.quantity import format_nanos

if TYPE_CHECKING:
    from meterline.core.envelope import Batch

__all__ = ["DeadLetterRecord", "Flush", "LateRecord", "RollupRecord", "event_dead_letter",
           "event_json", "group_key", "record_dead_letter"]

WHOLE_RECORD = -1  # DeadLetterRecord.position when the whole Kafka record was unreadable
# A dead letter travelling through Kafka carries at most this much of an unreadable record
# (as text); the exact bytes stay in the topic at (partition, offset), and writers that
# insert directly (raw stage, embedded runner, output loader) keep them whole.
MAX_DEAD_PAYLOAD = 1 << 20


def group_key(group: tuple[tuple[str, str], ...]) -> str:
    """Canonical text of a dimension group, used in sorting keys: ``k=v`` joined by '&'.
    Names are ``[a-z0-9_]`` (meter registry); values escape '%', '&' and '='."""
    return "&".join(f"{k}={_esc(v)}" for k, v in group)


def _fields(record: Any) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies recursively, ~40 us a record, which at tens
    # of thousands of window rows a second was most of a worker's flush time.
    return {name: getattr(record, name) for name in record.__slots__}


def _known(cls: Any, d: dict[str, Any]) -> dict[str, Any]:
    """The fields ``cls`` knows, from a dict that may carry more (written by a newer
    version). A missing field surfaces as ``TypeError`` from the constructor."""
    if type(d) is not dict:
        raise TypeError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
    return {name: d[name] for name in cls.__slots__ if name in d}


def _int(value: Any, name: str) -> int:
    # JSON ints stay ints; totals beyond int64 travel as decimal strings. Anything else
    # (a float, a bool, "1e3") is refused rather than coerced into a wrong total.
    if type(value) is int:
        return value
    if type(value) is str and value.lstrip("-").isdigit() and value.isascii():
        return int(value)
    raise ValueError(f"{name} must be an int, got {value!r}")


def _group(value: Any) -> tuple[tuple[str, str], ...]:
    if type(value) is not list or any(type(p) is not list or len(p) != 2 for p in value):
        raise ValueError(f"group must be a list of [dimension, value] pairs, got {value!r}")
    return tuple((str(k), str(v)) for k, v in value)


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
        d = _known(cls, d)
        d["group"] = _group(d.get("group"))
        d["value_nanos"] = _int(d.get("value_nanos"), "value_nanos")
        return cls(**d)


# The rollups topic's columnar block: rows of one (source, partition) as one object of
# columns. ~2.5x fewer bytes than one object per row (no repeated field names), and both
# ends skip a dict per row: the worker writes lists, the loader maps them straight onto
# RollupRecord. Readers still take the row form ({"rollups": [...]}) of older workers.
ROLLUP_COLUMNS = ("window", "customer", "meter", "group", "window_start_ms",
                  "window_end_ms", "aggregation", "value_nanos", "events", "version")
_STR_COLUMNS = ("window", "customer", "meter", "aggregation")
_INT_COLUMNS = ("window_start_ms", "window_end_ms", "events", "version")


def rollup_columns(rows: Sequence[RollupRecord]) -> dict[str, Any]:
    """The block of ``rows`` (all of one source partition), JSON-ready: totals beyond
    int64 (orjson's limit) travel as decimal strings, as in ``RollupRecord.to_dict``."""
    first = rows[0]
    if any(r.source != first.source or r.partition != first.partition for r in rows):
        raise ValueError("a rollup_columns block holds rows of one source partition")
    totals = [r.value_nanos for r in rows]
    values: list[int | str] | list[int] = totals
    if min(totals) < -(2**63) or max(totals) >= 2**63:
        values = [v if -(2**63) <= v < 2**63 else str(v) for v in totals]
    block: dict[str, Any] = {"source": first.source, "partition": first.partition}
    for name in ROLLUP_COLUMNS:
        block[name] = values if name == "value_nanos" else [getattr(r, name) for r in rows]
    return block


@dataclass(frozen=True, slots=True)
class RollupBlock:
    """Rollup rows of one source partition as columns: how the loader holds a
    ``rollup_columns`` block, so no object is made per row on the way into ClickHouse
    (``sinks.rollups.write_flush`` inserts the lists as they are)."""

    source: str
    partition: int
    window: list[str]
    customer: list[str]
    meter: list[str]
    group: list[tuple[tuple[str, str], ...]]
    window_start_ms: list[int]
    window_end_ms: list[int]
    aggregation: list[str]
    value_nanos: list[int]
    events: list[int]
    version: list[int]
    # The compiled store's rows ``[0, buffers_rows)`` once more as buffers (dictionary
    # codes and int columns, ``WindowStore.take_dirty``) under "raw", for the Arrow
    # encoder (which caches its columns beside them); not compared (two blocks of the
    # same rows are equal with or without them).
    buffers: Any = field(default=None, compare=False, repr=False)
    buffers_rows: int = field(default=0, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.window)

    def row(self, i: int) -> RollupRecord:
        return RollupRecord(self.window[i], self.customer[i], self.meter[i], self.group[i],
                            self.window_start_ms[i], self.window_end_ms[i],
                            self.aggregation[i], self.value_nanos[i], self.events[i],
                            self.version[i], self.source, self.partition)

    def columns(self, lo: int = 0, hi: int | None = None) -> dict[str, Any]:
        """Rows ``lo:hi`` as a ``rollup_columns`` block, JSON-ready (``rollup_columns``'
        rules: totals beyond int64 as decimal strings)."""
        n = len(self)
        hi = n if hi is None else min(hi, n)
        whole = lo == 0 and hi == n

        def cut(column: list[Any]) -> list[Any]:
            return column if whole else column[lo:hi]

        values: list[Any] = cut(self.value_nanos)
        if values and (min(values) < -(2**63) or max(values) >= 2**63):
            values = [v if -(2**63) <= v < 2**63 else str(v) for v in values]
        block: dict[str, Any] = {"source": self.source, "partition": self.partition}
        for name in ROLLUP_COLUMNS:
            block[name] = values if name == "value_nanos" else cut(getattr(self, name))
        return block

    def records(self) -> list[RollupRecord]:
        n = len(self)
        return list(map(RollupRecord, *(getattr(self, name) for name in ROLLUP_COLUMNS),
                        repeat(self.source, n), repeat(self.partition, n)))

    @classmethod
    def from_doc(cls, block: Any) -> RollupBlock:
        """A decoded ``rollup_columns`` object. Raises TypeError / ValueError naming what
        is wrong: the block is read whole or not at all (its record becomes a dead
        letter)."""
        if type(block) is not dict:
            raise TypeError(f"rollup_columns must be an object, got {type(block).__name__}")
        source, partition = block.get("source"), block.get("partition")
        if type(source) is not str or type(partition) is not int:
            raise TypeError("rollup_columns needs source (str) and partition (int)")
        columns: dict[str, Any] = {name: block.get(name) for name in ROLLUP_COLUMNS}
        for name, column in columns.items():
            if type(column) is not list:
                raise TypeError(f"rollup_columns.{name} must be a list")
        n = len(columns["window"])
        if any(len(c) != n for c in columns.values()):
            raise ValueError("rollup_columns: columns of different lengths")
        for name in _STR_COLUMNS:
            if not set(map(type, columns[name])) <= {str}:
                raise TypeError(f"rollup_columns.{name} must hold strings")
        for name in _INT_COLUMNS:  # bool is not int here: type(), not isinstance()
            if not set(map(type, columns[name])) <= {int}:
                raise TypeError(f"rollup_columns.{name} must hold ints")
        if not set(map(type, columns["value_nanos"])) <= {int}:
            columns["value_nanos"] = [_int(v, "value_nanos") for v in columns["value_nanos"]]
        # Few distinct groups: each is checked and made a tuple once.
        made: dict[str, tuple[tuple[str, str], ...]] = {}
        groups = []
        for g in columns["group"]:
            text = repr(g)
            group = made.get(text)
            if group is None:
                group = made[text] = _group(g)
            groups.append(group)
        columns["group"] = groups
        return cls(source, partition, **columns)


def rollups_from_columns(block: Any) -> list[RollupRecord]:
    """The rows of a ``rollup_columns`` block (``RollupBlock.from_doc``'s errors)."""
    return RollupBlock.from_doc(block).records()


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    source: str
    partition: int
    offset: int
    position: int  # event index in the batch, or WHOLE_RECORD
    batch_id: str
    event_id: str
    reason: str
    # The event as JSON text (:func:`event_json`), or the unreadable record's exact bytes.
    # Through Kafka, bytes travel as UTF-8 text with bad bytes shown as \\xNN escapes
    # (first MAX_DEAD_PAYLOAD bytes); the exact bytes stay in the topic at (partition, offset).
    payload: str | bytes
    received_at_ms: int  # the Kafka record timestamp: the same on every replay

    def to_dict(self) -> dict[str, Any]:
        d = _fields(self)
        if isinstance(self.payload, bytes):
            d["payload"] = self.payload[:MAX_DEAD_PAYLOAD].decode("utf-8", "backslashreplace")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeadLetterRecord:
        return cls(**_known(cls, d))


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
        d = _known(cls, d)
        d["group"] = _group(d.get("group"))
        d["quantity_nanos"] = _int(d.get("quantity_nanos"), "quantity_nanos")
        return cls(**d)


class RecordBlock(Protocol):
    """Rows held in another form than records (the loader's Arrow blocks,
    sinks/rollup_arrow.py, which core cannot import)."""

    def __len__(self) -> int: ...

    def records(self) -> list[RollupRecord]: ...


@dataclass(slots=True)
class Flush:
    """Everything one flush of the rollup stage must make durable, in one bundle."""

    rollups: list[RollupRecord] = field(default_factory=list)
    dead_letters: list[DeadLetterRecord] = field(default_factory=list)
    late: list[LateRecord] = field(default_factory=list)
    # Rows as column blocks: what the output loader reads (``decode_outputs``) and what
    # the columnar engine's compiled window store flushes (``rollup_rows()`` has all).
    rollup_blocks: list[RollupBlock] = field(default_factory=list)
    # Blocks as the output loader decodes them from the rollups topic's Arrow records
    # (sinks/rollup_arrow.py): columns that go into ClickHouse without Python rows.
    arrow_blocks: list[RecordBlock] = field(default_factory=list)

    def __len__(self) -> int:
        return (len(self.rollups) + sum(map(len, self.rollup_blocks))
                + sum(map(len, self.arrow_blocks)) + len(self.dead_letters) + len(self.late))

    def rollup_rows(self) -> list[RollupRecord]:
        """Every rollup row, those of the column blocks as records too."""
        if not self.rollup_blocks and not self.arrow_blocks:
            return self.rollups
        return [*self.rollups, *(r for block in self.rollup_blocks for r in block.records()),
                *(r for arrow in self.arrow_blocks for r in arrow.records())]

    def extend(self, other: Flush) -> None:
        self.rollups += other.rollups
        self.dead_letters += other.dead_letters
        self.late += other.late
        self.rollup_blocks += other.rollup_blocks
        self.arrow_blocks += other.arrow_blocks


# --------------------------------------------------------------------------- dead letters


def event_json(batch: Batch, position: int, event_id: str) -> str:
    """A rejected event as JSON text, the same whichever stage rejected it.

    ``quantity`` is in *units* as an exact decimal string (``"0.1"``), the way the caller
    passed it to ``emit()``; ``dimensions`` only when the event has some.
    """
    i = position
    event: dict[str, Any] = {
        "id": event_id, "customer": batch.customers[i], "meter": batch.meters[i],
        "quantity": format_nanos(batch.quantities[i]), "timestamp_ms": batch.timestamps_ms[i],
    }
    if batch.dimensions is not None and batch.dimensions[i]:
        event["dimensions"] = batch.dimensions[i]
    return json.dumps(event, ensure_ascii=False, sort_keys=True)


def event_dead_letter(source: str, partition: int, offset: int, received_at_ms: int,
                      batch: Batch, position: int, event_id: str,
                      reason: str) -> DeadLetterRecord:
    """One rejected event of a batch; ``reason`` is ``event.<code>`` (codes: rollup.py
    REJECTION_REASONS, plus ``outside_retention`` and the raw stage's own)."""
    return DeadLetterRecord(
        source=source, partition=partition, offset=offset, position=position,
        batch_id=batch.batch_id, event_id=event_id, reason=reason,
        payload=event_json(batch, position, event_id), received_at_ms=received_at_ms)


def record_dead_letter(source: str, partition: int, offset: int, received_at_ms: int,
                       reason: str, payload: bytes, *, position: int = WHOLE_RECORD,
                       ) -> DeadLetterRecord:
    """A record (or, with ``position``, one item of it) that could not be read: kept with
    its exact bytes."""
    return DeadLetterRecord(
        source=source, partition=partition, offset=offset, position=position, batch_id="",
        event_id="", reason=reason, payload=bytes(payload), received_at_ms=received_at_ms)
