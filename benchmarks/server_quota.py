"""Quota checks under load: a real `meterline serve` process (embedded, as shipped), a real
HTTP client (aiohttp, keep-alive connections) over loopback.

    .venv/bin/python benchmarks/server_quota.py                 # full size
    .venv/bin/python benchmarks/server_quota.py --quick         # smoke size

1. Seeds --customers customers x 2 meters (llm_tokens: sum with fractional quantities,
   api_calls: count) through the native batch endpoint, with a monthly quota on each
   meter, and waits until the rollups show every key's total (progress-based).
2. Measures, each at --concurrency requests in flight, over random (customer, meter) keys:
   - floor: GET /healthz (no key, no read): what HTTP + both event loops cost here;
   - idle: quota checks for --seconds with no ingest;
   - ingest: quota checks for --seconds while paced ingest (--ingest-rate events/s in
     batches of --ingest-batch) flows to the same customers, so the rollups flush and
     move the cache's generation all along.
   Each: requests/s and p50/p95/p99/max latency; from the server's /metrics the share
   answered from memory (``meterline_quota_cache_total``) and the share the server itself
   handled within 1 ms / 5 ms. Then all of it again against a second server that reads
   every check from the views (``METERLINE_QUOTA_TOTALS=0``, --baseline-customers; the
   design before the in-memory totals), so both are measured in the same run.
3. Checks answers: after seeding and again after the ingest phase, every key must answer
   ``used`` == what this script sent (its own integer sums, not the server's); during
   ingest every answer must lie between the seeded and the sent total. Freshness: the
   time from the last ingest acknowledgement until a --sample of the keys it touched
   matched.
Exit status 1 when an answer was wrong. Client and server share this machine's cores: the
floor is the baseline the quota latencies are read against (same run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from meterline.core.envelope import Batch, encode_batch

CLI = [sys.executable, "-m", "meterline.cli"]
METERS = ("llm_tokens", "api_calls")  # sum and count meters of the default registry
NANOS = 10**9
Key = tuple[int, str]  # (customer index, meter)


def start_server(workdir: Path, flush_interval_s: float, totals: bool = True
                 ) -> tuple[subprocess.Popen[str], str, str, str | None]:
    """(process, url, admin key, metrics url or None). ``totals=False``: the server reads
    every quota from the views (``METERLINE_QUOTA_TOTALS=0``), the comparison."""
    config = workdir / "meterline.toml"
    quotas = "".join(f'[[server.quotas]]\nmeter = "{m}"\nlimit = "1000000"\nperiod = "month"\n'
                     for m in METERS)
    config.write_text(f'[storage]\ndata_dir = "{workdir / "chdb"}"\n'
                      f"[rollups]\nflush_interval_s = {flush_interval_s}\n"
                      "[server]\nport = 0\nmax_pending_events = 2000000\n" + quotas)
    made = subprocess.run([*CLI, "keys", "create", "--tenant", "bench", "--scope", "admin",
                           "--config", str(config)], capture_output=True, text=True,
                          check=True)
    key = made.stdout.strip()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "METERLINE_METRICS_PORT": "0",
           "METERLINE_QUOTA_TOTALS": "1" if totals else "0"}
    proc = subprocess.Popen([*CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    metrics = None
    for line in proc.stdout:
        if "metrics on " in line:
            metrics = line.split("metrics on ", 1)[1].split()[0]
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].split()[0], key, metrics
    raise SystemExit("server did not start")


def customer(i: int) -> str:
    return f"cust-{i}"


def quantity_nanos(meter: str, n: int) -> int:
    """Deterministic quantities; llm_tokens has fractions (exact decimals end to end), a
    count meter counts events whatever quantity was sent."""
    if meter == "llm_tokens":
        return (n * 7919 % 1000 + 1) * NANOS + (n % 4) * 250_000_000
    return (n % 5 + 1) * NANOS


class Truth:
    """What this script sent, per key, in nano-units of the meter's value."""

    def __init__(self) -> None:
        self.sent: dict[Key, int] = {}
        self.events = 0

    def batch(self, picks: list[Key], now_ms: int) -> bytes:
        n0 = self.events
        quantities = [quantity_nanos(m, n0 + j) for j, (_, m) in enumerate(picks)]
        for (c, m), q in zip(picks, quantities, strict=True):
            self.sent[(c, m)] = self.sent.get((c, m), 0) + (q if m == "llm_tokens" else NANOS)
        self.events += len(picks)
        return encode_batch(Batch(
            batch_id=uuid.uuid4().hex, created_ms=now_ms,
            customers=[customer(c) for c, _ in picks], meters=[m for _, m in picks],
            quantities=quantities, timestamps_ms=[now_ms] * len(picks),
            dimensions=[{"model": "m1"} if m == "llm_tokens" else {"endpoint": "/v1"}
                        for _, m in picks]))


