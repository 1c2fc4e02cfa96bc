"""Meterline's own batch envelope (docs/envelope.md) over HTTP: ``POST /api/v1/batches``.

The body is exactly what the SDK puts in one Kafka record. It is decoded with the same
``decode_batch`` the pipeline uses (a structural fault rejects the body with its stable
``reason``), then every event is validated like any other. The event ids the envelope
implies (``{batch_id}-{i}``) become explicit, so a resend of the same envelope dedupes
event by event even after the server re-batched it.
"""

from __future__ import annotations

from meterline.core.envelope import Batch, decode_batch
from meterline.core.errors import EnvelopeError
from meterline.server.problems import EventError, Problem
from meterline.server.validation import Draft

ENVELOPE = "application/vnd.meterline.envelope+json"


def read(body: bytes) -> list[Draft | EventError]:
    return drafts(decode(body))


def decode(body: bytes) -> Batch:
    """The envelope, or 400 with decode_batch's reason."""
    try:
        return decode_batch(body)
    except EnvelopeError as exc:
        raise Problem(400, "invalid-envelope", "Invalid envelope",
                      f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason) from None


def drafts(batch: Batch) -> list[Draft | EventError]:
    dims = batch.event_dimensions()
    sources = batch.event_sources()
    return [
        Draft(customer=customer, meter=meter, quantity=None, quantity_nanos=qty,
              timestamp_ms=ts, dimensions=dim or None, id_parts=(event_id,), source=src)
        for customer, meter, qty, ts, dim, event_id, src in zip(
            batch.customers, batch.meters, batch.quantities, batch.timestamps_ms, dims,
            batch.event_ids(), sources, strict=True)
    ]
