"""Batch envelope v1: encode/decode round trips and every rejection reason."""

from __future__ import annotations

import ast
import copy
import inspect
import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from meterline.core import envelope
from meterline.core.envelope import (
    MAX_BATCH_EVENTS,
    MAX_ENVELOPE_BYTES,
    REASONS,
    VERSION,
    Batch,
    decode_batch,
    encode_batch,
)
from meterline.core.errors import EnvelopeError
from meterline.core.events import (
    MAX_CUSTOMER_LEN,
    MAX_DIMENSIONS,
    MAX_ID_LEN,
    MAX_METER_LEN,
    MAX_SOURCE_LEN,
    UsageEvent,
)
from meterline.core.ids import id_timestamp_ms
from meterline.core.partitioning import partition_for
from meterline.core.quantity import INT64_MAX, INT64_MIN

TS = 1_700_000_000_000
BID = "01HF0000000000000000000000"


def make_batch(n: int = 3, **kw: Any) -> Batch:
    fields: dict[str, Any] = dict(
        batch_id=BID,
        created_ms=TS + 5,
        customers=[f"cust-{i}" for i in range(n)],
        meters=["api_calls"] * n,
        quantities=[(i + 1) * 10**9 for i in range(n)],
        timestamps_ms=[TS + i for i in range(n)],
    )
    fields.update(kw)
    return Batch(**fields)


def doc_of(batch: Batch) -> dict[str, Any]:
    return orjson.loads(encode_batch(batch))


def valid_doc() -> dict[str, Any]:
    return {
        "v": 1,
        "batch_id": BID,
        "created_ms": TS,
        "count": 2,
        "customer": ["a", "b"],
        "meter": ["api_calls", "api_calls"],
        "quantity": [1, 2],
        "timestamp_ms": [TS, TS],
    }


def reason_of(data: object) -> str:
    with pytest.raises(EnvelopeError) as exc:
        decode_batch(data)
    assert exc.value.reason in REASONS
    return exc.value.reason


# -- round trips -------------------------------------------------------------------------
def test_minimal_round_trip_and_wire_shape() -> None:
    batch = make_batch()
    data = encode_batch(batch)
    doc = orjson.loads(data)
    assert doc == {
        "v": VERSION,
        "batch_id": BID,
        "created_ms": TS + 5,
        "count": 3,
        "customer": ["cust-0", "cust-1", "cust-2"],
        "meter": ["api_calls"] * 3,
        "quantity": [10**9, 2 * 10**9, 3 * 10**9],
        "timestamp_ms": [TS, TS + 1, TS + 2],
    }
    back = decode_batch(data)
    assert back == batch
    assert len(back) == 3
    assert decode_batch(bytearray(data)) == batch
    assert decode_batch(memoryview(data)) == batch


def test_implied_ids() -> None:
    batch = make_batch(ids=[None, "explicit-1", None])
    back = decode_batch(encode_batch(batch))
    assert back.event_ids() == [f"{BID}-0", "explicit-1", f"{BID}-2"]
    # All-None ids are left off the wire entirely.
    plain = make_batch(ids=[None, None, None])
    assert "id" not in doc_of(plain)
    assert decode_batch(encode_batch(plain)).event_ids() == [f"{BID}-{i}" for i in range(3)]
    # Implied ids are the same on every decode (resend) of the same bytes.
    data = encode_batch(plain)
    assert decode_batch(data).event_ids() == decode_batch(data).event_ids()


def test_dimensions_round_trip() -> None:
    dims: list[dict[str, str] | None] = [{"region": "eu", "plan": "pro"}, None, {}]
    batch = make_batch(dimensions=dims)
    back = decode_batch(encode_batch(batch))
    assert back.event_dimensions() == [{"region": "eu", "plan": "pro"}, {}, {}]
    assert "dimensions" not in doc_of(make_batch(dimensions=[None, {}, None]))


