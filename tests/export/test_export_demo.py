"""The demo's export step: its lines -> files through the ledger, and the summary line."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from export_factories import rated_line

from meterline.export.demo import export_demo_lines


def test_demo_lines_are_exported_to_files_with_a_summary(tmp_path: Path) -> None:
    lines = [rated_line(i, status="in_progress") for i in range(4)]  # an open period
    lines.append(rated_line(9, month="2026-12", amount="100.00"))
    text = export_demo_lines(lines, tmp_path)
    want_total = sum((ln.amount for ln in lines), Decimal(0))
    assert text == (f"Export: 5 invoice lines -> {tmp_path / 'export' / '2026-11'}, "
                    f"{tmp_path / 'export' / '2026-12'} (CSV + Parquet + manifest with SHA-256)"
                    f", 5 sent via the ledger (5 new, 5 sent, 0 failed), total {want_total:,} USD")
    doc = json.loads((tmp_path / "export" / "2026-11" / "manifest.json").read_text())
    assert doc["rows"] == 4
    assert "\n" not in text
