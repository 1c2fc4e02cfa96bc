"""The columnar fold against the per-event fold (the reference), output for output.

Hypothesis draws one partition's records - resent batches, producer sequences, explicit
ids reused within and across batches, every aggregation, invalid events of every reason,
events too late and too far ahead, quantities past int64 and sums past Decimal(38, 9),
unreadable envelopes, log clocks that step back or are missing - and random fetch
boundaries. Both processors see the same records and flush at the same points; every
flush (rollup rows, dead letters, late events), the pending counts, the counters and the
checkpoints must be equal (bytes, or with the compiled window store the same cells in
another order), also after both restore from their checkpoint mid-stream.

``METERLINE_HYPOTHESIS_EXAMPLES`` raises the number of examples (default keeps
``make test`` fast).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.aggregators.columnar import ColumnarPartitionProcessor, native
from meterline.aggregators.processor import PartitionProcessor, RollupSettings
from meterline.core.envelope import Batch, encode_batch
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import Flush
from meterline.core.quantity import MAX_NANOS, SCALE
from meterline.core.windows import HOUR_MS
from meterline.ingest.sources import SourceRecord

EXAMPLES = int(os.environ.get("METERLINE_HYPOTHESIS_EXAMPLES", "150"))


@pytest.fixture(autouse=True, params=["native", "numpy"])
def builder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: columns from the compiled builder (native/, what production
    runs) and from the numpy one (the fallback without it)."""
    if request.param == "native":
        assert native.available(), "meterline_native is not built: run `make install`"
    monkeypatch.setenv("METERLINE_NATIVE", "1" if request.param == "native" else "0")
    return str(request.param)


DAY0 = 1_699_920_000_000  # 2023-11-14T00:00:00Z
REGISTRY = MeterRegistry.from_mapping({"meters": {
    "tokens": {"aggregation": "sum", "dimensions": ["model"]},
    "credits": {"aggregation": "sum", "allow_negative": True},
    "calls": {"aggregation": "count", "dimensions": ["endpoint", "region"]},
    "peak": {"aggregation": "max", "dimensions": ["region"]},
    "low": {"aggregation": "min", "allow_negative": True},
    "seats": {"aggregation": "latest"},
    "users": {"aggregation": "unique_count", "value_property": "user_id",
              "dimensions": ["user_id", "plan"]},
}})
METERS = ["tokens", "credits", "calls", "peak", "low", "seats", "users", "nope"]
DIMS = {"tokens": ["model"], "credits": [], "calls": ["endpoint", "region"],
        "peak": ["region"], "low": [], "seats": [], "users": ["user_id", "plan"], "nope": []}

quantities = st.one_of(
    st.integers(-3, 5).map(lambda u: u * SCALE),
    st.integers(-10**12, 10**12),
    st.sampled_from([2**61, -(2**61), 2**63 - 1, 2**63, 10**37, 6 * 10**37, -(6 * 10**37),
                     MAX_NANOS, MAX_NANOS + 1]),
)
# A few hours (hour starts and ends included, so events sit exactly on the lateness
# boundary and share times for latest's tie-break) and the two days they span: the
# watermark moves and closes some of them. Plus times out of range or too far ahead.
timestamps = st.one_of(
    st.builds(lambda h, m: DAY0 + 20 * HOUR_MS + h * HOUR_MS + m,
              st.integers(0, 6), st.sampled_from([0, 0, 1, 30 * 60_000, HOUR_MS - 1])),
    st.integers(0, 8 * HOUR_MS).map(lambda off: DAY0 + 20 * HOUR_MS + off),
    st.sampled_from([0, 946_684_799_999, DAY0 + 40 * HOUR_MS, 2**32 * 1000]),
)


