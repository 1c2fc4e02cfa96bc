"""Writing raw events and dead letters, and the exact, deduplicated reads of raw events.

Inputs are column lists (what the batch decoder produces), quantities are ``int``
nano-units (10**9 per unit) and times are UTC ``*_ms`` integers. Query objects render
``(sql, params)`` with ClickHouse ``{name:Type}`` placeholders and read the
``raw_events_deduplicated`` view, which counts each ``(customer, meter, event_id)`` once
(its first delivery in log order, as the rollups do), so callers never deal with
duplicates. Inserts are split so that no block spans more than
``MAX_PARTITIONS_PER_INSERT`` months.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any

from meterline.core.events import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS
from meterline.core.outputs import DeadLetterRecord
from meterline.core.quantity import INT64_MAX, INT64_MIN, MAX_NANOS, SCALE_DIGITS
from meterline.sinks.columns import (
    INT32_MAX,
    INT32_MIN,
    Columns,
    check_ints,
    check_lengths,
    month_of_ms,
    partition_groups,
    pick,
    range_errors,
    require,
)
from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.schema import (
    DEAD_LETTER_STAGES,
    DEAD_LETTERS,
    RAW_EVENTS,
    RAW_EVENTS_DEDUPLICATED,
)
from meterline.sinks.storage import DEFAULT_DATABASE, Storage, is_identifier

__all__ = [
    "DeadLetterColumns",
    "RawEventColumns",
    "UsageQuery",
    "UsageSummaryQuery",
    "UsageSummaryRow",
    "UsageTotals",
    "insert_dead_letters",
    "insert_raw_events",
    "nano_from_decimal",
]


# Skip ReplacingMergeTree's collapse at insert time: readers collapse with FINAL anyway and
# background merges do it for storage; measured ~30% faster inserts on chDB.
RAW_INSERT_SETTINGS: Mapping[str, Any] = {"optimize_on_insert": 0}


def nano_from_decimal(value: object) -> int:
    """A Decimal result with scale 9 (``decimal.Decimal`` from both drivers) -> int nano-units.

    Exact digit arithmetic, no decimal context, and no range limit: a *total* may exceed
    what one quantity may be (the query helpers sum in Decimal(76, 9)). Anything but a
    finite Decimal with at most 9 fractional digits is refused, so a float can never slip
    into a total.
    """
    if not isinstance(value, Decimal):
        raise SinkError(f"expected a Decimal quantity from ClickHouse, got {type(value).__name__}")
    if not value.is_finite():
        raise SinkError(f"expected a finite Decimal from ClickHouse, got {value}")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    shift = exponent + SCALE_DIGITS
    if shift >= 0:
        nanos = int("".join(map(str, digits))) * 10**shift
    else:
        keep = max(len(digits) + shift, 0)  # digits left of the 9th fractional place
        if any(digits[keep:]):
            raise SinkError(f"{value} has more than {SCALE_DIGITS} fractional digits")
        nanos = int("".join(map(str, digits[:keep])) or "0")
    return -nanos if sign else nanos


@dataclass(frozen=True)
class RawEventColumns(Columns):
    """A batch of validated events, one list per column (index i is event i).

    ``source_partition``/``source_offset``/``position`` are the delivery's log position
    (the first delivery of an event id is the one readers count); left out, they are -1.
    """

    event_id: Sequence[str]
    batch_id: Sequence[str]
    customer: Sequence[str]
    meter: Sequence[str]
    quantity_nano: Sequence[int]
    timestamp_ms: Sequence[int]
    dimensions: Sequence[Mapping[str, str]]
    source: Sequence[str]
    ingested_at_ms: Sequence[int]
    source_partition: Sequence[int] | None = None
    source_offset: Sequence[int] | None = None
    position: Sequence[int] | None = None

    def as_columns(self) -> dict[str, Sequence[Any]]:
        columns = super().as_columns()
        for name in _POSITION_COLUMNS:
            if columns[name] is None:
                columns[name] = [-1] * len(self)
        return columns

    def validate(self) -> None:
        """Raise :class:`SinkConfigError` listing every problem found.

        Writers validate each event before it gets here (the raw stage dead-letters what
        storage cannot hold), so this is the last guard against a programming error.
        """
        errors: list[str] = []
        columns = self.as_columns()
        check_lengths(columns, errors)
        # A single quantity may exceed Int64 (core carries it as a decimal string on the
        # wire); it must still fit Decimal(38, 9).
        check_ints("quantity_nano", self.quantity_nano, errors, -MAX_NANOS, MAX_NANOS)
        check_ints("timestamp_ms", self.timestamp_ms, errors,
                   MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS - 1)
        check_ints("ingested_at_ms", self.ingested_at_ms, errors, INT64_MIN, INT64_MAX)
        check_ints("source_partition", columns["source_partition"], errors,
                   INT32_MIN, INT32_MAX)
        check_ints("source_offset", columns["source_offset"], errors, INT64_MIN, INT64_MAX)
        check_ints("position", columns["position"], errors, INT32_MIN, INT32_MAX)
        if errors:
            raise SinkConfigError("raw event columns", errors)


_POSITION_COLUMNS = ("source_partition", "source_offset", "position")


@dataclass(frozen=True)
class DeadLetterColumns(Columns):
    """Rejected records and events, one list per column. ``payload`` keeps the original
    bytes of a whole record (``position`` -1), or the rejected event as JSON.

    A row is identified by ``(source, source_partition, source_offset, position, stage)``:
    re-inserting it (a replay) leaves one row for readers of ``dead_letters FINAL``.
    """

    received_at_ms: Sequence[int]  # the record's log timestamp, stable across replays
    source: Sequence[str]
    source_partition: Sequence[int]  # -1 when the record did not come from Kafka
    source_offset: Sequence[int]  # -1 when the record did not come from Kafka
    position: Sequence[int]  # event index in the batch, -1 for the whole record
    stage: Sequence[str]  # one of DEAD_LETTER_STAGES
    batch_id: Sequence[str]
    event_id: Sequence[str]  # "" for a whole record
    reason: Sequence[str]
    payload: Sequence[bytes | str]

    @classmethod
    def from_records(cls, records: Sequence[DeadLetterRecord], stage: str) -> DeadLetterColumns:
        return cls(
            received_at_ms=[r.received_at_ms for r in records],
            source=[r.source for r in records],
            source_partition=[r.partition for r in records],
            source_offset=[r.offset for r in records],
            position=[r.position for r in records],
            stage=[stage] * len(records),
            batch_id=[r.batch_id for r in records],
            event_id=[r.event_id for r in records],
            reason=[r.reason for r in records],
            payload=[r.payload for r in records],
        )

    def validate(self) -> None:
        errors: list[str] = []
        columns = self.as_columns()
        check_lengths(columns, errors)
        for name in ("received_at_ms", "source_offset"):
            check_ints(name, columns[name], errors, INT64_MIN, INT64_MAX)
        for name in ("source_partition", "position"):
            check_ints(name, columns[name], errors, INT32_MIN, INT32_MAX)
        unknown = set(self.stage) - set(DEAD_LETTER_STAGES)
        if unknown:
            errors.append(f"stage must be one of {', '.join(DEAD_LETTER_STAGES)}, "
                          f"found {sorted(map(repr, unknown))}")
        if errors:
            raise SinkConfigError("dead letter columns", errors)


_RAW_COLUMN_NAMES = tuple(f.name for f in fields(RawEventColumns))
assert _RAW_COLUMN_NAMES[-3:] == _POSITION_COLUMNS
_RAW_TYPES = RAW_EVENTS.insert_types(_RAW_COLUMN_NAMES)
_DEAD_LETTER_COLUMN_NAMES = tuple(f.name for f in fields(DeadLetterColumns))
_DEAD_LETTER_TYPES = DEAD_LETTERS.insert_types(_DEAD_LETTER_COLUMN_NAMES)


def insert_raw_events(
    storage: Storage, rows: RawEventColumns, *, database: str | None = None
) -> int:
    """Validate and insert ``rows`` into ``raw_events``; returns the number of rows.

    Re-inserting an event, or inserting another delivery of it (same customer, meter and
    event_id), is harmless: readers see its first delivery once. Rows spanning more than
    ``MAX_PARTITIONS_PER_INSERT`` months go in several inserts.
    """
    rows.validate()
    if len(rows) == 0:
        return 0
    table = RAW_EVENTS.qualified(database or storage.database)
    columns = rows.as_columns()
    groups = partition_groups(rows.timestamp_ms, month_of_ms)
    for part in [columns] if groups is None else [pick(columns, g) for g in groups]:
        storage.insert_columns(table, part, _RAW_TYPES, RAW_INSERT_SETTINGS)
    return len(rows)


def insert_dead_letters(
    storage: Storage, rows: DeadLetterColumns, *, database: str | None = None
) -> int:
    rows.validate()
    if len(rows) == 0:
        return 0
    columns = rows.as_columns()
    # One representation per column: the drivers type a column by its first value.
    # A str payload is text (an event as JSON): stored as its UTF-8 bytes.
    columns["payload"] = [p.encode() if isinstance(p, str) else bytes(p) for p in rows.payload]
    storage.insert_columns(
        DEAD_LETTERS.qualified(database or storage.database), columns, _DEAD_LETTER_TYPES
    )
    return len(rows)


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class UsageTotals:
    quantity_nano: int
    events: int


@dataclass(frozen=True)
class UsageQuery:
    """Exact usage of one customer's meter over the half-open range [start_ms, end_ms)."""

    customer: str
    meter: str
    start_ms: int
    end_ms: int
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        errors = range_errors(self.start_ms, self.end_ms)
        if not is_identifier(self.database):
            errors.append(f"database {self.database!r} is not a plain identifier")
        require(errors, "usage query")
        sql = (
            "SELECT sum(toDecimal256(quantity, 9)) AS quantity, count() AS events\n"
            f"FROM {RAW_EVENTS_DEDUPLICATED.qualified(self.database)}\n"
            "WHERE customer = {customer:String}\n"
            "  AND meter = {meter:String}\n"
            "  AND timestamp_ms >= {start_ms:Int64}\n"
            "  AND timestamp_ms < {end_ms:Int64}"
        )
        params = {
            "customer": self.customer,
            "meter": self.meter,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
        }
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> UsageTotals:
        if len(rows) != 1:
            raise SinkError(f"usage query returned {len(rows)} rows, expected 1")
        quantity, events = rows[0]
        return UsageTotals(quantity_nano=nano_from_decimal(quantity), events=int(events))

    def run(self, storage: Storage) -> UsageTotals:
        return self.parse(storage.query_rows(*self.to_sql()))


