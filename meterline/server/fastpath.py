"""Columnar fast path for batch ingest: a CloudEvents batch or a native envelope -> the
validated SDK items, column by column, without a ``Draft`` or a validator call per event.

Why: the per-event path (formats -> ``Draft`` -> ``Validator.item``) costs ~17 us of
Python per CloudEvent after the JSON parse (docs/server.md, Performance), most of it in
calls and small objects per event; the checks themselves are cheap when they run over a
column in C (``set(map(type, col))``, ``min``/``max``, ``list.count``, one ``str.join``).

Contract, which keeps validation exactly the per-event path's:
- The fast path never decides an error. ``*_items`` return the items only when every
  event of the request passes every check below; otherwise None, and the caller runs the
  per-event path on the same request, which accepts or reports each invalid event by
  index as before (so an invalid batch pays both: the fast path is for the common case).
- Each check is a sufficient condition for the per-event rule it mirrors (named in a
  comment beside it): whatever the fast path accepts, the per-event path accepts too,
  with the same items (same tuples, same order), which tests/server/test_server_fastpath.py
  compares on valid, mixed and hostile batches.
- Any surprise (a ``TypeError``/``ValueError`` from a value of an unexpected shape) also
  means "not sure": None, and the per-event path decides.

``METERLINE_SERVER_FASTPATH=0`` turns it off (ingest_api.py), for the benchmark's same-run
before/after ratio and as an escape hatch.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain, repeat
from typing import Any

from meterline.core.envelope import Batch
from meterline.core.events import (
    MAX_DIMENSION_KEY_LEN,
    MAX_DIMENSION_VALUE_LEN,
    MAX_DIMENSIONS,
    MAX_ID_LEN,
    MAX_SOURCE_LEN,
    MAX_TIMESTAMP_MS,
    METER_NAME_RE,
    MIN_TIMESTAMP_MS,
)
from meterline.core.meters import Aggregation, Meter, MeterRegistry
from meterline.core.quantity import MAX_NANOS, MAX_UNITS, SCALE, to_nanos
from meterline.sdk.batching import Item
from meterline.server.formats.common import rfc3339_ms
from meterline.server.tenancy import SEPARATOR, max_customer_len, scoped_id

__all__ = ["cloudevents_items", "envelope_items"]

_MISSING: Any = object()  # "key absent" in a column read with dict.get(d, key, _MISSING)
_JSON_DATA = "application/json"
_SPECVERSION = "1.0"


def cloudevents_items(doc: list[Any], registry: MeterRegistry, tenant: str,
                      now_ms: int) -> list[Item] | None:
    """The items of a parsed CloudEvents batch (``cloudevents.read`` + ``Validator``), or
    None when the per-event path must decide."""
    try:
        return _cloudevents_items(doc, registry, tenant, now_ms)
    except (TypeError, ValueError):
        return None


def envelope_items(batch: Batch, registry: MeterRegistry, tenant: str) -> list[Item] | None:
    """The items of a decoded native envelope (``native.read`` + ``Validator``), or None."""
    try:
        return _envelope_items(batch, registry, tenant)
    except (TypeError, ValueError):
        return None


def _cloudevents_items(doc: list[Any], registry: MeterRegistry, tenant: str,
                       now_ms: int) -> list[Item] | None:
    n = len(doc)
    if not n or set(map(type, doc)) != {dict}:  # "must be a JSON object (a CloudEvent)"
        return None

    def column(name: str) -> list[Any]:
        return list(map(dict.get, doc, repeat(name)))

    # cloudevents._draft: the required attributes are non-empty strings; specversion 1.0.
    if column("specversion").count(_SPECVERSION) != n:
        return None
    ids, sources, types, subjects = (column(k) for k in ("id", "source", "type", "subject"))
    if not all(_nonempty_strs(c) for c in (ids, sources, types, subjects)):
        return None
    content = column("datacontenttype")
    if content.count(None) + content.count(_JSON_DATA) != n:
        return None
    datas = column("data")
    data_types = set(map(type, datas))
    if not data_types <= {dict, type(None)}:
        return None
    if type(None) in data_types:
        datas = [{} if d is None else d for d in datas]  # absent data reads as {}
    timestamps = _event_times(column("time"), now_ms)
    if timestamps is None:
        return None
    # Validator.item: customer (check_customer, tenant limit), id parts (check_id) and
    # source (check_source on source[:256]; check_id already bounds it to 128).
    if (max(map(len, subjects)) > max_customer_len(tenant)
            or max(map(len, ids)) > MAX_ID_LEN or max(map(len, sources)) > MAX_ID_LEN
            or not _utf8(chain(subjects, ids, sources))):
        return None
    quantities, dimensions = _by_meter(types, datas, registry)
    if quantities is None or dimensions is None:
        return None
    prefix = tenant + SEPARATOR
    # tenancy.scoped_id, its common case (short parts) inlined, the rest hashed by it.
    keys = [f"{prefix}v{len(s)}:{s}{len(i)}:{i}" for s, i in zip(sources, ids, strict=True)]
    if max(map(len, keys)) > MAX_ID_LEN:
        keys = [k if len(k) <= MAX_ID_LEN else scoped_id(tenant, s, i)
                for k, s, i in zip(keys, sources, ids, strict=True)]
    customers = [prefix + s for s in subjects]
    return list(zip(customers, types, quantities, timestamps, dimensions, keys, sources,
                    strict=True))


def _event_times(times: list[Any], now_ms: int) -> list[int] | None:
    """``time`` -> UTC ms (absent: the receive time, which is not range-checked, as in
    ``Validator.item``); None unless every present time is an RFC 3339 string within
    ``check_timestamp_ms``'s range."""
    kinds = set(map(type, times))
    if kinds == {str}:
        parsed = list(map(rfc3339_ms, times))  # ValueError: the caller's None
        present = parsed
    elif kinds <= {str, type(None)}:
        present = [rfc3339_ms(t) for t in times if t is not None]
        parsed = [now_ms if t is None else rfc3339_ms(t) for t in times]
    else:
        return None
    if present and (min(present) < MIN_TIMESTAMP_MS or max(present) >= MAX_TIMESTAMP_MS):
        return None
    return parsed


