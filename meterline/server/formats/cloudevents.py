"""OpenMeter's ingest format: CloudEvents 1.0 in JSON (structured mode).

    {"specversion": "1.0", "id": "evt-1", "source": "my-app", "type": "api_calls",
     "subject": "cust-42", "time": "2024-05-01T12:00:00Z",
     "data": {"endpoint": "/v1/search", "tokens": 120}}

``subject`` -> customer, ``type`` -> meter, ``data[value_property]`` -> quantity (count and
unique_count meters count 1), ``data[<dimension>]`` -> dimensions, ``(source, id)`` -> the
idempotency key (CloudEvents: "source + id is unique for each distinct event"), ``time``
-> event time (absent: the receive time, as OpenMeter does).
"""

from __future__ import annotations

from typing import Any

from meterline.core.meters import MeterRegistry
from meterline.server.formats.common import (
    dimensions_of,
    rfc3339_ms,
    value_of,
)
from meterline.server.problems import EventError, bad_request
from meterline.server.validation import Draft

CLOUDEVENTS = "application/cloudevents+json"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json"
_REQUIRED = ("specversion", "id", "source", "type", "subject")


def is_cloudevent(doc: object) -> bool:
    return type(doc) is dict and "specversion" in doc


def read(doc: Any, registry: MeterRegistry, *, batch: bool | None) -> list[Draft | EventError]:
    """``batch``: True for a JSON array (cloudevents-batch), False for one object, None for
    application/json (either)."""
    if batch is None:
        batch = type(doc) is list
    if batch:
        if type(doc) is not list:
            raise bad_request("a CloudEvents batch must be a JSON array of events")
        if not doc:
            raise bad_request("the batch is empty")
        return [_draft(i, e, registry) for i, e in enumerate(doc)]
    if type(doc) is not dict:
        raise bad_request("a CloudEvent must be a JSON object")
    return [_draft(0, doc, registry)]


def _draft(index: int, event: object, registry: MeterRegistry) -> Draft | EventError:
    if type(event) is not dict:
        return EventError(index, "event", "must be a JSON object (a CloudEvent)")
    for name in _REQUIRED:
        if type(event.get(name)) is not str or not event[name]:
            return EventError(index, name, "required CloudEvents attribute, a non-empty string")
    if event["specversion"] != "1.0":
        return EventError(index, "specversion", f"must be '1.0', got {event['specversion']!r}")
    content_type = event.get("datacontenttype")
    if content_type is not None and content_type != "application/json":
        return EventError(index, "datacontenttype", "only application/json data is accepted")
    data = event.get("data")
    if data is None:
        data = {}
    elif type(data) is not dict:
        return EventError(index, "data", "must be a JSON object")
    time = event.get("time")
    timestamp_ms: object = None
    if time is not None:
        if type(time) is not str:
            return EventError(index, "time", "must be an RFC 3339 string")
        try:
            timestamp_ms = rfc3339_ms(time)
        except ValueError as exc:
            return EventError(index, "time", str(exc))
    meter = registry.get(event["type"])
    quantity: object = 1
    dims: dict[str, str] | None = None
    if meter is not None:  # an unknown meter is reported by the validator
        try:
            quantity = value_of(meter, data)
        except KeyError:
            return EventError(index, f"data.{meter.value_property}",
                              f"required by meter {meter.name!r} (its value)")
        dims = dimensions_of(meter, data)
    return Draft(customer=event["subject"], meter=event["type"], quantity=quantity,
                 timestamp_ms=timestamp_ms, dimensions=dims,
                 id_parts=(event["source"], event["id"]), source=event["source"][:256])
