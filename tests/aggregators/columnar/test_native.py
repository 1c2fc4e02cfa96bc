"""The compiled decoder (native/) against ``decode_batch``: whatever it takes, the Python
reader takes too, with the same values; whatever the SDK writes, it takes.

The fold's exactness rests on the first property: a record the native decoder refuses is
folded by the per-event reference code (which then refuses or takes it the Python way),
so the only way to be wrong is to *accept* something differently. Hypothesis mutates
valid envelopes field by field (wrong types, nulls, big and negative numbers, lengths at
and past each limit, wrong column lengths, escapes, non-ASCII, duplicate keys, a top
level that is not an object) and checks every accepted one column by column.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.aggregators.columnar import native
from meterline.core.envelope import Batch, decode_batch, encode_batch
from meterline.core.errors import EnvelopeError
from meterline.core.meters import MeterRegistry

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="meterline_native is not built (make install)")

REGISTRY = MeterRegistry.from_mapping({"meters": {
    "tokens": {"aggregation": "sum", "dimensions": ["model"]},
    "users": {"aggregation": "unique_count", "value_property": "user_id",
              "dimensions": ["user_id", "plan"]},
}})
WEIRD = [None, True, False, 0, -1, 1, 1.5, 2**63 - 1, 2**63, 2**64, -(2**63), "", "x",
         "x" * 64, "x" * 65, "x" * 128, "x" * 129, "é" * 256, "é" * 257, "\ud800", [], {},
         [None], ["a"], {"a": 1}, {"a": "b"}, "1", "-5"]
weird = st.sampled_from(WEIRD).map(copy.deepcopy)  # drawn lists and dicts get mutated


def _valid(n: int) -> dict[str, Any]:
    return {
        "v": 1, "batch_id": "01HZBATCH", "created_ms": 1_700_000_000_000, "count": n,
        "customer": [f"c{i % 3}" for i in range(n)],
        "meter": ["tokens" if i % 2 else "users" for i in range(n)],
        "quantity": [i * 1_000_000_000 - 7 for i in range(n)],
        "timestamp_ms": [1_700_000_000_000 + i for i in range(n)],
        "id": [None if i % 2 else f"id-{i}" for i in range(n)],
        "dimensions": [None if i % 3 == 0 else {"model": "m", "user_id": f"u{i}"}
                       for i in range(n)],
        "event_source": [None] * n, "source": "svc", "producer": "p", "seq": 3,
    }


@st.composite
def mutated(draw: Any) -> bytes:
    n = draw(st.integers(1, 4))
    doc: Any = _valid(n)
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(sorted(doc)))
        action = draw(st.sampled_from(["set", "drop", "element", "length", "dims"]))
        if action == "set":
            doc[field] = draw(weird)
        elif action == "drop":
            doc.pop(field)
        elif action == "element" and isinstance(doc.get(field), list) and doc[field]:
            doc[field][draw(st.integers(0, len(doc[field]) - 1))] = draw(weird)
        elif action == "length" and isinstance(doc.get(field), list):
            doc[field] = doc[field] + doc[field][:1] if draw(st.booleans()) else doc[field][1:]
        elif action == "dims" and isinstance(doc.get("dimensions"), list) and doc["dimensions"]:
            i = draw(st.integers(0, len(doc["dimensions"]) - 1))
            key = draw(st.sampled_from(["model", "user_id", "plan", "", "k" * 65, "é"]))
            old = doc["dimensions"][i]
            entry = dict(old) if isinstance(old, dict) else {}
            entry[key] = draw(weird)
            if draw(st.booleans()):
                entry.update({f"extra{j}": "v" for j in range(draw(st.integers(1, 17)))})
            doc["dimensions"][i] = entry
    if draw(st.integers(0, 20)) == 0:
        doc = list(doc.values())
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    if draw(st.integers(0, 10)) == 0 and isinstance(doc, dict) and doc:
        key = draw(st.sampled_from(sorted(doc)))  # the same key twice: orjson keeps the last
        text = "{" + json.dumps(key) + ": " + json.dumps(draw(weird)) + ", " + text[1:]
    return text.encode("utf-8", "surrogatepass")


def _columns(nc: native.NativeColumns, batch: Any) -> list[tuple[Any, ...]]:
    cols = nc.columns([batch], [1_700_000_000_000], {})
    return [(cols.customers[c], cols.meters[m], q, t, i)
            for c, m, q, t, i in zip(cols.customer.tolist(), cols.meter.tolist(),
                                     cols.quantity.tolist(), cols.timestamp.tolist(),
                                     cols.ids, strict=True)]


def _agrees(nc: native.NativeColumns, payload: bytes) -> bool:
    got = nc.decode(payload)
    try:
        want: Batch | None = decode_batch(payload)
    except EnvelopeError:
        want = None
    if got is None:
        return want is None
    assert want is not None, f"native took what decode_batch refuses: {payload[:300]!r}"
    assert (got.batch_id, got.created_ms, got.producer, got.seq, got.source, len(got)) == (
        want.batch_id, want.created_ms, want.producer, want.seq, want.source, len(want))
    assert got.abs_sum == sum(abs(q) for q in want.quantities)
    assert got.max_timestamp == max(want.timestamps_ms)
    ids = want.ids if want.ids is not None else [None] * len(want)
    assert _columns(nc, got) == list(zip(want.customers, want.meters, want.quantities,
                                         want.timestamps_ms, ids, strict=True))
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_native_takes_only_what_decode_batch_takes_with_the_same_values(payload: bytes) -> None:
    _agrees(native.NativeColumns(REGISTRY), payload)


def test_native_takes_what_the_sdk_writes() -> None:
    nc = native.NativeColumns(REGISTRY)
    batches = [
        Batch("b1", 5, ["c1", "c2"], ["tokens", "users"], [1, -2], [10, 20]),
        Batch("b2", 5, ["ç\u00e9\U0001f600" * 50], ["tokens"], [2**63 - 1], [2**40],
              ids=["x" * 128], dimensions=[{"model": "\"quoted\"\n"}], source="s" * 256,
              producer="p", seq=0),
        Batch("b3", 5, [""], [""], [0], [0], sources=["web"]),
    ]
    for batch in batches:
        payload = encode_batch(batch)
        assert nc.decode(payload) is not None, payload
        assert _agrees(nc, payload)
    doc = json.loads(encode_batch(batches[0]))
    assert nc.decode(b"  \n" + json.dumps(doc).encode()) is not None  # leading whitespace
    assert nc.decode(bytearray(encode_batch(batches[0]))) is None  # left to the Python reader


def test_native_verdicts_and_groups_match_the_numpy_builder() -> None:
    """The same run through both builders gives the same Columns."""
    from meterline.aggregators.columnar.columns import build_columns, quantities_of

    batches = [Batch(f"b{k}", 5, ["c1", "", "c2", "c1", "c1", "c2"],
                     ["tokens", "tokens", "users", "users", "nope", "tokens"],
                     [1, 2, 3, -4, 5, 6],
                     [1_700_000_000_000, 1_700_000_000_000, 1, 1_700_000_000_000,
                      1_700_000_000_000, 1_700_003_600_000],
                     ids=[None, "a", None, None, None, None],
                     dimensions=[{"model": "m1"}, None, {"user_id": "u1"}, {"user_id": ""},
                                 {"x": "y"}, {"colour": "red"} if k else {}])
               for k in range(3)]
    nc = native.NativeColumns(REGISTRY)
    natives = [nc.decode(encode_batch(b)) for b in batches]
    now = [1_700_000_100_000] * 3
    got = nc.columns(natives, now, {})
    want = build_columns(batches, [quantities_of(b).values for b in batches],  # type: ignore[union-attr]
                         now, REGISTRY, {})
    for name in ("starts", "batch_ids", "ids", "unique_values", "customers", "meters",
                 "groups", "max_timestamp"):
        assert getattr(got, name) == getattr(want, name), name
    for name in ("record", "position", "quantity", "timestamp", "hour_start", "customer",
                 "meter", "group", "reason", "has_id"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), name
