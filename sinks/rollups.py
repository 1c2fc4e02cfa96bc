"""Writing rollup-stage flushes, and the exact reads of windowed usage.

:func:`write_flush` makes one :class:`~meterline.core.outputs.Flush` durable: window totals
into ``hourly_rollups`` / ``daily_rollups``, rejected events into ``dead_letters`` and
too-late events into ``late_events``. Every row is idempotent in its table (rollups keep the
highest ``version`` of a window per source partition, dead letters and late events collapse
on their identity), so the worker may write a flush again after a crash or a retry and
readers still see each row once. Values travel as exact ``int`` nano-units into the
EPHEMERAL ``*_nano Int128`` columns, as for raw events.

Each row is checked on its own, and a row its table cannot hold, or would delete at once
(past the table's retention), is set aside as a ``load``-stage dead letter with its reason
and content, logged and counted in :class:`FlushCounts`; the rest of the flush lands. So
one bad window or event never makes a writer fail, and retry, forever.

The query objects that read the usage views live in :mod:`meterline.sinks.rollup_queries`
and are re-exported here.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from meterline.core.events import MAX_TIMESTAMP_MS, MIN_TIMESTAMP_MS
from meterline.core.outputs import (
    DeadLetterRecord,
    Flush,
    LateRecord,
    RollupBlock,
    RollupRecord,
    group_key,
)
from meterline.core.quantity import INT64_MAX, INT64_MIN, MAX_NANOS, format_nanos
from meterline.sinks.columns import (
    INT32_MAX,
    INT32_MIN,
    UINT64_MAX,
    Columns,
    bad_ints,
    month_of_ms,
    partition_groups,
    pick,
    year_of_ms,
)
from meterline.sinks.exceptions import SinkConfigError
from meterline.sinks.raw_events import DeadLetterColumns, insert_dead_letters
from meterline.sinks.retention import RETENTION_MARGIN_MS, RetentionPolicy
from meterline.sinks.rollup_arrow import ArrowRollupBlock, dimensions_json
from meterline.sinks.rollup_queries import (
    LATE_REASONS,
    DeadLetterCountsQuery,
    LateEventsQuery,
    LateRestatementQuery,
    LateTotals,
    RollupTotalsQuery,
    RollupUsageQuery,
    RollupUsageRow,
)
from meterline.sinks.schema import (
    DAILY_ROLLUPS,
    DEAD_LETTER_STAGES,
    HOURLY_ROLLUPS,
    LATE_EVENTS,
    Table,
)
from meterline.sinks.storage import Storage

__all__ = [
    "DeadLetterCountsQuery",
    "FlushCounts",
    "LateEventColumns",
    "LATE_REASONS",
    "LateEventsQuery",
    "LateRestatementQuery",
    "LateTotals",
    "RollupColumns",
    "RollupTotalsQuery",
    "RollupUsageQuery",
    "RollupUsageRow",
    "write_flush",
]

log = logging.getLogger(__name__)

_TABLES: Mapping[str, Table] = {"hourly": HOURLY_ROLLUPS, "daily": DAILY_ROLLUPS}
# Python twins of the tables' PARTITION BY (month / year of window_start_ms).
_PARTITION_OF: Mapping[str, Callable[[int], int]] = {"hourly": month_of_ms,
                                                     "daily": year_of_ms}
_RETENTION_FIELD = {"hourly": "hourly_rollups_days", "daily": "daily_rollups_days"}
# A window start can be up to a day before the earliest accepted event time.
_MIN_WINDOW_MS = MIN_TIMESTAMP_MS - 86_400_000


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- columns


def _group_columns(groups: list[Any]) -> tuple[list[str], list[dict[str, str]]]:
    """group_key and dimensions of each row. A flush repeats few distinct groups: their
    key text and dict are made once each (the dicts are shared between rows and never
    written to)."""
    try:
        distinct = {g: (group_key(g), dict(g)) for g in set(groups)}
    except TypeError:  # an unhashable group (not from a decoder): one by one
        return [group_key(g) for g in groups], [dict(g) for g in groups]
    return [distinct[g][0] for g in groups], [distinct[g][1] for g in groups]


@dataclass(frozen=True)
class RollupColumns(Columns):
    """Window totals for one rollup table, one list per column."""

    customer: Sequence[str]
    meter: Sequence[str]
    group_key: Sequence[str]
    dimensions: Sequence[Mapping[str, str]]
    window_start_ms: Sequence[int]
    window_end_ms: Sequence[int]
    aggregation: Sequence[str]
    value_nano: Sequence[int]
    events: Sequence[int]
    version: Sequence[int]
    source: Sequence[str]
    source_partition: Sequence[int]
    updated_at_ms: Sequence[int]

    @classmethod
    def from_block(cls, block: RollupBlock, rows: Sequence[int] | None,
                   updated_at_ms: int) -> RollupColumns:
        """A column block's rows (``rows``: these only; None: all of it, its lists taken
        as they are)."""
        def column(name: str) -> list[Any]:
            values: list[Any] = getattr(block, name)
            return values if rows is None else [values[i] for i in rows]

        n = len(block) if rows is None else len(rows)
        keys, dims = _group_columns(column("group"))
        return cls(customer=column("customer"), meter=column("meter"), group_key=keys,
                   dimensions=dims, window_start_ms=column("window_start_ms"),
                   window_end_ms=column("window_end_ms"), aggregation=column("aggregation"),
                   value_nano=column("value_nanos"), events=column("events"),
                   version=column("version"), source=[block.source] * n,
                   source_partition=[block.partition] * n, updated_at_ms=[updated_at_ms] * n)

    @classmethod
    def concat(cls, parts: Sequence[RollupColumns]) -> RollupColumns:
        """The rows of ``parts`` in order (one non-empty part: that part itself)."""
        full = [p for p in parts if len(p)]
        if len(full) == 1:
            return full[0]
        if not full:
            return parts[0] if parts else cls.from_records([], 0)
        return cls(**{f.name: [v for p in full for v in getattr(p, f.name)]
                      for f in fields(cls)})

    @classmethod
    def from_records(cls, records: Sequence[RollupRecord], updated_at_ms: int) -> RollupColumns:
        keys, dims = _group_columns([r.group for r in records])
        return cls(
            customer=[r.customer for r in records],
            meter=[r.meter for r in records],
            group_key=keys,
            dimensions=dims,
            window_start_ms=[r.window_start_ms for r in records],
            window_end_ms=[r.window_end_ms for r in records],
            aggregation=[r.aggregation for r in records],
            value_nano=[r.value_nanos for r in records],
            events=[r.events for r in records],
            version=[r.version for r in records],
            source=[r.source for r in records],
            source_partition=[r.partition for r in records],
            updated_at_ms=[updated_at_ms] * len(records),
        )

    def take(self, rows: Sequence[int]) -> RollupColumns:
        """These rows only, in this order."""
        return RollupColumns(**{f.name: [getattr(self, f.name)[i] for i in rows]
                                for f in fields(self)})

    def bad_rows(self) -> dict[int, str]:
        """``{row: problem}`` for rows the table cannot hold (a total beyond Decimal(38, 9),
        a float where an int belongs, ...): each is refused on its own."""
        bad: dict[int, str] = {}
        # A float would be truncated on its way into an integer column (see columns.py).
        bad_ints("value_nanos", self.value_nano, -MAX_NANOS, MAX_NANOS, bad)
        for name in ("window_start_ms", "window_end_ms"):
            bad_ints(name, getattr(self, name), _MIN_WINDOW_MS, MAX_TIMESTAMP_MS + 86_400_000,
                     bad)
        bad_ints("updated_at_ms", self.updated_at_ms, INT64_MIN, INT64_MAX, bad)
        for name in ("events", "version"):
            bad_ints(name, getattr(self, name), 0, UINT64_MAX, bad)
        bad_ints("partition", self.source_partition, INT32_MIN, INT32_MAX, bad)
        return bad


@dataclass(frozen=True)
class LateEventColumns(Columns):
    """Too-late events, one list per column."""

    source: Sequence[str]
    source_partition: Sequence[int]
    source_offset: Sequence[int]
    position: Sequence[int]
    event_id: Sequence[str]
    customer: Sequence[str]
    meter: Sequence[str]
    group_key: Sequence[str]
    dimensions: Sequence[Mapping[str, str]]
    quantity_nano: Sequence[int]
    timestamp_ms: Sequence[int]
    window_start_ms: Sequence[int]
    received_at_ms: Sequence[int]

    @classmethod
    def from_records(cls, records: Sequence[LateRecord]) -> LateEventColumns:
        return cls(
            source=[r.source for r in records],
            source_partition=[r.partition for r in records],
            source_offset=[r.offset for r in records],
            position=[r.position for r in records],
            event_id=[r.event_id for r in records],
            customer=[r.customer for r in records],
            meter=[r.meter for r in records],
            group_key=[group_key(r.group) for r in records],
            dimensions=[dict(r.group) for r in records],
            quantity_nano=[r.quantity_nanos for r in records],
            timestamp_ms=[r.timestamp_ms for r in records],
            window_start_ms=[r.window_start_ms for r in records],
            received_at_ms=[r.received_at_ms for r in records],
        )

    def bad_rows(self) -> dict[int, str]:
        bad: dict[int, str] = {}
        bad_ints("quantity_nanos", self.quantity_nano, -MAX_NANOS, MAX_NANOS, bad)
        bad_ints("timestamp_ms", self.timestamp_ms, MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS - 1, bad)
        bad_ints("window_start_ms", self.window_start_ms, _MIN_WINDOW_MS, MAX_TIMESTAMP_MS, bad)
        for name in ("source_offset", "received_at_ms"):
            bad_ints(name, getattr(self, name), INT64_MIN, INT64_MAX, bad)
        bad_ints("partition", self.source_partition, INT32_MIN, INT32_MAX, bad)
        bad_ints("position", self.position, INT32_MIN, INT32_MAX, bad)
        return bad


_ROLLUP_TYPES = HOURLY_ROLLUPS.insert_types(f.name for f in fields(RollupColumns))
_LATE_TYPES = LATE_EVENTS.insert_types(f.name for f in fields(LateEventColumns))


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class FlushCounts:
    """Rows handed to each table by one :func:`write_flush`; ``refused`` rows went to
    ``dead_letters`` (stage ``load``) instead, by reason code."""

    hourly: int = 0
    daily: int = 0
    dead_letters: int = 0
    late: int = 0
    refused: int = 0
    refused_by_reason: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.hourly + self.daily + self.dead_letters + self.late


def _rollup_identity(r: RollupRecord) -> int:
    # A window row has no log position; its key is its identity. A stable non-negative
    # Int32 hash of it stands in for ``position`` so that refusing the same window again
    # (a later version, a replay) collapses onto one dead letter.
    key = "\x1f".join(map(str, (r.window, r.customer, r.meter, r.group, r.window_start_ms)))
    return zlib.crc32(key.encode("utf-8", "backslashreplace")) & 0x7FFF_FFFF


def _refuse_rollup(r: RollupRecord, code: str, detail: str, now_ms: int) -> DeadLetterRecord:
    return DeadLetterRecord(
        source=str(r.source), partition=_int32_or(r.partition), offset=-1,
        position=_rollup_identity(r), batch_id="", event_id="", reason=f"load.{code}: {detail}",
        payload=json.dumps(r.to_dict(), ensure_ascii=False, sort_keys=True, default=str),
        received_at_ms=now_ms)


def _refuse_late(r: LateRecord, reason: str, now_ms: int) -> DeadLetterRecord:
    doc: dict[str, Any] = {"id": r.event_id, "customer": r.customer, "meter": r.meter,
                           "quantity": _units(r.quantity_nanos), "timestamp_ms": r.timestamp_ms}
    if any(v for _, v in r.group):
        doc["dimensions"] = dict(r.group)
    return DeadLetterRecord(
        source=str(r.source), partition=_int32_or(r.partition), offset=_int64_or(r.offset),
        position=_int32_or(r.position), batch_id="", event_id=str(r.event_id), reason=reason,
        payload=json.dumps(doc, ensure_ascii=False, sort_keys=True, default=str),
        received_at_ms=_int64_or(r.received_at_ms, now_ms))


def _units(nanos: Any) -> str:
    # The same unit as every other dead letter's "quantity" (core.outputs.event_json).
    return format_nanos(nanos) if type(nanos) is int else repr(nanos)


def _int32_or(value: Any, default: int = -1) -> int:
    return value if type(value) is int and INT32_MIN <= value <= INT32_MAX else default


def _int64_or(value: Any, default: int = -1) -> int:
    return value if type(value) is int and INT64_MIN <= value <= INT64_MAX else default


def _storable_dead_letters(records: Sequence[DeadLetterRecord]) -> list[DeadLetterRecord]:
    """The dead letters dead_letters can hold. One it cannot (only a bug makes one) cannot
    be dead-lettered in turn: it is logged with its content instead of failing the flush."""
    ok = []
    for r in records:
        try:
            DeadLetterColumns.from_records([r], "rollup").validate()
        except SinkConfigError as exc:
            log.error("dropping a dead letter that dead_letters cannot hold (%s): %r", exc, r)
            continue
        ok.append(r)
    return ok


def write_flush(
    storage: Storage,
    flush: Flush,
    *,
    stage: str = "rollup",
    database: str | None = None,
    clock_ms: Callable[[], int] = _wall_clock_ms,
    retention: RetentionPolicy | None = None,
    refused: Sequence[DeadLetterRecord] = (),
) -> FlushCounts:
    """Insert ``flush`` into the rollup, dead-letter and late-event tables.

    Every row is checked on its own before anything is written. A row its table cannot
    hold, and a row the table's TTL would delete on insert (``retention``, default
    ``RetentionPolicy()``: pass the configured one), goes to ``dead_letters`` with stage
    ``load`` and a reason instead; the rest lands. Writing the same flush again is
    harmless: readers of the views and query objects see each row once. ``stage`` labels
    the flush's own dead letters; ``clock_ms`` stamps ``updated_at_ms`` (informational:
    ``version``, not the clock, decides which total wins) and is the retention clock.
    ``refused``: dead letters the caller made itself (output records it could not
    decode), stored and counted with stage ``load`` like the rows refused here.
    """
    if stage not in DEAD_LETTER_STAGES:  # a caller's bug, not data: fail loudly at once
        raise SinkConfigError("rollup flush", [f"stage must be one of "
                                               f"{', '.join(DEAD_LETTER_STAGES)}, got {stage!r}"])
    database = database or storage.database
    retention = retention or RetentionPolicy()
    now_ms = clock_ms()
    horizon_ms = now_ms + RETENTION_MARGIN_MS
    refused = list(refused)

    # Arrow blocks (the output loader's) go in as they are when every row passes the
    # checks below as a whole; a block with a row to refuse takes the row-by-row path.
    arrow_ready: dict[str, list[Any]] = {name: [] for name in _TABLES}
    blocks, loose = list(flush.rollup_blocks), list(flush.rollups)
    for arrow in flush.arrow_blocks:
        if not isinstance(arrow, ArrowRollupBlock):
            loose += arrow.records()
        elif (table := _arrow_insertable(arrow, now_ms, horizon_ms, retention)) is None:
            blocks.append(arrow.to_block())
        else:
            arrow_ready[arrow.window].append(table)
    by_window: dict[str, list[RollupRecord]] = {name: [] for name in _TABLES}
    for record in loose:
        if record.window in by_window:
            by_window[record.window].append(record)
        else:
            refused.append(_refuse_rollup(record, "bad_window", f"window {record.window!r} "
                                          f"is not one of {', '.join(_TABLES)}", now_ms))
    # Column blocks: a block of one window kind goes in whole.
    block_rows: dict[str, list[tuple[RollupBlock, list[int] | None]]] = {
        name: [] for name in _TABLES}
    for block in blocks:
        kinds = set(block.window)
        if len(kinds) == 1 and next(iter(kinds)) in block_rows:
            block_rows[next(iter(kinds))].append((block, None))
            continue
        rows_of: dict[str, list[int]] = {name: [] for name in _TABLES}
        for i, window in enumerate(block.window):
            if window in rows_of:
                rows_of[window].append(i)
            else:
                refused.append(_refuse_rollup(block.row(i), "bad_window", f"window {window!r} "
                                              f"is not one of {', '.join(_TABLES)}", now_ms))
        for name, rows in rows_of.items():
            if rows:
                block_rows[name].append((block, rows))
    rollups: dict[str, RollupColumns] = {}
    for name, records in by_window.items():
        # Columns once; the rows refused below are left out by index.
        parts = [RollupColumns.from_records(records, now_ms)]
        parts += [RollupColumns.from_block(b, rows, now_ms) for b, rows in block_rows[name]]
        columns = RollupColumns.concat(parts)

        def record_at(i: int, records: list[RollupRecord] = records,
                      blocks: list[tuple[RollupBlock, list[int] | None]] = block_rows[name],
                      ) -> RollupRecord:
            """Row ``i`` of ``columns`` as a record (for a refusal only)."""
            if i < len(records):
                return records[i]
            i -= len(records)
            for block, rows in blocks:
                n = len(block) if rows is None else len(rows)
                if i < n:
                    return block.row(i if rows is None else rows[i])
                i -= n
            raise IndexError(i)

        bad = columns.bad_rows()
        expires_at_ms = retention.expiry(_RETENTION_FIELD[name])
        oldest = min(columns.window_start_ms, default=None)
        if not bad and oldest is not None and min(
                expires_at_ms(oldest, m) for m in set(columns.meter)) > horizon_ms:
            rollups[name] = columns  # the oldest window of every meter is in retention
            continue
        keep = []
        for i, (start_ms, meter) in enumerate(zip(columns.window_start_ms, columns.meter,
                                                  strict=True)):
            if i in bad:
                refused.append(_refuse_rollup(record_at(i), "out_of_range", bad[i], now_ms))
            elif expires_at_ms(start_ms, meter) <= horizon_ms:
                refused.append(_refuse_rollup(record_at(i), "outside_retention",
                                              f"{_RETENTION_FIELD[name]} passed", now_ms))
            else:
                keep.append(i)
        rollups[name] = columns if len(keep) == len(columns) else columns.take(keep)

    late_bad = LateEventColumns.from_records(flush.late).bad_rows()
    late_keep = []
    for i, late_record in enumerate(flush.late):
        if i in late_bad:
            refused.append(_refuse_late(late_record, f"load.out_of_range: {late_bad[i]}",
                                        now_ms))
        elif retention.expires_at_ms("late_events_days", late_record.window_start_ms,
                                     late_record.meter) <= horizon_ms:
            refused.append(_refuse_late(late_record, "event.outside_retention", now_ms))
        else:
            late_keep.append(late_record)
    late = LateEventColumns.from_records(late_keep)

    for name, columns in rollups.items():
        _insert_partitioned(storage, _TABLES[name].qualified(database), columns.as_columns(),
                            _ROLLUP_TYPES, columns.window_start_ms, _PARTITION_OF[name])
    arrow_rows = {name: _insert_arrow(storage, _TABLES[name].qualified(database), tables,
                                      _PARTITION_OF[name])
                  for name, tables in arrow_ready.items()}
    _insert_partitioned(storage, LATE_EVENTS.qualified(database), late.as_columns(),
                        _LATE_TYPES, late.window_start_ms, month_of_ms)
    dead = DeadLetterColumns.from_records(_storable_dead_letters(flush.dead_letters), stage)
    insert_dead_letters(storage, dead, database=database)
    by_reason: dict[str, int] = {}
    if refused:
        refused = _storable_dead_letters(refused)
        insert_dead_letters(storage, DeadLetterColumns.from_records(refused, "load"),
                            database=database)
        for refusal in refused:
            code = refusal.reason.split(":", 1)[0]
            by_reason[code] = by_reason.get(code, 0) + 1
        log.warning("rollup flush: %d row(s) refused into dead_letters (stage load): %s; "
                    "first: %s", len(refused), by_reason, refused[0].reason if refused else "")
    return FlushCounts(hourly=len(rollups["hourly"]) + arrow_rows["hourly"],
                       daily=len(rollups["daily"]) + arrow_rows["daily"],
                       dead_letters=len(dead), late=len(late), refused=len(refused),
                       refused_by_reason=by_reason)


def _arrow_insertable(arrow: ArrowRollupBlock, now_ms: int, horizon_ms: int,
                      retention: RetentionPolicy) -> Any:
    """``arrow``'s rows as the rollup table's columns when every row passes what
    ``RollupColumns.bad_rows`` and the retention check ask of it (decided from the
    columns' min/max and the block's meters), else None: the caller then refuses and
    keeps rows one by one on the list path."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = arrow.table
    if (arrow.window not in _TABLES or not INT32_MIN <= arrow.partition <= INT32_MAX
            or table.schema.field("value_nano").type != pa.int64()):
        return None  # totals past int64 are rare: the list path casts them
    n = table.num_rows
    if n == 0:
        return table
    # int64 totals are all within Decimal(38, 9); events and version are uint64.
    for name in ("window_start_ms", "window_end_ms"):
        low_high = pc.min_max(table.column(name))
        if not (low_high["min"].as_py() >= _MIN_WINDOW_MS
                and low_high["max"].as_py() <= MAX_TIMESTAMP_MS + 86_400_000):
            return None
    oldest = pc.min(table.column("window_start_ms")).as_py()
    newest = pc.max(table.column("window_start_ms")).as_py()
    if partition_groups([oldest, newest], _PARTITION_OF[arrow.window]) is not None:
        return None  # more partitions than one INSERT may touch: the list path splits
    expires_at_ms = retention.expiry(_RETENTION_FIELD[arrow.window])
    meters = table.column("meter").combine_chunks().dictionary.to_pylist()
    if min(expires_at_ms(oldest, m) for m in meters) <= horizon_ms:
        return None
    # Each distinct group once (ClickHouse's dictionary reader relies on it), as the
    # canonical text of the decoded group: a name repeated in the sent JSON counts once.
    codes = arrow.group_codes()
    distinct: dict[tuple[tuple[str, str], ...], int] = {}
    remap = [distinct.setdefault(g, len(distinct)) for g in arrow.groups]
    if len(distinct) != len(remap):
        codes = pc.take(pa.array(remap, pa.int32()), codes)
    text = pa.dictionary(pa.int32(), pa.string())
    group_keys = pa.DictionaryArray.from_arrays(
        codes, pa.array([group_key(g) for g in distinct], pa.string()))
    dimensions = pa.DictionaryArray.from_arrays(
        codes, pa.array([dimensions_json(g) for g in distinct], pa.string()))
    columns = {
        "customer": table.column("customer"), "meter": table.column("meter"),
        "group_key": group_keys, "dimensions": dimensions,
        "window_start_ms": table.column("window_start_ms"),
        "window_end_ms": table.column("window_end_ms"),
        "aggregation": table.column("aggregation"), "value_nano": table.column("value_nano"),
        "events": table.column("events"), "version": table.column("version"),
        "source": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)),
                                                 pa.array([arrow.source], pa.string())),
        "source_partition": pa.array(np.full(n, arrow.partition, np.int32)),
        "updated_at_ms": pa.array(np.full(n, now_ms, np.int64)),
    }
    schema = pa.schema([pa.field(name, text if name in ("group_key", "dimensions", "source")
                                 else columns[name].type, nullable=False)
                        for name in columns])
    return pa.Table.from_arrays(list(columns.values()), schema=schema)


