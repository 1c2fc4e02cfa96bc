"""Batch envelope v1: many usage events in one Kafka record.

Faust and Kafka cost tens of microseconds per record, so the SDK ships hundreds to
thousands of events per record. The layout is columnar JSON (one array per field) because
orjson parses a few long homogeneous arrays much faster than thousands of small objects,
and the consumers (raw sink, rollups) work column by column anyway. The format is
specified for non-Python producers in docs/envelope.md.

``decode_batch`` never raises anything but ``EnvelopeError``; every rejection carries a
stable ``reason`` (see ``REASONS``) so a dead-letter record says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from meterline.core.errors import EnvelopeError
from meterline.core.events import (
    MAX_CUSTOMER_LEN,
    MAX_DIMENSION_KEY_LEN,
    MAX_DIMENSION_VALUE_LEN,
    MAX_DIMENSIONS,
    MAX_ID_LEN,
    MAX_METER_LEN,
    MAX_SOURCE_LEN,
    UsageEvent,
)
from meterline.core.quantity import INT64_MAX, INT64_MIN

VERSION = 1
# Upper bounds protect consumers from a single record exhausting memory. Kafka's default
# max.message.bytes is ~1 MiB; we allow larger topics but refuse absurd envelopes.
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024
MAX_BATCH_EVENTS = 1_000_000

REASONS = (
    "not_bytes",
    "too_large",
    "malformed_json",
    "not_an_object",
    "unsupported_version",
    "bad_batch_id",
    "bad_created_ms",
    "bad_count",
    "bad_column",
    "bad_source",
    "bad_producer",
)


@dataclass(slots=True)
class Batch:
    """Column-oriented events of one envelope. All lists have ``len(self)`` entries.

    ``ids`` entries may be None: the SDK leaves generated ids implicit as
    ``"{batch_id}-{index}"``, which is unique, time-ordered (batch ids are ULIDs) and
    identical on every resend of the batch, so downstream dedupe works on either form.
    """

    batch_id: str
    created_ms: int
    customers: list[str]
    meters: list[str]
    quantities: list[int]
    timestamps_ms: list[int]
    ids: list[str | None] | None = None
    dimensions: list[dict[str, str] | None] | None = None
    sources: list[str | None] | None = None
    source: str | None = None
    # Optional, together: the sending SDK instance and this batch's number among its
    # batches to this partition (0, 1, 2, ...). Resends keep both; the rollup dedupes
    # batches by them in O(producers) state (core/dedupe.py SequenceDeduper).
    producer: str | None = None
    seq: int | None = None

    def __len__(self) -> int:
        return len(self.customers)

    def event_ids(self) -> list[str]:
        """Explicit id of every event, implied ids filled in."""
        prefix = self.batch_id + "-"
        if self.ids is None:
            return [prefix + str(i) for i in range(len(self.customers))]
        return [
            prefix + str(i) if eid is None else eid for i, eid in enumerate(self.ids)
        ]

    def event_sources(self) -> list[str | None]:
        if self.sources is None:
            return [self.source] * len(self.customers)
        return [self.source if s is None else s for s in self.sources]

    def event_dimensions(self) -> list[dict[str, str]]:
        if self.dimensions is None:
            return [{} for _ in range(len(self.customers))]
        return [d or {} for d in self.dimensions]

    def events(self) -> Iterator[UsageEvent]:
        for eid, cust, meter, qty, ts, dims, src in zip(
            self.event_ids(),
            self.customers,
            self.meters,
            self.quantities,
            self.timestamps_ms,
            self.event_dimensions(),
            self.event_sources(),
            strict=True,
        ):
            yield UsageEvent(eid, cust, meter, qty, ts, dims, src)


def encode_batch(batch: Batch) -> bytes:
    qs = batch.quantities
    quantities: list[int | str] | list[int] = qs
    if qs and (min(qs) < INT64_MIN or max(qs) > INT64_MAX):
        # JSON readers (orjson included) turn integers past 64 bits into floats, so huge
        # single quantities travel as decimal strings of nano-units.
        quantities = [
            q if INT64_MIN <= q <= INT64_MAX else str(q) for q in batch.quantities
        ]
    doc: dict[str, Any] = {
        "v": VERSION,
        "batch_id": batch.batch_id,
        "created_ms": batch.created_ms,
        "count": len(batch.customers),
        "customer": batch.customers,
        "meter": batch.meters,
        "quantity": quantities,
        "timestamp_ms": batch.timestamps_ms,
    }
    # list.count runs in C; a generator with any() would cost ~100 ns per event here.
    if batch.ids is not None and batch.ids.count(None) != len(batch.ids):
        doc["id"] = batch.ids
    if batch.dimensions is not None and any(batch.dimensions):
        doc["dimensions"] = batch.dimensions
    if batch.source is not None:
        doc["source"] = batch.source
    if batch.sources is not None and batch.sources.count(None) != len(batch.sources):
        doc["event_source"] = batch.sources
    if batch.producer is not None:
        doc["producer"] = batch.producer
        doc["seq"] = batch.seq
    return orjson.dumps(doc)


def decode_batch(data: object) -> Batch:
    """Parse and structurally validate one envelope. Raises only ``EnvelopeError``.

    Per-event business rules (known meter, sign of quantity, lateness) are not checked
    here: they depend on the meter registry and are applied per event downstream, so one
    bad event does not sink its whole batch.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EnvelopeError("not_bytes", f"got {type(data).__name__}")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError("too_large", f"{len(data)} bytes > {MAX_ENVELOPE_BYTES}")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError("malformed_json", str(exc)[:200]) from None
    if type(doc) is not dict:
        raise EnvelopeError("not_an_object", f"top level is {type(doc).__name__}")
    version = doc.get("v")
    if version != VERSION or type(version) is not int:
        raise EnvelopeError("unsupported_version", f"v={version!r}, this reader knows {VERSION}")
    batch_id = doc.get("batch_id")
    if type(batch_id) is not str or not 0 < len(batch_id) <= MAX_ID_LEN:
        raise EnvelopeError("bad_batch_id", "batch_id must be a non-empty str")
    created_ms = doc.get("created_ms")
    if type(created_ms) is not int or created_ms < 0:
        raise EnvelopeError("bad_created_ms", "created_ms must be a non-negative int")
    count = doc.get("count")
    if type(count) is not int or not 0 < count <= MAX_BATCH_EVENTS:
        raise EnvelopeError("bad_count", f"count must be 1..{MAX_BATCH_EVENTS}, got {count!r}")
    source = doc.get("source")
    if source is not None and (type(source) is not str or len(source) > MAX_SOURCE_LEN):
        raise EnvelopeError("bad_source", "source must be a short str")
    producer, seq = doc.get("producer"), doc.get("seq")
    if (producer is not None or seq is not None) and (
            type(producer) is not str or not 0 < len(producer) <= MAX_ID_LEN
            or type(seq) is not int or not 0 <= seq <= INT64_MAX):
        raise EnvelopeError("bad_producer",
                                "producer (non-empty str) and seq (int >= 0) go together")

    # Empty customer/meter strings pass here on purpose: they are per-event faults that the
    # validator dead-letters one by one, without discarding the good events of the batch.
    customers = _str_column(doc, "customer", count, MAX_CUSTOMER_LEN, nullable=False, min_len=0)
    meters = _str_column(doc, "meter", count, MAX_METER_LEN, nullable=False, min_len=0)
    quantities = _quantity_column(doc, count)
    timestamps = _column(doc, "timestamp_ms", count)
    if set(map(type, timestamps)) != {int} or min(timestamps) < 0 or max(timestamps) > INT64_MAX:
        raise EnvelopeError("bad_column", "timestamp_ms must hold non-negative int64 values")
    ids = _str_column(doc, "id", count, MAX_ID_LEN, nullable=True) if "id" in doc else None
    sources = (
        _str_column(doc, "event_source", count, MAX_SOURCE_LEN, nullable=True)
        if "event_source" in doc
        else None
    )
    dimensions = _dimensions_column(doc, count) if "dimensions" in doc else None
    return Batch(
        batch_id=batch_id,
        created_ms=created_ms,
        customers=customers,
        meters=meters,
        quantities=quantities,
        timestamps_ms=timestamps,
        ids=ids,
        dimensions=dimensions,
        sources=sources,
        source=source,
        producer=producer,
        seq=seq,
    )


