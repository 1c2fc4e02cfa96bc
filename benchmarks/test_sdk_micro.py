"""Micro-benchmarks of the SDK hot path and the envelope codec.

Every figure is read next to a baseline measured in the same run (machines here are shared
and noisy): compare ratios, not nanoseconds.

    make bench          # or: .venv/bin/python -m pytest benchmarks --benchmark-only
"""

from __future__ import annotations

import collections
import random

import orjson
import pytest

from meterline.core.envelope import Batch, decode_batch, encode_batch
from meterline.sdk import Emitter, MemoryTransport

CALLS = 10_000  # per benchmark round; results are per round, divide by CALLS per call
BATCH = 2_000


@pytest.fixture
def idle_emitter(tmp_path):
    # A linger of a minute keeps the background thread asleep, so we time emit() alone.
    em = Emitter(transport=MemoryTransport(4), spool_dir=tmp_path / "spool",
                 linger_ms=60_000, max_buffered_events=50_000_000)
    em.emit("cust-1", "api_calls", 1)
    yield em
    em._buffer.clear()
    em.close(timeout=1)


def test_baseline_function_append(benchmark):
    """The floor: a Python function with emit's signature that only appends a tuple."""
    buf: collections.deque = collections.deque()

    def emit(customer, meter, quantity=1, *, timestamp_ms=None, dimensions=None, id=None,
             source=None):
        buf.append((customer, meter, quantity, timestamp_ms, dimensions, id, source))

    def run():
        for _ in range(CALLS):
            emit("cust-1", "api_calls", 1)
        buf.clear()

    benchmark(run)


def test_emit_int_quantity(benchmark, idle_emitter):
    emit = idle_emitter.emit

    def run():
        for _ in range(CALLS):
            emit("cust-1", "api_calls", 1)
        idle_emitter._buffer.clear()

    benchmark(run)


def test_emit_float_with_dimensions(benchmark, idle_emitter):
    emit = idle_emitter.emit
    dims = {"endpoint": "/v1/search", "region": "eu"}

    def run():
        for _ in range(CALLS):
            emit("cust-1", "llm_tokens", 0.25, dimensions=dims)
        idle_emitter._buffer.clear()

    benchmark(run)


def test_emit_durable(benchmark, tmp_path):
    em = Emitter(transport=MemoryTransport(4), spool_dir=tmp_path / "durable",
                 durability="durable", linger_ms=60_000)

    def run():
        for _ in range(100):
            em.emit("cust-1", "api_calls", 1)

    benchmark(run)
    em.close(timeout=5)


def _batch(n: int) -> Batch:
    rnd = random.Random(1)
    return Batch(
        batch_id="01JC0000000000000000000000",
        created_ms=1_700_000_000_000,
        customers=[f"cust-{rnd.randrange(500)}" for _ in range(n)],
        meters=[rnd.choice(["api_calls", "llm_tokens"]) for _ in range(n)],
        quantities=[rnd.randrange(1, 10**12) for _ in range(n)],
        timestamps_ms=[1_700_000_000_000 + i for i in range(n)],
        ids=[None] * n,
        dimensions=[{"endpoint": "/v1/search"} if i % 2 else None for i in range(n)],
    )


def test_encode_columnar(benchmark):
    batch = _batch(BATCH)
    benchmark(encode_batch, batch)


def test_decode_columnar(benchmark):
    payload = encode_batch(_batch(BATCH))
    benchmark(decode_batch, payload)


def test_decode_row_objects_baseline(benchmark):
    """Layout baseline: the same events as one JSON object per event, parsed with orjson
    and checked field by field. Shows what the columnar layout saves."""
    b = _batch(BATCH)
    rows = [
        {"id": None, "customer": c, "meter": m, "quantity": q, "timestamp_ms": t, "dimensions": d}
        for c, m, q, t, d in zip(b.customers, b.meters, b.quantities, b.timestamps_ms,
                                 b.dimensions or [], strict=True)
    ]
    payload = orjson.dumps({"v": 1, "batch_id": b.batch_id, "events": rows})

    def decode_rows():
        doc = orjson.loads(payload)
        out = []
        for ev in doc["events"]:
            if type(ev["customer"]) is not str or type(ev["quantity"]) is not int:
                raise ValueError
            out.append((ev["customer"], ev["meter"], ev["quantity"], ev["timestamp_ms"]))
        return out

    benchmark(decode_rows)
