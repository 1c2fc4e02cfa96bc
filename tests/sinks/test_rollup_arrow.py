"""The rollups topic's Arrow blocks (sinks/rollup_arrow.py): exact round trips, and every
kind of damage refused with a reason (the loader turns it into a dead letter)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.core.outputs import RollupBlock, RollupRecord
from meterline.sinks.rollup_arrow import (
    FORMAT,
    decode_block,
    encode_block,
    encode_rows,
    is_arrow_payload,
)

HOUR_MS = 3_600_000
DAY0 = 1_767_225_600_000  # 2026-01-01

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
groups = st.lists(st.tuples(st.sampled_from(["model", "region", "endpoint"]), texts),
                  max_size=3, unique_by=lambda p: p[0]).map(tuple)
values = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-(10**37), 10**37),
                   st.sampled_from([0, 2**63, -(2**63) - 1, 10**38 - 1]))


@st.composite
def blocks(draw: Any) -> RollupBlock:
    window = draw(st.sampled_from(["hourly", "daily", "weekly"]))
    n = draw(st.integers(1, 30))
    pool = draw(st.lists(groups, min_size=1, max_size=4))
    rows = [RollupRecord(window, draw(texts), draw(st.sampled_from(["tokens", "calls"])),
                         draw(st.sampled_from(pool)),
                         draw(st.integers(-(2**40), 2**45)), draw(st.integers(0, 2**45)),
                         draw(st.sampled_from(["sum", "count", "max"])), draw(values),
                         draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)),
                         "usage", draw(st.integers(-(2**31), 2**31 - 1)))
            for _ in range(n)]
    return RollupBlock(rows[0].source, rows[0].partition,
                       *([getattr(r, name) for r in rows] for name in (
                           "window", "customer", "meter", "group", "window_start_ms",
                           "window_end_ms", "aggregation", "value_nanos", "events",
                           "version")))


@settings(max_examples=150, deadline=None)
@given(blocks(), st.data())
def test_any_block_comes_back_row_for_row(block: RollupBlock, data: Any) -> None:
    lo = data.draw(st.integers(0, len(block) - 1))
    hi = data.draw(st.integers(lo + 1, len(block)))
    payload = encode_block(block, lo, hi)
    assert is_arrow_payload(payload)
    decoded = decode_block(payload)
    assert (decoded.source, decoded.partition, decoded.window) == (
        block.source, block.partition, block.window[0])
    assert decoded.records() == block.records()[lo:hi]
    # each distinct group once in the dictionary (ClickHouse's reader relies on it)
    assert len(set(decoded.groups)) == len(decoded.groups)


def test_equal_groups_as_different_objects_share_one_dictionary_entry() -> None:
    n = 50
    block = RollupBlock("usage", 0, ["hourly"] * n, ["c"] * n, ["tokens"] * n,
                        [(("model", f"m{i % 2}"),) for i in range(n)],  # 50 tuples, 2 values
                        [DAY0] * n, [DAY0 + HOUR_MS] * n, ["sum"] * n, list(range(n)),
                        [1] * n, [1] * n)
    decoded = decode_block(encode_block(block))
    assert decoded.groups == ((("model", "m0"),), (("model", "m1"),))
    assert decoded.records() == block.records()


def test_a_block_holds_one_window_kind_and_one_source_partition() -> None:
    row = RollupRecord("hourly", "c", "tokens", (), DAY0, DAY0 + HOUR_MS, "sum", 1, 1, 1,
                       "usage", 0)
    with pytest.raises(ValueError, match="one window kind"):
        encode_rows([row, RollupRecord(**{**_fields(row), "window": "daily"})])
    with pytest.raises(ValueError, match="one source partition"):
        encode_rows([row, RollupRecord(**{**_fields(row), "partition": 1})])


def _fields(r: RollupRecord) -> dict[str, Any]:
    return {name: getattr(r, name) for name in r.__slots__}


# --------------------------------------------------------------------------- damage


def _good_table() -> pa.Table:
    row = RollupRecord("hourly", "c", "tokens", (("model", "m"),), DAY0, DAY0 + HOUR_MS,
                       "sum", 5, 1, 1, "usage", 0)
    return pa.ipc.open_stream(encode_rows([row, row])).read_all()


def _stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def _with(table: pa.Table, name: str, array: Any, field: Any = None) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, field or pa.field(name, array.type, nullable=False), array)


def _meta(table: pa.Table, **changes: str) -> pa.Table:
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    return table.replace_schema_metadata({**meta, **changes})


TEXT = pa.dictionary(pa.int32(), pa.string())


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p[:4] + b"garbage" * 9, "not an Arrow IPC stream"),
    (lambda p: p[: len(p) // 2], "not an Arrow IPC stream"),
    (lambda p: _stream(_meta(_good_table(), meterline="rollup_columns/9")), "metadata"),
    (lambda p: _stream(_meta(_good_table(), partition="3x")), "integer partition"),
    (lambda p: _stream(_good_table().drop_columns(["events"])), "columns"),
    (lambda p: _stream(_with(_good_table(), "events", pa.array([1, 1], pa.int64()))),
     "columns"),
    (lambda p: _stream(_with(_good_table(), "customer", pa.array(["c", None]),
                             pa.field("customer", pa.string()))), "null values"),
    (lambda p: _stream(_with(_good_table(), "dimensions", pa.DictionaryArray.from_arrays(
        pa.array([0, 0], pa.int32()), pa.array(["{not json"])))), "not JSON"),
    (lambda p: _stream(_with(_good_table(), "dimensions", pa.DictionaryArray.from_arrays(
        pa.array([0, 0], pa.int32()), pa.array(['{"model": 3}'])))), "object of strings"),
    (lambda p: _stream(_with(_good_table(), "value_nano", pa.array(["1e3", "2"]))),
     "decimal integer"),
    (lambda p: _stream(_with(_good_table(), "meter", pa.DictionaryArray.from_arrays(
        pa.array([0, 7], pa.int32()), pa.array(["tokens"]), safe=False))), "Arrow"),
])
def test_damage_is_refused_with_a_reason(damage: Any, reason: str) -> None:
    row = RollupRecord("hourly", "c", "tokens", (), DAY0, DAY0 + HOUR_MS, "sum", 5, 1, 1,
                       "usage", 0)
    payload = damage(encode_rows([row]))
    with pytest.raises(ValueError, match=reason):
        decode_block(payload)


def test_a_foreign_writer_s_repeated_dictionary_values_are_folded() -> None:
    """Another Arrow writer may repeat a value in a dictionary; the block still reads
    the same rows and each meter once."""
    table = _with(_good_table(), "meter", pa.DictionaryArray.from_arrays(
        pa.array([0, 1], pa.int32()), pa.array(["tokens", "tokens"])))
    decoded = decode_block(_stream(table))
    assert decoded.table.column("meter").combine_chunks().dictionary.to_pylist() == ["tokens"]
    assert [r.meter for r in decoded.records()] == ["tokens", "tokens"]
    assert FORMAT == "rollup_columns/1"