def _by_meter(types: list[str], datas: list[dict[str, Any]], registry: MeterRegistry
              ) -> tuple[list[int] | None, list[dict[str, str] | None] | None]:
    """Quantity and dimension columns, each meter's events read by that meter's rules."""
    meters = {}
    for name in set(types):  # check_meter_name, then "is not defined"
        meter = registry.get(name) if METER_NAME_RE.match(name) else None
        if meter is None or not _meter_fits(meter):
            return None, None
        meters[name] = meter
    if len(meters) == 1:
        return _meter_columns(meters[types[0]], datas)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(types):
        groups.setdefault(name, []).append(i)
    quantities: list[int] = [0] * len(types)
    dimensions: list[dict[str, str] | None] = [None] * len(types)
    for name, rows in groups.items():
        qs, dims = _meter_columns(meters[name], [datas[i] for i in rows])
        if qs is None or dims is None:
            return None, None
        for i, q, d in zip(rows, qs, dims, strict=True):
            quantities[i] = q
            dimensions[i] = d
    return quantities, dimensions


def _meter_fits(meter: Meter) -> bool:
    """The meter's own dimension keys pass check_dimensions (they are the only keys
    ``dimensions_of`` can produce), and unique_count's value can be among them."""
    keys = meter.dimensions
    if len(keys) > MAX_DIMENSIONS or not all(
            type(k) is str and 0 < len(k) <= MAX_DIMENSION_KEY_LEN for k in keys):
        return False
    if not _utf8(keys):
        return False
    return meter.aggregation is not Aggregation.UNIQUE_COUNT or meter.value_property in keys


def _meter_columns(meter: Meter, datas: list[dict[str, Any]]
                   ) -> tuple[list[int] | None, list[dict[str, str] | None] | None]:
    # common.value_of + to_nanos + registry_problem's sign rule.
    if meter.aggregation in (Aggregation.COUNT, Aggregation.UNIQUE_COUNT):
        quantities = [SCALE] * len(datas)  # to_nanos(1)
    else:
        values: list[Any] = list(map(dict.get, datas, repeat(meter.value_property),
                                     repeat(_MISSING)))
        kinds = set(map(type, values))
        if kinds == {int}:
            if min(values) < -MAX_UNITS or max(values) > MAX_UNITS:
                return None, None
            quantities = [v * SCALE for v in values]
        elif float in kinds or type(_MISSING) in kinds:  # float: the exact re-parse decides
            return None, None
        else:
            quantities = list(map(to_nanos, values))  # QuantityError is a ValueError
        if not meter.allow_negative and min(quantities) < 0:
            return None, None
    # common.dimensions_of (ints as their decimal text), check_dimensions' value rule, and
    # registry_problem: no key outside the meter's (none can be), unique_count's value.
    keys = meter.dimensions
    if not keys:
        return quantities, [None] * len(datas)
    columns = []
    for key in keys:
        col = _dimension_values(list(map(dict.get, datas, repeat(key), repeat(_MISSING))))
        if col is None:
            return None, None
        if (meter.aggregation is Aggregation.UNIQUE_COUNT and key == meter.value_property
                and _MISSING in col):
            return None, None
        columns.append(col)
    if len(keys) == 1:
        key = keys[0]
        dims = [None if v is _MISSING else {key: v} for v in columns[0]]
    else:
        dims = [{k: v for k, v in zip(keys, row, strict=True) if v is not _MISSING} or None
                for row in zip(*columns, strict=True)]
    return quantities, dims


