"""Signed webhook target: rated line items as JSON POSTs, one idempotency key per line.

Each request carries ``lines_per_request`` lines (1 by default: one line, one request)::

    POST <url>
    Content-Type: application/json
    Idempotency-Key: ml1:sub-1:1793491200000:1793491200000/usage/api_calls:count:0
    X-Meterline-Timestamp: 1796083200
    X-Meterline-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

    {"type": "meterline.rated_lines", "version": 1,
     "lines": [{"idempotency_key": "ml1:...", "key": "ml1:...", "customer": "acme",
                "quantity": "1250", "amount": "2.50", "currency": "USD", ...}]}

With several lines per request the header is ``batch:<sha256 of the keys>`` and the
receiver dedupes per line on ``idempotency_key`` in the body. Receivers verify with
:func:`meterline.export.signed_http.verify_signature` and answer 2xx (or 409: already
held) for lines they hold. Outcomes: 2xx/409 sent; 408/425/429/5xx, timeouts and
connection errors retried by the engine with exponential backoff and jitter; any other
4xx is a permanent failure stored with the status and the start of the answer. The
secret is never logged, stored or put in an error (only the signature derived from it
leaves the process).

Transport: :class:`meterline.export.http1.PipelinedPoster` (a kept-alive connection per
engine thread, one write per request); ``pipeline`` > 1 also pipelines that many requests
of a batch on the connection (docs/export.md section 8 has the measurements). Every
request is signed and keyed on its own, so pipelining changes nothing a receiver sees
except the arrival order on one connection.
"""

from __future__ import annotations

import hashlib
import http.client
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from meterline.export.build import item_to_dict
from meterline.export.http1 import PipelinedPoster
from meterline.export.items import ExportItem, SendResult
from meterline.export.signed_http import classify_status, signed_headers
from meterline.logs import redact

__all__ = ["WebhookTarget", "WebhookTargetSettings", "request_body"]

USER_AGENT = "meterline-export/1"

# (body, headers) -> (status, response body); raises OSError/TimeoutError when unreachable.
Post = Callable[[bytes, Mapping[str, str]], tuple[int, bytes]]


@dataclass(frozen=True)
class WebhookTargetSettings:
    url: str
    secret: str
    timeout_s: float = 10.0
    lines_per_request: int = 1
    pipeline: int = 1  # requests in flight per connection (1: one at a time)

    def errors(self) -> list[str]:
        out = []
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            out.append("webhook url must be an http(s) URL (--url or METERLINE_WEBHOOK_URL)")
        if not isinstance(self.secret, str) or len(self.secret) < 16:
            out.append("webhook secret must be at least 16 characters "
                       "(METERLINE_WEBHOOK_SECRET)")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, int | float) \
                or self.timeout_s <= 0:
            out.append(f"webhook timeout must be > 0 seconds, got {self.timeout_s!r}")
        if isinstance(self.lines_per_request, bool) \
                or not isinstance(self.lines_per_request, int) or self.lines_per_request < 1:
            out.append(f"lines per request must be an int >= 1, got {self.lines_per_request!r}")
        if isinstance(self.pipeline, bool) or not isinstance(self.pipeline, int) \
                or not 1 <= self.pipeline <= 64:
            out.append(f"pipeline depth must be an int 1..64, got {self.pipeline!r}")
        return out

    def __repr__(self) -> str:  # never the secret
        return (f"WebhookTargetSettings(url={redact(self.url)!r}, secret='***', "
                f"timeout_s={self.timeout_s}, lines_per_request={self.lines_per_request}, "
                f"pipeline={self.pipeline})")


def request_body(items: Sequence[ExportItem]) -> bytes:
    lines = [{"idempotency_key": it.key, **item_to_dict(it)} for it in items]
    return orjson.dumps({"type": "meterline.rated_lines", "version": 1, "lines": lines},
                        option=orjson.OPT_SORT_KEYS)


def request_key(items: Sequence[ExportItem]) -> str:
    if len(items) == 1:
        return items[0].key
    return "batch:" + hashlib.sha256("\n".join(it.key for it in items).encode()).hexdigest()


class WebhookTarget:
    def __init__(self, settings: WebhookTargetSettings, *, name: str = "webhook",
                 post: Post | None = None,
                 clock_s: Callable[[], float] = time.time) -> None:
        from meterline.core.errors import ConfigError

        found = settings.errors()
        if found:
            raise ConfigError(found, "webhook target")
        self.name = name
        self.settings = settings
        self._poster = None if post is not None else PipelinedPoster(
            settings.url, settings.timeout_s, settings.pipeline)
        self._post: Post | None = post
        self._clock_s = clock_s

    def close(self) -> None:
        if self._poster is not None:
            self._poster.close()

    def send(self, items: Sequence[ExportItem]) -> list[SendResult]:
        n = self.settings.lines_per_request
        chunks = [items[i:i + n] for i in range(0, len(items), n)]
        depth = self.settings.pipeline
        out: list[SendResult] = []
        for g in range(0, len(chunks), depth):
            group = chunks[g:g + depth]
            # Signed just before its group leaves: a slow receiver must not make the
            # timestamps of a batch's last requests stale (receivers allow 5 minutes).
            timestamp = int(self._clock_s())
            requests = []
            for chunk in group:
                body = request_body(chunk)
                requests.append((body, signed_headers(self.settings.secret, body,
                                                      request_key(chunk), timestamp,
                                                      USER_AGENT)))
            if self._poster is not None:
                answers = self._poster.post_many(requests)
            else:
                answers = [self._post_one(body, headers) for body, headers in requests]
            for chunk, answer in zip(group, answers, strict=True):
                out += self._results(chunk, answer)
        return out

    def _post_one(self, body: bytes, headers: Mapping[str, str]
                  ) -> tuple[int, bytes] | OSError:
        assert self._post is not None
        try:
            return self._post(body, headers)
        except (OSError, TimeoutError, http.client.HTTPException) as exc:
            return exc if isinstance(exc, OSError) else OSError(f"{type(exc).__name__}: {exc}")

    def _results(self, chunk: Sequence[ExportItem], answer: tuple[int, bytes] | OSError
                 ) -> list[SendResult]:
        if isinstance(answer, OSError):
            reason = redact(f"unreachable: {type(answer).__name__}: {answer}")[:200]
            return [SendResult(it.key, "retry", None, reason) for it in chunk]
        status, answer_body = answer
        return self._answered(chunk, status, answer_body)

    def _answered(self, chunk: Sequence[ExportItem], status: int, answer: bytes
                  ) -> list[SendResult]:
        outcome = classify_status(status)
        # A receiver that echoes what it got must not carry the secret into the ledger.
        text = answer.decode("utf-8", "replace").strip().replace(self.settings.secret, "***")
        response = redact(f"http {status}" + (f": {text[:200]}" if text else ""))
        remote = ""
        if outcome == "sent" and text.startswith("{"):
            try:
                remote = str(orjson.loads(answer).get("id", ""))[:100]
            except (orjson.JSONDecodeError, AttributeError):
                remote = ""
        return [SendResult(it.key, outcome, status, response, remote) for it in chunk]

    def received(self, keys: Sequence[str]) -> set[str] | None:
        return None  # a webhook cannot be asked what it holds
