"""Signed webhook for anomaly events: Alertmanager-shaped, retried, never blocking.

    sender = WebhookSender(WebhookSettings(url="https://ops.example/hooks/meterline",
                                           secret="..."), dead_letters=SqliteDeadLetters(p))
    sender.submit(events)          # returns at once; a thread delivers
    ...
    sender.close()                 # what could not be delivered is dead-lettered, not lost

**Signature.** Every POST carries ``X-Meterline-Timestamp`` (UTC seconds) and
``X-Meterline-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``. Signing
the timestamp with the body lets a receiver refuse replays of an old request
(:func:`verify` allows ``tolerance_s``, 5 minutes by default). ``Idempotency-Key`` is the
event's key (series, episode start, sequence): the stage may deliver an event again after a
crash or a retry whose answer was lost, so receivers dedupe on it.

**Payload.** Alertmanager's webhook format (``version: "4"``), so receivers written for
Alertmanager accept it unchanged: one alert per event, ``status`` firing (open, update,
early) or resolved, ``labels`` (alertname, meter, direction, severity, customer, group,
kind), ``annotations`` (the explanation), ``startsAt`` the episode start, ``endsAt`` the
end of its last abnormal window once resolved, ``fingerprint`` one per episode. The
event itself is under ``meterline`` (``EpisodeEvent.to_dict``).

**Delivery.** A bounded queue drained by one thread: ``submit`` never blocks (a full queue
dead-letters the event with reason ``queue_full``). Connection errors, timeouts, 408, 429
and 5xx are retried with exponential backoff and full jitter, up to ``max_attempts``;
other 4xx answers are final. An event not delivered after its attempts is dead-lettered
with the reason and the body, never dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from meterline.core.anomaly.model import EARLY, EpisodeEvent
from meterline.core.errors import ConfigError
from meterline.export.signed_http import (
    IDEMPOTENCY_HEADER,
    RETRY_STATUS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    backoff_s,
    sign,
    signed_headers,
    verify_signature,
)

__all__ = ["ALERTNAME", "IDEMPOTENCY_HEADER", "SIGNATURE_HEADER", "TIMESTAMP_HEADER",
           "DeadLetterStore", "MemoryDeadLetters", "SqliteDeadLetters", "WebhookSender",
           "WebhookSettings", "alert_payload", "sign", "verify"]

log = logging.getLogger(__name__)

ALERTNAME = "MeterlineUsageAnomaly"
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "no end yet"
# One signing scheme and one retry rule for every Meterline webhook (the invoicing export's
# too): meterline/export/signed_http.py. Re-exported here for existing receivers' imports.
_RETRY_STATUS = RETRY_STATUS


def verify(secret: str | bytes, body: bytes, timestamp: str | None, signature: str | None,
           *, now_s: float | None = None, tolerance_s: float = 300.0) -> bool:
    """For receivers: :func:`meterline.export.signed_http.verify_signature` given the two
    header values instead of the headers."""
    headers = {k: v for k, v in ((TIMESTAMP_HEADER, timestamp), (SIGNATURE_HEADER, signature))
               if v is not None}
    return verify_signature(secret, headers, body, tolerance_s, now_s=now_s)


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def alert_payload(event: EpisodeEvent, *, receiver: str = "meterline",
                  external_url: str = "") -> dict[str, Any]:
    """The Alertmanager webhook document (version 4) for one event."""
    a = event.anomaly
    s = event.series
    resolved = event.kind == "resolve"
    labels = {"alertname": ALERTNAME, "meter": s.meter, "direction": a.direction,
              "severity": a.severity, "customer": s.customer,
              "group": "&".join(f"{k}={v}" for k, v in s.group), "kind": event.kind}
    annotations = {
        "summary": f"{s.customer} {s.meter}: usage {a.direction} ({a.severity})"
                   + (" - early warning, window not final" if event.kind == EARLY else ""),
        "description": a.explain(),
        "observed": repr(a.observed), "expected": repr(a.expected),
        "band": f"{a.lower!r}..{a.upper!r}", "score": repr(a.score),
        "windows": str(event.windows),
    }
    ends = _rfc3339(event.until_ms) if resolved and event.until_ms is not None else _ZERO_TIME
    fingerprint = hashlib.sha256(f"{s.id}|{event.since_ms}".encode()).hexdigest()[:16]
    alert = {"status": "resolved" if resolved else "firing", "labels": labels,
             "annotations": annotations, "startsAt": _rfc3339(event.since_ms),
             "endsAt": ends, "generatorURL": external_url, "fingerprint": fingerprint}
    group_labels = {"alertname": ALERTNAME, "meter": s.meter}
    return {
        "version": "4", "groupKey": f"{{}}:{{alertname=\"{ALERTNAME}\", meter=\"{s.meter}\"}}",
        "truncatedAlerts": 0, "status": alert["status"], "receiver": receiver,
        "groupLabels": group_labels, "commonLabels": labels,
        "commonAnnotations": annotations, "externalURL": external_url, "alerts": [alert],
        "meterline": event.to_dict(),
    }


# --------------------------------------------------------------------------- dead letters


class DeadLetterStore(Protocol):
    def add(self, key: str, reason: str, attempts: int, body: bytes) -> None: ...


@dataclass
class MemoryDeadLetters:
    entries: list[tuple[str, str, int, bytes]] = field(default_factory=list)

    def add(self, key: str, reason: str, attempts: int, body: bytes) -> None:
        self.entries.append((key, reason, attempts, body))


class SqliteDeadLetters:
    """Undelivered webhook events on disk (SQLite: durable appends for free). One row per
    event key; a later failure of the same key replaces it."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS webhook_dead_letters (key TEXT PRIMARY "
                         "KEY, reason TEXT NOT NULL, attempts INTEGER NOT NULL, body BLOB NOT "
                         "NULL, at_ms INTEGER NOT NULL)")
        self._lock = threading.Lock()

    def add(self, key: str, reason: str, attempts: int, body: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO webhook_dead_letters VALUES (?,?,?,?,?)",
                             (key, reason, attempts, body, time.time_ns() // 1_000_000))

    def rows(self) -> list[tuple[str, str, int]]:
        with self._lock:
            return [(str(k), str(r), int(n)) for k, r, n in self._db.execute(
                "SELECT key, reason, attempts FROM webhook_dead_letters ORDER BY key")]

    def close(self) -> None:
        self._db.close()


# --------------------------------------------------------------------------- sending


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    secret: str
    max_attempts: int = 8  # with the backoff below: about 2 minutes of trying
    backoff_base_s: float = 0.5  # attempt n waits up to base * 2**n (full jitter) ...
    backoff_max_s: float = 60.0  # ... capped here
    timeout_s: float = 10.0  # per request
    queue_size: int = 10_000  # events waiting; beyond: dead-lettered as queue_full
    receiver: str = "meterline"

    def errors(self) -> list[str]:
        out = []
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            out.append(f"url must be an http(s) URL, got {self.url!r}")
        if not isinstance(self.secret, str) or len(self.secret) < 16:
            out.append("secret must be a string of at least 16 characters")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or self.max_attempts < 1:
            out.append(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        for name in ("backoff_base_s", "backoff_max_s", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                out.append(f"{name} must be a number > 0 (seconds), got {value!r}")
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int) \
                or self.queue_size < 1:
            out.append(f"queue_size must be an int >= 1, got {self.queue_size!r}")
        return out

    def validate(self) -> None:
        found = self.errors()
        if found:
            raise ConfigError(found, "[anomalies.webhook]")


# (url, body, headers, timeout_s) -> HTTP status; raises OSError on connection problems.
Transport = Callable[[str, bytes, Mapping[str, str], float], int]


def urllib_transport(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@dataclass(slots=True)
class WebhookCounters:
    delivered: int = 0
    retries: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)


class WebhookSender:
    def __init__(self, settings: WebhookSettings, *, dead_letters: DeadLetterStore,
                 transport: Transport = urllib_transport,
                 clock_s: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        settings.validate()
        self.settings = settings
        self._dead = dead_letters
        self._transport = transport
        self._clock_s = clock_s
        self._rng = rng or random.Random()
        self._queue: queue.Queue[EpisodeEvent | None] = queue.Queue(settings.queue_size)
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0
        self.counters = WebhookCounters()
        self._thread = threading.Thread(target=self._run, name="meterline-webhook",
                                        daemon=True)
        self._thread.start()

    # -- the stream's side: never blocks -------------------------------------------------

    def submit(self, events: Iterable[EpisodeEvent]) -> None:
        for event in events:
            if self._stop.is_set():
                self._dead_letter(event, "shutdown", 0)
                continue
            with self._idle:
                self._busy += 1
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                self._done()
                self._dead_letter(event, "queue_full", 0)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted event was delivered or dead-lettered."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop: what is still queued or retrying is dead-lettered (reason ``shutdown``)."""
        self.flush(timeout_s)
        self._stop.set()
        while self._thread.is_alive():  # once stopped, the thread drains the queue quickly
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(timeout_s + self.settings.timeout_s)

    # -- the thread --------------------------------------------------------------------

    def _done(self) -> None:
        with self._idle:
            self._busy -= 1
            if not self._busy:
                self._idle.notify_all()

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                break
            if self._stop.is_set():
                self._dead_letter(event, "shutdown", 0)
                self._done()
                continue
            try:
                self._deliver(event)
            except Exception:  # a bug here must not kill the thread (or block the stage)
                log.exception("webhook: delivering %s failed unexpectedly", event.key)
                self._dead_letter(event, "internal_error", 0)
            finally:
                self._done()
        while True:  # stopped: nothing queued may vanish
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                self._dead_letter(left, "shutdown", 0)
                self._done()

    def _body(self, event: EpisodeEvent) -> bytes:
        payload = alert_payload(event, receiver=self.settings.receiver)
        return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()

    def _deliver(self, event: EpisodeEvent) -> None:
        s = self.settings
        body = self._body(event)
        reason = ""
        for attempt in range(s.max_attempts):
            if attempt:
                self.counters.retries += 1
                delay = backoff_s(attempt, s.backoff_base_s, s.backoff_max_s, self._rng)
                if self._stop.wait(delay):
                    self._dead_letter(event, f"shutdown after {reason}", attempt, body)
                    return
            ts = int(self._clock_s())
            headers = signed_headers(s.secret, body, event.key, ts, "meterline-webhook/1")
            try:
                status = self._transport(s.url, body, headers, s.timeout_s)
            except (OSError, TimeoutError) as exc:  # refused, reset, DNS, timeout
                reason = f"error: {type(exc).__name__}: {exc}"[:200]
                continue
            if 200 <= status < 300:
                self.counters.delivered += 1
                return
            reason = f"http {status}"
            if status not in _RETRY_STATUS:
                self._dead_letter(event, f"rejected: {reason}", attempt + 1, body)
                return
        self._dead_letter(event, f"gave up after {s.max_attempts} attempts: {reason}",
                          s.max_attempts, body)

    def _dead_letter(self, event: EpisodeEvent, reason: str, attempts: int,
                     body: bytes | None = None) -> None:
        kind = reason.split(":")[0].split(" ")[0]
        self.counters.dead_letters[kind] = self.counters.dead_letters.get(kind, 0) + 1
        log.warning("webhook: event %s dead-lettered after %d attempt(s): %s", event.key,
                    attempts, reason)
        try:
            self._dead.add(event.key, reason, attempts, body or self._body(event))
        except Exception:
            log.exception("webhook: could not store the dead letter of %s", event.key)