def _dimension_values(values: list[Any]) -> list[Any] | None:
    kinds = set(map(type, values)) - {type(_MISSING)}
    if not kinds <= {str, int}:
        return None
    if int in kinds:
        values = [str(v) if type(v) is int else v for v in values]
    present = [v for v in values if v is not _MISSING] if _MISSING in values else values
    if present and (max(map(len, present)) > MAX_DIMENSION_VALUE_LEN or not _utf8(present)):
        return None
    return values


def _envelope_items(batch: Batch, registry: MeterRegistry, tenant: str) -> list[Item] | None:
    # decode_batch already bounds every column's types and lengths; what is left are the
    # Validator's rules: non-empty customer within the tenant's limit, known meter, quantity
    # range and sign, time range, ids, sources, dimension keys per meter, UTF-8 everywhere.
    customers, meter_names = batch.customers, batch.meters
    if "" in customers or max(map(len, customers)) > max_customer_len(tenant):
        return None
    meters = {}
    for name in set(meter_names):
        meter = registry.get(name) if METER_NAME_RE.match(name) else None
        if meter is None:
            return None
        meters[name] = meter
    qs, ts = batch.quantities, batch.timestamps_ms
    if min(qs) < -MAX_NANOS or max(qs) > MAX_NANOS:
        return None
    if min(qs) < 0:
        positive = {m for m, spec in meters.items() if not spec.allow_negative}
        if positive and any(q < 0 and m in positive
                            for q, m in zip(qs, meter_names, strict=True)):
            return None
    if min(ts) < MIN_TIMESTAMP_MS or max(ts) >= MAX_TIMESTAMP_MS:
        return None
    ids = batch.event_ids()
    if "" in ids or max(map(len, ids)) > MAX_ID_LEN:
        return None
    sources = batch.event_sources()
    named: list[str] = [s for s in sources if s is not None]
    if named and ("" in named or max(map(len, named)) > MAX_SOURCE_LEN):
        return None
    dims = _envelope_dimensions(batch, meter_names, meters)
    if dims is None:
        return None
    if not _utf8(chain(customers, ids, named)):
        return None
    prefix = tenant + SEPARATOR
    keys = [f"{prefix}v{len(e)}:{e}" for e in ids]  # tenancy.scoped_id, as above
    if max(map(len, keys)) > MAX_ID_LEN:
        keys = [k if len(k) <= MAX_ID_LEN else scoped_id(tenant, e)
                for k, e in zip(keys, ids, strict=True)]
    return list(zip([prefix + c for c in customers], meter_names, qs, ts, dims, keys,
                    sources, strict=True))


def _envelope_dimensions(batch: Batch, names: list[str], meters: dict[str, Meter]
                         ) -> list[dict[str, str] | None] | None:
    unique = {m for m, spec in meters.items() if spec.aggregation is Aggregation.UNIQUE_COUNT}
    if batch.dimensions is None or not any(batch.dimensions):
        return None if unique else [None] * len(names)
    allowed = {m: frozenset(spec.dimensions) for m, spec in meters.items()}
    out: list[dict[str, str] | None] = []
    for dims, name in zip(batch.dimensions, names, strict=True):
        if not dims:
            if name in unique:
                return None
            out.append(None)
            continue
        if not dims.keys() <= allowed[name]:
            return None
        if name in unique and meters[name].value_property not in dims:
            return None
        out.append(dims)
    present = [d for d in out if d]
    if not _utf8(chain.from_iterable(chain(d, d.values()) for d in present)):
        return None
    return out


def _nonempty_strs(col: list[Any]) -> bool:
    return set(map(type, col)) == {str} and "" not in col


def _utf8(strings: Iterable[str]) -> bool:
    """Every string encodable as UTF-8 (core.events.is_utf8), checked on one join: a lone
    surrogate in any part makes the joined text fail to encode too."""
    text = "".join(strings)
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

