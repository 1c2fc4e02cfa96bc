"""The columnar batch fast path (server/fastpath.py) against the per-event path: for every
batch, either the same items or "not sure" (None, and the per-event path decides), never
an acceptance the per-event path would refuse. Through the app, a mixed valid/invalid
batch gets the same problem+json, and a valid one writes the same items, either way.
Last, the serving process's GC settings (gc_tuning.py)."""

from __future__ import annotations

import asyncio
import copy
import gc
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.config import DEFAULT_METERS
from meterline.core.envelope import Batch, decode_batch, encode_batch
from meterline.core.meters import MeterRegistry
from meterline.server import fastpath
from meterline.server.app import Request, ServerApp
from meterline.server.formats import cloudevents, native
from meterline.server.gc_tuning import YOUNG_THRESHOLD, tune_for_serving
from meterline.server.keys import KeyStore
from meterline.server.validation import Validator

REGISTRY = MeterRegistry.load(DEFAULT_METERS)
NOW = 1_764_576_000_000  # 2025-12-01T08:00:00Z
TENANT = "acme"
BATCH = "application/cloudevents-batch+json"


def _ce(i: int, **over: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"specversion": "1.0", "id": f"e{i}", "source": "app",
                             "type": "llm_tokens", "subject": f"c{i % 3}",
                             "time": "2025-12-01T08:00:00.250Z",
                             "data": {"quantity": i + 1, "model": "m1"}}
    event.update(over)
    return event


def _valid_events() -> list[dict[str, Any]]:
    """Every shape the per-event path accepts: mixed meters, absent data/time, string and
    negative-free quantities, int dimensions, partial multi-key dimensions, unique_count,
    a long idempotency key (hashed id), non-ASCII text."""
    return [
        _ce(0),
        _ce(1, time=None, datacontenttype="application/json"),
        _ce(2, data={"quantity": "12.000000001"}),
        _ce(3, type="api_calls", data=None),
        _ce(4, type="api_calls", data={"endpoint": "/v1/x", "quantity": 99}),
        _ce(5, type="api_calls", data={"region": 7, "endpoint": "/v1/y"}),
        _ce(6, type="active_users", data={"user_id": 42}),
        _ce(7, type="storage_gb", data={"quantity": 3, "region": "eu"}),
        _ce(8, id="x" * 128, source="s" * 100),
        _ce(9, subject="kunde-\u00e4\u00f6\u00fc", data={"quantity": 0, "model": "\u6a21\u578b"}),
        _ce(10, time="2025-12-01T09:30:00.123456789+01:30"),
        _ce(11, data={"quantity": 5}),
    ]


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda e: e.pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda e: e.__setitem__(key, value)


def _data(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda e: e["data"].__setitem__(key, value)


# One rule broken per mutation: the CloudEvents reader's, the SDK's field checks, the
# registry's, plus values the JSON parser can produce where a string or int is expected.
MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "no id": _drop("id"), "empty id": _set("id", ""), "int id": _set("id", 7),
    "long id": _set("id", "i" * 129), "no source": _drop("source"),
    "long source": _set("source", "s" * 129), "no subject": _drop("subject"),
    "empty subject": _set("subject", ""), "long subject": _set("subject", "c" * 252),
    "no type": _drop("type"), "bad meter name": _set("type", "Llm"),
    "unknown meter": _set("type", "nope"), "specversion": _set("specversion", "0.3"),
    "specversion int": _set("specversion", 1), "content type": _set("datacontenttype", "text/xml"),
    "data list": _set("data", [1]), "time int": _set("time", 1764576000),
    "time text": _set("time", "yesterday"), "time 1999": _set("time", "1999-12-31T23:59:59Z"),
    "no quantity": lambda e: e["data"].pop("quantity"),
    "null quantity": _data("quantity", None), "bool quantity": _data("quantity", True),
    "negative": _data("quantity", -1),
    "huge": _data("quantity", 10**29), "too precise": _data("quantity", "0.0000000001"),
    "text quantity": _data("quantity", "lots"), "dict dimension": _data("model", {"x": 1}),
    "bool dimension": _data("model", False), "long dimension": _data("model", "m" * 257),
    "null dimension": _data("model", None),
    "unique without value": lambda e: e.update(type="active_users", data={}),
    "lone surrogate": _set("subject", "c\ud800"),
}


