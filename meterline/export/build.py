"""Rated lines -> export items, and an item's canonical form (JSON dict, content hash).

Pure: no storage, no network. The item of a line is a function of the line alone, so a
re-run builds the same items with the same keys and the same content hashes; the ledger
compares the hash to tell "already known" from "changed under the same key" (an error:
a line that changed after it was exported needs a correction, never a silent resend).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import orjson

from meterline.core.billing.lines import RatedLine
from meterline.export.items import ExportItem, item_key

__all__ = ["content_hash", "item_from_dict", "item_from_line", "item_to_dict",
           "items_from_lines", "plain"]

_DECIMALS = ("quantity", "amount")


def plain(value: Decimal) -> str:
    """A decimal as plain digits ("1000.50", never "1.0005E+3"): one text per value, so
    hashes, CSV cells and JSON bodies are the same for the same number and scale."""
    return format(value, "f")


def item_from_line(line: RatedLine) -> ExportItem:
    """A line (correction 0) or a correction (n > 0, ``corrects`` = the original line's id,
    whose item key it references: corrections are their own items, the original is never
    amended)."""
    corrects = ""
    if line.correction > 0:
        original = line.corrects or line.line_id
        corrects = item_key(line.subscription_id, line.period_start_ms, original, 0)
    return ExportItem(
        key=item_key(line.subscription_id, line.period_start_ms, line.line_id,
                     line.correction),
        customer=line.customer, subscription_id=line.subscription_id,
        period_start_ms=line.period_start_ms, period_end_ms=line.period_end_ms,
        line_id=line.line_id, correction=line.correction, corrects=corrects, kind=line.kind,
        meter=line.meter, aggregation=line.aggregation, quantity=line.quantity,
        amount=line.amount, currency=line.currency, plan_id=line.plan_id,
        plan_version=line.plan_version, segment_start_ms=line.segment_start_ms,
        segment_end_ms=line.segment_end_ms)


def items_from_lines(lines: Iterable[RatedLine], *, include_in_progress: bool = False
                     ) -> list[ExportItem]:
    """Items of the ``final`` lines (and in-progress ones when asked), sorted by key."""
    chosen = [item_from_line(ln) for ln in lines
              if include_in_progress or ln.status == "final"]
    return sorted(chosen, key=lambda it: it.key)


def item_to_dict(item: ExportItem) -> dict[str, Any]:
    """JSON-ready: decimals as plain strings (exact), times as integer UTC ms. The quantity
    without trailing zeros (storage reads it with 9 decimals, the rating core may not: one
    text per number keeps the content hash stable); the amount at its currency's scale, as
    rated ("2.50")."""
    out: dict[str, Any] = {name: getattr(item, name) for name in ExportItem.__slots__}
    out["quantity"] = plain(item.quantity.normalize())
    out["amount"] = plain(item.amount)
    return out


def item_from_dict(doc: Mapping[str, Any]) -> ExportItem:
    values = dict(doc)
    for name in _DECIMALS:
        values[name] = Decimal(str(values[name]))
    return ExportItem(**values)


def content_hash(item: ExportItem) -> str:
    """SHA-256 of the item's canonical JSON (sorted keys): what the ledger pins per key."""
    body = orjson.dumps(item_to_dict(item), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(body).hexdigest()
