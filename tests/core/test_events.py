"""Field rules of a usage event: each check names the field it rejects."""

from __future__ import annotations

import dataclasses

import pytest

from meterline.core.errors import InvalidEventError, MeterlineError
from meterline.core.events import (
    MAX_CUSTOMER_LEN,
    MAX_DIMENSION_KEY_LEN,
    MAX_DIMENSION_VALUE_LEN,
    MAX_DIMENSIONS,
    MAX_ID_LEN,
    MAX_METER_LEN,
    MAX_SOURCE_LEN,
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    UsageEvent,
    check_customer,
    check_dimensions,
    check_id,
    check_meter_name,
    check_source,
    check_timestamp_ms,
    is_utf8,
)

TS = 1_700_000_000_000


def _field(exc: pytest.ExceptionInfo[InvalidEventError]) -> str:
    return exc.value.field


def test_usage_event_is_frozen() -> None:
    ev = UsageEvent("id-1", "cust", "api_calls", 10**9, TS)
    assert ev.dimensions == {} and ev.source is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.quantity = 2  # type: ignore[misc]


def test_invalid_event_error_is_a_value_error_naming_the_field() -> None:
    err = InvalidEventError("customer", "bad")
    assert isinstance(err, ValueError) and isinstance(err, MeterlineError)
    assert str(err) == "customer: bad"
    assert (err.field, err.message) == ("customer", "bad")


# -- customer ----------------------------------------------------------------------------
@pytest.mark.parametrize("ok", ["c", "cust-42", "x" * MAX_CUSTOMER_LEN, "kunde-ä-日本"])
def test_customer_ok(ok: str) -> None:
    assert check_customer(ok) is ok


@pytest.mark.parametrize(
    "bad", ["", None, 42, b"cust", "x" * (MAX_CUSTOMER_LEN + 1), "bad\ud800surrogate"]
)
def test_customer_rejected(bad: object) -> None:
    with pytest.raises(InvalidEventError) as exc:
        check_customer(bad)
    assert _field(exc) == "customer"


# -- meter -------------------------------------------------------------------------------
@pytest.mark.parametrize("ok", ["a", "api_calls", "gpu_seconds_v2", "a" * MAX_METER_LEN])
def test_meter_ok(ok: str) -> None:
    assert check_meter_name(ok) == ok


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "API_calls",
        "1abc",
        "_x",
        "api-calls",
        "api calls",
        "a" * (MAX_METER_LEN + 1),
        "api_calls\n",  # "$" would match before a trailing newline
        "a" * MAX_METER_LEN + "\n",
        None,
        ["api_calls"],
        7,
    ],
)
def test_meter_rejected(bad: object) -> None:
    with pytest.raises(InvalidEventError) as exc:
        check_meter_name(bad)
    assert _field(exc) == "meter"


# -- timestamp ---------------------------------------------------------------------------
@pytest.mark.parametrize("ok", [MIN_TIMESTAMP_MS, TS, MAX_TIMESTAMP_MS - 1])
def test_timestamp_ok(ok: int) -> None:
    assert check_timestamp_ms(ok) == ok


@pytest.mark.parametrize(
    "bad",
    [
        MIN_TIMESTAMP_MS - 1,
        MAX_TIMESTAMP_MS,
        1_700_000_000,  # seconds by mistake
        1_700_000_000_000_000,  # microseconds by mistake
        float(TS),
        str(TS),
        True,
        None,
        -1,
    ],
)
def test_timestamp_rejected(bad: object) -> None:
    with pytest.raises(InvalidEventError) as exc:
        check_timestamp_ms(bad)
    assert _field(exc) == "timestamp_ms"


# -- id / source -------------------------------------------------------------------------
@pytest.mark.parametrize("ok", ["k", "x" * MAX_ID_LEN, "order-7/line-2", "ид"])
def test_id_ok(ok: str) -> None:
    assert check_id(ok) == ok


@pytest.mark.parametrize("bad", ["", None, 5, "x" * (MAX_ID_LEN + 1), "\udfff"])
def test_id_rejected(bad: object) -> None:
    with pytest.raises(InvalidEventError) as exc:
        check_id(bad)
    assert _field(exc) == "id"


@pytest.mark.parametrize("ok", [None, "svc", "x" * MAX_SOURCE_LEN])
def test_source_ok(ok: str | None) -> None:
    assert check_source(ok) == ok


@pytest.mark.parametrize("bad", ["", 1, b"svc", "x" * (MAX_SOURCE_LEN + 1), "a\ud800"])
def test_source_rejected(bad: object) -> None:
    # "" too: the envelope's per-event source column refuses empty strings.
    with pytest.raises(InvalidEventError) as exc:
        check_source(bad)
    assert _field(exc) == "source"


# -- dimensions --------------------------------------------------------------------------
def test_dimensions_ok_and_not_copied() -> None:
    dims = {"region": "eu", "endpoint": "/v1/search", "empty": ""}
    assert check_dimensions(dims) is dims
    assert check_dimensions(None) == {}
    assert check_dimensions({}) == {}
    full = {f"k{i}": "v" * MAX_DIMENSION_VALUE_LEN for i in range(MAX_DIMENSIONS)}
    assert check_dimensions(full) is full
    assert check_dimensions({"k" * MAX_DIMENSION_KEY_LEN: "v"})


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ([("a", "b")], "dimensions"),
        ("a=b", "dimensions"),
        ({f"k{i}": "v" for i in range(MAX_DIMENSIONS + 1)}, "dimensions"),
        ({"": "v"}, "dimensions"),
        ({1: "v"}, "dimensions"),
        ({"k" * (MAX_DIMENSION_KEY_LEN + 1): "v"}, "dimensions"),
        ({"k\ud800": "v"}, "dimensions"),
        ({"region": 1}, "dimensions.region"),
        ({"region": None}, "dimensions.region"),
        ({"region": "v" * (MAX_DIMENSION_VALUE_LEN + 1)}, "dimensions.region"),
        ({"region": "\ud800"}, "dimensions.region"),
    ],
)
def test_dimensions_rejected(bad: object, field: str) -> None:
    with pytest.raises(InvalidEventError) as exc:
        check_dimensions(bad)
    assert _field(exc) == field


def test_is_utf8() -> None:
    assert is_utf8("") and is_utf8("abc") and is_utf8("äöü 日本 🙂")
    assert not is_utf8("\ud800") and not is_utf8("ok\udc00")
