"""The output loader (``meterline load-rollups``): forward-compatible decoding, and nothing
it cannot read or store is skipped or retried forever (issue 8, item 5)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from meterline.aggregators.outputs_io import OutputLoader, decode_outputs
from meterline.core.outputs import LateRecord, RollupRecord
from meterline.ingest.sources import SourceRecord
from meterline.sinks.rollups import LateEventsQuery, RollupTotalsQuery

HOUR_MS = 3_600_000


class ListSource:
    def __init__(self, records: list[SourceRecord]) -> None:
        self.pending = list(records)
        self.committed: list[SourceRecord] = []

    def poll_records(self, max_records: int, timeout_s: float) -> list[SourceRecord]:
        out, self.pending = self.pending[:max_records], self.pending[max_records:]
        return out

    def commit(self, records: Sequence[SourceRecord]) -> None:
        self.committed += list(records)

    def close(self) -> None:
        pass


def _now_hour() -> int:
    now = time.time_ns() // 1_000_000
    return now - now % HOUR_MS - HOUR_MS


def _rollup(start: int, customer: str = "acme", **extra: Any) -> dict[str, Any]:
    doc = RollupRecord("hourly", customer, "llm_tokens", (("model", "s"),), start,
                       start + HOUR_MS, "sum", 7 * 10**9, 2, 2, "usage", 0).to_dict()
    doc.update(extra)
    return doc


def _record(offset: int, doc: Any, topic: str = "usage.rollups") -> SourceRecord:
    payload = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return SourceRecord(topic, 0, offset, payload, time.time_ns() // 1_000_000)


def test_records_from_a_newer_writer_with_extra_fields_load() -> None:
    """Old code: ``cls(**d)`` raised TypeError on an unknown key and the loader committed
    past the record - a rolling upgrade that adds a field lost rollup rows."""
    start = _now_hour()
    late = LateRecord("usage", 0, 4, 1, "e1", "acme", "llm_tokens", (), 5, start + 1, start,
                      start + 9).to_dict()
    flush, undecodable = decode_outputs([
        _record(0, {"rollups": [_rollup(start, restated=True, v2_field={"x": 1})],
                    "future_kind": [{"a": 1}]}),
        _record(1, {"late": [{**late, "correction_of": None}]}),
    ])
    assert undecodable == []
    assert [r.customer for r in flush.rollups] == ["acme"]
    assert flush.rollups[0].value_nanos == 7 * 10**9
    assert [r.event_id for r in flush.late] == ["e1"]


def test_undecodable_records_are_dead_letters_with_their_bytes_and_the_rest_lands(
        migrated_storage: Any) -> None:
    start = _now_hour()
    garbage = b"\xff\xfe not json at all"
    records = [
        _record(0, {"rollups": [_rollup(start)]}),
        _record(1, garbage),
        _record(2, {"rollups": [_rollup(start, customer="beta"),
                                {"window": "hourly"},  # missing fields: this item only
                                _rollup(start, customer="gamma", value_nanos=1.5)]}),
        _record(3, [1, 2, 3]),
        _record(4, {"rollups": [_rollup(start + HOUR_MS, value_nanos=str(10**38))]}),
    ]
    source = ListSource(records)
    loader = OutputLoader(migrated_storage, source)
    assert loader.run_once() == 5
    assert [r.offset for r in source.committed] == [0, 1, 2, 3, 4]  # the partition moves on
    db = migrated_storage.database
    totals = RollupTotalsQuery("hour", database=db).run(migrated_storage)
    assert totals == {("acme", "llm_tokens", start): 7 * 10**9,
                      ("beta", "llm_tokens", start): 7 * 10**9}
    rows = migrated_storage.query_rows(
        f"SELECT source, source_offset, position, stage, reason, payload "
        f"FROM {db}.dead_letters FINAL ORDER BY source_offset, position")
    shown = [(r[1], r[2], r[3], r[4].split(":", 1)[0]) for r in rows]
    assert shown == [
        (-1, shown[0][1], "load", "load.out_of_range"),  # the total beyond Decimal(38, 9)
        (1, -1, "load", "output.undecodable"),
        (2, 1, "load", "output.undecodable"),
        (2, 2, "load", "output.undecodable"),
        (3, -1, "load", "output.undecodable"),
    ]
    assert rows[1][5] == garbage, "the exact bytes are kept"
    assert loader.totals().dead_letters_by_reason == {"output.undecodable": 4,
                                                      "load.out_of_range": 1}
    assert LateEventsQuery(database=db).run(migrated_storage) == {}
    # a replay of the same records changes nothing
    OutputLoader(migrated_storage, ListSource(records)).run_once()
    again = migrated_storage.query_rows(f"SELECT count() FROM {db}.dead_letters FINAL")
    assert again == [(5,)]
    assert RollupTotalsQuery("hour", database=db).run(migrated_storage) == totals


def test_an_unreadable_record_is_logged_with_where_it_sits(
        migrated_storage: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The error line carries topic, partition and offset as fields (JSON logs show them
    as keys), so an operator can fetch the exact record."""
    caplog.set_level(logging.ERROR, logger="meterline.aggregators.outputs_io")
    records = [_record(0, {"rollups": [_rollup(_now_hour())]}), _record(1, b"\x00garbage")]
    OutputLoader(migrated_storage, ListSource(records)).run_once()
    [line] = [r for r in caplog.records if r.name == "meterline.aggregators.outputs_io"]
    assert (line.topic, line.partition, line.offset) == (  # type: ignore[attr-defined]
        records[1].topic, records[1].partition, 1)


