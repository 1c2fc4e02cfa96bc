"""Reconcile's last hop, pure: rated items vs ledger entries vs what the target holds."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

from meterline.export.files_target import FilesTarget
from meterline.export.items import ExportItem, SendResult
from meterline.export.ledger import ExportLedger
from meterline.export.reconcile import compare


def test_every_kind_of_difference_is_reported(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(8)
    keys = [it.key for it in items]
    ledger = ExportLedger(tmp_path / "l.db", rng=random.Random(0))
    ledger.enqueue("t", items[:7], 0)  # item 7: never exported
    ledger.claim("t", 0, None)
    ledger.apply("t", [SendResult(k, "sent", 200) for k in keys[:4]]
                 + [SendResult(keys[4], "failed", 400, "http 400: no such customer"),
                    SendResult(keys[5], "retry", 503, "http 503")], 1)
    # keys[6] stays `sending`; keys[3] the target lost; the rated line 2 changed since.
    rated = [*items[:2], replace(items[2], amount=items[2].amount + Decimal("1.00")),
             *items[3:]]
    held = set(keys[:3]) | {keys[5]}
    result = compare(rated, ledger.entries("t"), held)
    got = {(d.key, d.problem) for d in result.diffs}
    assert got == {(keys[2], "changed"), (keys[3], "not held"), (keys[4], "failed"),
                   (keys[5], "pending"), (keys[5], "unexpected"), (keys[6], "sending"),
                   (keys[7], "not enqueued")}
    assert next(d.detail for d in result.diffs if d.problem == "failed") == \
        "attempt 1: rejected: http 400: no such customer"
    assert (result.rated, result.in_ledger, result.sent, result.received) == (8, 7, 4, 4)
    # A line withdrawn by a re-rating, still in the ledger:
    result = compare(items[1:4], ledger.entries("t", states=("sent",)), None)
    assert [(d.key, d.problem) for d in result.diffs] == [(keys[0], "unexpected")]


def test_no_difference_when_everything_arrived(
        tmp_path: Path, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(5)
    ledger = ExportLedger(tmp_path / "l.db")
    target = FilesTarget(tmp_path / "out")
    ledger.enqueue("files", items, 0)
    claimed = ledger.claim("files", 0, None)
    ledger.apply("files", target.send(claimed), 1)
    keys = [it.key for it in items]
    result = compare(items, ledger.entries("files"), target.received(keys))
    assert result.diffs == [] and result.received == 5