@st.composite
def events(draw: Any) -> dict[str, Any]:
    meter = draw(st.sampled_from(METERS))
    dims: dict[str, str] | None = None
    shape = draw(st.sampled_from(["none", "empty", "valid", "valid", "partial", "bad"]))
    if shape == "empty":
        dims = {}
    elif shape in ("valid", "partial"):
        names = DIMS[meter] if shape == "valid" else DIMS[meter][:1]
        dims = {n: draw(st.sampled_from(["a", "b", ""])) for n in names}
    elif shape == "bad":
        dims = {"colour": "red"}
    return {
        "customer": draw(st.sampled_from(["c1", "c1", "c2", ""])),
        "meter": meter,
        "qty": draw(quantities),
        "ts": draw(timestamps),
        "id": draw(st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3", "k4"]))),
        "dims": dims,
    }


@st.composite
def streams(draw: Any) -> tuple[list[SourceRecord], list[int], int | None, RollupSettings]:
    """Records of one partition, the fetch sizes, and where to checkpoint and restore."""
    payloads: list[bytes] = []
    records: list[SourceRecord] = []
    clock = DAY0 + 21 * HOUR_MS
    n_records = draw(st.integers(1, 20))
    for offset in range(n_records):
        kind = draw(st.sampled_from(["new", "new", "new", "seq", "resend", "garbage"]))
        if kind == "resend" and payloads:
            payload = draw(st.sampled_from(payloads))
        elif kind == "garbage":
            payload = draw(st.sampled_from([b"{", b"[]", b'{"v": 1}', b"\xff"]))
        else:
            evs = draw(st.lists(events(), min_size=1, max_size=12))
            batch = Batch(
                f"b{offset}", DAY0 + 23 * HOUR_MS,
                [e["customer"] for e in evs], [e["meter"] for e in evs],
                [e["qty"] for e in evs], [e["ts"] for e in evs],
                ids=[e["id"] for e in evs], dimensions=[e["dims"] for e in evs],
                producer="p1" if kind == "seq" else None,
                seq=draw(st.integers(0, 3)) if kind == "seq" else None)
            payload = encode_batch(batch)
            payloads.append(payload)
        step = draw(st.sampled_from([0, 60_000, 20 * 60_000, HOUR_MS, -HOUR_MS]))
        clock += step
        stamp = -1 if draw(st.integers(0, 19)) == 0 else clock  # no log time at all
        records.append(SourceRecord("usage", 0, offset, payload, stamp))
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=n_records))
    restore_at = draw(st.one_of(st.none(), st.integers(0, len(sizes))))
    config = RollupSettings(
        allowed_lateness_ms=draw(st.sampled_from([0, HOUR_MS, 2 * HOUR_MS])),
        watermark_delay_ms=draw(st.sampled_from([0, 60_000, HOUR_MS])),
        dedupe_horizon_ms=draw(st.sampled_from([1, 30 * 60_000, 24 * HOUR_MS])))
    return records, sizes, restore_at, config


def fetches(records: list[SourceRecord], sizes: list[int]) -> list[list[SourceRecord]]:
    out, i, k = [], 0, 0
    while i < len(records):
        size = sizes[k % len(sizes)]
        out.append(records[i:i + size])
        i, k = i + size, k + 1
    return out


def view(flush: Flush) -> tuple[list[Any], list[Any], list[Any]]:
    # Rollups come from a set of changed windows: their order carries no meaning.
    return sorted(flush.rollup_rows(), key=repr), flush.dead_letters, flush.late


def same_checkpoint(col: bytes, ref: bytes) -> bool:
    """Equal blobs, but for the order of the cells: the compiled window store lists its
    windows after the Python-held ones, and restore does not depend on the order."""
    def doc(blob: bytes) -> Any:
        d = json.loads(zlib.decompress(blob))
        d["cells"] = sorted(d["cells"], key=repr)
        return d
    return col == ref or doc(col) == doc(ref)


def run_both(records: list[SourceRecord], sizes: list[int], restore_at: int | None,
             config: RollupSettings) -> tuple[ColumnarPartitionProcessor, list[Flush]]:
    """Both folds over the same fetches; the columnar processor and the flushes."""
    flushes = []
    ref = PartitionProcessor("usage", 0, REGISTRY, config)
    col = ColumnarPartitionProcessor("usage", 0, REGISTRY, config)
    for n, fetch in enumerate(fetches(records, sizes)):
        if n == restore_at:
            blob = ref.checkpoint()
            assert same_checkpoint(col.checkpoint(), blob)
            ref_delta, col_delta = ref.take_id_delta(), col.take_id_delta()
            assert col_delta == ref_delta
            ref = PartitionProcessor.from_checkpoint(blob, REGISTRY, config,
                                                     id_deltas=[ref_delta])
            col = ColumnarPartitionProcessor.from_checkpoint(blob, REGISTRY, config,
                                                             id_deltas=[col_delta])
        for record in fetch:
            assert ref.process(record)
        assert col.process_many(fetch) == len(fetch)
        assert col.pending == ref.pending
        flushes.append(ref.take_flush())
        assert view(col.take_flush()) == view(flushes[-1])
        assert col.counters == ref.counters
    assert same_checkpoint(col.checkpoint(), ref.checkpoint())
    assert col.take_id_delta() == ref.take_id_delta()
    return col, flushes


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(streams())
def test_columnar_fold_equals_per_event_fold(stream: Any) -> None:
    run_both(*stream)


def test_replay_from_any_offset_skips_what_the_state_holds() -> None:
    """A fetch that starts below next_offset (a re-delivery) is skipped record by record,
    and one past a gap stops at the gap, as ``process`` does."""
    batch = Batch("b0", DAY0, ["c1"], ["tokens"], [SCALE], [DAY0 + 10 * HOUR_MS])
    records = [SourceRecord("usage", 0, i, encode_batch(batch), DAY0 + 11 * HOUR_MS)
               for i in range(4)]
    col = ColumnarPartitionProcessor("usage", 0, REGISTRY)
    assert col.process_many(records[:2]) == 2
    assert col.process_many(records[:3]) == 3  # 0 and 1 skipped, 2 folded
    assert col.counters.skipped_records == 2
    assert col.process_many([records[3], records[3]]) == 2
    assert col.next_offset == 4
    gap = SourceRecord("usage", 0, 6, encode_batch(batch), DAY0 + 11 * HOUR_MS)
    assert col.process_many([gap]) == 0
    assert col.next_offset == 4


