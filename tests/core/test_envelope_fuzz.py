"""Fuzzing decode_batch: it raises nothing but EnvelopeError, with a reason from REASONS."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterline.core.envelope import REASONS, Batch, decode_batch, encode_batch
from meterline.core.errors import EnvelopeError
from meterline.core.events import (
    MAX_CUSTOMER_LEN,
    MAX_DIMENSION_VALUE_LEN,
    MAX_ID_LEN,
    MAX_SOURCE_LEN,
)
from meterline.core.quantity import MAX_NANOS

# Sized so the whole file runs in well under 20 s.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(FUZZ, max_examples=150)

COLUMNS = ("customer", "meter", "quantity", "timestamp_ms", "id", "dimensions", "event_source")
KEYS = ("v", "batch_id", "created_ms", "count", "source", *COLUMNS)


def check_decode(data: object) -> Batch | None:
    """Decode; the only allowed failure is EnvelopeError with a known reason. A decoded
    batch must be internally consistent and re-encodable."""
    try:
        batch = decode_batch(data)
    except EnvelopeError as exc:
        assert exc.reason in REASONS, exc.reason
        return None
    n = len(batch)
    assert n >= 1
    for col in (batch.customers, batch.meters, batch.quantities, batch.timestamps_ms):
        assert len(col) == n
    for opt in (batch.ids, batch.dimensions, batch.sources):
        assert opt is None or len(opt) == n
    assert all(type(q) is int for q in batch.quantities)
    assert all(type(t) is int and t >= 0 for t in batch.timestamps_ms)
    events = list(batch.events())
    assert len(events) == n
    assert len(set(batch.event_ids())) <= n
    # Whatever the decoder accepts, a consumer can re-encode (e.g. a dead-letter writer).
    again = decode_batch(encode_batch(batch))
    assert list(again.events()) == events
    return batch


# -- (a) arbitrary input -----------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    check_decode(data)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@FUZZ
@given(json_values)
def test_arbitrary_json(value: Any) -> None:
    check_decode(json.dumps(value).encode())


@FUZZ
@given(st.one_of(json_values, st.builds(bytearray, st.binary(max_size=64)), st.integers()))
def test_arbitrary_python_objects(value: Any) -> None:
    check_decode(value)


# -- (b) structured mutations of valid envelopes -----------------------------------------
TS = 1_700_000_000_000

garbage = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # includes huge ints beyond 64 bits (written by stdlib json)
    st.integers(min_value=2**63 - 3, max_value=2**64 + 3),
    st.floats(),  # NaN and infinities too (written as NaN / Infinity literals)
    st.sampled_from(
        [
            "NaN",
            "nan",
            "Infinity",
            "-Infinity",
            "1e309",
            "-0",
            "0x10",
            "1_000",
            "--5",
            "-",
            "",
            " 1",
            "1.5",
            "١٢",
            "9" * 61,
            "9" * 60,
            "-" + "9" * 59,
            "\u0000",
            "null",
        ]
    ),
    st.text(max_size=300),
    json_values,
    st.lists(json_values, max_size=4),
    st.dictionaries(st.text(max_size=70), json_values, max_size=20),
)


@st.composite
def valid_docs(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(min_value=1, max_value=6))
    doc: dict[str, Any] = {
        "v": 1,
        "batch_id": draw(st.text(min_size=1, max_size=30)),
        "created_ms": draw(st.integers(min_value=0, max_value=2**63 - 1)),
        "count": n,
        "customer": draw(st.lists(st.text(max_size=10), min_size=n, max_size=n)),
        "meter": draw(
            st.lists(st.sampled_from(["api_calls", "tokens", ""]), min_size=n, max_size=n)
        ),
        "quantity": draw(
            st.lists(
                st.integers(min_value=-(2**63), max_value=2**63 - 1)
                | st.integers(min_value=-MAX_NANOS, max_value=MAX_NANOS).map(str),
                min_size=n,
                max_size=n,
            )
        ),
        "timestamp_ms": draw(st.lists(st.integers(0, 2**63 - 1), min_size=n, max_size=n)),
    }
    if draw(st.booleans()):
        doc["id"] = draw(
            st.lists(st.none() | st.text(min_size=1, max_size=12), min_size=n, max_size=n)
        )
    if draw(st.booleans()):
        doc["dimensions"] = draw(
            st.lists(
                st.none()
                | st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3),
                min_size=n,
                max_size=n,
            )
        )
    if draw(st.booleans()):
        doc["event_source"] = draw(
            st.lists(st.none() | st.text(min_size=1, max_size=8), min_size=n, max_size=n)
        )
    if draw(st.booleans()):
        doc["source"] = draw(st.text(max_size=8))
    return doc


def dumps(doc: Any) -> bytes:
    # stdlib json with surrogatepass: may write lone surrogates, huge ints, NaN/Infinity.
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


@FUZZ
@given(valid_docs())
def test_valid_docs_decode(doc: dict[str, Any]) -> None:
    try:
        data = orjson.dumps(doc)
    except orjson.JSONEncodeError:  # lone surrogates drawn by st.text
        data = dumps(doc)
    batch = check_decode(data)
    if batch is not None:
        assert len(batch) == doc["count"]
        assert batch.quantities == [int(q) for q in doc["quantity"]]


mutation = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("replace"), st.sampled_from(KEYS), garbage),
    st.tuples(st.just("element"), st.sampled_from(COLUMNS), garbage),
    st.tuples(st.just("truncate"), st.sampled_from(COLUMNS), st.none()),
    st.tuples(st.just("extend"), st.sampled_from(COLUMNS), garbage),
    st.tuples(st.just("count"), st.just("count"), st.integers(-2, 10) | garbage),
    st.tuples(st.just("add"), st.text(max_size=10), garbage),
    st.tuples(st.just("dimension"), st.text(max_size=70), garbage),
)


def _small_count(doc: dict[str, Any]) -> int:
    count = doc.get("count")
    return count if type(count) is int and 1 <= count <= 8 else 1


def apply(doc: dict[str, Any], op: str, key: str, value: Any) -> None:
    if op == "drop":
        doc.pop(key, None)
    elif op in ("replace", "count", "add"):
        doc[key] = value
    elif op in ("element", "truncate", "extend"):
        col = doc.get(key)
        if not isinstance(col, list):
            count = doc.get("count")
            doc[key] = [value] * (count if type(count) is int and 0 <= count <= 8 else 1)
            return
        if op == "element" and col:
            col[len(col) // 2] = value
        elif op == "truncate":
            if col:
                col.pop()
        else:
            col.append(value)
    elif op == "dimension":
        dims = doc.get("dimensions")
        if not isinstance(dims, list) or not dims:
            dims = doc["dimensions"] = [None] * _small_count(doc)
        if not isinstance(dims[0], dict):
            dims[0] = {}
        dims[0][key] = value


@FUZZ
@given(valid_docs(), st.lists(mutation, min_size=1, max_size=4))
def test_mutated_docs_never_crash(doc: dict[str, Any], mutations: list[Any]) -> None:
    for op, key, value in mutations:
        if not isinstance(doc.get("count"), int) or isinstance(doc.get("count"), bool):
            doc["count"] = 1
        apply(doc, op, key, value)
    check_decode(dumps(doc))


@FUZZ
@given(valid_docs(), st.integers(min_value=0, max_value=10**6), st.binary(max_size=4))
def test_byte_level_corruption(doc: dict[str, Any], pos: int, junk: bytes) -> None:
    data = bytearray(dumps(doc))
    i = pos % (len(data) + 1)
    data[i : i + len(junk)] = junk
    check_decode(bytes(data))


# -- (c) round trip ----------------------------------------------------------------------
safe_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12
)  # no lone surrogates: not encodable as UTF-8


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    n = draw(st.integers(min_value=1, max_value=8))

    def column(strategy: st.SearchStrategy[Any]) -> list[Any]:
        return draw(st.lists(strategy, min_size=n, max_size=n))

    def maybe() -> bool:
        return draw(st.booleans())

    return Batch(
        batch_id=draw(safe_text.filter(bool)),
        created_ms=draw(st.integers(min_value=0, max_value=2**63 - 1)),
        customers=column(safe_text.filter(lambda s: 0 < len(s) <= MAX_CUSTOMER_LEN)),
        meters=column(st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z")),
        quantities=column(
            st.integers(min_value=-MAX_NANOS, max_value=MAX_NANOS)
            | st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2)
            | st.integers(min_value=2**63 - 2, max_value=2**63 + 2)
            | st.integers(-(10**12), 10**12)
        ),
        timestamps_ms=column(st.integers(min_value=0, max_value=2**63 - 1)),
        ids=column(st.none() | safe_text.filter(lambda s: 0 < len(s) <= MAX_ID_LEN))
        if maybe()
        else None,
        dimensions=column(
            st.none()
            | st.dictionaries(
                safe_text.filter(bool),
                safe_text.filter(lambda s: len(s) <= MAX_DIMENSION_VALUE_LEN),
                max_size=4,
            )
        )
        if maybe()
        else None,
        sources=column(st.none() | safe_text.filter(lambda s: 0 < len(s) <= MAX_SOURCE_LEN))
        if maybe()
        else None,
        source=draw(st.none() | safe_text),
    )


@ROUND_TRIP
@given(batches())
def test_round_trip(batch: Batch) -> None:
    data = encode_batch(batch)
    back = decode_batch(data)
    assert back.batch_id == batch.batch_id
    assert back.created_ms == batch.created_ms
    assert back.customers == batch.customers
    assert back.meters == batch.meters
    assert back.quantities == batch.quantities
    assert back.timestamps_ms == batch.timestamps_ms
    assert back.source == batch.source
    assert back.event_ids() == batch.event_ids()
    assert back.event_dimensions() == batch.event_dimensions()
    assert back.event_sources() == batch.event_sources()
    assert list(back.events()) == list(batch.events())
    assert sum(back.quantities) == sum(batch.quantities)
    # Encoding is a pure function of the batch: the decoded batch encodes to the same bytes.
    assert encode_batch(back) == data


def test_float_garbage_does_not_sneak_in() -> None:
    # A sanity check on the helper: NaN in a column is malformed JSON for orjson.
    assert math.isnan(json.loads(dumps({"x": float("nan")}))["x"])
    check_decode(dumps({"v": 1, "quantity": [float("nan")]}))