def test_sources_round_trip() -> None:
    batch = make_batch(source="svc-a", sources=[None, "svc-b", None])
    doc = doc_of(batch)
    assert doc["source"] == "svc-a"
    assert doc["event_source"] == [None, "svc-b", None]
    back = decode_batch(encode_batch(batch))
    assert back.event_sources() == ["svc-a", "svc-b", "svc-a"]
    no_source = decode_batch(encode_batch(make_batch()))
    assert no_source.event_sources() == [None, None, None]


def test_quantities_beyond_int64_travel_as_strings() -> None:
    qs = [INT64_MAX, INT64_MAX + 1, INT64_MIN, INT64_MIN - 1, 10**37, -(10**37)]
    batch = make_batch(n=len(qs), quantities=qs)
    doc = doc_of(batch)
    assert doc["quantity"] == [
        INT64_MAX,
        str(INT64_MAX + 1),
        INT64_MIN,
        str(INT64_MIN - 1),
        str(10**37),
        str(-(10**37)),
    ]
    back = decode_batch(encode_batch(batch))
    assert back.quantities == qs
    assert all(type(q) is int for q in back.quantities)


def test_events_view() -> None:
    batch = make_batch(
        n=2,
        ids=["k1", None],
        dimensions=[{"region": "eu"}, None],
        sources=[None, "svc-b"],
        source="svc-a",
    )
    events = list(decode_batch(encode_batch(batch)).events())
    assert events == [
        UsageEvent("k1", "cust-0", "api_calls", 10**9, TS, {"region": "eu"}, "svc-a"),
        UsageEvent(f"{BID}-1", "cust-1", "api_calls", 2 * 10**9, TS + 1, {}, "svc-b"),
    ]


def test_unicode_round_trip() -> None:
    batch = make_batch(n=1, customers=["kunde-日本-🙂"], dimensions=[{"städt": "Zürich"}])
    assert decode_batch(encode_batch(batch)).customers == ["kunde-日本-🙂"]


def test_limits_are_inclusive() -> None:
    batch = make_batch(
        n=1,
        batch_id="b" * MAX_ID_LEN,
        customers=["c" * MAX_CUSTOMER_LEN],
        meters=["m" * MAX_METER_LEN],
        ids=["i" * MAX_ID_LEN],
        source="s" * MAX_SOURCE_LEN,
        sources=["s" * MAX_SOURCE_LEN],
        dimensions=[{f"k{i}": "v" * 256 for i in range(MAX_DIMENSIONS)}],
    )
    assert decode_batch(encode_batch(batch)) == batch


def test_unknown_keys_are_ignored() -> None:
    doc = valid_doc()
    doc["future_field"] = {"x": 1}
    assert len(decode_batch(orjson.dumps(doc))) == 2


def test_empty_customer_and_meter_pass_structural_check() -> None:
    # Per-event faults: dead-lettered one by one downstream, not the whole batch.
    doc = valid_doc()
    doc["customer"] = ["", "b"]
    doc["meter"] = ["api_calls", ""]
    assert decode_batch(orjson.dumps(doc)).customers == ["", "b"]


# -- rejections --------------------------------------------------------------------------
def mutated(**changes: Any) -> bytes:
    doc = valid_doc()
    for key, value in changes.items():
        if value is _DROP:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()  # stdlib json: writes ints beyond 64 bits as-is


_DROP = object()

