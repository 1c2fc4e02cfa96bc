"""The export engine: enqueue items in the ledger, send what is due in batches with bounded
concurrency, apply each answer (ledger.py describes the kill -9 protocol).

The engine holds no state a crash could lose: every decision is a committed ledger
transition, and the target gets only claimed (``sending``) items. A target that is down
answers ``retry``; its items go back to ``pending`` with a backoff and leave when it
returns (``run(until_drained=True)`` waits for them; a plain run leaves them for the next
run). Batches run on a thread pool of ``concurrency`` workers; the ledger is touched only
from the calling thread (SQLite connections are not shared across threads), which claims
a new batch as soon as one returns, so ``concurrency`` requests stay in flight.

A target whose keys protect a resend for a while only says so with
``idempotency_window_ms`` (and ``remote_key(key)``: the key as it knows it); every claim
then holds back items first attempted longer ago than that (ledger.py: ``claim_within``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from meterline.core.billing.periods import add_months, month_start
from meterline.export.items import ExportItem, ExportTarget, SendResult
from meterline.export.ledger import Applied, EnqueueResult, ExportLedger
from meterline.export.metrics import ExportMetrics
from meterline.logs import redact

__all__ = ["EngineSettings", "Exporter", "RunReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    batch_size: int = 100  # items per target call (a webhook target posts them in parallel)
    concurrency: int = 4  # batches in flight at once
    max_wait_s: float = 1.0  # longest sleep while waiting for a backoff to pass

    def errors(self) -> list[str]:
        out = []
        for name in ("batch_size", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.max_wait_s, bool) or not isinstance(self.max_wait_s, int | float) \
                or self.max_wait_s <= 0:
            out.append(f"max_wait_s must be a number > 0, got {self.max_wait_s!r}")
        return out


@dataclass
class RunReport:
    recovered: int = 0  # items a crashed run left `sending`, sent again with their key
    sent: int = 0
    retried: int = 0
    failed: int = 0
    failed_keys: list[str] = field(default_factory=list)
    pending: int = 0  # not yet sent or failed when the run ended (a backoff not passed)
    calls: int = 0
    # failed without a resend: first attempted longer ago than the target's idempotency
    # window (also counted in failed / failed_keys)
    held: int = 0

    def add(self, applied: Applied) -> None:
        self.sent += applied.sent
        self.retried += applied.retried
        self.failed += applied.failed
        self.failed_keys += applied.failed_keys


def _month_range(period_start_ms: int) -> tuple[int, int]:
    start = month_start(period_start_ms)
    return start, add_months(start, 1)


class Exporter:
    def __init__(self, ledger: ExportLedger, target: ExportTarget, *,
                 settings: EngineSettings | None = None, metrics: ExportMetrics | None = None,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.ledger = ledger
        self.target = target
        self.settings = settings or EngineSettings()
        self.metrics = metrics
        self._clock_ms = clock_ms
        self._sleep = sleep
        # Files are written per month from every item of it: such a target gets the whole
        # month (already-sent items included) whenever one of its items is due.
        self._whole_period = bool(getattr(target, "whole_period", False))
        self._window_ms: int | None = getattr(target, "idempotency_window_ms", None)
        self._remote_key: Callable[[str], str] = getattr(target, "remote_key", str)

    @property
    def name(self) -> str:
        return self.target.name

    def enqueue(self, items: Iterable[ExportItem]) -> EnqueueResult:
        result = self.ledger.enqueue(self.name, items, self._clock_ms())
        for key in result.conflicts[:20]:
            log.error("export %s: item %s changed after it was enqueued (a correction is "
                      "needed); not re-sent", self.name, key)
        self._update_backlog()
        return result

    def run(self, *, until_drained: bool = False,
            should_stop: Callable[[], bool] = lambda: False) -> RunReport:
        """Send every due item. ``until_drained``: also wait out backoffs until nothing is
        pending (every item sent or failed)."""
        self.ledger.lock(self.name)
        report = RunReport(recovered=self.ledger.recover(self.name, self._clock_ms()))
        if report.recovered:
            log.warning("export %s: %d item(s) were being sent when a run stopped; sending "
                        "them again with the same idempotency keys", self.name,
                        report.recovered)
        with ThreadPoolExecutor(self.settings.concurrency,
                                thread_name_prefix=f"export-{self.name}") as pool:
            while not should_stop():
                self._pump(pool, report, should_stop)
                if not until_drained:
                    break
                due = self.ledger.next_due_ms(self.name)
                if due is None:
                    break
                self._sleep(min(self.settings.max_wait_s,
                                max(0.0, (due - self._clock_ms()) / 1000)))
        counts = self.ledger.counts(self.name)
        # Unfinished: pending (a backoff not passed) or, had recording an answer failed,
        # sending; the next run picks both up.
        report.pending = counts["pending"] + counts["sending"]
        self._update_backlog()
        return report

    # -- internals ---------------------------------------------------------------------------

    def _claim(self, report: RunReport) -> tuple[list[ExportItem], list[ExportItem]]:
        """(claimed items, the batch to hand the target)."""
        limit = None if self._whole_period else self.settings.batch_size
        claim = self.ledger.claim_within(self.name, self._clock_ms(), limit, self._window_ms,
                                         self._remote_key)
        if claim.held:
            report.held += len(claim.held)
            report.failed += len(claim.held)
            report.failed_keys += claim.held
            log.error("export %s: %d item(s) first attempted more than %.1f h ago were not "
                      "re-sent: the target no longer recognises their idempotency keys; "
                      "check what it holds, then --replay-past-window", self.name,
                      len(claim.held), (self._window_ms or 0) / 3_600_000)
            if self.metrics is not None:
                self.metrics.failed.labels(self.name).inc(len(claim.held))
                self.metrics.backlog.labels(self.name).dec(len(claim.held))
        claimed = claim.items
        if not self._whole_period or not claimed:
            return claimed, claimed
        batch: dict[str, ExportItem] = {}
        for start in sorted({_month_range(it.period_start_ms) for it in claimed}):
            for it in self.ledger.items(self.name, period_range=start,
                                        states=("sent", "sending")):
                batch[it.key] = it
        return claimed, sorted(batch.values(), key=lambda it: it.key)

    def _pump(self, pool: ThreadPoolExecutor, report: RunReport,
              should_stop: Callable[[], bool]) -> None:
        """Keep up to ``concurrency`` batches in flight until nothing is due."""
        inflight: dict[Future[list[SendResult]], tuple[list[ExportItem], float]] = {}
        exhausted = False
        while True:
            while not exhausted and len(inflight) < self.settings.concurrency \
                    and not should_stop():
                claimed, batch = self._claim(report)
                if not claimed:
                    exhausted = True
                    break
                report.calls += 1
                inflight[pool.submit(self.target.send, batch)] = (claimed, time.monotonic())
                if self._whole_period:
                    exhausted = True  # the whole due set went in one call
            if not inflight:
                return
            done, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for future in done:
                claimed, started = inflight.pop(future)
                if self.metrics is not None:
                    self.metrics.send_seconds.labels(self.name).observe(
                        time.monotonic() - started)
                self._apply(claimed, future, report)

    def _apply(self, claimed: Sequence[ExportItem], future: Future[list[SendResult]],
               report: RunReport) -> None:
        keys = {it.key for it in claimed}
        try:
            answers = future.result()
        except Exception as exc:  # a target bug: the items stay safe for a retry
            log.exception("export %s: the target raised on a batch of %d", self.name,
                          len(claimed))
            reason = redact(f"target error: {type(exc).__name__}: {exc}")[:200]
            answers = [SendResult(k, "retry", None, reason) for k in sorted(keys)]
        results: list[SendResult] = []
        seen: set[str] = set()
        for r in answers:  # one answer per claimed key; extras (other keys, repeats) ignored
            if r.key in keys and r.key not in seen:
                seen.add(r.key)
                results.append(r)
        missing = keys - {r.key for r in results}
        results += [SendResult(k, "retry", None, "no answer from the target for this item")
                    for k in sorted(missing)]
        applied = self.ledger.apply(self.name, results, self._clock_ms())
        report.add(applied)
        for r in results:
            if r.outcome == "failed":
                log.warning("export %s: %s refused: %s", self.name, r.key, redact(r.response))
        if self.metrics is not None:
            m = self.metrics
            m.sent.labels(self.name).inc(applied.sent)
            m.retries.labels(self.name).inc(applied.retried)
            m.failed.labels(self.name).inc(applied.failed)
            m.backlog.labels(self.name).dec(applied.sent + applied.failed)

    def _update_backlog(self) -> None:
        if self.metrics is not None:
            counts = self.ledger.counts(self.name)
            self.metrics.backlog.labels(self.name).set(counts["pending"] + counts["sending"])
