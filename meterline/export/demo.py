"""The export step of `meterline demo`: the demo's invoice lines -> files, through the
ledger, with a one-line summary. The demo's periods are still open (its usage is the last
48 hours), so its lines are ``in_progress`` and exported as such: a preview of the invoice
files finance would get once the period is final."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from meterline.core.billing.lines import RatedLine

__all__ = ["export_demo_lines"]


def export_demo_lines(lines: Sequence[RatedLine], workdir: Path) -> str:
    from meterline.export.build import items_from_lines
    from meterline.export.engine import Exporter
    from meterline.export.files_target import FilesTarget, month_label
    from meterline.export.ledger import ExportLedger

    items = items_from_lines(lines, include_in_progress=True)
    ledger = ExportLedger(workdir / "export-ledger.db")
    try:
        exporter = Exporter(ledger, FilesTarget(workdir / "export"))
        queued = exporter.enqueue(items)
        report = exporter.run(until_drained=True)
        counts = ledger.counts("files")
    finally:
        ledger.close()
    totals: dict[str, Decimal] = {}
    for it in items:
        totals[it.currency] = totals.get(it.currency, Decimal(0)) + it.amount
    months = sorted({month_label(it.period_start_ms) for it in items})
    money = ", ".join(f"{v:,} {c}" for c, v in sorted(totals.items())) or "nothing"
    where = ", ".join(str(workdir / "export" / m) for m in months) or str(workdir / "export")
    return (f"Export: {len(items):,} invoice lines -> {where} (CSV + Parquet + manifest with "
            f"SHA-256), {report.sent:,} sent via the ledger ({queued.new:,} new, "
            f"{counts['sent']:,} sent, {counts['failed']} failed), total {money}")
