"""The export engine with in-memory targets: batching, bounded concurrency, outages,
refusals, corrections, re-runs and the metrics."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from export_factories import FakeClock, rated_line

from meterline.export.build import item_from_line, items_from_lines
from meterline.export.engine import EngineSettings, Exporter
from meterline.export.items import ExportItem, SendResult
from meterline.export.ledger import ExportLedger, RetryPolicy
from meterline.export.metrics import ExportMetrics


class MemoryTarget:
    """Holds items by key; ``answer(call_no, item)`` scripts the outcome."""

    name = "memory"

    def __init__(self, answer: Callable[[int, ExportItem], str] | None = None,
                 delay_s: float = 0.0) -> None:
        self.answer = answer or (lambda n, it: "sent")
        self.delay_s = delay_s
        self.held: dict[str, ExportItem] = {}
        self.wire: Counter[str] = Counter()
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def send(self, items: Sequence[ExportItem]) -> list[SendResult]:
        with self._lock:
            self.calls += 1
            call = self.calls
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            out = []
            for it in items:
                outcome = self.answer(call, it)
                with self._lock:
                    self.wire[it.key] += 1
                    if outcome == "sent":
                        self.held.setdefault(it.key, it)
                status = {"sent": 200, "retry": 503, "failed": 422}[outcome]
                out.append(SendResult(it.key, outcome, status, f"http {status}"))  # type: ignore[arg-type]
            return out
        finally:
            with self._lock:
                self.active -= 1

    def received(self, keys: Sequence[str]) -> set[str] | None:
        return set(keys) & set(self.held)


def _exporter(tmp_path: Path, target: MemoryTarget, clock: FakeClock, *,
              batch: int = 10, concurrency: int = 3, **policy: object
              ) -> tuple[Exporter, ExportLedger, ExportMetrics]:
    ledger = ExportLedger(tmp_path / "ledger.db", policy=RetryPolicy(**policy),  # type: ignore[arg-type]
                          rng=random.Random(3))
    metrics = ExportMetrics()
    return (Exporter(ledger, target, settings=EngineSettings(batch, concurrency),
                     metrics=metrics, clock_ms=clock.now, sleep=clock.sleep), ledger, metrics)


def _metric(metrics: ExportMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, {"target": "memory"})
    return 0.0 if value is None else value


def test_everything_is_sent_once_in_bounded_batches(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(95)
    target = MemoryTarget(delay_s=0.01)
    exporter, ledger, metrics = _exporter(tmp_path, target, FakeClock(), batch=10,
                                          concurrency=3)
    assert exporter.enqueue(items).new == 95
    assert _metric(metrics, "meterline_export_backlog_items") == 95
    report = exporter.run()
    assert (report.sent, report.failed, report.pending) == (95, 0, 0)
    assert set(target.held) == {it.key for it in items}
    assert set(target.wire.values()) == {1}
    assert target.calls == 10 and 2 <= target.max_active <= 3
    assert ledger.counts("memory") == {"pending": 0, "sending": 0, "sent": 95, "failed": 0}
    assert _metric(metrics, "meterline_export_sent_items_total") == 95
    assert _metric(metrics, "meterline_export_backlog_items") == 0
    assert _metric(metrics, "meterline_export_send_seconds_count") == 10
    # A re-run (same lines rated again) enqueues nothing and sends nothing.
    again = exporter.enqueue(make_items(95))
    assert (again.new, again.known) == (0, 95)
    exporter.run()
    assert target.calls == 10


def test_a_target_down_for_a_while_gets_everything_when_it_returns(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(40)
    clock = FakeClock()
    up_at = clock.ms + 5 * 60_000  # down for five minutes of (fake) time

    target = MemoryTarget(answer=lambda n, it: "sent" if clock.ms >= up_at else "retry")
    exporter, ledger, metrics = _exporter(tmp_path, target, clock, max_attempts=50,
                                          backoff_base_s=1.0, backoff_max_s=30.0)
    exporter.enqueue(items)
    first = exporter.run()  # a plain run while it is down: nothing lost, all still pending
    assert (first.sent, first.failed, first.pending) == (0, 0, 40)
    assert _metric(metrics, "meterline_export_backlog_items") == 40
    report = exporter.run(until_drained=True)
    assert report.sent == 40 and report.failed == 0 and report.pending == 0
    assert clock.ms >= up_at
    assert set(target.held) == {it.key for it in items}
    assert _metric(metrics, "meterline_export_retried_items_total") >= 80
    assert _metric(metrics, "meterline_export_backlog_items") == 0
    assert ledger.counts("memory")["sent"] == 40


def test_refusals_are_dead_letters_with_the_reason_and_replay_resends_them(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(6)
    bad = {items[1].key, items[4].key}
    refuse = [True]
    target = MemoryTarget(answer=lambda n, it: "failed" if refuse[0] and it.key in bad
                          else "sent")
    exporter, ledger, metrics = _exporter(tmp_path, target, FakeClock())
    exporter.enqueue(items)
    report = exporter.run(until_drained=True)
    assert (report.sent, report.failed) == (4, 2) and sorted(report.failed_keys) == sorted(bad)
    failed = {e.key: e for e in ledger.entries("memory", states=("failed",))}
    assert set(failed) == bad
    assert {e.last_response for e in failed.values()} == {"rejected: http 422"}
    assert {e.attempts for e in failed.values()} == {1}  # a 4xx is not retried
    assert _metric(metrics, "meterline_export_failed_items_total") == 2
    refuse[0] = False
    assert ledger.replay("memory", 0) == 2
    assert exporter.run().sent == 2
    assert set(target.held) == {it.key for it in items}


def test_attempts_used_up_become_a_dead_letter(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    target = MemoryTarget(answer=lambda n, it: "retry")
    exporter, ledger, _ = _exporter(tmp_path, target, FakeClock(), max_attempts=3,
                                    backoff_base_s=0.5)
    exporter.enqueue(make_items(2))
    report = exporter.run(until_drained=True)
    assert (report.sent, report.failed, report.retried) == (0, 2, 4)
    assert {e.attempts for e in ledger.entries("memory")} == {3}
    assert all(e.last_response.startswith("gave up after 3 attempt(s)")
               for e in ledger.entries("memory"))


def test_a_target_that_raises_or_forgets_items_loses_nothing(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(4)
    calls = Counter[str]()

    class Flaky(MemoryTarget):
        def send(self, batch: Sequence[ExportItem]) -> list[SendResult]:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("bug in the target")
            out = super().send(batch)
            return out[1:] if calls["n"] == 2 else out  # forgets one answer once

    target = Flaky()
    exporter, ledger, _ = _exporter(tmp_path, target, FakeClock(), batch=4, concurrency=1,
                                    backoff_base_s=0.1)
    exporter.enqueue(items)
    report = exporter.run(until_drained=True)
    assert report.sent == 4 and report.failed == 0
    assert set(target.held) == {it.key for it in items}
    assert ledger.counts("memory")["sent"] == 4


def test_corrections_are_their_own_items_referencing_the_original() -> None:
    original = rated_line(7)
    correction = rated_line(7, correction=1, amount="0.42")
    a, b = items_from_lines([correction, original])
    assert (a.correction, b.correction) == (0, 1)
    line_id = original.line_id
    assert a.key == f"ml1:sub-00007:{original.period_start_ms}:{line_id}:0"
    assert b.key == f"ml1:sub-00007:{original.period_start_ms}:{line_id}:1"
    assert (a.corrects, b.corrects) == ("", a.key)
    assert b.amount == item_from_line(correction).amount == rated_line(0, amount="0.42").amount


def test_in_progress_lines_are_left_out_unless_asked() -> None:
    lines = [rated_line(1), rated_line(2, status="in_progress")]
    assert [it.subscription_id for it in items_from_lines(lines)] == ["sub-00001"]
    assert len(items_from_lines(lines, include_in_progress=True)) == 2


def test_metrics_are_served_for_prometheus(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    import socket
    import urllib.request

    target = MemoryTarget(answer=lambda n, it: "retry" if it.key.endswith(":0") and n == 1
                          else "sent")
    exporter, _, metrics = _exporter(tmp_path, target, FakeClock(), batch=10, concurrency=1,
                                     backoff_base_s=0.1)
    exporter.enqueue(make_items(12))
    exporter.run(until_drained=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'meterline_export_sent_items_total{target="memory"} 12.0' in text
    assert 'meterline_export_retried_items_total{target="memory"} 10.0' in text
    assert 'meterline_export_backlog_items{target="memory"} 0.0' in text