def _slow(doc: list[Any]) -> tuple[list[Any], list[Any]]:
    drafts = cloudevents.read(doc, REGISTRY, batch=True)
    return Validator(REGISTRY).items(drafts, TENANT, NOW)


def test_valid_cloudevents_give_the_same_items() -> None:
    doc = _valid_events()
    items, errors = _slow(copy.deepcopy(doc))
    assert errors == []
    assert fastpath.cloudevents_items(doc, REGISTRY, TENANT, NOW) == items
    # Single-meter batches take the column-at-once branch: the same items too.
    same = [_ce(i) for i in range(50)]
    assert fastpath.cloudevents_items(same, REGISTRY, TENANT, NOW) == _slow(same)[0]


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_any_invalid_event_sends_the_batch_to_the_per_event_path(name: str) -> None:
    doc = _valid_events()
    MUTATIONS[name](doc[4 if "unique" in name else 0])
    _, errors = _slow(copy.deepcopy(doc))
    fast = fastpath.cloudevents_items(doc, REGISTRY, TENANT, NOW)
    assert errors, f"mutation {name!r} should be invalid"
    assert fast is None


def test_non_object_events_and_the_empty_batch_are_left_to_the_per_event_path() -> None:
    # A float value is re-read exactly by the per-event path (formats.common.value_of).
    doc = _valid_events()
    doc[0]["data"]["quantity"] = 1.5
    assert fastpath.cloudevents_items(doc, REGISTRY, TENANT, NOW) is None
    assert fastpath.cloudevents_items([_ce(0), "x"], REGISTRY, TENANT, NOW) is None
    assert fastpath.cloudevents_items([], REGISTRY, TENANT, NOW) is None


def _envelope(**over: Any) -> Batch:
    n = 4
    fields: dict[str, Any] = dict(
        batch_id="b" * 20, created_ms=NOW, customers=["c1", "c\u00e4", "c1", "c3"],
        meters=["llm_tokens", "api_calls", "active_users", "compute_seconds"],
        quantities=[5 * 10**9, 10**9, 10**9, 1], timestamps_ms=[NOW] * n,
        ids=[None, "explicit", None, "y" * 128],
        dimensions=[{"model": "m"}, None, {"user_id": "u1"}, {"tier": "t"}],
        sources=[None, "web", None, None], source="sdk")
    fields.update(over)
    return Batch(**fields)


def _slow_envelope(batch: Batch) -> tuple[list[Any], list[Any]]:
    return Validator(REGISTRY).items(native.drafts(batch), TENANT, NOW)


ENVELOPE_MUTATIONS: dict[str, dict[str, Any]] = {
    "empty customer": {"customers": ["", "c", "c", "c"]},
    "long customer": {"customers": ["c" * 252, "c", "c", "c"]},
    "unknown meter": {"meters": ["nope", "api_calls", "active_users", "compute_seconds"]},
    "negative": {"quantities": [-1, 1, 1, 1]},
    "huge": {"quantities": [10**38, 1, 1, 1]},
    "old time": {"timestamps_ms": [NOW, 1, NOW, NOW]},
    "extra dimension": {"dimensions": [{"model": "m", "x": "y"}, None, {"user_id": "u"}, None]},
    "unique without value": {"dimensions": [None, None, {"other": "u"}, None]},
    "no dimensions at all": {"dimensions": None},
    "long implied id": {"batch_id": "b" * 128},
    "empty source": {"source": ""},
    "lone surrogate": {"customers": ["c\ud800", "c", "c", "c"]},
}


def test_envelopes_agree_with_the_per_event_path() -> None:
    batch = decode_batch(encode_batch(_envelope()))
    items, errors = _slow_envelope(batch)
    assert errors == []
    assert fastpath.envelope_items(batch, REGISTRY, TENANT) == items
    for name, over in ENVELOPE_MUTATIONS.items():
        bad = _envelope(**over)
        assert _slow_envelope(bad)[1], f"mutation {name!r} should be invalid"
        assert fastpath.envelope_items(bad, REGISTRY, TENANT) is None, name


class _MemoryWriter:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def write(self, items: list[Any]) -> Future[None]:
        self.items += items
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def close(self) -> None:
        pass


