"""RFC 9457 problem details: the body of every error response.

One shape for every failure, so a client has one thing to parse. Invalid events are listed
*all* at once in ``errors`` (index into the request's events, field, message), never just
the first: a client fixing a 500-event batch should not need 500 round trips.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

PROBLEM_JSON = "application/problem+json"
# Problem types are relative URIs under /problems/ (RFC 9457 section 3.1.1 allows
# relative references); docs/server.md describes each.
_TYPE = "/problems/"


@dataclass(frozen=True)
class EventError:
    index: int  # position of the event in the request (0 for a single event)
    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message}


@dataclass
class Problem(Exception):
    """An HTTP error with an RFC 9457 body. Raise it from a handler."""

    status: int
    kind: str  # the last part of the type URI, e.g. "invalid-events"
    title: str
    detail: str = ""
    errors: list[EventError] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(f"{self.status} {self.title}: {self.detail}")

    def body(self) -> bytes:
        doc: dict[str, Any] = {"type": _TYPE + self.kind, "title": self.title,
                               "status": self.status}
        if self.detail:
            doc["detail"] = self.detail
        if self.errors:
            doc["errors"] = [e.as_dict() for e in self.errors]
        return orjson.dumps(doc)


def invalid_events(errors: list[EventError], total: int) -> Problem:
    bad = len({e.index for e in errors})
    return Problem(400, "invalid-events", "Invalid events",
                   f"{bad} of {total} event(s) are invalid; nothing was accepted", errors)


def bad_request(detail: str) -> Problem:
    return Problem(400, "bad-request", "Bad request", detail)


def unauthorized(detail: str = "missing or unknown API key") -> Problem:
    return Problem(401, "unauthorized", "Unauthorized", detail,
                   headers={"www-authenticate": 'Bearer realm="meterline"'})


def forbidden(detail: str) -> Problem:
    return Problem(403, "forbidden", "Forbidden", detail)


def not_found(detail: str = "no such resource") -> Problem:
    return Problem(404, "not-found", "Not found", detail)


def too_large(limit: int) -> Problem:
    return Problem(413, "body-too-large", "Request body too large",
                   f"the body exceeds {limit} bytes; split the batch")


def unsupported_media_type(got: str, allowed: list[str]) -> Problem:
    return Problem(415, "unsupported-media-type", "Unsupported media type",
                   f"got {got or 'none'!r}; send one of {', '.join(allowed)}")


def unavailable(detail: str, retry_after_s: int) -> Problem:
    return Problem(503, "unavailable", "Service unavailable", detail,
                   headers={"retry-after": str(retry_after_s)})


def unprocessable(detail: str) -> Problem:
    return Problem(422, "unprocessable", "Unprocessable request", detail)
