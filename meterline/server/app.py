"""Routing, authentication and the one error shape, free of any web framework, plus the
ASGI adapter. The handlers live by concern: ingest_api.py (the three ingest formats),
usage_api.py (usage and quota reads), page_api.py (the usage page and its signed links);
messages.py holds Request/Response and the parsing helpers they share.

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
    POST /api/v1/usage-links        {"customer", "expires_in_s"} -> a signed page link
    GET  /usage/{customer}          the usage page (signed link, or a read key's header);
                                    ?granularity=hour[&day=YYYY-MM-DD], ?format=csv
    GET  /api/v1/openapi.json       (no key needed)
    GET  /healthz                   (no key needed)

Prometheus /metrics is served on its own loopback listener, not here (server/metrics.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from meterline.core.meters import MeterRegistry
from meterline.server import problems
from meterline.server.ingest_api import IngestApi
from meterline.server.keys import KeyStore, Principal
from meterline.server.messages import (
    JSON,
    Request,
    Response,
    json_response,
    problem_response,
    segment,
)
from meterline.server.metrics import ServerMetrics, route_template
from meterline.server.page_api import PageApi
from meterline.server.problems import Problem
from meterline.server.usage import QuotaService, UsageReader
from meterline.server.usage_api import UsageApi
from meterline.server.validation import Validator
from meterline.server.writers import EventWriter

__all__ = ["AsgiAdapter", "Limits", "Request", "Response", "ServerApp"]

log = logging.getLogger(__name__)

Handler = Callable[[Request, Principal, list[str]], Awaitable[Response]]


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
        self._openapi = orjson.dumps(openapi)
        self._health = health or dict
        self.metrics = metrics
        self.ingest = IngestApi(registry=registry, validator=self.validator, writer=writer,
                                max_events_per_request=self.limits.max_events_per_request,
                                metrics=metrics, clock_ms=clock_ms)
        self.usage = UsageApi(registry=registry, reader=reader, quotas=quotas,
                              clock_ms=clock_ms)
        self.page = PageApi(registry=registry, keys=keys, reader=reader,
                            authenticate=self._authenticate, clock_ms=clock_ms)

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
            return problem_response(problem)
        except Exception:  # a bug: answer 500 in the one error shape, and log it
            log.exception("unhandled error on %s %r", request.method, request.raw_path[:200])
            return problem_response(Problem(500, "internal", "Internal server error",
                                            "see the server log"))

    async def _route(self, request: Request) -> Response:
        parts = request.raw_path.split(b"?", 1)[0].strip(b"/").split(b"/")
        method = request.method
        if len(parts) == 2 and parts[0] == b"usage" and method == "GET":
            return await self.page.page(request, segment(parts[1]))
        if parts == [b"healthz"]:
            stages = self._health()
            ok = all(not v.startswith("stopped") for v in stages.values())
            return json_response(200 if ok else 503, {"status": "ok" if ok else "degraded",
                                                      "stages": stages})
        if parts[:2] != [b"api", b"v1"]:
            raise problems.not_found()
        route = parts[2:]
        if route == [b"openapi.json"] and method == "GET":
            return Response(200, self._openapi, JSON)
        handler: Handler | None = None
        scope = "ingest"
        args: list[str] = []
        if method == "POST" and route == [b"events"]:
            handler = self.ingest.events
        elif method == "POST" and route == [b"events", b"batch"]:
            handler = self.ingest.lago_batch
        elif method == "POST" and route == [b"batches"]:
            handler = self.ingest.native
        elif method == "GET" and len(route) == 3 and route[0] in (b"usage", b"quota"):
            handler = self.usage.usage if route[0] == b"usage" else self.usage.quota
            scope = "read"
            args = [segment(route[1]), segment(route[2])]
        elif method == "POST" and route == [b"usage-links"]:
            handler = self.page.usage_link
            scope = "read"
        if handler is None:
            known = {b"events", b"batches", b"usage", b"quota", b"openapi.json",
                     b"usage-links"}
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
            response = problem_response(problems.too_large(limit))
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
                    response = problem_response(problems.too_large(limit))
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
