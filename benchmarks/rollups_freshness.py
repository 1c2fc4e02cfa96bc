"""Measurement 3 of benchmarks/e2e_rollups.py: freshness (SDK -> worker -> chDB, probes)."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from rollups_common import (
    CUSTOMERS,
    FLUSH_INTERVAL_S,
    FRESH_WARMUP_S,
    PARTITIONS,
    PROBE_EVERY_S,
    LagProbe,
    _create_topics,
    _open_storage,
    _pct,
)
from rollups_worker import LoaderThread, Worker


def run_freshness(broker: Any, workdir: Path, data_dir: Path, seconds: float,
                  rate: int) -> dict[str, Any]:
    from meterline.sdk import Emitter, EmitterConfig

    topic = "fresh"
    group = "bench-rollups-fresh"
    _create_topics(broker, topic)
    storage = _open_storage(data_dir, "fresh")
    emitted_at: dict[str, float] = {}
    visible: dict[str, tuple[float, float]] = {}  # probe -> (insert returned, query returned)
    query_s: list[float] = []
    sql = "SELECT customer FROM fresh.hourly_usage WHERE customer LIKE 'probe-%'"

    def after_insert(now: float) -> None:
        t0 = time.perf_counter()
        rows = storage.query_rows(sql)
        query_s.append(time.perf_counter() - t0)
        seen = time.time()
        for (customer,) in rows:
            if customer not in visible:
                visible[customer] = (now, seen)

    loader = LoaderThread(storage, broker.bootstrap, topic, "fresh", after_insert)
    lag = LagProbe(broker.bootstrap, topic, group)
    worker = Worker(broker.bootstrap, topic, group, workdir,
                    {"METERLINE_FLUSH_INTERVAL_S": str(FLUSH_INTERVAL_S)})
    lags: list[int] = []
    stop_sampling = threading.Event()

    def sample_lag() -> None:  # does the worker keep up? (off the emitting thread)
        while not stop_sampling.wait(1.0):
            with contextlib.suppress(Exception):
                lags.append(lag.lag())

    sampler = threading.Thread(target=sample_lag, name="lag", daemon=True)
    sent = 0
    try:
        loader.start_and_wait_assigned()
        worker.start()
        worker.wait_assigned(PARTITIONS, 120)
        sampler.start()
        config = EmitterConfig(topic=topic, bootstrap_servers=broker.bootstrap,
                               spool_dir=workdir / "fresh-spool")
        meters = ("api_calls", "llm_tokens", "compute_seconds", "storage_gb")
        tick = 0.01
        with Emitter(config) as emitter:
            emit = emitter.emit
            t_start = time.monotonic()
            t_probes = t_start + FRESH_WARMUP_S
            t_end = t_probes + seconds
            next_tick = next_probe = t_probes
            next_lag = t_start
            probe = 0
            i = 0
            while True:
                now = time.monotonic()
                if now >= t_end:
                    break
                # Paced by count: catch up after a stall, but never more than 0.1 s worth.
                due = min(round((now - t_start) * rate), i + rate // 10)
                while i < due:
                    emit(f"cust-{i % CUSTOMERS:04d}", meters[i % 4], 1 + i % 7)
                    i += 1
                if now >= next_probe:
                    name = f"probe-{probe:05d}"
                    emitted_at[name] = time.time()
                    emit(name, "api_calls", 1)
                    probe += 1
                    next_probe += PROBE_EVERY_S
                if now >= next_lag:
                    worker.check()
                    loader.check()
                    next_lag = now + 1.0
                next_tick += tick
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_tick = time.monotonic()
            sent = i
            emit_s = time.monotonic() - t_start
            if not emitter.flush(timeout=60):
                raise RuntimeError("emitter did not deliver within 60 s")
            stats = emitter.stats()
        deadline = time.monotonic() + 30
        while len(visible) < len(emitted_at) and time.monotonic() < deadline:
            worker.check()
            loader.check()
            time.sleep(0.1)
    finally:
        stop_sampling.set()
        if sampler.is_alive():
            sampler.join(30)
        worker.stop()
        loader.stop()
        lag.close()
        storage.close()
    lat = [visible[p][0] - t for p, t in emitted_at.items() if p in visible]
    lat_obs = [visible[p][1] - t for p, t in emitted_at.items() if p in visible]
    missing = len(emitted_at) - len(lat)
    q = {f"p{p}": round(_pct(lat, p), 3) for p in (50, 95, 99)}
    return {
        "seconds": seconds, "target_rate": rate,
        "achieved_rate": round(sent / emit_s), "events": sent, "delivered": stats.delivered,
        "probes": len(emitted_at), "probes_visible": len(lat), "probes_missing": missing,
        **q, "max": round(max(lat), 3) if lat else None,
        "mean": round(statistics.fmean(lat), 3) if lat else None,
        "p99_observed": round(_pct(lat_obs, 99), 3),
        "probe_query_p50_s": round(_pct(query_s, 50), 3),
        "probe_query_max_s": round(max(query_s), 3) if query_s else None,
        "loader_inserts": len(loader.inserts),
        "loader_insert_p50_s": round(_pct([s for _, s, _ in loader.inserts], 50), 3),
        "loader_insert_p99_s": round(_pct([s for _, s, _ in loader.inserts], 99), 3),
        "max_committed_lag_records": max(lags) if lags else None,
        "worker_env": worker.reported_env,
        "met_p99_le_2s": bool(lat) and missing == 0 and q["p99"] <= 2.0,
    }