REJECTIONS: list[tuple[str, object]] = [
    ("not_bytes", "a str is not bytes"),
    ("not_bytes", None),
    ("not_bytes", valid_doc()),
    ("malformed_json", b""),
    ("malformed_json", b"{"),
    ("malformed_json", b"\xff\xfe"),
    ("malformed_json", b'{"v": NaN}'),
    ("malformed_json", b'{"customer": ["\\ud800"]}'),
    ("malformed_json", b"[" * 2000 + b"]" * 2000),
    ("not_an_object", b"[]"),
    ("not_an_object", b"1"),
    ("not_an_object", b'"text"'),
    ("not_an_object", b"null"),
    ("unsupported_version", mutated(v=_DROP)),
    ("unsupported_version", mutated(v=2)),
    ("unsupported_version", mutated(v=True)),
    ("unsupported_version", mutated(v=1.0)),
    ("unsupported_version", mutated(v="1")),
    ("bad_batch_id", mutated(batch_id=_DROP)),
    ("bad_batch_id", mutated(batch_id="")),
    ("bad_batch_id", mutated(batch_id=7)),
    ("bad_batch_id", mutated(batch_id="b" * (MAX_ID_LEN + 1))),
    ("bad_created_ms", mutated(created_ms=_DROP)),
    ("bad_created_ms", mutated(created_ms=-1)),
    ("bad_created_ms", mutated(created_ms=1.5)),
    ("bad_created_ms", mutated(created_ms=True)),
    ("bad_created_ms", mutated(created_ms="1")),
    ("bad_count", mutated(count=_DROP)),
    ("bad_count", mutated(count=0)),
    ("bad_count", mutated(count=-2)),
    ("bad_count", mutated(count=MAX_BATCH_EVENTS + 1)),
    ("bad_count", mutated(count=2.0)),
    ("bad_count", mutated(count=True)),
    ("bad_source", mutated(source=1)),
    ("bad_source", mutated(source="s" * (MAX_SOURCE_LEN + 1))),
    ("bad_source", mutated(source=["svc"])),
    ("bad_producer", mutated(producer="sdk-1")),  # seq missing
    ("bad_producer", mutated(seq=3)),  # producer missing
    ("bad_producer", mutated(producer="", seq=3)),
    ("bad_producer", mutated(producer="sdk-1", seq=-1)),
    ("bad_producer", mutated(producer="sdk-1", seq="3")),
    ("bad_column", mutated(count=3)),  # count disagrees with the columns
    ("bad_column", mutated(customer=_DROP)),
    ("bad_column", mutated(customer="a")),
    ("bad_column", mutated(customer=["a", 1])),
    ("bad_column", mutated(customer=["a", None])),
    ("bad_column", mutated(customer=["a", "c" * (MAX_CUSTOMER_LEN + 1)])),
    ("bad_column", mutated(meter=["api_calls"])),
    ("bad_column", mutated(meter=["api_calls", "m" * (MAX_METER_LEN + 1)])),
    ("bad_column", mutated(quantity=[1, 1.5])),
    ("bad_column", mutated(quantity=[1, True])),
    ("bad_column", mutated(quantity=[1, None])),
    ("bad_column", mutated(quantity=[1, "1.5"])),
    ("bad_column", mutated(quantity=[1, "--5"])),
    ("bad_column", mutated(quantity=[1, "-"])),
    ("bad_column", mutated(quantity=[1, ""])),
    ("bad_column", mutated(quantity=[1, " 5"])),
    ("bad_column", mutated(quantity=[1, "١٢"])),  # non-ASCII digits
    ("bad_column", mutated(quantity=[1, "9" * 61])),
    ("bad_column", mutated(quantity=[1, 2**64])),  # orjson reads it as a float
    ("bad_column", mutated(timestamp_ms=[TS, -1])),
    ("bad_column", mutated(timestamp_ms=[TS, 2**63])),
    ("bad_column", mutated(timestamp_ms=[TS, float(TS)])),
    ("bad_column", mutated(timestamp_ms=[TS, str(TS)])),
    ("bad_column", mutated(timestamp_ms=[TS, True])),
    ("bad_column", mutated(id=None)),
    ("bad_column", mutated(id=["k"])),
    ("bad_column", mutated(id=["k", ""])),
    ("bad_column", mutated(id=["k", 5])),
    ("bad_column", mutated(id=["k", "i" * (MAX_ID_LEN + 1)])),
    ("bad_column", mutated(event_source=["s", ""])),
    ("bad_column", mutated(event_source=["s", 1])),
    ("bad_column", mutated(event_source=None)),
    ("bad_column", mutated(dimensions=None)),
    ("bad_column", mutated(dimensions=[{}, []])),
    ("bad_column", mutated(dimensions=[{}, "a=b"])),
    ("bad_column", mutated(dimensions=[{}, {"": "v"}])),
    ("bad_column", mutated(dimensions=[{}, {"k" * 65: "v"}])),
    ("bad_column", mutated(dimensions=[{}, {"k": 1}])),
    ("bad_column", mutated(dimensions=[{}, {"k": None}])),
    ("bad_column", mutated(dimensions=[{}, {"k": "v" * 257}])),
    ("bad_column", mutated(dimensions=[{}, {f"k{i}": "v" for i in range(MAX_DIMENSIONS + 1)}])),
]


