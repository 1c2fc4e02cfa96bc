"""Rate one month for many subscriptions x 5 meters (issue 9's benchmark).

Builds a chDB database with a month of daily rollups for N customers x 4 rollup meters
(generated inside ClickHouse with ``numbers()``, so setup is not Python-bound) and raw
events for a fifth, ``active_users`` (unique_count reads raw events), publishes 3 plans
and subscribes every customer (1 % in a trial ending mid-month, 1 % upgrading mid-month),
then times ``meterline.rating.stage.rate`` for the month, twice (the second run rewrites
the same rows), and prints where the time goes:

- plan: segments and usage requests per subscription (pure Python);
- read: the quantity queries (per time range one for sum, count and max together, one per
  other aggregation);
- price: the core prices every line (pure Python; ``Price.rate_line``, no explanation);
- compare: reading the current lines back (tombstones, closed periods);
- write: one insert of every line into ``rated_usage``.

Each phase is reported in wall and CPU seconds (this process, chDB's threads included): on
a shared machine the CPU figure is the steadier one.

Results must not change with the code's speed: the last two lines print a digest of every
rated line (as Python sees it) and of every ``rated_usage`` row. To compare with older
code, run this same script with that code first on ``PYTHONPATH`` (for example a
``git archive`` of the previous commit, with ``sinks/`` etc. linked in as
``meterline/sinks``) at the same ``--subscriptions``, and compare the digests.

    python benchmarks/rating_month.py                    # 100,000 subscriptions
    python benchmarks/rating_month.py --subscriptions 2000   # a small run (tests use this)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from decimal import Decimal
from typing import Any

DAY_MS = 86_400_000
MONTH = "2026-11"
DISCOUNT = (Decimal(1), Decimal("0.8"), Decimal("0.5"))  # per-unit prices by plan

PLAN_CHARGES = [
    ("api_calls", "count", {"model": "graduated", "tiers": [{"up_to": 1000, "unit_amount": "0"},
                                                            {"unit_amount": "0.002"}]}),
    ("llm_tokens", "sum", {"model": "per_unit", "unit_amount": "0.00042"}),
    ("compute_seconds", "sum", {"model": "per_unit", "unit_amount": "0.0001"}),
    ("storage_gb", "max", {"model": "volume", "tiers": [{"up_to": 100, "unit_amount": "0.05"},
                                                        {"unit_amount": "0.03"}]}),
    ("active_users", "unique_count", {"model": "per_unit", "unit_amount": "0.10"}),
]


def _plans() -> list[dict[str, Any]]:
    out = []
    for i, (plan_id, fee) in enumerate((("starter", "0"), ("growth", "49.00"),
                                        ("scale", "499.00"))):
        charges = []
        for meter, agg, price in PLAN_CHARGES:
            charge: dict[str, Any] = {"meter": meter, "aggregation": agg, "price": dict(price)}
            if agg == "unique_count":
                charge["dimension"] = "user_id"
            if price["model"] == "per_unit":
                charge["price"]["unit_amount"] = str(Decimal(price["unit_amount"]) * DISCOUNT[i])
            charges.append(charge)
        out.append({"id": plan_id, "currency": "USD", "base_fee": fee, "charges": charges})
    return out


def _load_usage(storage: Any, n: int, month_ms: int, days: int) -> None:
    db = storage.database
    for meter, agg, scale in (("api_calls", "count", 1), ("llm_tokens", "sum", 37),
                              ("compute_seconds", "sum", 3), ("storage_gb", "max", 1)):
        storage.execute(
            f"INSERT INTO {db}.daily_rollups (customer, meter, group_key, dimensions, "
            "window_start_ms, window_end_ms, aggregation, value_nano, events, version, source, "
            "source_partition, updated_at_ms)\n"
            "SELECT concat('cust-', leftPad(toString(number % {n:UInt64}), 6, '0')),\n"
            "  {meter:String}, '', map(),\n"
            "  {m:Int64} + intDiv(number, {n:UInt64}) * 86400000,\n"
            "  {m:Int64} + (intDiv(number, {n:UInt64}) + 1) * 86400000, {agg:String},\n"
            "  toInt128((number * 7919 % 1000 + 1) * {scale:UInt64}) * 1000000000,\n"
            "  number * 7919 % 1000 + 1, 1, 'bench', 0, 0\n"
            "FROM numbers({rows:UInt64})",
            {"n": n, "meter": meter, "m": month_ms, "agg": agg, "scale": scale,
             "rows": n * days})
    storage.execute(
        f"INSERT INTO {db}.raw_events (event_id, batch_id, customer, meter, quantity_nano, "
        "timestamp_ms, dimensions, source, ingested_at_ms)\n"
        "SELECT toString(number), 'b', concat('cust-', leftPad(toString(number % {n:UInt64}), "
        "6, '0')), 'active_users', 1000000000, {m:Int64} + number % 2500000000,\n"
        "  map('user_id', concat('u', toString(number * 13 % 17))), 'bench', 0\n"
        "FROM numbers({rows:UInt64})",
        {"n": n, "m": month_ms, "rows": n * 10})


def _lines_digest(lines: list[Any]) -> str:
    """Every field of every line as Python sees it (a Decimal's exponent included, so
    66.00 and 66.0 differ), in the order ``rate`` returns them."""
    h = hashlib.sha256()
    for line in lines:
        h.update(repr(line).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _table_digest(storage: Any) -> str:
    """Row count and an order-independent hash of every stored ``rated_usage`` row, all
    columns but ``rated_at_ms`` (the wall-clock stamp of the run)."""
    table = f"{storage.database}.rated_usage"
    cols = [str(r[0]) for r in storage.query_rows(
        "SELECT name FROM system.columns WHERE database = {db:String} AND table = 'rated_usage' "
        "AND name != 'rated_at_ms' AND default_kind != 'EPHEMERAL' ORDER BY position",
        {"db": storage.database})]
    (count, digest), = storage.query_rows(
        f"SELECT count(), hex(sipHash128(arraySort(groupArray(sipHash128({', '.join(cols)})))))"
        f" FROM {table}")
    return f"{int(count):,} rows, {str(digest)[:16].lower()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscriptions", type=int, default=100_000)
    args = parser.parse_args(argv)
    n = args.subscriptions

    from meterline.core.billing import change_plan, parse_instant, publish_plan, subscribe
    from meterline.rating.stage import rate
    from meterline.sinks.billing_events import BillingLedger
    from meterline.sinks.chdb_backend import ChdbStorage
    from meterline.sinks.schema import migrate

    month_ms = parse_instant(f"{MONTH}-01")
    days = 30
    data_dir = tempfile.mkdtemp(prefix="rating-bench-")
    storage = ChdbStorage(data_dir, "bench")
    migrate(storage)
    t = time.monotonic()
    _load_usage(storage, n, month_ms, days)
    load_s = time.monotonic() - t

    t = time.monotonic()
    ledger = BillingLedger(storage, clock_ms=lambda: month_ms)
    plans = _plans()
    ledger.record(*[(lambda s, now, d=d: publish_plan(s, d, actor="bench", reason="bench",
                                                      now_ms=now)) for d in plans])
    names = [p["id"] for p in plans]
    mid = month_ms + 15 * DAY_MS
    commands = []
    for i in range(n):
        c = f"cust-{i:06d}"
        commands.append(lambda s, now, c=c, i=i: subscribe(
            s, f"sub-{c}", c, names[i % 3], start_ms=month_ms, actor="bench", reason="bench",
            now_ms=now, trial_end_ms=mid if i % 100 == 7 else None))
    commands += [(lambda s, now, i=i: change_plan(s, f"sub-cust-{i:06d}", "scale", at_ms=mid,
                                                  actor="bench", reason="bench", now_ms=now))
                 for i in range(1, n, 100) if i % 3 != 2]
    ledger.record(*commands)
    ledger_s = time.monotonic() - t

    as_of = month_ms + days * DAY_MS + DAY_MS
    t, cpu = time.monotonic(), time.process_time()
    first = rate(storage, ledger.state, period=MONTH, as_of_ms=as_of, settle_ms=3 * 3_600_000)
    first_s, first_cpu = time.monotonic() - t, time.process_time() - cpu
    t, cpu = time.monotonic(), time.process_time()
    second = rate(storage, ledger.state, period=MONTH, as_of_ms=as_of,
                  settle_ms=3 * 3_600_000)
    second_s, second_cpu = time.monotonic() - t, time.process_time() - cpu
    assert [x.amount for x in first.lines] == [x.amount for x in second.lines]

    # Sanity check against the rollups themselves: the rated llm_tokens of every paid
    # segment plus trial segment add up to the table's sum.
    rated = sum(x.quantity for x in first.lines if x.meter == "llm_tokens")
    table = storage.query_rows(
        f"SELECT sum(value) FROM {storage.database}.daily_rollups WHERE meter = 'llm_tokens'")
    assert rated == table[0][0], (rated, table)

    print(f"rating one month: {n:,} subscriptions x 5 meters, {len(first.lines):,} lines, "
          f"{first.queries} quantity queries")
    print(f"  setup: usage load {load_s:.1f}s, {len(ledger.state.subscriptions):,} "
          f"subscriptions into the event log {ledger_s:.1f}s")
    for label, seconds, cpu_s, result in (("first run", first_s, first_cpu, first),
                                          ("re-run", second_s, second_cpu, second)):
        cpu_parts = getattr(result, "cpu_seconds", {})  # absent in code before it
        parts = ", ".join(f"{k} {v:.1f}s" + (f" ({cpu_parts[k]:.1f}s CPU)" if k in cpu_parts
                                             else "")
                          for k, v in result.seconds.items())
        print(f"  {label}: {seconds:.1f}s wall, {cpu_s:.1f}s CPU (this process, chDB "
              f"included) ({n / seconds:,.0f} subscriptions/s): {parts}")
    print("  quantity queries (aggregation, range days, requests, seconds):")
    for agg, start, end, count, secs in sorted(first.query_timings, key=lambda q: -q[4]):
        days_from, days_to = (start - month_ms) / DAY_MS, (end - month_ms) / DAY_MS
        print(f"    {agg:<18}{days_from:>5.1f}..{days_to:<5.1f}{count:>9,}{secs:>8.2f}")
    load = os.getloadavg()
    if load:
        print(f"  machine load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
              f"({os.cpu_count()} cores)")
    total = sum((x.amount for x in first.lines), Decimal(0))
    print(f"  invoice total {total:,} USD; llm_tokens rated = rollups ({rated:,})")
    # Exactness check across code changes: run this with the old code (e.g. `git archive`
    # of the previous commit on PYTHONPATH) and compare these two lines.
    print(f"  digest of rated lines (Python, repr): {_lines_digest(first.lines)}")
    print(f"  digest of rated_usage rows (table, both runs): {_table_digest(storage)}")
    storage.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