def _post_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, body: bytes,
               ctype: str) -> list[tuple[int, bytes, list[Any]]]:
    """(status, body, written items) with the fast path off, then on."""
    out = []
    tmp_path.mkdir(exist_ok=True)
    keys = KeyStore(tmp_path / "keys.db")
    key, _ = keys.create(TENANT, ["ingest"])
    for flag in ("0", "1"):
        monkeypatch.setenv("METERLINE_SERVER_FASTPATH", flag)
        writer = _MemoryWriter()
        app = ServerApp(registry=REGISTRY, keys=keys, writer=writer, reader=None,
                        quotas=None, openapi={}, clock_ms=lambda: NOW)
        r = asyncio.run(app.handle(Request("POST", path.encode(), b"", {
            "authorization": f"Bearer {key}", "content-type": ctype}, body)))
        out.append((r.status, r.body, writer.items))
    return out


def test_through_the_app_mixed_batches_get_the_same_errors_by_index(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc: list[Any] = _valid_events()
    doc[1]["type"] = "unknown"
    doc[3] = "not an object"
    doc[5]["data"]["region"] = 1.5
    doc[7]["data"]["quantity"] = -2
    doc[9]["time"] = "2025-12-01"
    off, on = _post_both(tmp_path, monkeypatch, "/api/v1/events", orjson.dumps(doc), BATCH)
    assert off == on
    problem = orjson.loads(on[1])
    assert on[0] == 400 and on[2] == []
    assert [(e["index"], e["field"]) for e in problem["errors"]] == [
        (1, "meter"), (3, "event"), (5, "dimensions.region"), (7, "quantity"), (9, "time")]


def test_through_the_app_valid_batches_write_the_same_items(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    off, on = _post_both(tmp_path, monkeypatch, "/api/v1/events",
                         orjson.dumps(_valid_events()), BATCH)
    assert off == on and on[0] == 204 and len(on[2]) == len(_valid_events())
    off, on = _post_both(tmp_path / "n", monkeypatch, "/api/v1/batches",
                         encode_batch(_envelope()), native.ENVELOPE)
    assert off == on and on[0] == 200 and len(on[2]) == 4


_text = st.sampled_from(["a", "", "c\u00e4", "c\ud800", "x" * 128, "x" * 129, "x" * 300])
_any = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.just(10**30), _text,
                 st.just(1.5), st.just({"x": 1}), st.just([1]))
_top = st.sampled_from(["specversion", "id", "source", "subject", "type", "time",
                        "datacontenttype", "data"])
_data_key = st.sampled_from(["quantity", "model", "endpoint", "region", "user_id"])
_values = st.one_of(_any, st.sampled_from(["1.0", "llm_tokens", "api_calls", "active_users",
                                           "2025-12-01T08:00:00Z", "1999-01-01T00:00:00Z",
                                           "application/json", "12.5", 7, {}]))


@st.composite
def _event(draw: st.DrawFn) -> Any:
    """A valid event with up to two changes, each possibly breaking a rule (or not)."""
    event = copy.deepcopy(draw(st.sampled_from(_valid_events())))
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()) and type(event.get("data")) is dict:
            event["data"][draw(_data_key)] = draw(_values)
        elif draw(st.booleans()):
            event.pop(draw(_top), None)
        else:
            event[draw(_top)] = draw(_values)
    return event


@settings(max_examples=250, deadline=None)
@given(st.lists(_event(), min_size=1, max_size=5))
def test_fast_path_never_accepts_what_the_per_event_path_refuses(doc: list[Any]) -> None:
    fast = fastpath.cloudevents_items(copy.deepcopy(doc), REGISTRY, TENANT, NOW)
    if fast is None:
        return  # the per-event path decides: nothing to compare
    items, errors = _slow(doc)
    assert errors == [] and fast == items


def test_gc_tuning_is_applied_once_startup_is_done_and_can_be_turned_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = gc.get_threshold()
    monkeypatch.setenv("METERLINE_SERVER_GC", "default")
    assert not tune_for_serving() and gc.get_threshold() == before
    monkeypatch.delenv("METERLINE_SERVER_GC")
    try:
        assert tune_for_serving()
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
