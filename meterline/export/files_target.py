"""Files for finance and ERP: per month, CSV + Parquet of the exported items and a manifest.

    <out>/2026-11/rated-lines-2026-11.csv
    <out>/2026-11/rated-lines-2026-11.parquet
    <out>/2026-11/manifest.json     # files, rows, bytes, SHA-256, totals per currency

A month's files hold every item of the periods starting in it (the engine hands this
target the whole month whenever one of its items is due: ``whole_period``), sorted by
key. Each file is written atomically (temp file in the same directory, fsync, rename,
fsync of the directory), data files first and the manifest last, so a reader that trusts
the manifest's checksums never reads a torn file, and a crash leaves the previous
complete set or the new one. The bytes are a function of the items only (no timestamps,
sorted rows, fixed Parquet settings): re-running writes identical files, which is what
makes a re-send after kill -9 exactly-once here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterline.core.billing.periods import month_start
from meterline.export.build import item_to_dict, plain
from meterline.export.items import ExportItem, SendResult

__all__ = ["FilesTarget", "month_label", "verify_month"]

COLUMNS = ExportItem.__slots__
_INT_COLUMNS = frozenset({"period_start_ms", "period_end_ms", "correction", "plan_version",
                          "segment_start_ms", "segment_end_ms"})
_DECIMAL_COLUMNS = frozenset({"quantity", "amount"})
MANIFEST_FORMAT = "meterline-export-files/1"


def month_label(ms: int) -> str:
    import time

    return time.strftime("%Y-%m", time.gmtime(month_start(ms) / 1000))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def csv_bytes(items: Sequence[ExportItem]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for item in items:
        doc = item_to_dict(item)
        writer.writerow([doc[c] for c in COLUMNS])
    return buf.getvalue().encode("utf-8")


def parquet_bytes(items: Sequence[ExportItem]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = []
    for name in COLUMNS:
        if name in _INT_COLUMNS:
            fields.append(pa.field(name, pa.int64(), nullable=False))
        elif name in _DECIMAL_COLUMNS:  # exact: Decimal(38, 9), like rated_usage
            fields.append(pa.field(name, pa.decimal128(38, 9), nullable=False))
        else:
            fields.append(pa.field(name, pa.string(), nullable=False))
    schema = pa.schema(fields)
    columns = {name: [getattr(it, name) for it in items] for name in COLUMNS}
    table = pa.Table.from_pydict(columns, schema=schema)
    sink = pa.BufferOutputStream()
    # Fixed settings (no dictionary pages, one row group, zstd): the bytes depend on the
    # rows only, for a given pyarrow version (its name is in the file's created_by).
    pq.write_table(table, sink, compression="zstd", use_dictionary=False,
                   row_group_size=max(1, len(items)), write_statistics=True)
    return bytes(sink.getvalue().to_pybytes())


def manifest(label: str, items: Sequence[ExportItem], files: dict[str, bytes]
             ) -> dict[str, Any]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for it in items:
        totals[it.currency] += it.amount
    return {
        "format": MANIFEST_FORMAT,
        "period": label,
        "rows": len(items),
        "amount_by_currency": {code: plain(v) for code, v in sorted(totals.items())},
        "files": [{"name": name, "rows": len(items), "bytes": len(data),
                   "sha256": hashlib.sha256(data).hexdigest()}
                  for name, data in sorted(files.items())],
    }


def verify_month(folder: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(manifest, problems): every file the manifest lists exists with its checksum."""
    path = folder / "manifest.json"
    if not path.exists():
        return None, [f"{path}: no manifest"]
    doc = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for entry in doc.get("files", []):
        f = folder / entry["name"]
        if not f.exists():
            problems.append(f"{f}: missing")
        elif hashlib.sha256(f.read_bytes()).hexdigest() != entry["sha256"]:
            problems.append(f"{f}: checksum differs from the manifest")
    return doc, problems


class FilesTarget:
    whole_period = True

    def __init__(self, out_dir: str | Path, *, name: str = "files") -> None:
        self.name = name
        self.out_dir = Path(out_dir)

    def write_month(self, label: str, items: Sequence[ExportItem]) -> Path:
        folder = self.out_dir / label
        folder.mkdir(parents=True, exist_ok=True)
        ordered = sorted(items, key=lambda it: it.key)
        files = {f"rated-lines-{label}.csv": csv_bytes(ordered),
                 f"rated-lines-{label}.parquet": parquet_bytes(ordered)}
        for name, data in sorted(files.items()):
            _atomic_write(folder / name, data)
        doc = manifest(label, ordered, files)
        _atomic_write(folder / "manifest.json",
                      (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        return folder

    def send(self, items: Sequence[ExportItem]) -> list[SendResult]:
        by_month: dict[str, list[ExportItem]] = defaultdict(list)
        for it in items:
            by_month[month_label(it.period_start_ms)].append(it)
        out: list[SendResult] = []
        for label, month_items in sorted(by_month.items()):
            try:
                folder = self.write_month(label, month_items)
            except OSError as exc:  # disk full, permissions: worth another try later
                out += [SendResult(it.key, "retry", None, f"write failed: {exc}")
                        for it in month_items]
                continue
            out += [SendResult(it.key, "sent", None, "written",
                               f"{folder.name}/rated-lines-{label}.csv")
                    for it in month_items]
        return out

    def received(self, keys: Sequence[str]) -> set[str] | None:
        """Keys in the CSV files whose checksum matches their manifest."""
        wanted = set(keys)
        found: set[str] = set()
        if not self.out_dir.exists():
            return found
        for folder in sorted(p for p in self.out_dir.iterdir() if p.is_dir()):
            doc, problems = verify_month(folder)
            if doc is None or problems:
                continue
            for entry in doc["files"]:
                if entry["name"].endswith(".csv"):
                    text = (folder / entry["name"]).read_text(encoding="utf-8")
                    for row in csv.DictReader(io.StringIO(text)):
                        if row["key"] in wanted:
                            found.add(row["key"])
        return found
