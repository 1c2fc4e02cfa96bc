"""The framework-free request and response of ``ServerApp.handle``, and the small parsing
helpers every handler module shares (query string, path segments, times, JSON bodies).

Every helper that can refuse input raises a ``Problem`` (problems.py), so a bad request is
answered 400 in the one problem+json shape wherever it is parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from meterline.server import problems
from meterline.server.formats.common import rfc3339_ms
from meterline.server.problems import PROBLEM_JSON, Problem

JSON = "application/json"


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


def query_params(request: Request) -> dict[str, list[str]]:
    try:
        return parse_qs(request.query.decode("ascii"), keep_blank_values=True,
                        errors="strict")
    except UnicodeError:
        raise problems.bad_request("the query string must be percent-encoded UTF-8") from None


def segment(raw: bytes) -> str:
    try:
        return unquote(raw.decode("ascii"), errors="strict")
    except UnicodeError:
        raise problems.bad_request("path segments must be percent-encoded UTF-8") from None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def one(query: dict[str, list[str]], name: str, default: str) -> str:
    """The last value of ``name`` (as most frameworks do), or ``default``."""
    values = query.get(name)
    return values[-1] if values else default


def time_param(query: dict[str, list[str]], name: str, default: int) -> int:
    if name not in query:
        return default
    text = query[name][-1]
    try:
        return int(text) if text.isdigit() else rfc3339_ms(text)
    except ValueError as exc:
        raise problems.bad_request(f"{name}: {exc} (or integer UTC milliseconds)") from None


def json_response(status: int, doc: Any) -> Response:
    return Response(status, orjson.dumps(doc, default=_exact), JSON)


def _exact(value: object) -> str:
    # Decimals come from exact parsing of client JSON (echoed Lago properties): as text,
    # every digit kept.
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def problem_response(problem: Problem) -> Response:
    return Response(problem.status, problem.body(), PROBLEM_JSON, dict(problem.headers))
