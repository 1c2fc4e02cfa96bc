"""HTTP ingest throughput and latency: a real `meterline serve` process, a real HTTP client
(wrk or aiohttp, keep-alive connections) over loopback.

    .venv/bin/python benchmarks/server_ingest.py                # both pipelines, A/B
    .venv/bin/python benchmarks/server_ingest.py --quick        # smoke size
    .venv/bin/python benchmarks/server_ingest.py --pipeline kafka --loads singles \
        --variants uncoalesced,after --baseline uncoalesced  # coalescing A/B
    .venv/bin/python benchmarks/server_ingest.py --pipeline kafka --loads singles \
        --variants keys-per-request,after --baseline keys-per-request \
        --client wrk,aiohttp                                  # key check A/B, both clients

Pipelines (--pipeline, default both):
- embedded: local log + raw and rollup stages (chDB) running in the server process, as
  shipped. A request returns once its events are committed to the local log.
- kafka: `[server] pipeline = "kafka"` against a real Apache Kafka (KRaft, loopback, the
  tests' ``meterline.testing.kafka.KafkaBroker``); no stage runs in the server process.
  A request returns once Kafka acknowledged its events (acks=all).
Each pipeline is measured in variants (--variants), one server process each, in the same
run, so their ratios mean something on a shared machine:
- before: the per-event path and CPython's GC defaults (``METERLINE_SERVER_FASTPATH=0``,
  ``METERLINE_SERVER_GC=default``), i.e. the server as it was;
- fast: the columnar batch fast path (server/fastpath.py), GC defaults;
- uncoalesced: the fast path and the serving GC settings (server/gc_tuning.py), but in
  Kafka mode each request its own envelope and produce (``METERLINE_SERVER_COALESCE=0``);
- keys-per-request: as after, but the API-key cache's freshness checked on SQLite for
  every request (``METERLINE_KEYS_RECHECK_S=0``), as before issue 11;
- after: as shipped: fast path, GC settings, in Kafka mode the requests queued while
  the writer's sender thread was busy share envelopes and produce calls (writers.py),
  and the key check touching SQLite at most every 0.1 s (server/keys.py);
- granian: as after, served by granian's embedded server (Rust HTTP) instead of uvicorn
  (``METERLINE_SERVER_HTTP=granian``; needs ``pip install granian``, not a dependency).
``--baseline`` picks the variant the ratios are against (default before).
Besides rates, the server's own CPU time per event (or per request) is reported, from
/proc: less disturbed by other load than wall-clock rates are.

Loads:
- batches: CloudEvents batches (application/cloudevents-batch+json) and native envelopes
  of --batch-size events; events/s, and p50/p99 of the request latency (204/200 only).
- single events: one CloudEvent per request; requests/s, p50/p99. Client (--client):
  wrk (default; C, benchmarks/wrk_singles.lua, installed by tools/wrk/install.sh) or
  aiohttp in this process, or both in turn against the same server ("wrk,aiohttp").
  Either way the server's accepted-events counter (its /metrics) must have grown by
  exactly the client's count of 204s, or the run fails.
The clients run on the same 2-core machine as the server (and the broker, in kafka
mode), so the figures are a lower bound of what the server alone does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from meterline.core.envelope import Batch, encode_batch

CLI = [sys.executable, "-m", "meterline.cli"]


VARIANTS = {"before": {"METERLINE_SERVER_FASTPATH": "0", "METERLINE_SERVER_GC": "default",
                       "METERLINE_SERVER_COALESCE": "0"},
            "fast": {"METERLINE_SERVER_FASTPATH": "1", "METERLINE_SERVER_GC": "default",
                     "METERLINE_SERVER_COALESCE": "0"},
            "uncoalesced": {"METERLINE_SERVER_FASTPATH": "1", "METERLINE_SERVER_GC": "tuned",
                            "METERLINE_SERVER_COALESCE": "0"},
            "keys-per-request": {"METERLINE_SERVER_FASTPATH": "1",
                                 "METERLINE_SERVER_GC": "tuned",
                                 "METERLINE_SERVER_COALESCE": "1",
                                 "METERLINE_KEYS_RECHECK_S": "0"},
            "after": {"METERLINE_SERVER_FASTPATH": "1", "METERLINE_SERVER_GC": "tuned",
                      "METERLINE_SERVER_COALESCE": "1"},
            "granian": {"METERLINE_SERVER_FASTPATH": "1", "METERLINE_SERVER_GC": "tuned",
                        "METERLINE_SERVER_COALESCE": "1", "METERLINE_SERVER_HTTP": "granian"}}
LOADS = ("cloudevents", "native", "singles")


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    key: str
    metrics_url: str | None
    # The server's last lines of output, shown when it answers a scrape with an error.
    output: collections.deque[str] = field(default_factory=lambda: collections.deque(
        maxlen=200))


def start_server(workdir: Path, *, kafka: tuple[str, str] | None, variant: str) -> Server:
    """``kafka``: (bootstrap, topic) for the Kafka pipeline; None for the embedded one."""
    workdir.mkdir(parents=True)
    config = workdir / "meterline.toml"
    text = (f'[storage]\ndata_dir = "{workdir / "chdb"}"\n[server]\nport = 0\n'
            "max_pending_events = 2000000\n")
    if kafka is not None:
        text += (f'pipeline = "kafka"\n[kafka]\nbootstrap_servers = "{kafka[0]}"\n'
                 f'topic = "{kafka[1]}"\n')
    config.write_text(text)
    made = subprocess.run([*CLI, "keys", "create", "--tenant", "bench", "--scope", "ingest",
                           "--config", str(config)], capture_output=True, text=True,
                          check=True)
    key = made.stdout.strip()
    # /metrics on a free loopback port: its accepted-events counter is what the server
    # says it took, checked against what the client counted (idle unless scraped).
    proc = subprocess.Popen([*CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1",
                                 "METERLINE_METRICS_PORT": "0", **VARIANTS[variant]})
    assert proc.stdout is not None
    metrics_url = None
    for line in proc.stdout:
        if "metrics on " in line:
            metrics_url = line.split("metrics on ", 1)[1].split()[0]
        if "listening on " in line:
            server = Server(proc, line.split("listening on ", 1)[1].split()[0], key,
                            metrics_url)
            # Keep draining its output, so a chatty server never blocks on a full pipe.
            threading.Thread(target=server.output.extend, args=(proc.stdout,),
                             daemon=True).start()
            return server
    raise SystemExit("server did not start")


def accepted_events(server: Server) -> int | None:
    """The server's count of accepted CloudEvents (its /metrics), None without one."""
    metrics_url = server.metrics_url
    if metrics_url is None:
        return None
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=30) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"{metrics_url}: {exc}; the server's last output:\n"
                         + "".join(list(server.output)[-60:])) from None
    for line in text.splitlines():
        if line.startswith("meterline_server_events_total{") and \
                'format="cloudevents"' in line and 'outcome="accepted"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    raise SystemExit(f"no accepted-events counter on {metrics_url}")


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


