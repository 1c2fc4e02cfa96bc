"""The compiled window store (``native_state.NativeRollupState``) read back through every
``RollupState`` method, against the per-event fold's state over the same records.

The equivalence property test (test_columnar_equivalence.py) compares what the two folds
*write* - flushes and checkpoints; here the state's other readers (keys, snapshots,
exports, the daily == merge(hourly) audit, eviction) are checked too, and the paths a
random stream rarely takes: the slow path lifting a compiled window with unflushed
changes, the customer table's compaction, and column blocks through the Kafka writer's
chunking.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from meterline.aggregators.columnar import ColumnarPartitionProcessor, native
from meterline.aggregators.columnar.native_state import NativeRollupState
from meterline.aggregators.outputs_io import CHUNK, decode_outputs, output_records
from meterline.aggregators.processor import PartitionProcessor, RollupSettings
from meterline.core.envelope import Batch, encode_batch
from meterline.core.lateness import PartitionWatermark
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush, RollupBlock
from meterline.core.quantity import MAX_NANOS, SCALE
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.ingest.sources import SourceRecord

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="meterline_native is not built (make install)")

DAY0 = 1_699_920_000_000  # 2023-11-14T00:00:00Z
REGISTRY = MeterRegistry.from_mapping({"meters": {
    "tokens": {"aggregation": "sum", "dimensions": ["model"]},
    "calls": {"aggregation": "count"},
    "peak": {"aggregation": "max", "allow_negative": True},
    "low": {"aggregation": "min", "allow_negative": True},
    "seats": {"aggregation": "latest"},
    "users": {"aggregation": "unique_count", "value_property": "user_id",
              "dimensions": ["user_id"]},
}})
SETTINGS = RollupSettings(allowed_lateness_ms=0, watermark_delay_ms=0)


@pytest.fixture(autouse=True)
def native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_NATIVE", "1")


def records(batches: list[Batch], clock_ms: int) -> list[SourceRecord]:
    return [SourceRecord("usage", 0, i, encode_batch(b), clock_ms)
            for i, b in enumerate(batches)]


def both(batches: list[Batch], clock_ms: int) -> tuple[PartitionProcessor,
                                                         ColumnarPartitionProcessor]:
    ref = PartitionProcessor("usage", 0, REGISTRY, SETTINGS)
    col = ColumnarPartitionProcessor("usage", 0, REGISTRY, SETTINGS)
    assert isinstance(col.state, NativeRollupState)
    recs = records(batches, clock_ms)
    for r in recs:
        ref.process(r)
    assert col.process_many(recs) == len(recs)
    return ref, col


def mixed_batches() -> list[Batch]:
    meters = ["tokens", "calls", "peak", "low", "seats", "users"]
    dims = {"tokens": lambda i: {"model": f"m{i % 2}"},
            "users": lambda i: {"user_id": f"u{i % 7}\u00e9\"{i % 3}"}}
    out = []
    for b in range(6):
        n = 48
        names = [meters[(b + i) % 6] for i in range(n)]
        out.append(Batch(
            f"b{b}", DAY0, [f"c{(b * 7 + i) % 9}" for i in range(n)], names,
            [(i * 37 % 11 - 5) * SCALE if m != "users" else SCALE for i, m in enumerate(names)],
            [DAY0 + ((b * 5 + i) % 30) * HOUR_MS + i for i in range(n)],
            dimensions=[dims[m](i) if m in dims else {} for i, m in enumerate(names)]))
    return out


def rows(flush: Flush) -> list[Any]:
    return sorted(flush.rollup_rows(), key=repr)


def test_every_reader_of_the_state_agrees_with_the_per_event_fold() -> None:
    ref, col = both(mixed_batches(), DAY0 + 40 * HOUR_MS)
    rs, cs = ref.state, col.state
    assert len(cs.store) > 0 and len(cs) == len(rs)  # some windows are compiled
    keys = sorted(rs.window_keys())
    assert sorted(cs.window_keys()) == keys
    assert cs.snapshot(keys) == rs.snapshot(keys)
    assert [cs.export(k) for k in keys] == [rs.export(k) for k in keys]
    assert sorted(cs.totals(keys)) == sorted(rs.totals(keys))
    for k in keys:
        if k.window == "daily":
            assert cs.daily_from_hours(k) == rs.daily_from_hours(k)
    assert cs.max_abs_total() == rs.max_abs_total()
    def as_json(cells: list[list[Any]]) -> list[Any]:  # JSON-ready: compare as JSON
        return sorted(orjson.loads(orjson.dumps(cells)), key=repr)

    assert as_json(cs.export_all()) == as_json(rs.export_all())
    assert as_json(orjson.loads(cs.cells_json())) == as_json(rs.export_all())
    with pytest.raises(KeyError):
        cs.export(("hourly", "nobody", "tokens", (("model", "m0"),), DAY0))
    assert col.pending == ref.pending
    assert rows(col.take_flush()) == rows(ref.take_flush())
    # A checkpoint restores the compiled windows into a compiled store.
    again = ColumnarPartitionProcessor.from_checkpoint(col.checkpoint(), REGISTRY, SETTINGS)
    assert isinstance(again.state, NativeRollupState)
    assert len(again.state.store) == len(cs.store) and len(again.state) == len(rs)
    assert sorted(again.state.window_keys()) == sorted(rs.window_keys())
    assert again.state.snapshot(rs.window_keys()) == rs.snapshot(rs.window_keys())
    # Evict what ends by day 1: the same windows go, in both.
    mark = PartitionWatermark(0, DAY0 + DAY_MS + 3 * HOUR_MS)
    assert sorted(cs.evict_closed(mark)) == sorted(rs.evict_closed(mark))
    assert sorted(cs.window_keys()) == sorted(rs.window_keys())
    assert len(cs) == len(rs)


def test_the_slow_path_lifts_a_compiled_window_with_its_unflushed_changes() -> None:
    """A sum window held compiled, changed and not flushed; then a record whose sum could
    pass the range edge goes through the per-event code, which takes the window over
    (``lift``): the flush carries the window once, with every event, and later column
    runs fold into the Python-held window, not into a second copy."""
    near = MAX_NANOS - 10 * SCALE
    batches = [
        Batch("a", DAY0, ["c1"], ["tokens"], [5 * SCALE], [DAY0 + 10]),
        Batch("b", DAY0, ["c1"], ["tokens"], [near], [DAY0 + 20]),  # the slow path
        Batch("c", DAY0, ["c1"], ["tokens"], [4 * SCALE], [DAY0 + 30]),
        Batch("d", DAY0, ["c1"], ["tokens"], [2 * SCALE], [DAY0 + 40]),  # refused: > MAX
    ]
    ref, col = both(batches, DAY0 + HOUR_MS // 2)
    assert col.stats.slow_events >= 1
    assert col.pending == ref.pending
    got, want = col.take_flush(), ref.take_flush()
    assert rows(got) == rows(want)
    assert {r.value_nanos for r in got.rollup_rows()} == {5 * SCALE + near + 4 * SCALE}
    assert [d.reason for d in got.dead_letters] == [d.reason for d in want.dead_letters]
    assert len(col.state.store) == 0 and len(col.state) == 2  # both windows held in Python


def test_customer_table_is_compacted_when_windows_close() -> None:
    """Customers of evicted windows leave the store's table (it would otherwise grow
    with every customer ever seen); the codes of the customers left are renumbered, and
    their windows keep folding exactly."""
    n = 70_000
    day1 = DAY0 + 3 * DAY_MS
    first = [Batch(f"a{i}", DAY0, [f"c{j}" for j in range(i, i + 1000)], ["tokens"] * 1000,
                   [SCALE] * 1000, [DAY0 + j for j in range(1000)]) for i in range(0, n, 1000)]
    later = [Batch("k1", day1, ["c69999", "c5"], ["tokens"] * 2, [2 * SCALE, 3 * SCALE],
                   [day1 + 1, day1 + 2]),
             Batch("k2", day1, ["c5", "c69999", "new"], ["tokens"] * 3,
                   [7 * SCALE, 11 * SCALE, 13 * SCALE], [day1 + 3, day1 + 4, day1 + 5])]
    ref = PartitionProcessor("usage", 0, REGISTRY, SETTINGS)
    col = ColumnarPartitionProcessor("usage", 0, REGISTRY, SETTINGS)
    state = col.state
    assert isinstance(state, NativeRollupState)
    recs = records(first + later[:1], day1)
    recs.append(SourceRecord("usage", 0, len(recs), encode_batch(later[1]), day1))
    for r in recs[:-2]:
        ref.process(r)
    col.process_many(recs[:-2])
    assert rows(col.take_flush()) == rows(ref.take_flush())
    for r in recs[-2:]:  # the first one moves the watermark past day 0
        ref.process(r)
        col.process_many([r])
        assert rows(col.take_flush()) == rows(ref.take_flush())
    assert len(state.store) == len(ref.state) == 6  # 3 customers x hourly + daily
    assert sorted(col.state.window_keys()) == sorted(ref.state.window_keys())
    assert {r[1]: r[6] for r in state.export_all() if r[0] == "daily"} == {
        "c69999": 13 * SCALE, "c5": 10 * SCALE, "new": 13 * SCALE}


def test_column_blocks_go_through_the_kafka_writer_in_chunks() -> None:
    """A compiled store's block of more than CHUNK rows, a total past int64 among them,
    leaves as several Arrow records that decode to the same rows."""
    n = 2 * CHUNK + 7
    block = RollupBlock(
        "usage", 3, ["hourly"] * n, [f"c{i}" for i in range(n)], ["tokens"] * n,
        [(("model", "m"),)] * n, [DAY0] * n, [DAY0 + HOUR_MS] * n, ["sum"] * n,
        [i * SCALE if i != 5 else 2**70 for i in range(n)], [1] * n, [1] * n)
    out = list(output_records(Flush(rollup_blocks=[block])))
    assert [kind for kind, _, _ in out] == ["rollups"] * 3
    assert {key for _, key, _ in out} == {"usage/3"}
    decoded, bad = decode_outputs([SourceRecord("usage.rollups", 0, i, payload, 0)
                                   for i, (_, _, payload) in enumerate(out)])
    assert bad == []
    assert decoded.rollup_rows() == block.records()


def test_open_windows_can_be_counted_from_another_thread_while_the_fold_merges() -> None:
    """The metrics scrape reads len(state) from its own thread; the store's merge runs with
    the GIL released and the store mutably borrowed. The count must never raise (it did:
    "Already mutably borrowed", a /metrics 500 under load)."""
    import threading

    col = ColumnarPartitionProcessor("usage", 0, REGISTRY, SETTINGS)
    state = col.state
    assert isinstance(state, NativeRollupState)
    n = 4000
    recs = [SourceRecord("usage", 0, k, encode_batch(Batch(
        f"b{k}", DAY0, [f"c{(k * n + i) % 50_000}" for i in range(n)], ["tokens"] * n,
        [SCALE] * n, [DAY0 + i for i in range(n)], ids=[f"e{k}-{i}" for i in range(n)],
        dimensions=[{"model": f"m{i % 3}"} for i in range(n)])),
        DAY0 + n) for k in range(60)]
    done = threading.Event()
    errors: list[BaseException] = []

    def fold() -> None:
        try:
            for r in recs:
                col.process_many([r])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=fold)
    thread.start()
    overlaps, counts = 0, []
    while not done.is_set():
        try:
            len(state.store)  # the raw store: refuses during a merge
        except RuntimeError:
            overlaps += 1
        counts.append(len(state))  # never raises
    thread.join()
    assert not errors
    assert len(state) == len(state.store) > 0 and counts
    if overlaps == 0:
        pytest.skip("the scrape never overlapped a merge on this run (the machine's timing)")


def test_store_buffers_encode_the_same_arrow_rows_as_the_lists() -> None:
    """The compiled store hands its flushed rows twice: as lists (every reader) and as
    buffers (dictionary codes, int columns) that the Arrow encoder slices without a Python
    object per value. Both encodings decode to the same rows, chunk by chunk, Python-held
    windows and a total past int64 (lists only) included."""
    import dataclasses

    from meterline.sinks.rollup_arrow import decode_block, encode_block

    ref, col = both(mixed_batches(), DAY0 + 40 * HOUR_MS)
    flush = col.take_flush()
    assert rows(flush) == rows(ref.take_flush())
    assert flush.rollup_blocks and any(b.buffers_rows for b in flush.rollup_blocks)
    for block in flush.rollup_blocks:
        bare = dataclasses.replace(block, buffers=None, buffers_rows=0)
        for lo in range(0, len(block), 7):  # chunks inside and across the buffered rows
            hi = min(lo + 7, len(block))
            fast, slow = encode_block(block, lo, hi), encode_block(bare, lo, hi)
            assert decode_block(fast).records() == decode_block(slow).records() == \
                block.records()[lo:hi]
    # a total past int64 in the store: its block's buffers step aside for the lists
    big = ColumnarPartitionProcessor("usage", 0, REGISTRY, SETTINGS)
    for i, r in enumerate(records([  # a run's sum stays below 2**62: the store folds it
            Batch(f"big{i}", DAY0, ["c"], ["tokens"], [2**61], [DAY0 + i],
                  dimensions=[{"model": "m"}]) for i in range(5)], DAY0 + 5)):
        assert big.process_many([r]) == 1 and i < 5
    [*blocks] = big.take_flush().rollup_blocks
    assert blocks and all(b.buffers_rows for b in blocks)
    for block in blocks:
        assert decode_block(encode_block(block)).records() == block.records()
        assert block.records()[0].value_nanos == 5 * 2**61 > 2**63
        assert block.buffers["columns"] is None  # the lists were read