def nanos(text: str) -> int:
    return int(Decimal(text) * NANOS)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


QUOTA_ROUTE = "/api/v1/quota/{customer}/{meter}"


def server_counts(metrics_url: str | None) -> dict[str, float]:
    """The quota cache's hit/miss counters and the server's own latency histogram of the
    quota route (``le_<bound>``: requests handled within bound seconds, from request
    parsed to response made; queueing on the event loop is not in it)."""
    if metrics_url is None:
        return {}
    with urllib.request.urlopen(metrics_url, timeout=30) as r:
        text = r.read().decode()
    out = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^meterline_quota_cache_total\{result="(\w+)"\} (\S+)$', text, re.M)}
    for m in re.finditer(r'^meterline_server_request_seconds_bucket\{(.*)\} (\S+)$', text,
                         re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("route") == QUOTA_ROUTE:
            out[f"le_{labels['le']}"] = float(m.group(2))
    return out


class Client:
    def __init__(self, url: str, key: str, concurrency: int) -> None:
        self.url = url
        self.headers = {"authorization": f"Bearer {key}"}
        self.concurrency = concurrency
        self.session: Any = None

    async def __aenter__(self) -> Client:
        import aiohttp

        # Room for the ingest connections beside the quota ones.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency + 4))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def quota(self, key: Key) -> dict[str, Any]:
        c, m = key
        async with self.session.get(f"{self.url}/api/v1/quota/{customer(c)}/{m}",
                                    headers=self.headers) as r:
            body = await r.read()
            if r.status != 200:
                raise SystemExit(f"quota HTTP {r.status}: {body[:300]!r}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    async def healthz(self, _: Key) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/healthz") as r:
            await r.read()
        return {}

    async def post(self, body: bytes) -> None:
        async with self.session.post(
                f"{self.url}/api/v1/batches", data=body,
                headers={**self.headers,
                         "content-type": "application/vnd.meterline.envelope+json"}) as r:
            if r.status not in (200, 204):
                raise SystemExit(f"ingest HTTP {r.status}: {(await r.text())[:300]}")

    async def run(self, keys: list[Key], call: Any, check: Any = None,
                  seconds: float | None = None) -> tuple[float, list[float]]:
        """``keys`` through ``call`` at ``concurrency`` in flight: (seconds, latencies).
        With ``seconds``: random picks from ``keys`` until that time has passed (a phase
        as long for a slow server as for a fast one, so it spans the same flushes)."""
        latencies: list[float] = []
        queue = list(reversed(keys))
        rng = random.Random(11)
        end = None if seconds is None else time.perf_counter() + seconds

        async def worker() -> None:
            first = end is not None  # each worker measures at least once, however slow
            while first or (queue if end is None else time.perf_counter() < end):
                first = False
                key = queue.pop() if end is None else rng.choice(keys)
                t0 = time.perf_counter()
                doc = await call(key)
                latencies.append(time.perf_counter() - t0)
                if check is not None:
                    check(key, doc)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return time.perf_counter() - t0, latencies


async def settle(client: Client, truth: Truth, keys: list[Key], stall_s: float) -> float:
    """Seconds until every key answers the sent total; gives up (exit 1) when no key newly
    matched for ``stall_s`` (progress-based, not a wall-clock budget)."""
    t0 = last_progress = time.perf_counter()
    pending = set(keys)

    def matched(key: Key, doc: dict[str, Any]) -> None:
        if nanos(doc["used"]) == truth.sent[key]:
            pending.discard(key)

    while pending:
        before = len(pending)
        await client.run(sorted(pending), client.quota, matched)
        if len(pending) < before:
            last_progress = time.perf_counter()
        elif time.perf_counter() - last_progress > stall_s:
            bad = sorted(pending)[:5]
            raise SystemExit(f"WRONG: {len(pending)} keys never reached the sent total, "
                             f"e.g. {[(customer(c), m) for c, m in bad]}")
        if pending:
            await asyncio.sleep(0.05)
    return time.perf_counter() - t0


async def bench(args: argparse.Namespace, url: str, key: str, metrics: str | None
                ) -> dict[str, Any]:
    rng = random.Random(7)
    truth = Truth()
    keys = [(c, m) for c in range(args.customers) for m in METERS]
    report: dict[str, Any] = {"customers": args.customers, "keys": len(keys),
                              "concurrency": args.concurrency, "seconds": args.seconds,
                              "cores": os.cpu_count(), "phases": {}}
    async with Client(url, key, args.concurrency) as client:
        # Seed: every key gets --events-per-key events, shuffled across batches of 500.
        picks = keys * args.events_per_key
        rng.shuffle(picks)
        now_ms = time.time_ns() // 1_000_000
        for i in range(0, len(picks), 500):
            await client.post(truth.batch(picks[i:i + 500], now_ms))
        report["seeded_events"] = truth.events
        # Every key, not a sample: the ingest phase's bounds need each seeded total.
        report["seed_visible_s"] = round(await settle(client, truth, keys, args.stall_s), 2)
        seeded = dict(truth.sent)

        def phase(name: str, elapsed: float, lat: list[float], before: dict[str, float],
                  **extra: Any) -> None:
            after = server_counts(metrics)
            delta = {k: v - before.get(k, 0) for k, v in after.items()}
            hits, misses = delta.get("hit", 0), delta.get("miss", 0)
            handled = delta.get("le_+Inf", 0)
            if handled:
                extra["server_within_1ms"] = round(delta["le_0.001"] / handled, 4)
                extra["server_within_5ms"] = round(delta["le_0.005"] / handled, 4)
            report["phases"][name] = {
                "requests": len(lat), "requests_per_s": round(len(lat) / elapsed),
                "p50_ms": round(pct(lat, 0.5), 2), "p95_ms": round(pct(lat, 0.95), 2),
                "p99_ms": round(pct(lat, 0.99), 2), "max_ms": round(max(lat) * 1000, 2),
                "cache_hit_rate": (round(hits / (hits + misses), 4) if hits + misses
                                   else None), **extra}

        # Floor: the same client, loop and concurrency, no key check and no read.
        before = server_counts(metrics)
        elapsed, lat = await client.run(keys, client.healthz, seconds=args.seconds)
        phase("floor (/healthz)", elapsed, lat, before)

        before = server_counts(metrics)
        elapsed, lat = await client.run(keys, client.quota, seconds=args.seconds)
        phase("idle", elapsed, lat, before)

        # Under ingest: a paced sender beside the quota checks. Each answer must lie
        # between the seeded total (a cache may never go back) and what was sent so far.
        wrong: list[str] = []

        def bounded(k: Key, doc: dict[str, Any]) -> None:
            used = nanos(doc["used"])
            if not seeded[k] <= used <= truth.sent[k]:
                wrong.append(f"{customer(k[0])}/{k[1]}: used {doc['used']}, seeded "
                             f"{seeded[k]}, sent {truth.sent[k]} (nanos)")

        stop = asyncio.Event()
        sent_before = truth.events
        last_ack = [0.0]

        async def ingest() -> None:
            interval = args.ingest_batch / args.ingest_rate
            next_at = time.perf_counter()
            while not stop.is_set():
                body = truth.batch([rng.choice(keys) for _ in range(args.ingest_batch)],
                                   time.time_ns() // 1_000_000)
                await client.post(body)
                last_ack[0] = time.perf_counter()
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

        before = server_counts(metrics)
        sender = asyncio.create_task(ingest())
        t0 = time.perf_counter()
        elapsed, lat = await client.run(keys, client.quota, bounded, seconds=args.seconds)
        stop.set()
        await sender
        ingested = truth.events - sent_before
        phase("ingest", elapsed, lat, before,
              ingest_events_per_s=round(ingested / (time.perf_counter() - t0)))
        if wrong:
            raise SystemExit(f"WRONG during ingest ({len(wrong)}): {wrong[:3]}")
        # Freshness: from the last acknowledged ingest request until the sample matched.
        touched = [k for k in keys if truth.sent[k] != seeded[k]]
        after_sample = rng.sample(touched, min(args.sample, len(touched)))
        await settle(client, truth, after_sample, args.stall_s)
        report["ingest_visible_s"] = round(time.perf_counter() - last_ack[0], 2)
        await settle(client, truth, keys, args.stall_s)
        report["checked"] = {"after_seed": len(keys), "after_ingest": len(keys),
                             "during_ingest": len(lat), "wrong": 0}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--events-per-key", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=15.0, help="per measured phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--ingest-rate", type=float, default=2000.0, help="events/s")
    parser.add_argument("--ingest-batch", type=int, default=100)
    parser.add_argument("--flush-interval-s", type=float, default=0.5,
                        help="[rollups] flush_interval_s (the shipped default)")
    parser.add_argument("--sample", type=int, default=200, help="keys timed for freshness")
    parser.add_argument("--stall-s", type=float, default=60.0,
                        help="give up when no key caught up for this long")
    parser.add_argument("--baseline-customers", type=int, default=100,
                        help="customers of the views-only comparison run (0: skip it)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.customers, args.events_per_key, args.seconds = 20, 2, 0.3
        args.flush_interval_s = 0.2
        args.concurrency, args.ingest_rate, args.ingest_batch, args.sample = 4, 500.0, 20, 20
        args.baseline_customers = 0
    runs = [("in-memory totals", True, args)]
    if args.baseline_customers:
        runs.append(("views only (METERLINE_QUOTA_TOTALS=0)", False, argparse.Namespace(
            **{**vars(args), "customers": args.baseline_customers})))
    reports = {}
    for label, totals, run_args in runs:
        with tempfile.TemporaryDirectory(prefix="meterline-bench-") as tmp:
            proc, url, key, metrics = start_server(Path(tmp), args.flush_interval_s, totals)
            try:
                reports[label] = asyncio.run(bench(run_args, url, key, metrics))
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    print(f"server: meterline serve (embedded, flush {args.flush_interval_s} s), client: "
          f"aiohttp, {args.concurrency} in flight, {os.cpu_count()} cores")
    for label, report in reports.items():
        print(f"{label}: {report['keys']} keys, {report['seconds']} s a phase")
        floor = report["phases"]["floor (/healthz)"]["p99_ms"]
        for name, p in report["phases"].items():
            hit = "" if p["cache_hit_rate"] is None else f"  hits {p['cache_hit_rate']:.1%}"
            inside = ("" if "server_within_5ms" not in p else
                      f"  in server <=1ms {p['server_within_1ms']:.1%} "
                      f"<=5ms {p['server_within_5ms']:.1%}")
            print(f"  {name:<18} {p['requests_per_s']:>7,} req/s  p50 {p['p50_ms']:7.2f}  "
                  f"p95 {p['p95_ms']:7.2f}  p99 {p['p99_ms']:7.2f} ({p['p99_ms'] / floor:5.1f}x "
                  f"floor)  max {p['max_ms']:8.2f} ms{hit}{inside}")
        print(f"  answers exact: {report['checked']}; seed visible after "
              f"{report['seed_visible_s']} s, ingest after {report['ingest_visible_s']} s")
    if len(reports) == 2:
        new_r, old_r = (r["phases"] for r in reports.values())
        print("p99 views-only / in-memory: " + ", ".join(
            f"{name} {old_r[name]['p99_ms'] / new_r[name]['p99_ms']:.0f}x"
            for name in ("idle", "ingest")))
    print(json.dumps(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
