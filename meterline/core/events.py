"""The usage event and its field rules.

An event says: customer C used Q units of meter M at time T (UTC ms), optionally split by a
few dimensions. ``quantity`` is exact nano-units (see ``quantity.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from meterline.core.errors import InvalidEventError

# Limits keep one event small and one dimension group meaningful. They are part of the wire
# contract (docs/envelope.md), so a change is a contract change.
MAX_ID_LEN = 128
MAX_CUSTOMER_LEN = 256
MAX_METER_LEN = 64
MAX_SOURCE_LEN = 256
MAX_DIMENSIONS = 16
MAX_DIMENSION_KEY_LEN = 64
MAX_DIMENSION_VALUE_LEN = 256
# Event time must be a plausible UTC epoch in ms: 2000-01-01 (inclusive) up to the end of
# ClickHouse DateTime, 2^32 s = 2106-02-07T06:28:16Z (exclusive). Seconds or microseconds
# passed by mistake fall outside and are rejected instead of billed in 1970. The upper end
# is what storage can hold: TTLs and dashboards compute toDateTime(intDiv(ms, 1000)), which
# a later time would overflow. The fold, the raw stage and the SDK all check these bounds.
MIN_TIMESTAMP_MS = 946_684_800_000
MAX_TIMESTAMP_MS = 2**32 * 1000  # 4_294_967_296_000

# \Z, not $: "$" also matches before a trailing newline, which let "api_calls\n" through.
METER_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")


def is_utf8(text: str) -> bool:
    """True when ``text`` can be encoded as UTF-8 (no lone surrogates such as "\\ud800").
    Such a string cannot be written to the envelope; letting it into a batch would make the
    whole batch unencodable."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class UsageEvent:
    id: str
    customer: str
    meter: str
    quantity: int  # nano-units, exact
    timestamp_ms: int
    dimensions: dict[str, str] = field(default_factory=dict)
    source: str | None = None


def check_customer(customer: object) -> str:
    if type(customer) is not str or not customer:
        raise InvalidEventError("customer", f"must be a non-empty str, got {customer!r}")
    if len(customer) > MAX_CUSTOMER_LEN:
        raise InvalidEventError("customer", f"longer than {MAX_CUSTOMER_LEN} characters")
    if not is_utf8(customer):
        raise InvalidEventError("customer", "must be valid Unicode (no lone surrogates)")
    return customer


def check_meter_name(meter: object) -> str:
    if type(meter) is not str or not METER_NAME_RE.match(meter):
        raise InvalidEventError(
            "meter", f"must match {METER_NAME_RE.pattern} (lowercase snake_case), got {meter!r}"
        )
    return meter


def check_timestamp_ms(ts: object) -> int:
    if type(ts) is not int:
        raise InvalidEventError("timestamp_ms", f"must be int UTC milliseconds, got {ts!r}")
    if not MIN_TIMESTAMP_MS <= ts < MAX_TIMESTAMP_MS:
        raise InvalidEventError(
            "timestamp_ms", f"{ts} is not UTC milliseconds from 2000-01-01 to 2106-02-07"
        )
    return ts


def check_id(event_id: object) -> str:
    if (
        type(event_id) is not str
        or not event_id
        or len(event_id) > MAX_ID_LEN
        or not is_utf8(event_id)
    ):
        raise InvalidEventError("id", f"must be a non-empty str of <= {MAX_ID_LEN} characters")
    return event_id


def check_source(source: object) -> str | None:
    if source is None:
        return None
    # Non-empty: the envelope's per-event source column rejects "" (as it does for ids).
    if (
        type(source) is not str
        or not source
        or len(source) > MAX_SOURCE_LEN
        or not is_utf8(source)
    ):
        raise InvalidEventError(
            "source", f"must be a non-empty str of <= {MAX_SOURCE_LEN} characters"
        )
    return source


def check_dimensions(dimensions: object) -> dict[str, str]:
    """Validate a dimension map; returns it unchanged (no copy on the hot path)."""
    if dimensions is None:
        return {}
    if type(dimensions) is not dict:
        raise InvalidEventError("dimensions", f"must be a dict[str, str], got {dimensions!r}")
    if len(dimensions) > MAX_DIMENSIONS:
        raise InvalidEventError("dimensions", f"more than {MAX_DIMENSIONS} keys")
    for key, value in dimensions.items():
        if (
            type(key) is not str
            or not key
            or len(key) > MAX_DIMENSION_KEY_LEN
            or not is_utf8(key)
        ):
            raise InvalidEventError(
                "dimensions", f"key {key!r} must be a str of 1..{MAX_DIMENSION_KEY_LEN} chars"
            )
        if type(value) is not str or len(value) > MAX_DIMENSION_VALUE_LEN or not is_utf8(value):
            raise InvalidEventError(
                f"dimensions.{key}", f"value must be a str of <= {MAX_DIMENSION_VALUE_LEN} chars"
            )
    return dimensions
