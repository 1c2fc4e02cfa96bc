"""Rollup blocks as Arrow IPC streams: the rollups topic's wire form since session 22.

A worker's flush goes to ``<usage topic>.rollups`` in blocks of up to 2,000 rows of one
source partition and one window kind. As JSON lists (``{"rollup_columns": ...}``) the
loader paid ~0.8 µs a row to turn the text into Python lists and ~0.4 more to check and
re-shape them before chDB copied them again (docs/benchmarks.md, session 20-21). As an
Arrow IPC stream the loader maps the columns without a Python object per row, checks
them with vectorised kernels and hands the table to ClickHouse as it is.

The stream (one record batch, any Arrow reader can open it):

- schema metadata ``meterline`` = ``rollup_columns/1``, ``source``, ``partition`` and
  ``window`` (``hourly`` | ``daily``): one value per block;
- columns, none nullable: ``customer`` string; ``meter``, ``aggregation`` and
  ``dimensions`` dictionary<int32, string> (``dimensions`` is the group as a JSON object,
  dimension -> value, in the group's order); ``window_start_ms``, ``window_end_ms``
  int64; ``value_nano`` int64, or string (decimal text) for a block holding a total past
  int64 (exact either way: never a float); ``events``, ``version`` uint64.

Decoding checks everything a loader relies on (the exact schema, no nulls, valid
dictionary indices and UTF-8, each distinct group a JSON object of strings, decimal text
in a string ``value_nano``) and raises ``ValueError`` naming the problem: the record then
becomes an ``output.undecodable`` dead letter with its bytes, like a bad JSON record. Row
checks (ranges, retention, window kind) stay with ``write_flush``, which refuses rows one
by one exactly as for the other forms.

pyarrow is imported on first use: processes that never touch the rollups topic (the
raw loader, the SDK) do not pay for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from meterline.core.outputs import RollupBlock, RollupRecord

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["ArrowRollupBlock", "decode_block", "dimensions_json", "encode_block", "encode_rows",
           "is_arrow_payload", "warm_up"]

FORMAT = "rollup_columns/1"
# Every Arrow IPC stream starts with the continuation marker; no JSON text can.
_MAGIC = b"\xff\xff\xff\xff"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_DICT_COLUMNS = ("meter", "aggregation", "dimensions")


def is_arrow_payload(payload: bytes) -> bool:
    return payload[:4] == _MAGIC


def _schema(value_type: Any) -> pa.Schema:
    import pyarrow as pa

    text = pa.dictionary(pa.int32(), pa.string())
    return pa.schema([
        pa.field("customer", pa.string(), nullable=False),
        pa.field("meter", text, nullable=False),
        pa.field("dimensions", text, nullable=False),
        pa.field("window_start_ms", pa.int64(), nullable=False),
        pa.field("window_end_ms", pa.int64(), nullable=False),
        pa.field("aggregation", text, nullable=False),
        pa.field("value_nano", value_type, nullable=False),
        pa.field("events", pa.uint64(), nullable=False),
        pa.field("version", pa.uint64(), nullable=False),
    ])


def dimensions_json(group: tuple[tuple[str, str], ...]) -> str:
    """A group as a JSON object (the ``dimensions`` column's text)."""
    # The group's order is kept (a JSON object keeps its members' order), so decoding
    # gives back the same tuple.
    return orjson.dumps(dict(group)).decode()


def _ints(values: list[int], dtype: Any) -> Any:
    """An int column (OverflowError past ``dtype``); through numpy: ~15x faster than
    ``pa.array`` for int32 and ~2x for int64 from a list. numpy would truncate a float
    silently, so anything but an int is refused first (a bug upstream, never data)."""
    import numpy as np
    import pyarrow as pa

    if not set(map(type, values)) <= {int}:
        raise TypeError(f"an int column holds {sorted(t.__name__ for t in set(map(type, values)))}")
    return pa.array(np.fromiter(values, dtype, len(values)))


def _dictionary(values: list[Any], text_of: Any) -> Any:
    """A dictionary<int32, string> column of few distinct values (meters, aggregations,
    groups): one code per distinct value through C-speed dict maps, each text once."""
    import numpy as np
    import pyarrow as pa

    code_of = {v: code for code, v in enumerate(dict.fromkeys(values))}
    codes = np.fromiter(map(code_of.__getitem__, values), np.int32, len(values))
    return pa.DictionaryArray.from_arrays(
        pa.array(codes), pa.array([text_of(v) for v in code_of], pa.string()))


def encode_block(block: RollupBlock, lo: int = 0, hi: int | None = None) -> bytes:
    """Rows ``lo:hi`` of ``block`` (all of one window kind) as one IPC stream."""
    import numpy as np
    import pyarrow as pa

    n = len(block)
    hi = n if hi is None else min(hi, n)
    whole = lo == 0 and hi == n

    def cut(column: list[Any]) -> list[Any]:
        return column if whole else column[lo:hi]

    kinds = set(cut(block.window))
    if len(kinds) != 1:
        raise ValueError(f"an Arrow rollup block holds one window kind, got {sorted(kinds)}")
    arrays = _from_buffers(block, lo, hi) if hi <= block.buffers_rows else None
    if arrays is not None:
        return _stream(arrays, block, kinds.pop())
    values = cut(block.value_nanos)
    try:
        value = _ints(values, np.int64)
    except OverflowError:  # a total past int64: the block's totals as decimal text
        value = pa.array([str(v) for v in values], pa.string())
    arrays = [
        pa.array(cut(block.customer), pa.string()),
        _dictionary(cut(block.meter), str),
        _dictionary(cut(block.group), dimensions_json),
        _ints(cut(block.window_start_ms), np.int64),
        _ints(cut(block.window_end_ms), np.int64),
        _dictionary(cut(block.aggregation), str),
        value,
        _ints(cut(block.events), np.uint64),
        _ints(cut(block.version), np.uint64),
    ]
    return _stream(arrays, block, kinds.pop())


def _from_buffers(block: RollupBlock, lo: int, hi: int) -> list[Any] | None:
    """Rows ``lo:hi`` from the compiled store's buffers (``RollupBlock.buffers``): no
    Python object per value. None when a total is past int64 (the lists then)."""
    prepared = _prepared(block.buffers)
    if prepared is None:
        return None
    customer, meter, group, start, end, aggregation, value, events = (
        column.slice(lo, hi - lo) for column in prepared)
    return [customer.dictionary_decode(), meter, group, start, end, aggregation, value,
            events, events]


def _prepared(buffers: dict[str, Any]) -> list[Any] | None:
    """The block's Arrow columns, made once per block (its chunks are slices of them)."""
    if "columns" in buffers:
        return buffers["columns"]
    import numpy as np
    import pyarrow as pa

    (customer, meter, group, aggregation, customers, meters, groups, aggregations, start,
     end, value, events) = buffers["raw"]
    columns = None
    if value is not None:
        def ints(buffer: Any, dtype: Any = np.int64) -> Any:
            return pa.array(np.frombuffer(buffer, np.int64).astype(dtype, copy=False))

        def dictionary(codes: Any, texts: list[str]) -> Any:
            return pa.DictionaryArray.from_arrays(ints(codes, np.int32),
                                                  pa.array(texts, pa.string()))

        columns = [dictionary(customer, customers), dictionary(meter, meters),
                   dictionary(group, [dimensions_json(g) for g in groups]), ints(start),
                   ints(end), dictionary(aggregation, aggregations), ints(value),
                   ints(events, np.uint64)]  # never negative: a count of events
    buffers["columns"] = columns
    return columns


def _stream(arrays: list[Any], block: RollupBlock, window: str) -> bytes:
    import pyarrow as pa

    schema = _schema(arrays[6].type).with_metadata({
        "meterline": FORMAT, "source": block.source, "partition": str(block.partition),
        "window": window})
    batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue())


