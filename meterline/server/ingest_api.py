"""The ingest handlers: ``POST /api/v1/events`` (OpenMeter CloudEvents, or one Lago
event), ``POST /api/v1/events/batch`` (Lago) and ``POST /api/v1/batches`` (native
envelope). Each reads its format into drafts, then all share one rule: validate every
event, then make them all durable, or refuse the whole request (docs/server.md, Ingest).

CloudEvents batches and native envelopes first try the columnar fast path (fastpath.py):
it returns the very items the per-event path would, or None, and then the per-event path
runs and decides (and reports every invalid event by index).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from meterline.core.meters import MeterRegistry
from meterline.sdk.batching import Item
from meterline.server import fastpath, problems
from meterline.server.formats import cloudevents, lago, native
from meterline.server.formats.common import NeedsExactParse, parse_json
from meterline.server.keys import Principal
from meterline.server.messages import JSON, Request, Response, json_response, media_type
from meterline.server.metrics import ServerMetrics
from meterline.server.problems import EventError, Problem
from meterline.server.validation import Draft, Validator
from meterline.server.writers import EventWriter, Unavailable


class IngestApi:
    def __init__(self, *, registry: MeterRegistry, validator: Validator, writer: EventWriter,
                 max_events_per_request: int, metrics: ServerMetrics | None,
                 clock_ms: Callable[[], int], fast_path: bool | None = None) -> None:
        self._registry = registry
        self._validator = validator
        self._writer = writer
        self._max_events = max_events_per_request
        self._metrics = metrics
        self._clock_ms = clock_ms
        if fast_path is None:  # "0" turns it off: the benchmark's before/after, a safety valve
            fast_path = os.environ.get("METERLINE_SERVER_FASTPATH", "1") != "0"
        self._fast_path = fast_path

    async def events(self, request: Request, principal: Principal, _: list[str]) -> Response:
        ctype = media_type(request)
        allowed = [cloudevents.CLOUDEVENTS, cloudevents.CLOUDEVENTS_BATCH, JSON]
        if ctype not in allowed:
            raise problems.unsupported_media_type(ctype, allowed)

        def read(doc: Any) -> list[Draft | EventError]:
            if ctype == JSON and lago.is_lago_event(doc):
                return lago.read_one(doc, self._registry)
            batch = {cloudevents.CLOUDEVENTS: False, cloudevents.CLOUDEVENTS_BATCH: True}
            return cloudevents.read(doc, self._registry, batch=batch.get(ctype))

        doc = parse_json(request.body)
        if ctype != cloudevents.CLOUDEVENTS and self._fast_path and type(doc) is list \
                and 0 < len(doc) <= self._max_events:
            now = self._clock_ms()
            items = fastpath.cloudevents_items(doc, self._registry, principal.tenant, now)
            if items is not None:
                await self._commit(items, "cloudevents")
                return Response(204)
        drafts, doc = read_json(request.body, read, doc)
        fmt = "lago" if ctype == JSON and lago.is_lago_event(doc) else "cloudevents"
        now = await self._ingest(drafts, principal, fmt)
        if ctype == JSON and lago.is_lago_event(doc):
            return json_response(200, {"event": lago.echo(doc["event"],
                                                          draft_time(drafts[0], now))})
        return Response(204)

    async def lago_batch(self, request: Request, principal: Principal, _: list[str]
                         ) -> Response:
        if media_type(request) not in (JSON, ""):
            raise problems.unsupported_media_type(media_type(request), [JSON])
        drafts, doc = read_json(request.body, lambda d: lago.read_batch(d, self._registry))
        now = await self._ingest(drafts, principal, "lago")
        return json_response(200, {"events": [
            lago.echo(e, draft_time(d, now)) for e, d in zip(doc["events"], drafts,
                                                              strict=True)]})

    async def native(self, request: Request, principal: Principal, _: list[str]) -> Response:
        allowed = [native.ENVELOPE, JSON]
        if media_type(request) not in allowed:
            raise problems.unsupported_media_type(media_type(request), allowed)
        batch = native.decode(request.body)
        if self._fast_path and len(batch) <= self._max_events:
            items = fastpath.envelope_items(batch, self._registry, principal.tenant)
            if items is not None:
                await self._commit(items, "native")
                return json_response(200, {"accepted": len(items)})
        drafts = native.drafts(batch)
        await self._ingest(drafts, principal, "native")
        return json_response(200, {"accepted": len(drafts)})

    async def _ingest(self, drafts: list[Draft | EventError], principal: Principal,
                      fmt: str) -> int:
        """Validate every event, then make them all durable, or raise. All or nothing: one
        invalid event rejects the request (a client fixes and resends the whole batch;
        with the same ids, what was already written dedupes)."""
        if len(drafts) > self._max_events:
            self._count(fmt, "rejected", len(drafts))
            raise Problem(413, "too-many-events", "Too many events",
                          f"{len(drafts)} events; at most {self._max_events} per request")
        now = self._clock_ms()
        items, errors = self._validator.items(drafts, principal.tenant, now)
        if errors:
            self._count(fmt, "rejected", len(drafts))
            raise problems.invalid_events(errors, len(drafts))
        await self._commit(items, fmt)
        return now

    async def _commit(self, items: list[Item], fmt: str) -> None:
        """Every item durable, or raise 503 (nothing of the request counts as accepted)."""
        try:
            await self._write(items)
        except Problem:
            self._count(fmt, "unavailable", len(items))
            raise
        self._count(fmt, "accepted", len(items))

    def _count(self, fmt: str, outcome: str, n: int) -> None:
        if self._metrics is not None:
            self._metrics.events(fmt, outcome, n)

    async def _write(self, items: list[Item]) -> None:
        try:
            future = self._writer.write(items)
            await asyncio.wrap_future(future)
        except Unavailable as exc:
            raise problems.unavailable(str(exc), exc.retry_after_s) from None


def read_json(body: bytes, read: Callable[[Any], list[Draft | EventError]],
              parsed: Any = None) -> tuple[list[Draft | EventError], Any]:
    """Parse with orjson (unless ``parsed`` is that already); when a JSON float reaches a
    value that must be exact, parse again with Decimals (rare: most clients send integers
    or strings)."""
    doc = parse_json(body) if parsed is None else parsed
    try:
        return read(doc), doc
    except NeedsExactParse:
        doc = parse_json(body, exact=True)
        return read(doc), doc


def draft_time(draft: Draft | EventError, now_ms: int) -> int:
    if isinstance(draft, Draft) and type(draft.timestamp_ms) is int:
        return draft.timestamp_ms
    return now_ms
