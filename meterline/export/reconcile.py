"""Reconcile's last hop: rated lines vs the export ledger vs what the target received.

``meterline reconcile --period 2026-11 --target files`` lists every key where the three
disagree and exits 1 on any difference:

- ``not enqueued``: a final rated line the ledger has never seen (no export ran since);
- ``changed``: the rated line differs from what was exported under its key (a correction
  is needed; the exported version stands);
- ``pending`` / ``sending`` / ``failed``: not (yet) at the target, with the stored reason;
- ``not held``: the ledger says sent but the target does not list the key (files edited
  or deleted, a target-side purge);
- ``unexpected``: the target holds a key the ledger does not call sent, or the ledger has
  a key that is no longer a final rated line (withdrawn by a re-rating, or exported while
  in progress).

A target that cannot list what it holds (the webhook) is compared rated vs ledger only,
and the report says so. :func:`compare` is pure; :func:`reconcile_export` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meterline.export.build import content_hash
from meterline.export.items import ExportItem
from meterline.export.ledger import LedgerEntry

__all__ = ["ExportDiff", "ExportReconciliation", "compare", "reconcile_export"]


@dataclass(frozen=True)
class ExportDiff:
    key: str
    problem: str  # not enqueued | changed | pending | sending | failed | not held | unexpected
    detail: str = ""


@dataclass(frozen=True)
class ExportReconciliation:
    rated: int
    in_ledger: int
    sent: int
    received: int | None  # None: the target cannot list what it holds
    diffs: list[ExportDiff]


def compare(items: Sequence[ExportItem], entries: Sequence[LedgerEntry],
            received: set[str] | None) -> ExportReconciliation:
    rated = {it.key: it for it in items}
    ledger = {e.key: e for e in entries}
    diffs: list[ExportDiff] = []
    for key in sorted(set(rated) | set(ledger)):
        item, entry = rated.get(key), ledger.get(key)
        if entry is None:
            diffs.append(ExportDiff(key, "not enqueued", "rated, never exported"))
            continue
        if item is None:
            diffs.append(ExportDiff(key, "unexpected", f"in the ledger ({entry.state}) but "
                                    "not a final rated line of the period"))
            continue
        if content_hash(item) != entry.content_hash:
            diffs.append(ExportDiff(key, "changed", "the rated line differs from what was "
                                    "exported under this key: a correction is needed"))
        if entry.state != "sent":
            diffs.append(ExportDiff(key, entry.state, f"attempt {entry.attempts}: "
                                    f"{entry.last_response}".rstrip(": ")))
        elif received is not None and key not in received:
            diffs.append(ExportDiff(key, "not held", "the ledger says sent, the target does "
                                    "not list it"))
    if received is not None:
        for key in sorted(received):
            entry = ledger.get(key)
            if entry is not None and entry.state != "sent":
                diffs.append(ExportDiff(key, "unexpected", f"the target holds it, the ledger "
                                        f"says {entry.state}"))
    sent = sum(1 for e in entries if e.state == "sent")
    return ExportReconciliation(len(rated), len(ledger), sent,
                                None if received is None else len(received), diffs)


def reconcile_export(storage: Any, ledger: Any, target_name: str, target: Any | None, *,
                     period: str, database: str | None = None) -> ExportReconciliation:
    """``target`` None: the target is not asked (it cannot list, or is not configured)."""
    from meterline.export.build import items_from_lines
    from meterline.rating.stage import month_range
    from meterline.sinks.rated_usage import CurrentLinesQuery

    start, end = month_range(period)
    lines = CurrentLinesQuery(start, end, database or storage.database).run(storage)
    items = items_from_lines(lines)
    entries = ledger.entries(target_name, period_range=(start, end))
    keys = sorted({it.key for it in items} | {e.key for e in entries})
    received = target.received(keys) if target is not None else None
    return compare(items, entries, received)