def warm_up() -> None:
    """Load pyarrow and run one tiny encode and decode now. A worker calls this at start:
    the first flush otherwise paid ~0.2 s (idle) to ~1 s (busy 2-core machine) for the
    import, a delay of the first outputs after every start or rebalance (measured with
    benchmarks/e2e_rollups.py: first output 1.0-1.4 s after assignment, 0.1-0.3 s with
    JSON blocks)."""
    row = RollupRecord("hourly", "c", "m", (("k", "v"),), 0, 3_600_000, "sum", 1, 1, 1,
                       "warm-up", 0)
    decode_block(encode_rows([row]))


def encode_rows(rows: list[RollupRecord]) -> bytes:
    """Rows of one source partition and one window kind as one IPC stream."""
    first = rows[0]
    if any(r.source != first.source or r.partition != first.partition for r in rows):
        raise ValueError("an Arrow rollup block holds rows of one source partition")
    return encode_block(RollupBlock(
        first.source, first.partition, [r.window for r in rows], [r.customer for r in rows],
        [r.meter for r in rows], [r.group for r in rows], [r.window_start_ms for r in rows],
        [r.window_end_ms for r in rows], [r.aggregation for r in rows],
        [r.value_nanos for r in rows], [r.events for r in rows], [r.version for r in rows]))


