"""The rollup output path in its three wire forms, in one process and one run.

    .venv/bin/python benchmarks/rollup_loader.py [--rows N] [--repeat K]

What a flush costs from the worker's writer to rows in chDB, per row, without Kafka:

- **encode**: the worker's output payloads (``output_records``; orjson for the JSON forms);
- **decode**: the loader turning those records back into a flush (``decode_outputs``);
- **write**: ``write_flush`` into a migrated embedded chDB (checks, retention, inserts).

Three forms of the same rows (1,000 customers, 3 meters, grouped and ungrouped, hourly
and daily windows of the current day, one source partition per block): the **row** form
of older workers (``{"rollups": [{...}, ...]}``, one object per row), the JSON **column**
blocks of sessions 20-21 (``{"rollup_columns": {...}}``) and the **Arrow** IPC blocks the
worker writes now (sinks/rollup_arrow.py). The decoded flushes are
compared with the rows that went in, and each run inserts new versions, so a wrong or
partial decode cannot report a number. ``--repeat`` alternates the forms and keeps each
one's fastest run (the machine is shared). Prints one JSON line and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meterline.aggregators.outputs_io import decode_outputs, output_records  # noqa: E402
from meterline.core.outputs import Flush, RollupRecord  # noqa: E402
from meterline.core.windows import DAY_MS, HOUR_MS  # noqa: E402
from meterline.ingest.sources import SourceRecord  # noqa: E402

METERS = ("api_calls", "llm_tokens", "storage_gb")
FORMS = ("rows", "json-columns", "arrow")


def rows_of(n: int, version: int, now_ms: int) -> list[RollupRecord]:
    hour = now_ms - now_ms % HOUR_MS
    day = now_ms - now_ms % DAY_MS
    out = []
    for i in range(n):
        hourly = i % 2 == 1
        start = hour if hourly else day
        group = (("endpoint", f"/v{i % 7}"), ("region", "eu")) if i % 3 == 0 else ()
        out.append(RollupRecord("hourly" if hourly else "daily", f"cust-{i % 1000:05d}",
                                METERS[i % 3], group, start,
                                start + (HOUR_MS if hourly else DAY_MS), "sum",
                                1_000_000_000 * i + 7, 3, version, "usage", 0))
    return out


def _row_form(flush: Flush) -> list[bytes]:
    """What workers before the column blocks wrote (the loader still reads it)."""
    from meterline.aggregators.outputs_io import CHUNK

    return [orjson.dumps({"rollups": [r.to_dict() for r in flush.rollups[i:i + CHUNK]]})
            for i in range(0, len(flush.rollups), CHUNK)]


def _json_columns_form(flush: Flush) -> list[bytes]:
    """What workers of sessions 20-21 wrote: JSON column blocks of one source partition
    and window kind (the loader still reads them)."""
    from meterline.aggregators.outputs_io import CHUNK
    from meterline.core.outputs import rollup_columns

    runs: dict[tuple[str, int, str], list[RollupRecord]] = {}
    for r in flush.rollups:
        runs.setdefault((r.source, r.partition, r.window), []).append(r)
    return [orjson.dumps({"rollup_columns": rollup_columns(rows[i:i + CHUNK])})
            for rows in runs.values() for i in range(0, len(rows), CHUNK)]


def run(storage: Any, form: str, n: int, version: int) -> dict[str, Any]:
    from meterline.sinks.rollups import write_flush

    now = time.time_ns() // 1_000_000
    flush = Flush(rollups=rows_of(n, version, now))
    t0 = time.perf_counter()
    if form == "rows":
        payloads = _row_form(flush)
    elif form == "json-columns":
        payloads = _json_columns_form(flush)
    else:  # what the worker writes now
        payloads = [payload for kind, _, payload in output_records(flush)
                    if kind == "rollups"]
    t1 = time.perf_counter()
    records = [SourceRecord("usage.rollups", 0, k, p, now) for k, p in enumerate(payloads)]
    decoded, undecodable = decode_outputs(records)
    t2 = time.perf_counter()  # the check below is not timed
    got = decoded.rollup_rows()
    if undecodable or sorted(got, key=repr) != sorted(flush.rollups, key=repr):
        raise SystemExit(f"{form}: the decoded rows differ from the rows sent")
    t2b = time.perf_counter()
    counts = write_flush(storage, decoded)
    t3 = time.perf_counter()
    if counts.hourly + counts.daily != n or counts.refused:
        raise SystemExit(f"{form}: wrote {counts}, expected {n} rows")
    return {"form": form, "rows": n, "bytes_per_row": round(sum(map(len, payloads)) / n, 1),
            "encode_us_per_row": round((t1 - t0) / n * 1e6, 2),
            "decode_us_per_row": round((t2 - t1) / n * 1e6, 2),
            "write_us_per_row": round((t3 - t2b) / n * 1e6, 2),
            "loader_rows_per_s": round(n / (t2 - t1 + t3 - t2b))}


def main(argv: list[str] | None = None, storage: Any = None) -> int:
    """``storage``: a migrated Storage to write into (tests: chDB hosts one data directory
    per process); by default a new embedded chDB in a temporary directory."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if storage is None:
            from meterline.sinks.schema import migrate
            from meterline.sinks.storage import StorageConfig, open_storage

            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            storage = open_storage(StorageConfig(data_dir=tmp))
            stack.callback(storage.close)
            migrate(storage)
        best: dict[str, dict[str, Any]] = {}
        version = 0
        for _ in range(args.repeat):
            for form in FORMS:
                version += 1
                result = run(storage, form, args.rows, version)
                if (form not in best or result["loader_rows_per_s"]
                        > best[form]["loader_rows_per_s"]):
                    best[form] = result
    rate = {form: best[form]["loader_rows_per_s"] for form in FORMS}
    summary = {**best, "loader_ratio": round(rate["arrow"] / rate["rows"], 2),
               "loader_ratio_json_columns": round(rate["arrow"] / rate["json-columns"], 2)}
    print(json.dumps(summary))
    print(f"{'':22}" + "".join(f"{form:>14}" for form in FORMS))
    for key in ("bytes_per_row", "encode_us_per_row", "decode_us_per_row", "write_us_per_row",
                "loader_rows_per_s"):
        print(f"{key:22}" + "".join(f"{best[form][key]:>14,}" for form in FORMS))
    print(f"loader (decode + write) arrow / rows: {summary['loader_ratio']}x, "
          f"arrow / json-columns: {summary['loader_ratio_json_columns']}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