def _column(doc: dict[str, Any], name: str, count: int) -> list[Any]:
    col = doc.get(name)
    if type(col) is not list or len(col) != count:
        raise EnvelopeError("bad_column", f"{name} must be a list of {count} entries")
    return col


def _str_column(
    doc: dict[str, Any], name: str, count: int, max_len: int, *, nullable: bool, min_len: int = 1
) -> list[Any]:
    col = _column(doc, name, count)
    types = set(map(type, col))
    allowed = {str, type(None)} if nullable else {str}
    if not types <= allowed:
        kinds = "str or null" if nullable else "str"
        raise EnvelopeError("bad_column", f"{name} entries must be {kinds}")
    lengths = [len(v) for v in col if v is not None] if nullable else list(map(len, col))
    if lengths and (min(lengths) < min_len or max(lengths) > max_len):
        raise EnvelopeError(
            "bad_column", f"{name} entries must have {min_len}..{max_len} characters"
        )
    return col


def _quantity_column(doc: dict[str, Any], count: int) -> list[int]:
    col = _column(doc, "quantity", count)
    types = set(map(type, col))
    if types == {int}:
        return col
    if not types <= {int, str}:
        raise EnvelopeError("bad_column", "quantity entries must be int nano-units (or str)")
    out: list[int] = []
    for q in col:
        if type(q) is str:
            digits = q[1:] if q[:1] == "-" else q  # one sign at most: int("--5") raises
            if not (digits.isdigit() and q.isascii() and len(q) <= 60):
                raise EnvelopeError("bad_column", f"quantity string {q[:40]!r} is not an integer")
            out.append(int(q))
        else:
            out.append(q)
    return out


def _dimensions_column(doc: dict[str, Any], count: int) -> list[dict[str, str] | None]:
    col = _column(doc, "dimensions", count)
    for dims in col:
        if dims is None:
            continue
        if type(dims) is not dict or len(dims) > MAX_DIMENSIONS:
            raise EnvelopeError(
                "bad_column", f"dimensions entries must be objects of <= {MAX_DIMENSIONS} keys"
            )
        for key, value in dims.items():
            if not 0 < len(key) <= MAX_DIMENSION_KEY_LEN:
                raise EnvelopeError("bad_column", "dimension keys must have 1..64 characters")
            if type(value) is not str or len(value) > MAX_DIMENSION_VALUE_LEN:
                raise EnvelopeError("bad_column", f"dimension {key[:40]!r} must be a short str")
    return col
