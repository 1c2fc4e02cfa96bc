"""The signed webhook against a real HTTP receiver on loopback that verifies every
signature and counts deliveries per idempotency key, with 5xx answers, timeouts, a
rejection and a receiver that never answers well. Bounded: tiny backoffs, short timeouts,
and waits that end when every submitted event is delivered or dead-lettered."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from meterline.alerts.webhook import (
    ALERTNAME,
    MemoryDeadLetters,
    SqliteDeadLetters,
    WebhookSender,
    WebhookSettings,
    alert_payload,
    sign,
    verify,
)
from meterline.core.anomaly import AnomalyEngine, AnomalySettings, SeriesKey
from meterline.core.anomaly.model import EpisodeEvent

SECRET = "s3cret-s3cret-s3cret"
HOUR_MS = 3_600_000
START_MS = 1_704_067_200_000


class Receiver:
    """``script``: status per request in arrival order (``"hang"``: answer after the
    client's timeout); afterwards ``default``."""

    def __init__(self, script: list[Any], default: Any = 200) -> None:
        self.script = list(script)
        self.default = default
        self.requests = 0
        self.bad_signatures = 0
        self.delivered: Counter[str] = Counter()  # 2xx answers per idempotency key
        self.bodies: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests += 1
                    action = receiver.script.pop(0) if receiver.script else receiver.default
                    ok = verify(SECRET, body, self.headers["X-Meterline-Timestamp"],
                                self.headers["X-Meterline-Signature"])
                    if not ok:
                        receiver.bad_signatures += 1
                if action == "hang":
                    time.sleep(0.6)
                    action = 200  # too late: the client gave up and will retry
                status = int(action) if ok else 401
                if 200 <= status < 300:
                    key = self.headers["Idempotency-Key"]
                    with receiver.lock:
                        receiver.delivered[key] += 1
                        receiver.bodies[key] = json.loads(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(script: list[Any], default: Any = 200) -> Receiver:
        made.append(Receiver(script, default))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _events() -> list[EpisodeEvent]:
    engine = AnomalyEngine(AnomalySettings(min_abs_deviation=5))
    out: list[EpisodeEvent] = []
    for i in range(4):
        series = SeriesKey(f"cust-{i}", "api_calls")
        for h in range(16 * 24):
            base = 1000 if 9 <= h % 24 < 18 and (h // 24) % 7 < 5 else 100
            spike = h in (15 * 24 + 10 + i, 15 * 24 + 11 + i)
            out += engine.observe(series, START_MS + h * HOUR_MS, base * 30 if spike else base)
    assert {e.kind for e in out} >= {"open", "resolve"}
    return out


def _settings(url: str, **kw: Any) -> WebhookSettings:
    base: dict[str, Any] = {"url": url, "secret": SECRET, "max_attempts": 5,
                            "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 0.3}
    base.update(kw)
    return WebhookSettings(**base)


def test_retries_through_5xx_and_timeouts_deliver_every_event(receiver_factory: Any) -> None:
    events = _events()
    receiver = receiver_factory([503, 500, "hang", 502, 429, 200, 504])
    dead = MemoryDeadLetters()
    sender = WebhookSender(_settings(receiver.url, max_attempts=8), dead_letters=dead)
    sender.submit(events)
    assert sender.flush(timeout_s=30)
    sender.close()
    assert dead.entries == []
    assert receiver.bad_signatures == 0
    assert set(receiver.delivered) == {e.key for e in events}
    # a timed-out request may have reached the receiver: at least once, keyed
    assert all(n >= 1 for n in receiver.delivered.values())
    assert sum(receiver.delivered.values()) <= len(events) + 1
    assert sender.counters.retries >= 5 and sender.counters.delivered == len(events)
    body = receiver.bodies[events[0].key]
    assert body["version"] == "4" and body["alerts"][0]["labels"]["alertname"] == ALERTNAME
    assert body["meterline"]["key"] == events[0].key


def test_after_n_attempts_or_a_rejection_events_are_dead_lettered(
        receiver_factory: Any, tmp_path: Any) -> None:
    events = _events()[:3]
    receiver = receiver_factory([400], default=503)  # first rejected, then always down
    dead = SqliteDeadLetters(tmp_path / "dead.db")
    sender = WebhookSender(_settings(receiver.url, max_attempts=3), dead_letters=dead)
    sender.submit(events)
    assert sender.flush(timeout_s=30)
    sender.close()
    rows = dead.rows()
    assert sorted(k for k, _, _ in rows) == sorted(e.key for e in events)
    reasons = {k: (r, n) for k, r, n in rows}
    assert reasons[events[0].key] == ("rejected: http 400", 1)
    for e in events[1:]:
        assert reasons[e.key] == ("gave up after 3 attempts: http 503", 3)
    assert receiver.requests == 1 + 2 * 3
    assert receiver.delivered == Counter()


def test_submit_never_blocks_a_full_queue_dead_letters(receiver_factory: Any) -> None:
    receiver = receiver_factory([], default="hang")
    dead = MemoryDeadLetters()
    sender = WebhookSender(_settings(receiver.url, queue_size=2, max_attempts=1),
                           dead_letters=dead)
    events = _events()
    started = time.monotonic()
    sender.submit(events)
    assert time.monotonic() - started < 0.2  # the stream does not wait for the receiver
    sender.close(timeout_s=10)
    reasons = Counter(reason.split(":")[0] for _, reason, _, _ in dead.entries)
    assert reasons["queue_full"] >= len(events) - 3
    assert len(dead.entries) + sender.counters.delivered == len(events)


def test_signatures_verify_and_refuse_tampering_and_replays() -> None:
    body = b'{"a":1}'
    now = 1_800_000_000
    sig = sign(SECRET, now, body)
    assert verify(SECRET, body, str(now), sig, now_s=now + 10)
    assert verify(SECRET, body, str(now), "v1=00," + sig, now_s=now)  # rotating secrets
    assert not verify(SECRET, body + b" ", str(now), sig, now_s=now)
    assert not verify("another-secret-value", body, str(now), sig, now_s=now)
    assert not verify(SECRET, body, str(now), sig, now_s=now + 301)  # replayed later
    assert not verify(SECRET, body, None, sig, now_s=now)
    event = _events()[-1]
    doc = alert_payload(event)
    assert doc["status"] == "resolved" and doc["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"


def test_bad_settings_list_every_problem() -> None:
    from meterline.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        WebhookSender(WebhookSettings(url="ftp://x", secret="short", max_attempts=0,
                                      timeout_s=-1), dead_letters=MemoryDeadLetters())
    assert len(info.value.errors) == 4
