"""The export ledger's state transitions, and what survives a process that stops mid-call."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from meterline.export.items import ExportItem, SendResult
from meterline.export.ledger import ExportLedger, LedgerError, RetryPolicy

T0 = 1_800_000_000_000


def _ledger(path: Path, **policy: object) -> ExportLedger:
    return ExportLedger(path / "ledger.db", policy=RetryPolicy(**policy),  # type: ignore[arg-type]
                        rng=random.Random(1))


def test_enqueue_is_idempotent_and_a_changed_item_is_a_conflict(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(5)
    ledger = _ledger(tmp_path)
    first = ledger.enqueue("webhook", items, T0)
    assert (first.new, first.known, first.conflicts) == (5, 0, [])
    changed = replace(items[2], amount=items[2].amount + Decimal("0.01"))
    again = ledger.enqueue("webhook", [*items[:2], changed, *items[3:]], T0 + 1)
    assert (again.new, again.known, again.conflicts) == (0, 4, [items[2].key])
    # The stored item is the original one: a conflict never overwrites what was enqueued.
    claimed = {it.key: it for it in ledger.claim("webhook", T0 + 2, None)}
    assert claimed[items[2].key] == items[2]
    # Targets are independent: the same key to another target is another item.
    assert ledger.enqueue("files", items, T0).new == 5


def test_claim_is_committed_before_the_call_and_recover_resends_after_a_crash(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(3)
    ledger = _ledger(tmp_path)
    ledger.enqueue("webhook", items, T0)
    claimed = ledger.claim("webhook", T0, 2)
    assert [it.key for it in claimed] == sorted(it.key for it in items)[:2]
    # "Crash": another connection (a new process) sees the claim as committed.
    ledger._db.close()
    reopened = _ledger(tmp_path)
    by_key = {e.key: e for e in reopened.entries("webhook")}
    assert [by_key[it.key].state for it in claimed] == ["sending", "sending"]
    assert [by_key[it.key].attempts for it in claimed] == [1, 1]
    assert reopened.recover("webhook", T0 + 5) == 2
    again = reopened.claim("webhook", T0 + 5, None)
    assert sorted(it.key for it in again) == sorted(it.key for it in items)
    attempts = {e.key: e.attempts for e in reopened.entries("webhook")}
    assert [attempts[it.key] for it in claimed] == [2, 2]  # the same keys, attempt 2


def test_outcomes_backoff_dead_letter_and_replay(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    a, b, c = make_items(3)
    ledger = _ledger(tmp_path, max_attempts=2, backoff_base_s=10.0, backoff_max_s=60.0)
    ledger.enqueue("t", [a, b, c], T0)
    ledger.claim("t", T0, None)
    applied = ledger.apply("t", [SendResult(a.key, "sent", 200, "ok", "rx-1"),
                                 SendResult(b.key, "failed", 400, "http 400: bad currency"),
                                 SendResult(c.key, "retry", 503, "http 503")], T0 + 100)
    assert (applied.sent, applied.failed, applied.retried) == (1, 1, 1)
    e = {x.key: x for x in ledger.entries("t")}
    assert (e[a.key].state, e[a.key].remote_id, e[a.key].sent_ms) == ("sent", "rx-1", T0 + 100)
    assert e[b.key].state == "failed"
    assert e[b.key].last_response == "rejected: http 400: bad currency"
    assert e[c.key].state == "pending" and e[c.key].last_status == 503
    # Full jitter on attempt 1: somewhere in [0, base] after the answer.
    assert T0 + 100 <= e[c.key].next_attempt_ms <= T0 + 100 + 10_000
    assert ledger.claim("t", T0 + 99, None) == []  # not due before the answer
    ledger.claim("t", T0 + 100_000, None)
    ledger.apply("t", [SendResult(c.key, "retry", None, "unreachable: ConnectionRefused")],
                 T0 + 100_001)
    e = {x.key: x for x in ledger.entries("t")}
    assert e[c.key].state == "failed" and e[c.key].attempts == 2
    assert e[c.key].last_response.startswith("gave up after 2 attempt(s): unreachable")
    assert ledger.replay("t", T0 + 200_000) == 2
    e = {x.key: x for x in ledger.entries("t")}
    assert [(e[k].state, e[k].attempts) for k in (b.key, c.key)] == [("pending", 0)] * 2
    assert ledger.counts("t") == {"pending": 2, "sending": 0, "sent": 1, "failed": 0}


def test_results_for_items_not_being_sent_are_refused(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    (a,) = make_items(1)
    ledger = _ledger(tmp_path)
    ledger.enqueue("t", [a], T0)
    with pytest.raises(LedgerError, match="not being sent"):
        ledger.apply("t", [SendResult(a.key, "sent", 200)], T0)
    with pytest.raises(LedgerError, match="not being sent"):
        ledger.apply("t", [SendResult("ml1:nope", "sent", 200)], T0)


def test_one_exporter_per_target(tmp_path: Path) -> None:
    first, second = _ledger(tmp_path), _ledger(tmp_path)
    first.lock("webhook")
    with pytest.raises(LedgerError, match="another export to 'webhook' is running"):
        second.lock("webhook")
    second.lock("files")  # another target is fine
    first.close()
    second.lock("webhook")  # released with the holder


def test_the_response_text_is_redacted_and_bounded(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    (a,) = make_items(1)
    ledger = _ledger(tmp_path)
    ledger.enqueue("t", [a], T0)
    ledger.claim("t", T0, None)
    ledger.apply("t", [SendResult(a.key, "failed", 401,
                                  "http 401: invalid api_key=sk_test_abcdefgh123 " + "x" * 999)],
                 T0)
    (entry,) = ledger.entries("t")
    assert "sk_test_abcdefgh123" not in entry.last_response
    assert len(entry.last_response) <= 300