def _insert_arrow(storage: Storage, table: str, tables: list[Any],
                  key_of: Callable[[int], int]) -> int:
    """Insert Arrow blocks of one rollup table: in one INSERT when their rows span few
    enough partitions, else block by block (each was checked to). Returns the rows."""
    if not tables:
        return 0
    import pyarrow as pa
    import pyarrow.compute as pc

    # One dictionary per column, each value once (chDB reads one per column).
    whole = pa.concat_tables(tables).unify_dictionaries().combine_chunks()
    if whole.num_rows == 0:
        return 0
    low_high = pc.min_max(whole.column("window_start_ms"))
    if partition_groups([low_high["min"].as_py(), low_high["max"].as_py()], key_of) is None:
        storage.insert_arrow(table, whole, _ROLLUP_TYPES)
    else:  # each block spans few enough partitions (_arrow_insertable)
        for part in tables:
            storage.insert_arrow(table, part, _ROLLUP_TYPES)
    return int(whole.num_rows)


def _insert_partitioned(storage: Storage, table: str, columns: Mapping[str, Sequence[Any]],
                        types: Mapping[str, str], times_ms: Sequence[int],
                        key_of: Callable[[int], int]) -> None:
    """Insert, in several blocks when the rows span more partitions than one INSERT may."""
    if not times_ms:
        return
    groups = partition_groups(times_ms, key_of)
    for part in [columns] if groups is None else [pick(columns, g) for g in groups]:
        storage.insert_columns(table, part, types)