WRK_SCRIPT = Path(__file__).with_name("wrk_singles.lua")


def drive_wrk(url: str, key: str, count: int, concurrency: int, threads: int
              ) -> dict[str, Any]:
    """``count`` single-CloudEvent POSTs by wrk (C, epoll) with ``benchmarks/wrk_singles.lua``
    over ``concurrency`` keep-alive connections; its done() summary (counts, microseconds).
    Each wrk thread sends its share, then says "thread-done" once all of it is answered
    (the script's header says why); then wrk is interrupted, which ends its run at once."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("--client wrk: no wrk on PATH (bash tools/wrk/install.sh)")
    threads = max(1, min(threads, concurrency, count))
    quota = -(-count // threads)
    # The quotas add up to at least ``count``; the harness reports what was sent.
    limit_s = max(60, count // 200)  # an upper bound only: the run ends when all are done
    proc = subprocess.Popen(
        [wrk, f"-t{threads}", f"-c{max(concurrency, threads)}", f"-d{limit_s}s",
         "--timeout", "30s", "--latency", "-s", str(WRK_SCRIPT), url, "--",
         key, str(quota), uuid.uuid4().hex[:12]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    done, summary, tail = 0, None, []
    for line in proc.stdout:
        if line.startswith("thread-done"):
            done += 1
            if done == threads:
                proc.send_signal(signal.SIGINT)
        elif line.startswith("{"):
            summary = json.loads(line)
        else:
            tail.append(line)
    proc.wait(timeout=60)
    if summary is None:
        raise SystemExit(f"wrk gave no summary (exit {proc.returncode}): {''.join(tail)}")
    summary["all_done"] = done == threads
    return summary


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process used so far (Linux /proc).
    Less disturbed by other load on a shared machine than wall-clock rates."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    name: str
    unit: str  # "events" or "requests"
    count: int
    rate: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float  # server CPU per unit
    check: str = ""  # the server's accepted count against the client's


def measure(server: Server, args: argparse.Namespace, now_ms: int) -> list[Load]:
    """Each load against one running server."""
    url, key, pid = server.url, server.key, server.proc.pid
    size = args.batch_size
    loads: list[tuple[str, str, str, list[bytes], int, str]] = []
    for n, (load, name, path, ctype, make) in enumerate((
        ("cloudevents", "cloudevents batch", "/api/v1/events",
         "application/cloudevents-batch+json", cloudevents_batch),
        ("native", "native envelope", "/api/v1/batches",
         "application/vnd.meterline.envelope+json", envelope),
    )):
        if load not in args.loads:
            continue
        bodies = [make(size, n * 10_000_000 + i * size, now_ms) for i in range(args.batches)]
        loads.append((name, path, ctype, bodies, size, "events"))
    out = []
    for name, path, ctype, bodies, per_body, unit in loads:
        concurrency = min(args.concurrency, 8)
        cpu0 = cpu_s(pid)
        elapsed, lat = asyncio.run(drive(url, key, path, ctype, bodies, concurrency))
        count = len(bodies) * per_body
        out.append(Load(name, unit, count, count / elapsed, pct(lat, 0.5), pct(lat, 0.99),
                        (cpu_s(pid) - cpu0) / count * 1e6))
    if "singles" in args.loads:
        out.extend(measure_singles(server, args, client) for client in args.client)
    return out


def measure_singles(server: Server, args: argparse.Namespace, client: str) -> Load:
    """One CloudEvent per request, by the chosen client; then the server's accepted-events
    counter must have grown by exactly the client's 204s."""
    before = accepted_events(server)
    cpu0 = cpu_s(server.proc.pid)
    if client == "wrk":
        s = drive_wrk(server.url, server.key, args.singles, args.concurrency,
                      args.wrk_threads)
        ok, sent, other = s["ok"], s["sent"], s["other"]
        rate, p50, p99 = ok / (s["duration_us"] / 1e6), s["p50_us"] / 1e3, s["p99_us"] / 1e3
        errors = ", ".join(f"{s[k]} {k.replace('_', ' ')}" for k in (
            "connect_errors", "read_errors", "write_errors", "timeouts") if s[k])
        client_note = (f"wrk: {sent:,} sent, {ok:,} x 204, {other:,} non-2xx "
                       f"{s['codes'].split()[:5]}, socket errors: {errors or 'none'}"
                       f"{'' if s['all_done'] else ', NOT all answered'}")
    else:
        singles = [orjson.dumps({"specversion": "1.0", "id": f"s{i}", "source": "bench",
                                 "type": "api_calls", "subject": f"cust-{i % 1000}"})
                   for i in range(args.singles)]
        elapsed, lat = asyncio.run(drive(server.url, server.key, "/api/v1/events",
                                         "application/cloudevents+json", singles,
                                         args.concurrency))
        ok, other = len(lat), 0  # drive() stops the run on any non-2xx
        rate, p50, p99 = ok / elapsed, pct(lat, 0.5), pct(lat, 0.99)
        client_note = f"aiohttp: {ok:,} x 204"
    cpu = (cpu_s(server.proc.pid) - cpu0) / max(ok, 1) * 1e6
    after = accepted_events(server)
    if before is None or after is None:
        check = f"{client_note}; server count unknown (no /metrics)"
    elif after - before == ok:
        check = f"{client_note}; server accepted {after - before:,}: exact"
    else:
        raise SystemExit(f"server accepted {after - before:,} events, the client counted "
                         f"{ok:,} (204) - {client_note}")
    return Load(f"singles ({client})", "requests", ok, rate, p50, p99, cpu, check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=400, help="batch requests per format")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--singles", type=int, default=20_000, help="single-event requests")
    parser.add_argument("--concurrency", type=int, default=128,
                        help="connections for single events (batches: at most 8)")
    parser.add_argument("--pipeline", choices=("embedded", "kafka", "both"), default="both")
    parser.add_argument("--variants", default="before,fast,after",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--loads", default=",".join(LOADS),
                        help=f"comma-separated, of {', '.join(LOADS)}")
    parser.add_argument("--baseline", default="before", help="the variant ratios are against")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variants this many times per pipeline (ratios per round)")
    parser.add_argument("--client", default="wrk",
                        help="the single-event load's client(s), comma-separated, each run "
                             "in turn against the same server: wrk (C, "
                             "tools/wrk/install.sh; takes less of the shared cores) or "
                             "aiohttp (in this process)")
    parser.add_argument("--wrk-threads", type=int, default=1,
                        help="wrk threads (each one core at most); connections: "
                             "--concurrency")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.singles, args.concurrency, args.rounds = 8, 200, 8, 1
    pipelines = ["embedded", "kafka"] if args.pipeline == "both" else [args.pipeline]
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    args.client = args.client.split(",")
    if not set(args.client) <= {"wrk", "aiohttp"}:
        parser.error("--client: wrk, aiohttp or both (comma-separated)")
    args.loads = args.loads.split(",")
    if not set(args.loads) <= set(LOADS):
        parser.error(f"--loads: choose from {', '.join(LOADS)}")
    now_ms = time.time_ns() // 1_000_000
    runs: list[tuple[str, str, int, list[Load]]] = []
    with tempfile.TemporaryDirectory(prefix="meterline-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        broker = None
        if "kafka" in pipelines:
            from meterline.testing.kafka import KafkaBroker

            broker = stack.enter_context(KafkaBroker(Path(tmp) / "kafka"))
        for pipeline in pipelines:
            for round_ in range(args.rounds):
                for variant in variants:
                    name = f"{pipeline}-{variant}-{round_}"
                    kafka = None
                    if broker is not None and pipeline == "kafka":
                        # A fresh topic per run: 6 partitions, as `meterline topics create`.
                        kafka = (broker.bootstrap, broker.create_topic(f"usage-{name}", 6))
                    server = start_server(Path(tmp) / name, kafka=kafka, variant=variant)
                    try:
                        runs.append((pipeline, variant, round_, measure(server, args, now_ms)))
                    finally:
                        server.proc.terminate()
                        server.proc.wait(timeout=120)
    single_client = " then ".join(f"wrk ({args.wrk_threads} thread(s))" if c == "wrk"
                                  else "aiohttp" for c in args.client)
    print(f"client: aiohttp for batches, {single_client} for single events, over loopback, "
          f"{os.cpu_count()} cores shared with the server"
          f"{' and the Kafka broker' if 'kafka' in pipelines else ''}")
    for pipeline, variant, round_, loads in runs:
        print(f"server: meterline serve, pipeline {pipeline}, {variant}, round {round_ + 1}")
        for ld in loads:
            rate = f"{ld.rate:,.0f} {ld.unit}/s ({ld.count:,})"
            print(f"  {ld.name:<18} {rate:<28} p50 {ld.p50_ms:7.2f} ms  "
                  f"p99 {ld.p99_ms:7.2f} ms  server CPU "
                  f"{ld.server_cpu_us:6.1f} us/{ld.unit[:-1]}")
            if ld.check:
                print(f"    {ld.check}")
    by_key = {(p, v, r): loads for p, v, r, loads in runs}
    for pipeline in pipelines:
        for round_ in range(args.rounds):
            base = by_key.get((pipeline, args.baseline, round_))
            for variant in variants:
                other = by_key.get((pipeline, variant, round_))
                if base is None or other is None or variant == args.baseline:
                    continue
                ratios = [f"{b.name} rate x{b.rate / a.rate:.2f} "
                          f"CPU x{b.server_cpu_us / a.server_cpu_us:.2f}"
                          for a, b in zip(base, other, strict=True)]
                print(f"{variant}/{args.baseline}, {pipeline}, round {round_ + 1}: "
                      f"{'; '.join(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
