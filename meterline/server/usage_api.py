"""The read handlers: ``GET /api/v1/usage/{customer}/{meter}`` and
``GET /api/v1/quota/{customer}/{meter}``, plus the customer and meter checks every read
(the usage page included) applies before anything reaches a query object."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from meterline.core.errors import InvalidEventError
from meterline.core.events import check_customer, check_meter_name
from meterline.core.meters import Meter, MeterRegistry
from meterline.core.quantity import format_nanos
from meterline.server import problems
from meterline.server.keys import Principal
from meterline.server.messages import (
    Request,
    Response,
    json_response,
    one,
    query_params,
    time_param,
)
from meterline.server.tenancy import max_customer_len, scoped_customer
from meterline.server.usage import (
    DEFAULT_RANGE_MS,
    GRANULARITIES,
    MAX_RANGE_MS,
    Granularity,
    NeedsRead,
    NotFoldable,
    QuotaService,
    UsageReader,
    iso_ms,
    usage_document,
)


def stored_customer(principal: Principal, customer: str) -> str:
    """The stored id of ``customer`` as the key's tenant sees it (tenancy.py), after the
    SDK's own customer checks; a bad id is a 400, never a query."""
    try:
        check_customer(customer)
    except InvalidEventError as exc:
        raise problems.bad_request(f"customer: {exc.message}") from None
    if len(customer) > max_customer_len(principal.tenant):
        raise problems.bad_request("customer: too long")
    return scoped_customer(principal.tenant, customer)


def registry_meter(registry: MeterRegistry, name: str) -> Meter:
    try:
        check_meter_name(name)
    except InvalidEventError:
        raise problems.not_found(f"no meter {name[:64]!r}") from None
    meter = registry.get(name)
    if meter is None:
        raise problems.not_found(f"no meter {name!r}; known: {', '.join(registry.names)}")
    return meter


class UsageApi:
    def __init__(self, *, registry: MeterRegistry, reader: UsageReader | None,
                 quotas: QuotaService | None, clock_ms: Callable[[], int]) -> None:
        self._registry = registry
        self._reader = reader
        self._quotas = quotas
        self._clock_ms = clock_ms

    async def usage(self, request: Request, principal: Principal, args: list[str]
                    ) -> Response:
        if self._reader is None:
            raise problems.unavailable("usage reads are not configured", 60)
        customer, meter_name = args
        stored = stored_customer(principal, customer)
        meter = registry_meter(self._registry, meter_name)
        query = query_params(request)
        granularity = cast(Granularity, one(query, "granularity", "hour"))
        if granularity not in GRANULARITIES:
            raise problems.bad_request(f"granularity must be one of {', '.join(GRANULARITIES)}")
        end = time_param(query, "to", self._clock_ms())
        start = time_param(query, "from", end - DEFAULT_RANGE_MS[granularity])
        if start >= end:
            raise problems.bad_request("'from' must be before 'to'")
        if end - start > MAX_RANGE_MS[granularity]:
            raise problems.bad_request(f"the range is too long for granularity {granularity}")
        dims = {k[len("dimension."):]: v[-1] for k, v in query.items()
                if k.startswith("dimension.")}
        unknown = [k for k in dims if k not in meter.group_by]
        if unknown:
            raise problems.bad_request(f"meter {meter.name!r} has no group dimension "
                                       f"{', '.join(map(repr, unknown))}")
        reader = self._reader
        try:
            points = await asyncio.to_thread(reader.usage, stored, meter, granularity, start,
                                             end, dims)
        except NotFoldable as exc:
            raise problems.unprocessable(str(exc)) from None
        return json_response(200, usage_document(customer, meter, granularity, start, end,
                                                 points))

    async def quota(self, request: Request, principal: Principal, args: list[str]
                    ) -> Response:
        if self._quotas is None:
            raise problems.unavailable("quota reads are not configured", 60)
        customer, meter_name = args
        stored = stored_customer(principal, customer)
        meter = registry_meter(self._registry, meter_name)
        quotas = self._quotas
        try:
            try:  # from memory on the event loop: a thread hop costs more than the answer
                status = quotas.status(principal.tenant, customer, stored, meter, read=False)
            except NeedsRead:
                status = await asyncio.to_thread(quotas.status, principal.tenant, customer,
                                                 stored, meter)
        except NotFoldable as exc:
            raise problems.unprocessable(str(exc)) from None
        if status is None:
            raise problems.not_found(f"no quota is set for meter {meter.name!r}")
        return json_response(200, {
            "customer": customer, "meter": meter.name, "unit": meter.unit,
            "period": status.period, "period_start": iso_ms(status.period_start_ms),
            "period_end": iso_ms(status.period_end_ms),
            "limit": format_nanos(status.limit_nanos), "used": format_nanos(status.used_nanos),
            "remaining": format_nanos(status.remaining_nanos),
            "exceeded": status.used_nanos >= status.limit_nanos,
        })
