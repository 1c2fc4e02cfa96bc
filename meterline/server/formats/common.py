"""Helpers shared by the JSON formats: exact JSON numbers, RFC 3339 times, value and
dimension extraction per meter."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from decimal import Decimal
from typing import Any

import orjson

from meterline.core.meters import Aggregation, Meter
from meterline.server.problems import bad_request


class NeedsExactParse(Exception):
    """A JSON float reached a value that must be exact: re-read the body with Decimals."""


def parse_json(body: bytes, *, exact: bool = False) -> Any:
    """orjson (fast) by default; ``exact`` parses floats as Decimal, so ``10000000.123``
    keeps every digit the client wrote (a binary float cannot carry it)."""
    try:
        if exact:
            return json.loads(body, parse_float=Decimal)
        return orjson.loads(body)
    except (orjson.JSONDecodeError, ValueError, RecursionError) as exc:
        raise bad_request(f"body is not valid JSON: {str(exc)[:200]}") from None


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})\Z"
)


@functools.lru_cache(maxsize=65_536)  # events of a batch mostly share a few time strings
def rfc3339_ms(text: str) -> int:
    """UTC milliseconds of an RFC 3339 time, sub-millisecond digits floored (windows are
    ms-aligned, so flooring never moves an event across a window edge it did not cross)."""
    m = _RFC3339.match(text)
    if m is None:
        raise ValueError(f"{text[:64]!r} is not an RFC 3339 time (e.g. 2024-05-01T12:00:00Z)")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7) or "", m.group(8)
    offset = dt.timedelta(0)
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        offset = sign * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    try:
        base = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    except ValueError as exc:
        raise ValueError(f"{text[:64]!r}: {exc}") from None
    seconds = int((base - offset).timestamp())  # whole seconds: exact in a float
    return seconds * 1000 + int((frac + "000")[:3])


def seconds_to_ms(value: object) -> int:
    """Unix seconds (int, Decimal, numeric str) -> ms, floored below a millisecond."""
    if type(value) is int:
        return value * 1000
    if isinstance(value, Decimal | str):
        try:
            dec = Decimal(value)
        except ArithmeticError:
            raise ValueError(f"{str(value)[:64]!r} is not a number of seconds") from None
        if not dec.is_finite():
            raise ValueError("timestamp must be finite")
        return int((dec * 1000).to_integral_value(rounding="ROUND_FLOOR"))
    raise ValueError(f"must be Unix seconds or an ISO 8601 time, got {type(value).__name__}")


def value_of(meter: Meter, data: dict[str, Any]) -> object:
    """The event's quantity per the meter: count and unique_count events count 1 (the
    value of a unique_count is a dimension); the others read ``value_property``."""
    if meter.aggregation in (Aggregation.COUNT, Aggregation.UNIQUE_COUNT):
        return 1
    if meter.value_property not in data:
        raise KeyError(meter.value_property)
    value = data[meter.value_property]
    if type(value) is float:
        raise NeedsExactParse
    return value


def dimensions_of(meter: Meter, data: dict[str, Any]) -> dict[str, str]:
    """The meter's dimensions found in ``data``. Other fields are ignored, as OpenMeter and
    Lago ignore properties no meter reads. Integers become their decimal text (exact);
    anything else that is not a string is passed on for the SDK's check to reject."""
    out: dict[str, Any] = {}
    for key in meter.dimensions:
        if key in data:
            value = data[key]
            out[key] = str(value) if type(value) is int else value
    return out