@pytest.mark.parametrize(("reason", "data"), REJECTIONS)
def test_rejection_reason(reason: str, data: object) -> None:
    assert reason_of(data) == reason


def test_too_large() -> None:
    data = b" " * (MAX_ENVELOPE_BYTES + 1)
    assert reason_of(data) == "too_large"


def test_every_reason_is_reachable() -> None:
    covered = {reason for reason, _ in REJECTIONS} | {"too_large"}
    assert covered == set(REASONS)


def test_reasons_lists_every_reason_the_decoder_raises() -> None:
    # Every EnvelopeError("<reason>", ...) literal in envelope.py must be in REASONS, so a
    # dead-letter consumer can rely on the list.
    tree = ast.parse(inspect.getsource(envelope))
    raised = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "EnvelopeError"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert raised == set(REASONS)
    assert len(REASONS) == len(set(REASONS))


def test_envelope_error_carries_reason_and_detail() -> None:
    with pytest.raises(EnvelopeError) as exc:
        decode_batch(mutated(count=0))
    assert exc.value.reason == "bad_count"
    assert "count" in exc.value.detail
    assert str(exc.value).startswith("bad_count: ")
    assert isinstance(exc.value, ValueError)


def test_decoder_does_not_mutate_or_share_input_semantics() -> None:
    doc = valid_doc()
    snapshot = copy.deepcopy(doc)
    decode_batch(orjson.dumps(doc))
    assert doc == snapshot


# -- docs/envelope.md --------------------------------------------------------------------
DOC = Path(__file__).resolve().parents[2] / "docs" / "envelope.md"


def _json_blocks() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    return re.findall(r"```json\n(.*?)```", text, flags=re.S)


def test_documented_examples_decode() -> None:
    full, minimal = _json_blocks()
    batch = decode_batch(full.encode())
    events = list(batch.events())
    assert [(e.id, e.customer, e.meter, e.quantity, e.source) for e in events] == [
        ("01JD2Z8Y3K4M5N6P7Q8R9S0T1V-0", "initech", "api_calls", 10**9, "checkout-service"),
        ("inv-2024-11-0042", "umbrella", "storage_gb", 12_500_000_000, "checkout-service"),
        ("01JD2Z8Y3K4M5N6P7Q8R9S0T1V-2", "initech", "tokens", 1, "batch-job"),
        (
            "01JD2Z8Y3K4M5N6P7Q8R9S0T1V-3",
            "umbrella",
            "credits",
            12345678901234567890123456789,
            "checkout-service",
        ),
    ]
    assert events[0].dimensions == {"endpoint": "/v1/search", "region": "eu"}
    assert {partition_for(c, 12) for c in batch.customers} == {6}  # as the doc says
    assert id_timestamp_ms(batch.batch_id) == batch.created_ms
    assert len(decode_batch(minimal.strip().encode())) == 1


def test_documented_reasons_match_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.M))
    assert set(REASONS) <= table
    assert {
        r for r in table if r.startswith(("not_", "bad_", "too_", "malformed", "unsupported"))
    } == set(REASONS)


def test_producer_and_seq_round_trip() -> None:
    batch = Batch("b", 1, ["c"], ["m"], [1], [1], producer="sdk-1", seq=41)
    back = decode_batch(encode_batch(batch))
    assert (back.producer, back.seq) == ("sdk-1", 41)
    assert decode_batch(encode_batch(Batch("b", 1, ["c"], ["m"], [1], [1]))).producer is None