def test_workload_slow_path_share() -> None:
    """The usage_log workload takes the column path for all its events (no quantity past
    int64, no sum near the range edge); only explicit ids are deduped one by one."""
    from meterline.config import DEFAULT_METERS
    from meterline.testing.usage_log import usage_records

    registry = MeterRegistry.load(DEFAULT_METERS)
    start = DAY0 + 5 * HOUR_MS
    records = [SourceRecord("usage", 0, i, r.payload, start + 10_000 * i) for i, r in
               enumerate(usage_records(20_000, 200, 1, start_ms=start,
                                       events_per_batch=500, ms_per_batch=20_000))]
    ref = PartitionProcessor("usage", 0, registry)
    col = ColumnarPartitionProcessor("usage", 0, registry)
    for i in range(0, len(records), 7):
        for record in records[i:i + 7]:
            ref.process(record)
        col.process_many(records[i:i + 7])
        assert view(col.take_flush()) == view(ref.take_flush())
    assert same_checkpoint(col.checkpoint(), ref.checkpoint())
    assert col.stats.slow_events == col.stats.slow_records == 0
    c = ref.counters
    assert col.stats.run_events == c.accepted + c.duplicate + c.late + c.rejected
    assert 0 < col.stats.ordered_events < col.stats.run_events / 10


def _records(*batches: Batch) -> list[SourceRecord]:
    return [SourceRecord("usage", 0, i, encode_batch(b), DAY0 + 11 * HOUR_MS)
            for i, b in enumerate(batches)]


def test_sum_window_at_the_range_edge_refuses_the_event_that_would_leave_it(builder: str) -> None:
    """A window at MAX_NANOS (put there by a record the per-event path folds: its
    quantity is past int64), then small int64 quantities: the one that would take the
    total out of Decimal(38, 9) is a dead letter, the ones after it count. Without the
    bound the column path would have summed them all."""
    at = DAY0 + 10 * HOUR_MS
    records = _records(
        Batch("b0", DAY0, ["c1"], ["credits"], [MAX_NANOS], [at]),
        Batch("b1", DAY0, ["c1", "c1", "c1"], ["credits"] * 3, [1, -5, 1], [at] * 3),
    )
    col, flushes = run_both(records, [2], None, RollupSettings())
    # b0's quantity travels as a string: the native decoder leaves the record to the
    # per-event fold whole; b1 does not fit next to the window's total.
    assert (col.stats.slow_records, col.stats.slow_events) == (
        (1, 3) if builder == "native" else (0, 4))
    assert [d.reason for d in flushes[0].dead_letters] == ["event.window_total_out_of_range"]
    assert {r.value_nanos for r in flushes[0].rollups} == {MAX_NANOS - 4}


def test_latest_breaks_a_time_tie_by_event_id_then_quantity() -> None:
    at = DAY0 + 10 * HOUR_MS
    records = _records(Batch("b0", DAY0, ["c1"] * 4, ["seats"] * 4,
                             [7 * SCALE, 3 * SCALE, 9 * SCALE, 1 * SCALE],
                             [at, at + 5, at + 5, at + 5], ids=["z", "b", "c", "a"]))
    col, flushes = run_both(records, [1], None, RollupSettings())
    assert col.stats.slow_events == 0
    # ("c" > "b" > "a") among the events at +5; "z" is older
    assert {r.window: r.value_nanos for r in flushes[0].rollups} == {
        "hourly": 9 * SCALE, "daily": 9 * SCALE}


def test_windows_ending_exactly_at_the_watermark() -> None:
    """An hour ending exactly at the watermark is late but allowed; with no allowed
    lateness it is closed, and its event goes to the late events."""
    h = DAY0 + 10 * HOUR_MS
    records = _records(Batch("b0", DAY0, ["c1"], ["tokens"], [SCALE], [h]),
                       Batch("b1", DAY0, ["c1"], ["tokens"], [SCALE], [h - 1]))
    col, flushes = run_both(records, [2], None, RollupSettings(watermark_delay_ms=0))
    assert (col.counters.accepted, col.counters.late_allowed, col.counters.late) == (2, 1, 0)
    col, flushes = run_both(records, [2], None,
                            RollupSettings(watermark_delay_ms=0, allowed_lateness_ms=0))
    assert (col.counters.accepted, col.counters.late) == (1, 1)
    assert [r.window_start_ms for r in flushes[0].late] == [h - HOUR_MS]
