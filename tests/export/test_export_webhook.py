"""The signed webhook target against a real local receiver (HTTP on 127.0.0.1:0) that
verifies signatures and counts what it got per key; and the one verify function."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from export_factories import SECRET

from meterline.alerts import webhook as alerts
from meterline.core.errors import ConfigError
from meterline.export.engine import EngineSettings, Exporter
from meterline.export.items import ExportItem
from meterline.export.ledger import ExportLedger, RetryPolicy
from meterline.export.receiver import WebhookReceiver
from meterline.export.signed_http import sign, verify_signature
from meterline.export.webhook_target import WebhookTarget, WebhookTargetSettings


def _exporter(tmp_path: Path, url: str, *, timeout_s: float = 5.0, lines: int = 1,
              **policy: object) -> tuple[Exporter, ExportLedger]:
    ledger = ExportLedger(tmp_path / "ledger.db",
                          policy=RetryPolicy(**{"backoff_base_s": 0.01,  # type: ignore[arg-type]
                                                "backoff_max_s": 0.05, **policy}),
                          rng=random.Random(2))
    target = WebhookTarget(WebhookTargetSettings(url, SECRET, timeout_s, lines))
    return Exporter(ledger, target, settings=EngineSettings(20, 4)), ledger


# --------------------------------------------------------------------------- signatures


def test_verify_signature_accepts_only_the_signed_fresh_body() -> None:
    body = b'{"lines":[]}'
    now = 1_800_000_000
    headers = {"X-Meterline-Timestamp": str(now), "X-Meterline-Signature":
               sign(SECRET, now, body)}
    assert verify_signature(SECRET, headers, body, 300, now_s=now + 299)
    lower = {k.lower(): v for k, v in headers.items()}  # frameworks lower-case header names
    assert verify_signature(SECRET, lower, body, 300, now_s=now)
    assert not verify_signature(SECRET, headers, body + b" ", 300, now_s=now)
    assert not verify_signature(SECRET + "x", headers, body, 300, now_s=now)
    assert not verify_signature(SECRET, headers, body, 300, now_s=now + 301)  # a replay
    assert not verify_signature(SECRET, {"X-Meterline-Timestamp": str(now)}, body, now_s=now)
    rotated = {**headers, "X-Meterline-Signature":
               f"{sign('old-secret-0123456789', now, body)}, {sign(SECRET, now, body)}"}
    assert verify_signature(SECRET, rotated, body, 300, now_s=now)
    # Independent of our code: HMAC-SHA256 over "<ts>." + body, hex, with "v1=".
    import hashlib
    import hmac

    want = hmac.new(SECRET.encode(), f"{now}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers["X-Meterline-Signature"] == f"v1={want}"


def test_the_anomaly_webhook_uses_the_same_signing() -> None:
    body = b"{}"
    sig = alerts.sign(SECRET, 1000, body)
    assert sig == sign(SECRET, 1000, body)
    assert alerts.verify(SECRET, body, "1000", sig, now_s=1000)
    assert not alerts.verify(SECRET, body, "1000", sig, now_s=2000)


def test_settings_report_every_problem_and_never_the_secret() -> None:
    with pytest.raises(ConfigError) as err:
        WebhookTarget(WebhookTargetSettings("ftp://x", "short", 0, 0))
    assert len(err.value.errors) == 4
    settings = WebhookTargetSettings("http://127.0.0.1/h", SECRET)
    assert SECRET not in repr(settings)


# --------------------------------------------------------------------------- delivery


def test_every_line_arrives_signed_once_with_its_key(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(120)
    with WebhookReceiver(SECRET) as rx:
        exporter, ledger = _exporter(tmp_path, rx.url)
        exporter.enqueue(items)
        report = exporter.run()
    assert (report.sent, report.failed) == (120, 0)
    assert rx.bad_signatures == 0 and rx.requests == 120
    assert set(rx.held) == {it.key for it in items}
    assert set(rx.deliveries.values()) == {1}
    assert {h["Idempotency-Key"] for h in rx.seen_headers} == {it.key for it in items}
    by_key = {it.key: it for it in items}
    for key, line in rx.held.items():  # exact decimals as text, the line's own values
        assert (line["amount"], line["quantity"]) == (str(by_key[key].amount),
                                                      str(by_key[key].quantity))
    assert {e.remote_id for e in ledger.entries("webhook")} == {
        f"rx-{n}" for n in range(1, 121)}


def test_several_lines_per_request_dedupe_per_line(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(50)
    with WebhookReceiver(SECRET) as rx:
        exporter, _ = _exporter(tmp_path, rx.url, lines=10)
        exporter.enqueue(items)
        assert exporter.run().sent == 50
    assert rx.requests == 5  # batches of 20, 20, 10 -> 2 + 2 + 1 requests of 10 lines
    assert set(rx.held) == {it.key for it in items}
    assert all(h["Idempotency-Key"].startswith("batch:") for h in rx.seen_headers)


def test_a_receiver_answering_503_for_a_while_gets_everything_after(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(30)
    with WebhookReceiver(SECRET, respond=lambda n, key: 503 if n <= 45 else None) as rx:
        exporter, ledger = _exporter(tmp_path, rx.url, max_attempts=100)
        exporter.enqueue(items)
        first = exporter.run()  # one pass: all 30 answered 503, all still pending
        assert (first.sent, first.retried, first.pending) == (0, 30, 30)
        report = exporter.run(until_drained=True)
    assert report.sent == 30 and report.failed == 0
    assert rx.refused == 45
    assert set(rx.held) == {it.key for it in items} and set(rx.deliveries.values()) == {1}
    assert ledger.counts("webhook") == {"pending": 0, "sending": 0, "sent": 30, "failed": 0}


def test_a_4xx_is_a_permanent_failure_with_the_reason(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(10)
    bad = items[3].key
    with WebhookReceiver(SECRET, respond=lambda n, key: 422 if key == bad else None) as rx:
        exporter, ledger = _exporter(tmp_path, rx.url)
        exporter.enqueue(items)
        report = exporter.run(until_drained=True)
    assert (report.sent, report.failed, report.failed_keys) == (9, 1, [bad])
    assert rx.requests == 10  # not retried
    (entry,) = ledger.entries("webhook", states=("failed",))
    assert entry.last_status == 422
    assert entry.last_response == 'rejected: http 422: {"error":"answering 422"}'


def test_timeouts_and_an_unreachable_receiver_are_retried(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(3)
    slow = {"left": 2}

    def respond(n: int, key: str) -> int | None:
        if slow["left"] > 0:
            slow["left"] -= 1
            time.sleep(0.6)  # beyond the 0.2 s timeout: the sender gives up and retries
        return None

    with WebhookReceiver(SECRET, respond=respond) as rx:
        exporter, ledger = _exporter(tmp_path, rx.url, timeout_s=0.2, max_attempts=20)
        exporter.enqueue(items)
        report = exporter.run(until_drained=True)
    assert report.sent == 3 and report.retried == 2
    # The timed-out requests did arrive (late): on the wire twice, held once by key.
    assert set(rx.held) == {it.key for it in items}
    assert sum(rx.deliveries.values()) == 5 and max(rx.deliveries.values()) == 2

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exporter, ledger = _exporter(tmp_path / "down", f"http://127.0.0.1:{port}/h")
    exporter.enqueue(items)
    report = exporter.run()
    assert (report.sent, report.failed, report.pending) == (0, 0, 3)
    assert {e.last_response.split(":")[0] for e in ledger.entries("webhook")} == {
        "unreachable"}


def test_bodies_are_json_line_items_with_the_key_inside(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    from meterline.export.webhook_target import request_body

    (item,) = make_items(1)
    doc = orjson.loads(request_body([item]))
    assert doc["type"] == "meterline.rated_lines" and doc["version"] == 1
    (line,) = doc["lines"]
    assert line["idempotency_key"] == line["key"] == item.key
    assert line["amount"] == "0.00" and line["currency"] == "USD"