@dataclass(frozen=True)
class UsageSummaryRow:
    customer: str
    meter: str
    quantity_nano: int
    events: int
    first_timestamp_ms: int
    last_timestamp_ms: int


@dataclass(frozen=True)
class UsageSummaryQuery:
    """Totals per (customer, meter), optionally limited to [start_ms, end_ms) / one customer."""

    start_ms: int | None = None
    end_ms: int | None = None
    customer: str | None = None
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        errors = range_errors(self.start_ms, self.end_ms)
        if not is_identifier(self.database):
            errors.append(f"database {self.database!r} is not a plain identifier")
        require(errors, "usage summary query")
        conditions: list[str] = []
        params: dict[str, Any] = {}
        if self.customer is not None:
            conditions.append("customer = {customer:String}")
            params["customer"] = self.customer
        if self.start_ms is not None:
            conditions.append("timestamp_ms >= {start_ms:Int64}")
            params["start_ms"] = self.start_ms
        if self.end_ms is not None:
            conditions.append("timestamp_ms < {end_ms:Int64}")
            params["end_ms"] = self.end_ms
        where = ("WHERE " + "\n  AND ".join(conditions) + "\n") if conditions else ""
        sql = (
            "SELECT customer, meter, sum(toDecimal256(quantity, 9)) AS quantity, count() AS events,"
            " min(timestamp_ms) AS first_timestamp_ms, max(timestamp_ms) AS last_timestamp_ms\n"
            f"FROM {RAW_EVENTS_DEDUPLICATED.qualified(self.database)}\n"
            f"{where}"
            "GROUP BY customer, meter\n"
            "ORDER BY customer, meter"
        )
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> list[UsageSummaryRow]:
        return [
            UsageSummaryRow(
                customer=str(customer),
                meter=str(meter),
                quantity_nano=nano_from_decimal(quantity),
                events=int(events),
                first_timestamp_ms=int(first_ms),
                last_timestamp_ms=int(last_ms),
            )
            for customer, meter, quantity, events, first_ms, last_ms in rows
        ]

    def run(self, storage: Storage) -> list[UsageSummaryRow]:
        return self.parse(storage.query_rows(*self.to_sql()))
