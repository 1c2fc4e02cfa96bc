"""Signed HTTP delivery shared by every Meterline webhook: the invoicing webhook target
(meterline/export/webhook_target.py) and the anomaly alerts (meterline/alerts/webhook.py).

One signing scheme, one verify function for receivers, one retry classification, one
backoff. **Signature**: every POST carries

- ``X-Meterline-Timestamp``: UTC seconds when it was signed;
- ``X-Meterline-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``.

Signing the timestamp with the body lets a receiver refuse a replay of an old request:
:func:`verify_signature` rejects a timestamp more than ``tolerance_s`` (5 minutes) away
from its clock. A receiver checks, in this order: the signature (constant time), then the
``Idempotency-Key`` it has already processed (answer 2xx again without re-applying)::

    from meterline.export.signed_http import verify_signature

    if not verify_signature(SECRET, request.headers, raw_body, tolerance_s=300):
        return 401
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import random
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Literal

__all__ = ["IDEMPOTENCY_HEADER", "RETRY_STATUS", "SIGNATURE_HEADER", "TIMESTAMP_HEADER",
           "HttpPoster", "backoff_s", "classify_status", "sign", "signed_headers",
           "verify_signature"]

SIGNATURE_HEADER = "X-Meterline-Signature"
TIMESTAMP_HEADER = "X-Meterline-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Answers worth another try: the receiver or a proxy is overloaded, restarting or slow.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def sign(secret: str | bytes, timestamp_s: int, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, f"{timestamp_s}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def signed_headers(secret: str | bytes, body: bytes, idempotency_key: str,
                   timestamp_s: int, user_agent: str) -> dict[str, str]:
    return {"Content-Type": "application/json", TIMESTAMP_HEADER: str(timestamp_s),
            SIGNATURE_HEADER: sign(secret, timestamp_s, body),
            IDEMPOTENCY_HEADER: idempotency_key, "User-Agent": user_agent}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lower = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lower), None)


def verify_signature(secret: str | bytes, headers: Mapping[str, str], body: bytes,
                     tolerance_s: float = 300.0, *, now_s: float | None = None) -> bool:
    """For receivers: True if the request's ``X-Meterline-Signature`` signs ``body`` with
    its ``X-Meterline-Timestamp`` under ``secret`` and that timestamp is within
    ``tolerance_s`` of now. Header names are matched case-insensitively; comparison is
    constant-time; several ``v1=`` values separated by commas (a secret being rotated) are
    each tried. ``body`` must be the raw bytes received, before any JSON parsing."""
    timestamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    if not timestamp or not signature or not timestamp.isdigit():
        return False
    ts = int(timestamp)
    now = time.time() if now_s is None else now_s
    if abs(now - ts) > tolerance_s:
        return False
    expected = sign(secret, ts, body)
    return any(hmac.compare_digest(expected, part.strip()) for part in signature.split(","))


def classify_status(status: int) -> Literal["sent", "retry", "failed"]:
    """2xx and 409 (the receiver already holds this key) are delivered; 408/425/429/5xx
    retried; any other answer is a permanent refusal."""
    if 200 <= status < 300 or status == 409:
        return "sent"
    if status in RETRY_STATUS or status >= 500:
        return "retry"
    return "failed"


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Wait before attempt ``attempt + 1``: exponential with full jitter (AWS's "Exponential
    Backoff And Jitter"): uniform in [0, min(cap, base * 2**(attempt-1))]. Full jitter
    spreads a crowd of retries after an outage instead of having them arrive together."""
    ceiling = min(cap_s, base_s * 2 ** max(0, min(attempt - 1, 30)))
    return rng.uniform(0.0, ceiling)


class HttpPoster:
    """POST with one kept-alive connection per thread (http.client): a new TCP connection
    per item would cost more than the request. Thread-safe; ``close`` drops connections.
    Returns (status, up to 2 kB of the response body); raises OSError/TimeoutError on
    connection problems (the caller retries those)."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http(s) URL")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self._timeout_s)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def post(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        for fresh in (False, True):
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=body, headers=dict(headers))
                response = conn.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                return response.status, data[:2048]
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                conn.close()
                self._local.conn = None
                # A kept-alive connection the server closed while idle: retry once on a
                # fresh one. The same error on a fresh connection is the server's problem.
                if fresh:
                    raise OSError(f"{type(exc).__name__}: {exc}") from None
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
