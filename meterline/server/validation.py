"""One event draft (what a request format said) -> one validated SDK item.

The rules are the SDK's own, called in the order ``Emitter.emit`` applies them: the field
checks of ``meterline.core.events`` and ``meterline.core.quantity``, then the meter
registry's rules (``meterline.sdk.emitter.registry_problem``). Nothing here restates a
rule; this module only adds the tenant namespace (``tenancy``) and collects the first
problem of *every* event instead of raising at the first bad one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meterline.core.errors import InvalidEventError
from meterline.core.events import (
    check_customer,
    check_dimensions,
    check_id,
    check_meter_name,
    check_source,
    check_timestamp_ms,
)
from meterline.core.meters import MeterRegistry
from meterline.core.quantity import MAX_NANOS, QuantityError, to_nanos
from meterline.sdk.batching import Item
from meterline.sdk.emitter import registry_problem
from meterline.server.problems import EventError
from meterline.server.tenancy import max_customer_len, scoped_customer, scoped_id


@dataclass(slots=True)
class Draft:
    """An event as a request format read it, not validated yet.

    ``quantity`` is in units (int, decimal str, Decimal or float, as ``Emitter.emit``
    takes it) unless ``quantity_nanos`` is set (the native envelope carries nano-units).
    ``timestamp_ms`` None means "now" (the server's receive time), as in the SDK.
    ``id_parts`` is the idempotency key; every format has one (see ``tenancy.scoped_id``).
    """

    customer: object
    meter: object
    quantity: object
    timestamp_ms: object
    dimensions: Mapping[str, Any] | None
    id_parts: tuple[object, ...]
    source: object = None
    quantity_nanos: int | None = None


class Validator:
    def __init__(self, registry: MeterRegistry) -> None:
        self.registry = registry

    def item(self, draft: Draft, tenant: str, now_ms: int) -> Item:
        """The validated item; raises ``InvalidEventError`` naming the field."""
        customer = check_customer(draft.customer)
        limit = max_customer_len(tenant)
        if len(customer) > limit:
            raise InvalidEventError("customer", f"longer than {limit} characters")
        meter = check_meter_name(draft.meter)
        spec = self.registry.get(meter)
        if spec is None:
            raise InvalidEventError(
                "meter", f"{meter!r} is not defined; known: {', '.join(self.registry.names)}")
        if draft.quantity_nanos is not None:
            q = draft.quantity_nanos
            if not -MAX_NANOS <= q <= MAX_NANOS:
                raise InvalidEventError("quantity", f"{q} nano-units is out of range")
        else:
            try:
                q = to_nanos(draft.quantity)
            except QuantityError as exc:
                raise InvalidEventError("quantity", str(exc)) from None
        ts = now_ms if draft.timestamp_ms is None else check_timestamp_ms(draft.timestamp_ms)
        dims = None if draft.dimensions is None else check_dimensions(dict(draft.dimensions))
        parts = [check_id(p) for p in draft.id_parts]
        source = check_source(draft.source)
        problem = registry_problem(spec, q, dims)
        if problem is not None:
            raise InvalidEventError(*problem)
        return (scoped_customer(tenant, customer), meter, q, ts, dims or None,
                scoped_id(tenant, *parts), source)

    def items(self, drafts: Sequence[Draft | EventError], tenant: str, now_ms: int
              ) -> tuple[list[Item], list[EventError]]:
        """Every draft validated; ``EventError`` entries (a format-level problem found
        while reading that event) pass through with their index."""
        items: list[Item] = []
        errors: list[EventError] = []
        for index, draft in enumerate(drafts):
            if isinstance(draft, EventError):
                errors.append(draft)
                continue
            try:
                items.append(self.item(draft, tenant, now_ms))
            except InvalidEventError as exc:
                errors.append(EventError(index, exc.field, exc.message))
            except (TypeError, ValueError) as exc:  # e.g. dict() of a non-mapping
                errors.append(EventError(index, "event", str(exc)))
        return items, errors
