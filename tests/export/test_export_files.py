"""The files target: CSV + Parquet + manifest per month, atomic and byte-identical on
re-runs; the truths (sums, rows) are computed from the lines, not by the target."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from decimal import Decimal
from pathlib import Path

import pyarrow.parquet as pq
from export_factories import rated_line

from meterline.core.billing.lines import RatedLine
from meterline.export.build import items_from_lines
from meterline.export.engine import Exporter
from meterline.export.files_target import FilesTarget, verify_month
from meterline.export.ledger import ExportLedger


def _lines() -> list[RatedLine]:
    out = [rated_line(i) for i in range(12)]
    out += [rated_line(20, currency="EUR", amount="10.05"), rated_line(21, currency="EUR",
                                                                       amount="0.95")]
    out.append(rated_line(3, correction=1, amount="-0.03"))
    out.append(rated_line(30, month="2026-12", amount="7.00"))
    return out


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_month_files_manifest_and_identical_rerun(tmp_path: Path) -> None:
    lines = _lines()
    items = items_from_lines(lines)
    target = FilesTarget(tmp_path / "out")
    results = target.send(items)
    assert {r.outcome for r in results} == {"sent"} and len(results) == len(items)
    nov = tmp_path / "out" / "2026-11"
    assert sorted(p.name for p in nov.iterdir()) == [
        "manifest.json", "rated-lines-2026-11.csv", "rated-lines-2026-11.parquet"]
    doc, problems = verify_month(nov)
    assert problems == [] and doc is not None
    nov_lines = [ln for ln in lines if ln.period_start_ms < lines[-1].period_start_ms]
    # Truth from the lines themselves: 12 USD lines i.ii, the correction, two EUR lines.
    usd = sum(Decimal(f"{i}.{i:02d}") for i in range(12)) + Decimal("-0.03")
    assert doc["rows"] == len(nov_lines) == 15
    assert doc["amount_by_currency"] == {"EUR": "11.00", "USD": str(usd)}
    assert [f["rows"] for f in doc["files"]] == [15, 15]
    # Re-running (in any order) writes the same bytes.
    before = _digests(tmp_path / "out")
    random.Random(5).shuffle(items)
    FilesTarget(tmp_path / "out").send(items)
    assert _digests(tmp_path / "out") == before
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_csv_and_parquet_hold_the_exact_lines(tmp_path: Path) -> None:
    lines = _lines()
    FilesTarget(tmp_path).send(items_from_lines(lines))
    nov = [ln for ln in lines if ln.period_start_ms == lines[0].period_start_ms]
    want = {(ln.subscription_id, ln.correction): (ln.quantity, ln.amount, ln.currency)
            for ln in nov}
    text = (tmp_path / "2026-11" / "rated-lines-2026-11.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    got_csv = {(r["subscription_id"], int(r["correction"])):
               (Decimal(r["quantity"]), Decimal(r["amount"]), r["currency"]) for r in rows}
    assert got_csv == want
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    correction = next(r for r in rows if r["correction"] == "1")
    original = next(r for r in rows if r["subscription_id"] == correction["subscription_id"]
                    and r["correction"] == "0")
    assert correction["corrects"] == original["key"] and correction["amount"] == "-0.03"
    table = pq.read_table(tmp_path / "2026-11" / "rated-lines-2026-11.parquet").to_pylist()
    got_pq = {(r["subscription_id"], r["correction"]): (r["quantity"], r["amount"],
                                                         r["currency"]) for r in table}
    assert got_pq == want  # Decimal(38, 9) round-trips exactly


def test_received_trusts_only_files_matching_their_manifest(tmp_path: Path) -> None:
    items = items_from_lines(_lines())
    target = FilesTarget(tmp_path)
    target.send(items)
    keys = [it.key for it in items]
    assert target.received(keys) == set(keys)
    dec = tmp_path / "2026-12" / "rated-lines-2026-12.csv"
    dec.write_text(dec.read_text().replace("7.00", "70.00"))
    _, problems = verify_month(tmp_path / "2026-12")
    assert problems == [f"{dec}: checksum differs from the manifest"]
    dec_keys = {it.key for it in items if it.customer == "cust-00030"}
    assert target.received(keys) == set(keys) - dec_keys


def test_engine_rewrites_the_whole_month_when_an_item_is_added(tmp_path: Path) -> None:
    ledger = ExportLedger(tmp_path / "ledger.db")
    target = FilesTarget(tmp_path / "out")
    exporter = Exporter(ledger, target)
    lines = [rated_line(i) for i in range(5)]
    exporter.enqueue(items_from_lines(lines))
    assert exporter.run().sent == 5
    exporter.enqueue(items_from_lines([*lines, rated_line(9)]))
    report = exporter.run()
    assert report.sent == 1  # only the new item changes state ...
    doc = json.loads((tmp_path / "out" / "2026-11" / "manifest.json").read_text())
    assert doc["rows"] == 6  # ... but the month's files hold all six
    assert ledger.counts("files")["sent"] == 6
