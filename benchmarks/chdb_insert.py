"""Insert throughput of raw events into embedded chDB, one line per method tried.

Not collected by pytest (no ``test_`` prefix). Run:

    .venv/bin/python tests/sinks/bench_chdb_insert.py --rows 1000000 --repeat 3

Every method starts from the same Python column lists (what the batch decoder hands to
``insert_raw_events``), so Python-side conversion is included in the time. Each run goes
into a fresh table; after each run the count and the exact ``sum(quantity)`` are checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import orjson

from meterline.sinks.chdb_backend import ChdbStorage
from meterline.sinks.raw_events import RAW_INSERT_SETTINGS, RawEventColumns, insert_raw_events
from meterline.sinks.schema import RAW_EVENTS, RetentionPolicy

COLUMNS = [
    "event_id", "batch_id", "customer", "meter", "quantity_nano",
    "timestamp_ms", "dimensions", "source", "ingested_at_ms",
]


def make_rows(n: int) -> RawEventColumns:
    base = time.time_ns() // 1_000_000 - 3_600_000  # recent: older rows would hit the TTL
    return RawEventColumns(
        event_id=[f"{i:032x}" for i in range(n)],
        batch_id=[f"batch-{i // 1000}" for i in range(n)],
        customer=[f"cust-{i % 1000}" for i in range(n)],
        meter=[("api_calls", "tokens", "storage_gb")[i % 3] for i in range(n)],
        quantity_nano=[100_000_000] * n,  # 0.1 each: the sum must be exactly n / 10
        timestamp_ms=[base + i % 3_000_000 for i in range(n)],
        dimensions=[({"region": "eu", "plan": "pro"} if i % 2 else {"region": "us"})
                    for i in range(n)],
        source=["usage-events"] * n,
        ingested_at_ms=[base + 5000] * n,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="meterline-bench-")
    storage = ChdbStorage(data_dir, "bench")
    session = storage._session  # the raw chdb session, for the alternative methods
    storage.execute("CREATE DATABASE IF NOT EXISTS bench")
    rows = make_rows(args.rows)
    cols = rows.as_columns()
    names = ", ".join(COLUMNS)
    counter = iter(range(10**9))

    def fresh_table() -> str:
        table = dataclasses.replace(RAW_EVENTS, name=f"raw_{next(counter)}")
        storage.execute(table.create_sql("bench", RetentionPolicy()))
        return table.qualified("bench")

    def m_insert_raw_events(table: str) -> None:
        # The shipped path: validation + Python() over dict of lists, optimize_on_insert=0.
        insert_raw_events(storage, rows, database="bench")

    def m_python_dict_optimize_on_insert(table: str) -> None:
        storage.insert_columns(table, cols, RAW_EVENTS.insert_types(COLUMNS))

    def m_python_dict_no_validation(table: str) -> None:
        storage.insert_columns(table, cols, RAW_EVENTS.insert_types(COLUMNS),
                               RAW_INSERT_SETTINGS)

    def m_jsoncolumns_send_insert(table: str) -> None:
        with session.send_insert(f"INSERT INTO {table} ({names}) SETTINGS optimize_on_insert=0",
                                 "JSONColumns") as inserter:
            inserter.append(orjson.dumps(cols))
            inserter.finish()

    def m_jsoncolumns_query(table: str) -> None:
        session.query(f"INSERT INTO {table} ({names}) SETTINGS optimize_on_insert=0 "
                      f"FORMAT JSONColumns ".encode() + orjson.dumps(cols), "Null")

    def m_jsoneachrow(table: str) -> None:
        lines = [orjson.dumps(dict(zip(COLUMNS, r, strict=True)))
                 for r in zip(*cols.values(), strict=True)]
        session.query(f"INSERT INTO {table} ({names}) SETTINGS optimize_on_insert=0 "
                      "FORMAT JSONEachRow\n".encode() + b"\n".join(lines), "Null")

    def arrow_table() -> Any:
        import pyarrow as pa

        offsets, keys, values = [0], [], []
        for d in cols["dimensions"]:
            keys.extend(d)
            values.extend(d.values())
            offsets.append(len(keys))
        dims = pa.MapArray.from_arrays(pa.array(offsets, pa.int32()),
                                       pa.array(keys, pa.string()),
                                       pa.array(values, pa.string()))
        return pa.table({n: dims if n == "dimensions" else pa.array(cols[n]) for n in COLUMNS})

    def m_arrow_python_table(table: str) -> None:
        arrow_rows = arrow_table()  # noqa: F841 - read by chDB's Python() through the frame
        session.query(f"INSERT INTO {table} ({names}) SELECT {names} FROM Python(arrow_rows) "
                      "SETTINGS optimize_on_insert=0", "Null")

    def m_arrowstream_send_insert(table: str) -> None:
        import pyarrow as pa

        tbl = arrow_table()
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, tbl.schema) as writer:
            writer.write_table(tbl)
        with session.send_insert(f"INSERT INTO {table} ({names}) SETTINGS optimize_on_insert=0",
                                 "ArrowStream") as inserter:
            inserter.append(sink.getvalue())
            inserter.finish()

    def m_tabseparated(table: str) -> None:
        def esc(v: str) -> str:
            return v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")

        def dims(d: dict[str, str]) -> str:
            return "{" + ",".join(f"'{esc(k)}':'{esc(v)}'" for k, v in d.items()) + "}"

        out = [
            f"{esc(e)}\t{esc(b)}\t{esc(c)}\t{esc(m)}\t{q}\t{t}\t{dims(d)}\t{esc(s)}\t{i}"
            for e, b, c, m, q, t, d, s, i in zip(*cols.values(), strict=True)
        ]
        session.query(f"INSERT INTO {table} ({names}) SETTINGS optimize_on_insert=0 "
                      "FORMAT TabSeparated\n" + "\n".join(out), "Null")

    def m_clickhouse_connect_native(table: str) -> None:
        # server_backend's code path (Native over clickhouse-connect), chDB transport.
        server.insert_columns(table, cols, RAW_EVENTS.insert_types(COLUMNS), RAW_INSERT_SETTINGS)

    import clickhouse_connect

    from meterline.sinks.server_backend import ServerStorage

    server = ServerStorage(clickhouse_connect.get_client(interface="chdb", path=data_dir),
                           "bench")

    methods: dict[str, Callable[[str], None]] = {
        name[2:]: fn for name, fn in sorted(locals().items()) if name.startswith("m_")
    }
    print(f"chdb {_chdb_version()}, {args.rows:,} rows, best/median of {args.repeat}, "
          f"{os.cpu_count()} CPUs", flush=True)
    for name, fn in methods.items():
        if args.only and name not in args.only:
            continue
        rates = []
        for _ in range(args.repeat):
            table = fresh_table()
            if name == "insert_raw_events":
                storage.execute(f"DROP TABLE IF EXISTS bench.{RAW_EVENTS.name}")
                storage.execute(RAW_EVENTS.create_sql("bench", RetentionPolicy()))
                table = RAW_EVENTS.qualified("bench")
            start = time.perf_counter()
            fn(table)
            elapsed = time.perf_counter() - start
            count, total = storage.query_rows(f"SELECT count(), sum(quantity) FROM {table}")[0]
            exact = count == args.rows and total * 10 == args.rows
            if not exact:
                print(f"  {name}: WRONG count={count} sum={total}", file=sys.stderr)
            rates.append(args.rows / elapsed)
            storage.execute(f"DROP TABLE {table} SYNC")
        print(f"{name:34s} best {max(rates):>10,.0f} rows/s   median "
              f"{statistics.median(rates):>10,.0f} rows/s   exact={exact}", flush=True)
    server.close()
    storage.close()
    shutil.rmtree(data_dir, ignore_errors=True)


def _chdb_version() -> str:
    import chdb

    return str(chdb.__version__)


if __name__ == "__main__":
    main()
