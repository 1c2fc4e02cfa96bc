"""Routes and handlers, free of any web framework, plus the ASGI adapter.

The seam is one method, ``ServerApp.handle(Request) -> Response`` (as httpx's
``handle_request``): handlers are tested without a network, and the ASGI adapter below is
the only code that knows a server exists. Why raw ASGI rather than a framework is measured
in docs/server.md.

Routes (docs/server.md has the details, /api/v1/openapi.json the schema):

    POST /api/v1/events             OpenMeter CloudEvents (one or a batch), or one Lago event
    POST /api/v1/events/batch       Lago batch
    POST /api/v1/batches            native envelope (docs/envelope.md)
    GET  /api/v1/usage/{customer}/{meter}?granularity=hour|day|month&from=&to=&dimension.K=V
    GET  /api/v1/quota/{customer}/{meter}
    GET  /api/v1/openapi.json       (no key needed)
    GET  /healthz                   (no key needed)

Prometheus /metrics is served on its own loopback listener, not here (server/metrics.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast
from urllib.parse import parse_qs, unquote

import orjson

from meterline.core.errors import InvalidEventError
from meterline.core.events import check_customer, check_meter_name
from meterline.core.meters import MeterRegistry
from meterline.core.quantity import format_nanos
from meterline.sdk.batching import Item
from meterline.server import problems
from meterline.server.formats import cloudevents, lago, native
from meterline.server.formats.common import NeedsExactParse, parse_json, rfc3339_ms
from meterline.server.keys import KeyStore, Principal
from meterline.server.metrics import ServerMetrics, route_template
from meterline.server.problems import PROBLEM_JSON, EventError, Problem
from meterline.server.tenancy import max_customer_len, scoped_customer
from meterline.server.usage import (
    GRANULARITIES,
    Granularity,
    NotFoldable,
    QuotaService,
    UsageReader,
)
from meterline.server.validation import Draft, Validator
from meterline.server.writers import EventWriter, Unavailable

log = logging.getLogger(__name__)

JSON = "application/json"
_MAX_RANGE_MS = {"hour": 93 * 86_400_000, "day": 3_700 * 86_400_000,
                 "month": 3_700 * 86_400_000}
_DEFAULT_RANGE_MS = {"hour": 86_400_000, "day": 31 * 86_400_000, "month": 366 * 86_400_000}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    raw_path: bytes  # percent-encoded, so "a%2Fb" stays one path segment
    query: bytes
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_events_per_request: int = 20_000


class ServerApp:
    def __init__(self, *, registry: MeterRegistry, keys: KeyStore, writer: EventWriter,
                 reader: UsageReader | None, quotas: QuotaService | None,
                 openapi: dict[str, Any], limits: Limits | None = None,
                 health: Callable[[], dict[str, str]] | None = None,
                 metrics: ServerMetrics | None = None,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.registry = registry
        self.validator = Validator(registry)
        self.keys = keys
        self.writer = writer
        self.reader = reader
        self.quotas = quotas
        self.limits = limits or Limits()
        self._clock_ms = clock_ms
        self._openapi = orjson.dumps(openapi)
        self._health = health or dict
        self.metrics = metrics

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        response = await self._handle(request)
        if self.metrics is not None:
            self.metrics.request(route_template(request.raw_path), response.status,
                                 time.perf_counter() - started)
        return response

    async def _handle(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except Problem as problem:
            return _problem_response(problem)
        except Exception:  # a bug: answer 500 in the one error shape, and log it
            log.exception("unhandled error on %s %r", request.method, request.raw_path[:200])
            return _problem_response(Problem(500, "internal", "Internal server error",
                                             "see the server log"))

    async def _route(self, request: Request) -> Response:
        parts = request.raw_path.split(b"?", 1)[0].strip(b"/").split(b"/")
        method = request.method
        if parts == [b"healthz"]:
            stages = self._health()
            ok = all(not v.startswith("stopped") for v in stages.values())
            return _json(200 if ok else 503, {"status": "ok" if ok else "degraded",
                                              "stages": stages})
        if parts[:2] != [b"api", b"v1"]:
            raise problems.not_found()
        route = parts[2:]
        if route == [b"openapi.json"] and method == "GET":
            return Response(200, self._openapi, JSON)
        handler: Callable[[Request, Principal, list[str]], Awaitable[Response]] | None = None
        scope = "ingest"
        args: list[str] = []
        if method == "POST" and route == [b"events"]:
            handler = self._events
        elif method == "POST" and route == [b"events", b"batch"]:
            handler = self._lago_batch
        elif method == "POST" and route == [b"batches"]:
            handler = self._native
        elif method == "GET" and len(route) == 3 and route[0] in (b"usage", b"quota"):
            handler = self._usage if route[0] == b"usage" else self._quota
            scope = "read"
            args = [_segment(route[1]), _segment(route[2])]
        if handler is None:
            known = {b"events", b"batches", b"usage", b"quota", b"openapi.json"}
            if route and route[0] in known:
                raise Problem(405, "method-not-allowed", "Method not allowed",
                              f"{method} is not supported here")
            raise problems.not_found()
        principal = self._authenticate(request)
        if not principal.may(scope):
            raise problems.forbidden(f"this key's scopes ({', '.join(sorted(principal.scopes))})"
                                     f" do not include {scope}")
        return await handler(request, principal, args)

    def _authenticate(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise problems.unauthorized("send the API key as 'Authorization: Bearer <key>'")
        principal = self.keys.authenticate(key.strip())
        if principal is None:
            raise problems.unauthorized()
        return principal

    # ------------------------------------------------------------------ ingest

    async def _events(self, request: Request, principal: Principal, _: list[str]) -> Response:
        ctype = _media_type(request)
        allowed = [cloudevents.CLOUDEVENTS, cloudevents.CLOUDEVENTS_BATCH, JSON]
        if ctype not in allowed:
            raise problems.unsupported_media_type(ctype, allowed)

        def read(doc: Any) -> list[Draft | EventError]:
            if ctype == JSON and lago.is_lago_event(doc):
                return lago.read_one(doc, self.registry)
            batch = {cloudevents.CLOUDEVENTS: False, cloudevents.CLOUDEVENTS_BATCH: True}
            return cloudevents.read(doc, self.registry, batch=batch.get(ctype))

        drafts, doc = _read_json(request.body, read)
        fmt = "lago" if ctype == JSON and lago.is_lago_event(doc) else "cloudevents"
        now = await self._ingest(drafts, principal, fmt)
        if ctype == JSON and lago.is_lago_event(doc):
            return _json(200, {"event": lago.echo(doc["event"], _draft_time(drafts[0], now))})
        return Response(204)

    async def _lago_batch(self, request: Request, principal: Principal, _: list[str]
                          ) -> Response:
        if _media_type(request) not in (JSON, ""):
            raise problems.unsupported_media_type(_media_type(request), [JSON])
        drafts, doc = _read_json(request.body, lambda d: lago.read_batch(d, self.registry))
        now = await self._ingest(drafts, principal, "lago")
        return _json(200, {"events": [lago.echo(e, _draft_time(d, now))
                                      for e, d in zip(doc["events"], drafts, strict=True)]})

    async def _native(self, request: Request, principal: Principal, _: list[str]) -> Response:
        allowed = [native.ENVELOPE, JSON]
        if _media_type(request) not in allowed:
            raise problems.unsupported_media_type(_media_type(request), allowed)
        drafts: list[Draft | EventError] = list(native.read(request.body))
        await self._ingest(drafts, principal, "native")
        return _json(200, {"accepted": len(drafts)})

    async def _ingest(self, drafts: list[Draft | EventError], principal: Principal,
                      fmt: str) -> int:
        """Validate every event, then make them all durable, or raise. All or nothing: one
        invalid event rejects the request (a client fixes and resends the whole batch;
        with the same ids, what was already written dedupes)."""
        if len(drafts) > self.limits.max_events_per_request:
            self._count(fmt, "rejected", len(drafts))
            raise Problem(413, "too-many-events", "Too many events",
                          f"{len(drafts)} events; at most "
                          f"{self.limits.max_events_per_request} per request")
        now = self._clock_ms()
        items, errors = self.validator.items(drafts, principal.tenant, now)
        if errors:
            self._count(fmt, "rejected", len(drafts))
            raise problems.invalid_events(errors, len(drafts))
        try:
            await self._write(items)
        except Problem:
            self._count(fmt, "unavailable", len(drafts))
            raise
        self._count(fmt, "accepted", len(drafts))
        return now

    def _count(self, fmt: str, outcome: str, n: int) -> None:
        if self.metrics is not None:
            self.metrics.events(fmt, outcome, n)

    async def _write(self, items: list[Item]) -> None:
        try:
            future = self.writer.write(items)
            await asyncio.wrap_future(future)
        except Unavailable as exc:
            raise problems.unavailable(str(exc), exc.retry_after_s) from None

    # ------------------------------------------------------------------ reads

    def _customer(self, principal: Principal, customer: str) -> str:
        try:
            check_customer(customer)
        except InvalidEventError as exc:
            raise problems.bad_request(f"customer: {exc.message}") from None
        if len(customer) > max_customer_len(principal.tenant):
            raise problems.bad_request("customer: too long")
        return scoped_customer(principal.tenant, customer)

    def _meter(self, name: str) -> Any:
        try:
            check_meter_name(name)
        except InvalidEventError:
            raise problems.not_found(f"no meter {name[:64]!r}") from None
        meter = self.registry.get(name)
        if meter is None:
            raise problems.not_found(f"no meter {name!r}; known: {', '.join(self.registry.names)}")
        return meter

    async def _usage(self, request: Request, principal: Principal, args: list[str]
                     ) -> Response:
        if self.reader is None:
            raise problems.unavailable("usage reads are not configured", 60)
        customer, meter_name = args
        stored = self._customer(principal, customer)
        meter = self._meter(meter_name)
        try:
            query = parse_qs(request.query.decode("ascii"), keep_blank_values=True,
                             errors="strict")
        except UnicodeError:
            raise problems.bad_request("the query string must be percent-encoded UTF-8") from None
        granularity = cast(Granularity, _one(query, "granularity", "hour"))
        if granularity not in GRANULARITIES:
            raise problems.bad_request(f"granularity must be one of {', '.join(GRANULARITIES)}")
        end = _time_param(query, "to", self._clock_ms())
        start = _time_param(query, "from", end - _DEFAULT_RANGE_MS[granularity])
        if start >= end:
            raise problems.bad_request("'from' must be before 'to'")
        if end - start > _MAX_RANGE_MS[granularity]:
            raise problems.bad_request(f"the range is too long for granularity {granularity}")
        dims = {k[len("dimension."):]: v[-1] for k, v in query.items()
                if k.startswith("dimension.")}
        unknown = [k for k in dims if k not in meter.group_by]
        if unknown:
            raise problems.bad_request(f"meter {meter.name!r} has no group dimension "
                                       f"{', '.join(map(repr, unknown))}")
        reader = self.reader
        try:
            points = await asyncio.to_thread(reader.usage, stored, meter, granularity, start,
                                             end, dims)
        except NotFoldable as exc:
            raise problems.unprocessable(str(exc)) from None
        return _json(200, {
            "customer": customer, "meter": meter.name, "unit": meter.unit,
            "aggregation": meter.aggregation.value, "granularity": granularity,
            "from": _iso(start), "to": _iso(end),
            "data": [{"window_start": _iso(p.window_start_ms), "window_end": _iso(p.window_end_ms),
                      "window_start_ms": p.window_start_ms, "window_end_ms": p.window_end_ms,
                      "dimensions": p.group, "value": format_nanos(p.value_nanos),
                      "events": p.events} for p in points],
        })

    async def _quota(self, request: Request, principal: Principal, args: list[str]
                     ) -> Response:
        if self.quotas is None:
            raise problems.unavailable("quota reads are not configured", 60)
        customer, meter_name = args
        stored = self._customer(principal, customer)
        meter = self._meter(meter_name)
        quotas = self.quotas
        try:
            status = await asyncio.to_thread(quotas.status, principal.tenant, customer, stored,
                                             meter)
        except NotFoldable as exc:
            raise problems.unprocessable(str(exc)) from None
        if status is None:
            raise problems.not_found(f"no quota is set for meter {meter.name!r}")
        return _json(200, {
            "customer": customer, "meter": meter.name, "unit": meter.unit,
            "period": status.period, "period_start": _iso(status.period_start_ms),
            "period_end": _iso(status.period_end_ms),
            "limit": format_nanos(status.limit_nanos), "used": format_nanos(status.used_nanos),
            "remaining": format_nanos(status.remaining_nanos),
            "exceeded": status.used_nanos >= status.limit_nanos,
        })


# --------------------------------------------------------------------------- helpers


def _read_json(body: bytes, read: Callable[[Any], list[Draft | EventError]]
               ) -> tuple[list[Draft | EventError], Any]:
    """Parse with orjson; when a JSON float reaches a value that must be exact, parse
    again with Decimals (rare: most clients send integers or strings)."""
    doc = parse_json(body)
    try:
        return read(doc), doc
    except NeedsExactParse:
        doc = parse_json(body, exact=True)
        return read(doc), doc


def _segment(raw: bytes) -> str:
    try:
        return unquote(raw.decode("ascii"), errors="strict")
    except UnicodeError:
        raise problems.bad_request("path segments must be percent-encoded UTF-8") from None


def _draft_time(draft: Draft | EventError, now_ms: int) -> int:
    if isinstance(draft, Draft) and type(draft.timestamp_ms) is int:
        return draft.timestamp_ms
    return now_ms


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _one(query: dict[str, list[str]], name: str, default: str) -> str:
    values = query.get(name)
    return values[-1] if values else default


def _time_param(query: dict[str, list[str]], name: str, default: int) -> int:
    if name not in query:
        return default
    text = query[name][-1]
    try:
        return int(text) if text.isdigit() else rfc3339_ms(text)
    except ValueError as exc:
        raise problems.bad_request(f"{name}: {exc} (or integer UTC milliseconds)") from None


def _iso(ms: int) -> str:
    return (dt.datetime.fromtimestamp(ms // 1000, dt.UTC)
            .replace(microsecond=(ms % 1000) * 1000)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def _json(status: int, doc: Any) -> Response:
    return Response(status, orjson.dumps(doc, default=_exact), JSON)


def _exact(value: object) -> str:
    # Decimals come from exact parsing of client JSON (echoed Lago properties): as text,
    # every digit kept.
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _problem_response(problem: Problem) -> Response:
    return Response(problem.status, problem.body(), PROBLEM_JSON, dict(problem.headers))


# --------------------------------------------------------------------------- ASGI


class AsgiAdapter:
    """``ServerApp`` as an ASGI 3 application (uvicorn, granian, hypercorn...).

    The body is read up to ``max_body_bytes`` and no further: a larger upload is answered
    413 without buffering it (a declared Content-Length over the limit is refused before
    reading anything).
    """

    def __init__(self, app: ServerApp, *, on_startup: Callable[[], None] | None = None,
                 on_shutdown: Callable[[], None] | None = None) -> None:
        self.app = app
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind != "http":
            return
        started: float | None = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", ())}
        limit = self.app.limits.max_body_bytes
        response: Response | None = None
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            response = _problem_response(problems.too_large(limit))
        else:
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    response = _problem_response(problems.too_large(limit))
                    break
                chunks.append(chunk)
                more = message.get("more_body", False)
            if response is None:
                request = Request(scope["method"], scope.get("raw_path") or
                                  scope["path"].encode("utf-8"),
                                  scope.get("query_string", b""), headers, b"".join(chunks))
                response = await self.app.handle(request)  # counts itself in the metrics
                started = None
        if started is not None and self.app.metrics is not None:
            # Refused here (body too large) before handle() saw it: count it the same way.
            self.app.metrics.request(route_template(scope.get("raw_path") or
                                                    scope["path"].encode("utf-8")),
                                     response.status, time.perf_counter() - started)
        out_headers = [(k.encode("latin-1"), v.encode("latin-1"))
                       for k, v in response.headers.items()]
        if response.content_type:
            out_headers.append((b"content-type", response.content_type.encode("latin-1")))
        await send({"type": "http.response.start", "status": response.status,
                    "headers": out_headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self._on_startup is not None:
                    self._on_startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._on_shutdown is not None:
                    self._on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
