"""HTTP ingest throughput and latency: a real `meterline serve` process, a real HTTP client
(aiohttp, keep-alive connections) over loopback.

    .venv/bin/python benchmarks/server_ingest.py                # full size
    .venv/bin/python benchmarks/server_ingest.py --quick        # smoke size

Measures, against one embedded server (local log + raw and rollup stages running in the
same process, as shipped):
- batches: CloudEvents batches (application/cloudevents-batch+json) and native envelopes
  of --batch-size events; events/s, and p50/p99 of the request latency. A request is
  counted when it returned 204/200, i.e. when its events are committed to the local log.
- single events: one CloudEvent per request; requests/s, p50/p99.
The client runs in this process on the same 2-core machine as the server (and the server's
own pipeline threads), so the figures are a lower bound of what the server alone does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from meterline.core.envelope import Batch, encode_batch

CLI = [sys.executable, "-m", "meterline.cli"]


def start_server(workdir: Path) -> tuple[subprocess.Popen[str], str, str]:
    config = workdir / "meterline.toml"
    config.write_text(f'[storage]\ndata_dir = "{workdir / "chdb"}"\n[server]\nport = 0\n'
                      "max_pending_events = 2000000\n")
    made = subprocess.run([*CLI, "keys", "create", "--tenant", "bench", "--scope", "ingest",
                           "--config", str(config)], capture_output=True, text=True,
                          check=True)
    key = made.stdout.strip()
    proc = subprocess.Popen([*CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].split()[0], key
    raise SystemExit("server did not start")


def cloudevents_batch(n: int, offset: int, now_ms: int) -> bytes:
    time_s = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms // 1000))
    return orjson.dumps([
        {"specversion": "1.0", "id": f"e{offset + i}", "source": "bench", "type": "llm_tokens",
         "subject": f"cust-{(offset + i) % 1000}", "time": time_s,
         "data": {"quantity": (offset + i) % 97 + 1, "model": "m1"}}
        for i in range(n)])


def envelope(n: int, offset: int, now_ms: int) -> bytes:
    return encode_batch(Batch(
        batch_id=uuid.uuid4().hex, created_ms=now_ms,
        customers=[f"cust-{(offset + i) % 1000}" for i in range(n)],
        meters=["llm_tokens"] * n, quantities=[((offset + i) % 97 + 1) * 10**9
                                                for i in range(n)],
        timestamps_ms=[now_ms] * n, dimensions=[{"model": "m1"}] * n))


async def drive(url: str, key: str, path: str, ctype: str, bodies: list[bytes],
                concurrency: int) -> tuple[float, list[float]]:
    import aiohttp

    latencies: list[float] = []
    queue = list(reversed(bodies))
    headers = {"authorization": f"Bearer {key}", "content-type": ctype}

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            async with session.post(url + path, data=body, headers=headers) as r:
                await r.read()
                if r.status not in (200, 204):
                    raise SystemExit(f"HTTP {r.status}: {(await r.text())[:300]}")
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return elapsed, latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=400, help="batch requests per format")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--singles", type=int, default=20_000, help="single-event requests")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.singles, args.concurrency = 8, 200, 8
    now_ms = time.time_ns() // 1_000_000
    with tempfile.TemporaryDirectory(prefix="meterline-bench-") as tmp:
        proc, url, key = start_server(Path(tmp))
        try:
            results: list[tuple[str, str, Any]] = []
            size = args.batch_size
            for name, path, ctype, make in (
                ("cloudevents batch", "/api/v1/events", "application/cloudevents-batch+json",
                 cloudevents_batch),
                ("native envelope", "/api/v1/batches", "application/vnd.meterline.envelope+json",
                 envelope),
            ):
                base = len(results) * 10_000_000
                bodies = [make(size, base + i * size, now_ms) for i in range(args.batches)]
                elapsed, lat = asyncio.run(drive(url, key, path, ctype, bodies,
                                                 min(args.concurrency, 8)))
                rate = args.batches * size / elapsed
                results.append((name, f"{rate:,.0f} events/s ({args.batches} x {size})",
                                 lat))
            singles = [orjson.dumps({"specversion": "1.0", "id": f"s{i}", "source": "bench",
                                     "type": "api_calls", "subject": f"cust-{i % 1000}"})
                       for i in range(args.singles)]
            elapsed, lat = asyncio.run(drive(url, key, "/api/v1/events",
                                             "application/cloudevents+json", singles,
                                             args.concurrency))
            results.append(("single events", f"{args.singles / elapsed:,.0f} requests/s "
                                              f"({args.singles} requests)", lat))
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    print(f"server: meterline serve (embedded), client: aiohttp, {os.cpu_count()} cores")
    for name, rate, lat in results:
        print(f"  {name:<18} {rate:<40} p50 {pct(lat, 0.5):7.2f} ms  p99 {pct(lat, 0.99):7.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
