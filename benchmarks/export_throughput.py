"""Export throughput: items/s from the ledger to the local signed-webhook receiver.

    python benchmarks/export_throughput.py [--items 20000] [--concurrency 8]
        [--batch-size 100] [--lines-per-request 1] [--pipeline 1] [--client new|http.client]
    python benchmarks/export_throughput.py --compare     # the clients side by side

The receiver (meterline.export.receiver: verifies every signature, dedupes by key) runs in
its own process on 127.0.0.1, so sender and receiver each have a core. Measured: enqueue
(items into the SQLite ledger) and send (claim -> signed POSTs with bounded concurrency ->
outcomes applied), the latter as items/s. The run fails unless the receiver holds every
item exactly once with no bad signature (stripe-mock: benchmarks/export_stripe.py).
Prints the command, the figures, and a JSON line. ``--compare`` runs, in one process
and one after the other on the same machine load, the http.client poster the target used
before (``--client http.client``), the target's own client, and the latter pipelined
(``--pipeline 8``), each against a fresh receiver and ledger, and prints their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

SECRET = "bench-secret-0123456789abcdef"  # noqa: S105 - a local benchmark secret


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of another process, from /proc (0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _items(n: int) -> list:  # type: ignore[type-arg]
    from meterline.core.billing.lines import RatedLine
    from meterline.core.billing.periods import parse_instant
    from meterline.export.build import item_from_line

    start = parse_instant("2026-11-01")
    end = parse_instant("2026-12-01")
    return [item_from_line(RatedLine(
        subscription_id=f"sub-{i:07d}", customer=f"cust-{i:07d}", period_start_ms=start,
        period_end_ms=end, line_id=f"{start}/usage/api_calls:count", kind="usage",
        segment_start_ms=start, segment_end_ms=end, plan_id="pro", plan_version=1,
        meter="api_calls", aggregation="count", quantity=Decimal(i), currency="USD",
        amount=Decimal(i).scaleb(-2), amount_exact=str(i), proration_num=1, proration_den=1,
        tiers="1", price_model="per_unit", status="final")) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lines-per-request", type=int, default=1)
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--client", choices=("new", "http.client"), default="new")
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args(argv)
    if not args.compare:
        return 0 if run(args)["exact"] else 1
    modes = [("http.client", 1), ("new", 1), ("new", 8)]
    results = []
    for client, depth in modes:
        results.append(run(argparse.Namespace(**{**vars(args), "client": client,
                                                  "pipeline": depth, "compare": False})))
    base = results[0]["items_per_s"]
    load = os.getloadavg()
    print(f"compare (load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}):")
    for (client, depth), r in zip(modes, results, strict=True):
        print(f"  {client:<11} pipeline {depth}: {r['items_per_s']:>6,} items/s  "
              f"x{r['items_per_s'] / base:.2f}")
    return 0 if all(r["exact"] for r in results) else 1


def run(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    from meterline.export.engine import EngineSettings, Exporter
    from meterline.export.ledger import ExportLedger
    from meterline.export.signed_http import HttpPoster
    from meterline.export.webhook_target import WebhookTarget, WebhookTargetSettings

    command = "python benchmarks/export_throughput.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "compare")
    print(f"$ {command}", flush=True)
    rx = subprocess.Popen([sys.executable, "-m", "meterline.export.receiver"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "METERLINE_WEBHOOK_SECRET": SECRET})
    try:
        assert rx.stdout is not None
        url = rx.stdout.readline().strip()
        items = _items(args.items)
        with tempfile.TemporaryDirectory() as tmp:
            ledger = ExportLedger(Path(tmp) / "ledger.db")
            settings = WebhookTargetSettings(url, SECRET, 30.0, args.lines_per_request,
                                             args.pipeline)
            # http.client: the poster the target used before its own client (the baseline)
            old = HttpPoster(url, 30.0) if args.client == "http.client" else None
            target = WebhookTarget(settings, post=old.post if old else None)
            exporter = Exporter(ledger, target, settings=EngineSettings(args.batch_size,
                                                                        args.concurrency))
            t0 = time.perf_counter()
            exporter.enqueue(items)
            t1 = time.perf_counter()
            cpu0, rx_cpu0 = time.process_time(), _cpu_s(rx.pid)
            report = exporter.run(until_drained=True)
            t2 = time.perf_counter()
            cpu_s, rx_cpu_s = time.process_time() - cpu0, _cpu_s(rx.pid) - rx_cpu0
            target.close()
            if old is not None:
                old.close()
            counts = ledger.counts("webhook")
            ledger.close()
        with urllib.request.urlopen(url.rsplit("/", 2)[0] + "/stats", timeout=10) as r:
            stats = json.loads(r.read())
    finally:
        if rx.stdin is not None:
            rx.stdin.close()
        rx.wait(timeout=30)
    ok = (report.sent == args.items and counts["sent"] == args.items
          and stats["held"] == args.items and stats["bad_signatures"] == 0)
    rate = args.items / (t2 - t1)
    print(f"enqueue: {args.items:,} items in {t1 - t0:.2f}s "
          f"({args.items / (t1 - t0):,.0f} items/s into the ledger)")
    print(f"send:    {args.items:,} items in {t2 - t1:.2f}s = {rate:,.0f} items/s to the "
          f"local webhook receiver ({stats['requests']:,} signed requests, concurrency "
          f"{args.concurrency}, {args.lines_per_request} line(s)/request, pipeline "
          f"{args.pipeline}, client {args.client}); receiver holds "
          f"{stats['held']:,} distinct keys, {stats['deliveries']:,} deliveries")
    per_request = 1e6 / max(1, stats["requests"])
    print(f"cpu:     sender {cpu_s * per_request:,.0f} us/request (ledger, signing, HTTP), "
          f"receiver {rx_cpu_s * per_request:,.0f} us/request")
    result = {"items": args.items, "items_per_s": round(rate),
              "enqueue_s": round(t1 - t0, 3), "send_s": round(t2 - t1, 3),
              "concurrency": args.concurrency, "batch_size": args.batch_size,
              "lines_per_request": args.lines_per_request, "pipeline": args.pipeline,
              "client": args.client, "sender_cpu_s": round(cpu_s, 3),
              "receiver_cpu_s": round(rx_cpu_s, 3), "exact": ok}
    print(json.dumps(result), flush=True)
    if not ok:
        print(f"NOT EXACT: report {report}, ledger {counts}, receiver {stats}",
              file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(main())
