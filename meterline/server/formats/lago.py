"""Lago's event API: ``POST /api/v1/events`` ``{"event": {...}}`` and
``POST /api/v1/events/batch`` ``{"events": [...]}``.

    {"transaction_id": "tx-1", "external_subscription_id": "sub-9",
     "external_customer_id": "cust-42", "code": "api_calls", "timestamp": 1714564800,
     "properties": {"endpoint": "/v1/search"}}

``code`` -> meter, ``properties[value_property]`` -> quantity (Lago's ``field_name``;
count and unique_count meters count 1), ``properties[<dimension>]`` -> dimensions,
``timestamp`` (Unix seconds, fractional allowed, or ISO 8601; absent: receive time).
Customer: ``external_customer_id`` when given, else ``external_subscription_id`` (Lago
ties an event to a subscription, which belongs to one customer; we have no subscription
table, so the subscription id stands for its customer). Idempotency key:
``(external_subscription_id, transaction_id)`` - Lago documents transaction_id as unique
per subscription. ``precise_total_amount_cents`` (dynamic pricing) is not used.
"""

from __future__ import annotations

from typing import Any

from meterline.core.meters import MeterRegistry
from meterline.server.formats.common import (
    NeedsExactParse,
    dimensions_of,
    rfc3339_ms,
    seconds_to_ms,
    value_of,
)
from meterline.server.problems import EventError, bad_request
from meterline.server.validation import Draft


def is_lago_event(doc: object) -> bool:
    return type(doc) is dict and "event" in doc and "specversion" not in doc


def read_one(doc: Any, registry: MeterRegistry) -> list[Draft | EventError]:
    if type(doc) is not dict or "event" not in doc:
        raise bad_request('a Lago event body is {"event": {...}}')
    return [_draft(0, doc["event"], registry)]


def read_batch(doc: Any, registry: MeterRegistry) -> list[Draft | EventError]:
    if type(doc) is not dict or type(doc.get("events")) is not list:
        raise bad_request('a Lago batch body is {"events": [...]}')
    if not doc["events"]:
        raise bad_request("the batch is empty")
    return [_draft(i, e, registry) for i, e in enumerate(doc["events"])]


def _draft(index: int, event: object, registry: MeterRegistry) -> Draft | EventError:
    if type(event) is not dict:
        return EventError(index, "event", "must be a JSON object")
    for name in ("transaction_id", "code"):
        if type(event.get(name)) is not str or not event[name]:
            return EventError(index, name, "required, a non-empty string")
    subscription = event.get("external_subscription_id")
    customer = event.get("external_customer_id")
    for name, value in (("external_subscription_id", subscription),
                        ("external_customer_id", customer)):
        if value is not None and (type(value) is not str or not value):
            return EventError(index, name, "must be a non-empty string")
    if subscription is None and customer is None:
        return EventError(index, "external_subscription_id",
                          "required (or external_customer_id)")
    properties = event.get("properties")
    if properties is None:
        properties = {}
    elif type(properties) is not dict:
        return EventError(index, "properties", "must be a JSON object")
    timestamp = event.get("timestamp")
    timestamp_ms: object = None
    if timestamp is not None:
        if type(timestamp) is float:
            raise NeedsExactParse
        try:
            if type(timestamp) is str and not _numeric(timestamp):
                timestamp_ms = rfc3339_ms(timestamp)
            else:
                timestamp_ms = seconds_to_ms(timestamp)
        except ValueError as exc:
            return EventError(index, "timestamp", str(exc))
    meter = registry.get(event["code"])
    quantity: object = 1
    dims: dict[str, str] | None = None
    if meter is not None:
        try:
            quantity = value_of(meter, properties)
        except KeyError:
            return EventError(index, f"properties.{meter.value_property}",
                              f"required by meter {meter.name!r} (its value)")
        dims = dimensions_of(meter, properties)
    key = ((subscription, event["transaction_id"]) if subscription is not None
           else ("customer", customer, event["transaction_id"]))
    return Draft(customer=customer if customer is not None else subscription,
                 meter=event["code"], quantity=quantity, timestamp_ms=timestamp_ms,
                 dimensions=dims, id_parts=key)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).lstrip("-").isdigit()


def echo(event: dict[str, Any], timestamp_ms: int) -> dict[str, Any]:
    """The response body's event, in the fields Lago's clients read."""
    import datetime as dt

    when = dt.datetime.fromtimestamp(timestamp_ms / 1000, dt.UTC)
    return {
        "lago_id": None, "transaction_id": event.get("transaction_id"),
        "lago_customer_id": None, "lago_subscription_id": None,
        "external_subscription_id": event.get("external_subscription_id"),
        "external_customer_id": event.get("external_customer_id"),
        "code": event.get("code"),
        "timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "properties": event.get("properties") or {},
        "created_at": None,
    }