def _rows(start: int, n: int = 5) -> list[RollupRecord]:
    day = start - start % (24 * HOUR_MS)
    return [RollupRecord("hourly", f"c{i % 3}", "llm_tokens",
                         (("model", "s" if i % 2 else "l"),) if i % 3 else (),
                         start, start + HOUR_MS, "sum", (i + 1) * 10**9, i + 1, i + 2,
                         "usage", 3) if i % 2 else
            RollupRecord("daily", f"c{i % 3}", "llm_tokens", (), day, day + 24 * HOUR_MS,
                         "sum", (i + 1) * 10**9, i + 1, i + 2, "usage", 3)
            for i in range(n)]


def test_rollup_columns_blocks_round_trip_exactly() -> None:
    """What KafkaOutputWriter sends, decode_outputs (the loader) and the anomaly stage
    read back row for row, totals past int64 included."""
    from meterline.aggregators.anomaly_stage import decode_rollup_rows
    from meterline.core.outputs import rollup_columns

    rows = _rows(_now_hour())
    rows.append(RollupRecord("daily", "big", "credits", (), 0, HOUR_MS, "sum", -(10**37), 1,
                             1, "usage", 3))
    payload = orjson.dumps({"rollup_columns": rollup_columns(rows)})
    assert len(payload) < len(orjson.dumps({"rollups": [r.to_dict() for r in rows]}))
    flush, undecodable = decode_outputs([_record(0, payload)])
    assert undecodable == [] and flush.rollups == []
    [block] = flush.rollup_blocks  # the loader keeps it as columns
    assert block.records() == rows and [block.row(i) for i in range(len(rows))] == rows
    assert decode_rollup_rows(payload) == rows
    with pytest.raises(ValueError, match="one source partition"):
        rollup_columns([rows[0], RollupRecord(*[*vars_of(rows[0])[:-1], 9])])


def vars_of(r: RollupRecord) -> list[Any]:
    return [getattr(r, name) for name in r.__slots__]


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b.update(customer=b["customer"][:-1]), "different lengths"),
    (lambda b: b.update(events=[True] * len(b["events"])), "events must hold ints"),
    (lambda b: b.update(customer=[1] * len(b["customer"])), "customer must hold strings"),
    (lambda b: b.update(value_nanos=[1.5] * len(b["value_nanos"])), "value_nanos"),
    (lambda b: b.update(group=[[["model"]]] * len(b["group"])), "group must be"),
    (lambda b: b.pop("version"), "version must be a list"),
    (lambda b: b.update(partition="3"), "source (str) and partition (int)"),
])
def test_a_damaged_block_is_one_dead_letter_with_its_bytes_and_the_rest_lands(
        migrated_storage: Any, damage: Any, reason: str) -> None:
    from meterline.core.outputs import rollup_columns

    start = _now_hour()
    block = rollup_columns(_rows(start))
    damage(block)
    bad = orjson.dumps({"rollup_columns": block})
    good = orjson.dumps({"rollup_columns": rollup_columns(_rows(start)[:1])})
    source = ListSource([_record(0, bad), _record(1, good)])
    loader = OutputLoader(migrated_storage, source)
    assert loader.run_once() == 2 and len(source.committed) == 2
    db = migrated_storage.database
    assert RollupTotalsQuery("day", database=db).run(migrated_storage) == {
        ("c0", "llm_tokens", start - start % (24 * HOUR_MS)): 10**9}
    [(offset, position, why, payload)] = migrated_storage.query_rows(
        f"SELECT source_offset, position, reason, payload FROM {db}.dead_letters FINAL")
    assert (offset, position) == (0, -1) and why.startswith("output.undecodable")
    assert reason in why and payload.encode() == bad  # text: the bytes are UTF-8 JSON


def test_a_damaged_arrow_block_is_one_dead_letter_with_its_bytes_and_the_rest_lands(
        migrated_storage: Any) -> None:
    """The worker's Arrow block (sinks/rollup_arrow.py), cut short on the wire: one
    output.undecodable dead letter holding the exact bytes; the good block lands through
    the Arrow insert, and a replay changes nothing."""
    from meterline.sinks.rollup_arrow import encode_rows

    start = _now_hour()
    rows = _rows(start)
    hourly = [r for r in rows if r.window == "hourly"]
    daily = [r for r in rows if r.window == "daily"]
    good = [encode_rows(hourly), encode_rows(daily)]
    bad = good[0][: len(good[0]) // 2]
    records = [_record(0, bad), _record(1, good[0]), _record(2, good[1])]
    for _ in range(2):
        source = ListSource(records)
        loader = OutputLoader(migrated_storage, source)
        assert loader.run_once() == 3 and len(source.committed) == 3
    db = migrated_storage.database
    day = start - start % (24 * HOUR_MS)
    expected: dict[Any, int] = {}
    for r in daily:
        expected[(r.customer, r.meter, day)] = expected.get((r.customer, r.meter, day), 0) + \
            r.value_nanos
    assert RollupTotalsQuery("day", database=db).run(migrated_storage) == expected
    hours = RollupTotalsQuery("hour", database=db).run(migrated_storage)
    assert sum(hours.values()) == sum(r.value_nanos for r in hourly)
    [(offset, position, why, payload)] = migrated_storage.query_rows(
        f"SELECT source_offset, position, reason, hex(payload) FROM {db}.dead_letters FINAL")
    assert (offset, position) == (0, -1) and why.startswith("output.undecodable: not an Arrow")
    assert payload == bad.hex().upper()