@dataclass(frozen=True)
class ArrowRollupBlock:
    """A decoded block: ``table`` has the wire columns (one chunk each), ``groups`` the
    groups of the ``dimensions`` dictionary, in its order."""

    source: str
    partition: int
    window: str
    table: pa.Table
    groups: tuple[tuple[tuple[str, str], ...], ...]

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def group_codes(self) -> Any:
        """The ``dimensions`` indices as one int32 array (into ``groups``)."""
        return self.table.column("dimensions").combine_chunks().indices

    def to_block(self) -> RollupBlock:
        """The same rows as lists (the path for a block with a row ``write_flush`` must
        refuse, and for readers that want records)."""
        t = self.table

        def column(name: str) -> list[Any]:
            return t.column(name).to_pylist()

        n = len(self)
        groups = self.groups
        group = [groups[c] for c in self.group_codes().to_pylist()]
        values = column("value_nano")
        if t.schema.field("value_nano").type != _int64_type():
            values = [int(v) for v in values]  # checked decimal text (decode_block)
        return RollupBlock(self.source, self.partition, [self.window] * n, column("customer"),
                           column("meter"), group, column("window_start_ms"),
                           column("window_end_ms"), column("aggregation"), values,
                           column("events"), column("version"))

    def records(self) -> list[RollupRecord]:
        return self.to_block().records()


def _int64_type() -> Any:
    import pyarrow as pa

    return pa.int64()


def _group_of(text: str) -> tuple[tuple[str, str], ...]:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"dimensions {text[:80]!r} is not JSON: {exc}") from None
    if type(obj) is not dict or not all(type(v) is str for v in obj.values()):
        raise ValueError(f"dimensions {text[:80]!r} is not an object of strings")
    return tuple(obj.items())


def decode_block(payload: bytes) -> ArrowRollupBlock:
    """One rollups-topic record in the Arrow form. Raises ``ValueError`` naming what is
    wrong; never returns a block a loader could misread."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
        table.validate(full=True)  # dictionary indices in range, offsets, UTF-8
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"not an Arrow IPC stream: {exc}") from None
    meta = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
            for k, v in (table.schema.metadata or {}).items()}
    if meta.get("meterline") != FORMAT:
        raise ValueError(f"schema metadata meterline is {meta.get('meterline')!r}, "
                         f"not {FORMAT!r}")
    source, partition, window = meta.get("source"), meta.get("partition", ""), meta.get("window")
    if not source or not window or not partition.lstrip("-").isdigit() or not partition.isascii():
        raise ValueError("schema metadata needs source, window and an integer partition")
    value_field = table.schema.field("value_nano") if "value_nano" in table.schema.names \
        else None
    expected = _schema(value_field.type if value_field is not None
                       and value_field.type in (pa.int64(), pa.string()) else pa.int64())
    got = table.schema.remove_metadata()
    if [(f.name, f.type) for f in got] != [(f.name, f.type) for f in expected]:
        raise ValueError(f"columns {[f'{f.name}: {f.type}' for f in got]} are not "
                         f"{[f'{f.name}: {f.type}' for f in expected]}")
    nulls = [name for name in table.column_names if table.column(name).null_count]
    if nulls:
        raise ValueError(f"null values in {nulls}")
    if table.num_rows:
        for name in _DICT_COLUMNS:
            for chunk in table.column(name).chunks:
                if chunk.dictionary.null_count:
                    raise ValueError(f"null in the {name} dictionary")
    if table.schema.field("value_nano").type == pa.string() and table.num_rows:
        ok = pc.match_substring_regex(table.column("value_nano"), r"^-?[0-9]{1,40}$")
        if not pc.all(ok).as_py():
            raise ValueError("value_nano holds text that is not a decimal integer")
    try:  # one chunk per column (a stream of several batches is unified first)
        table = table.unify_dictionaries().combine_chunks()
        for name in ("meter", "aggregation"):  # each value once in its dictionary
            column = table.column(name).combine_chunks()
            if len(pc.unique(column.dictionary)) != len(column.dictionary):
                table = table.set_column(table.schema.get_field_index(name),
                                         table.schema.field(name),
                                         column.dictionary_decode().dictionary_encode())
        dims = table.column("dimensions").combine_chunks()
    except pa.ArrowException as exc:
        raise ValueError(f"cannot combine the stream's batches: {exc}") from None
    groups = tuple(_group_of(text) for text in dims.dictionary.to_pylist())
    return ArrowRollupBlock(source, int(partition), window, table, groups)
