"""Rollup stage end to end: `meterline worker` throughput next to its peers, freshness.

    make bench-rollups     # or: .venv/bin/python benchmarks/e2e_rollups.py \\
                           #       [--events N] [--naive-events M] [--freshness-seconds S]

One local Kafka broker (meterline.testing.kafka: temp dir, free port, stopped at exit)
serves all measurements of one run (``--runs`` picks a subset; default all, in this order):

1. **Worker throughput.** ``--events`` events from ``meterline.testing.usage_log`` (1,000
   customers, the five default meters, resent batches and reused idempotency keys; ~500
   events per envelope, lz4, SDK producer settings) are produced into a 4-partition usage
   topic with ``message.timestamp.type=LogAppendTime`` *before* one ``python -m
   meterline.cli worker`` subprocess starts. An ``OutputLoader`` runs concurrently in a
   thread of this process (its own chDB data dir) and inserts the worker's output topics.
   The worker runs with METERLINE_FLUSH_INTERVAL_S=0.5 and METERLINE_CHECKPOINT_INTERVAL_S=5
   (both its defaults; ``--checkpoint-interval-s`` changes the latter).
   Boundaries (wall clock of this machine; the broker stamps LogAppendTime):

   - start: the worker's log line for the last of its 4 partition assignments ("assigned
     usage[p], resuming at ..."): process start, imports and the group join are excluded,
     fetching the first records is included;
   - ``outputs``: the broker's append time of the last record in the output topics (all
     rollups written; the worker's last flush is at most one flush interval after its last
     record); events/s = generated events / (outputs - start);
   - ``full``: the later of "committed lag of the worker's group is 0" (seen by polling
     every 0.1 s; commits follow checkpoints) and "the loader has inserted and committed
     every output record" into chDB; events/s = generated events / (full - start).

   ``--loader after`` keeps the loader paused (but in its group) until the lag is 0, so the
   worker has the machine to itself and ``full`` = worker + a sequential load.
   The chDB totals of every (customer, meter, group, hour/day) are then checked against
   ``usage_log.Truth`` (``--no-verify`` skips it: building the truth costs ~40 s at 2M).
2. **Peers**, same broker, the same workload (``benchmarks/rollups_peers.py``; each peer's
   totals are checked against truths from the generator, see there):

   - ``raw``: a raw confluent-kafka consume loop that only decodes the envelopes of the
     same usage topic (the upper bound), in its own process; rate = generated events /
     (last record decoded - partitions assigned);
   - ``quix``: quixstreams (its own venv, made on first use) with a 1-hour tumbling
     window sum/count per (customer, meter, group) over the same distinct events, one per
     message on a second topic (its natural mode); rate = events / first..last message;
   - ``naive``: ``benchmarks/faust_naive.py``'s ``run_naive`` (a Faust agent, one JSON
     event per message) over the first ``--naive-events`` of the same distinct events;
     rate from first to last message processed.

   Ratios are the worker's events/s (``outputs``) over each peer's, all from this run.
3. **Freshness.** A second worker (flush interval 0.5 s) on a fresh topic; the real SDK
   ``Emitter`` (KafkaTransport, linger 50 ms) emits ``--freshness-rate`` events/s for
   ``--freshness-seconds`` plus one probe event every 50 ms for a unique ``probe-NNNNN``
   customer. The harness loader (``OutputLoader.run_once`` with its defaults) inserts into
   chDB and after every insert queries ``hourly_usage`` for probe customers; a probe's
   latency is (insert returned) - (wall time just before its ``emit()``).

``--inprocess {noop,json}`` skips Kafka entirely and folds the same records through
``RollupWorker`` + ``MemoryCheckpointStore`` in this process (``noop``: outputs dropped;
``json``: outputs serialized the way ``KafkaOutputWriter`` does, not sent); run it under
``python -m cProfile`` to see where the worker's time goes, or with ``--phases`` for a
wall-time split (decode, apply_batch, take_flush, checkpoint, output encoding).

Prints one JSON summary line, then a table. The parts live next to this file:
``rollups_common`` (workload, topics, lag, storage), ``rollups_worker`` (worker subprocess,
loader, throughput), ``rollups_peers`` (+ ``raw_consume``, ``quix_peer``),
``rollups_freshness``, ``rollups_inprocess``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the rollups_* modules

from rollups_common import (  # noqa: E402
    CHECKPOINT_INTERVAL_S,
    ENGINES,
    PARTITIONS,
    Workload,
    _git_head,
    log,
)

RUNS = ("worker", "raw", "raw-aiokafka", "quix", "naive", "freshness")


# --------------------------------------------------------------------------- report
def _ratios(s: dict[str, Any]) -> None:
    """Worker events/s over each peer's, measured in this run; None for a peer whose totals
    were wrong (a fast but wrong peer is no yardstick)."""
    tp = s.get("throughput")
    if tp is None:
        return
    nv = s.get("naive")
    if nv is not None:
        s["ratio_outputs_vs_naive"] = round(tp["events_per_s_outputs"] / nv["events_per_s"], 2)
        s["ratio_full_vs_naive_incl_flush"] = round(
            tp["events_per_s_full"] / (nv["events"] / nv["seconds_incl_final_flush"]), 2)
    for peer in ("raw", "raw_aiokafka", "quix"):
        p = s.get(peer)
        if p is not None:
            ok = p.get("verify") == "exact" and p.get("events_per_s")
            s[f"ratio_outputs_vs_{peer}"] = (
                round(tp["events_per_s_outputs"] / p["events_per_s"], 3) if ok else None)


def _table(s: dict[str, Any]) -> str:
    tp, nv, fr = s.get("throughput"), s.get("naive"), s.get("freshness")
    raw, qx = s.get("raw"), s.get("quix")
    lines = [f"{'run':<58}{'events':>11}{'seconds':>9}{'events/s':>12}"]

    def row(name: str, n: int, sec: float, rate: float) -> None:
        lines.append(f"{name:<58}{n:>11,}{sec:>9.2f}{rate:>12,.0f}")

    if nv is not None:
        row("naive Faust (1 event/msg), first..last msg", nv["events"], nv["seconds"],
            nv["events_per_s"])
        row("naive Faust, incl. final chDB flush", nv["events"],
            nv["seconds_incl_final_flush"], nv["events"] / nv["seconds_incl_final_flush"])
    if qx is not None and qx.get("seconds"):
        row("quixstreams (1 event/msg, 1 h tumbling sum+count)", qx["events"], qx["seconds"],
            qx["events_per_s"])
    if raw is not None and raw.get("seconds"):
        row("raw confluent-kafka loop, decode only (upper bound)", raw["events"],
            raw["seconds"], raw["events_per_s"])
    rak = s.get("raw_aiokafka")
    if rak is not None and rak.get("seconds"):
        row("raw aiokafka loop (Faust's client), decode only", rak["events"],
            rak["seconds"], rak["events_per_s"])
    for engine, t in (s.get("throughput_by_engine") or {}).items():
        row(f"worker [{engine}]: assigned -> last output in Kafka (loader {t['loader']})",
            t["events"], t["outputs_s"], t["events_per_s_outputs"])
        row(f"full [{engine}]: assigned -> lag 0 and all outputs in chDB", t["events"],
            t["full_s"], t["events_per_s_full"])
        lines.append(f"  verify [{engine}]: {t.get('verify', 'skipped')}")
    if tp is not None and nv is not None:
        lines.append(f"ratio worker/naive: {s['ratio_outputs_vs_naive']:.1f}x (outputs), "
                     f"{s['ratio_full_vs_naive_incl_flush']:.1f}x (full vs naive incl. "
                     f"flush); verify: {tp.get('verify', 'skipped')}")
    elif tp is not None:
        lines.append(f"verify: {tp.get('verify', 'skipped')}")
    for peer, label in (("quix", "quixstreams"), ("raw", "raw loop"),
                        ("raw_aiokafka", "raw aiokafka loop")):
        p = s.get(peer)
        if p is None:
            continue
        ratio = s.get(f"ratio_outputs_vs_{peer}")
        lines.append(f"{label}: verify {p['verify']}"
                     + (f"; ratio worker/{peer}: {ratio:.3f}x" if ratio is not None else ""))
    if fr is not None:
        lines.append(f"freshness ({fr['achieved_rate']:,} ev/s for {fr['seconds']:.0f}s, "
                     f"{fr['probes_visible']}/{fr['probes']} probes): p50 {fr['p50']:.3f}s  "
                     f"p95 {fr['p95']:.3f}s  p99 {fr['p99']:.3f}s  max {fr['max']:.3f}s  "
                     f"-> p99 <= 2 s {'met' if fr['met_p99_le_2s'] else 'MISSED'}")
    return "\n".join(lines)


def _engines(text: str) -> tuple[str, ...]:
    engines = tuple(e.strip() for e in text.split(",") if e.strip())
    if not engines or any(e not in ENGINES for e in engines):
        raise argparse.ArgumentTypeError(f"engines are {', '.join(ENGINES)}, got {text!r}")
    return engines


def _runs(text: str) -> tuple[str, ...]:
    runs = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        raise argparse.ArgumentTypeError(f"unknown run(s) {unknown}; choose from {RUNS}")
    return runs


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--naive-events", type=int, default=200_000)
    parser.add_argument("--freshness-seconds", type=float, default=30.0)
    parser.add_argument("--freshness-rate", type=int, default=20_000, help="events/s")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the exact-totals check against usage_log.Truth")
    parser.add_argument("--inprocess", choices=("noop", "json"),
                        help="only fold the records through RollupWorker in this process")
    parser.add_argument("--phases", action="store_true",
                        help="with --inprocess: wall time per phase (decode, apply, flush...)")
    parser.add_argument("--checkpoint-interval-s", type=float, default=CHECKPOINT_INTERVAL_S,
                        help="METERLINE_CHECKPOINT_INTERVAL_S of the throughput worker")
    parser.add_argument("--loader", choices=("concurrent", "after"), default="concurrent",
                        help="throughput run: load outputs into chDB while the worker runs, "
                             "or only once its lag is 0 (the worker then has the CPU alone)")
    parser.add_argument("--runs", type=_runs, default=RUNS,
                        help=f"comma-separated subset of {','.join(RUNS)} (default: all)")
    parser.add_argument("--quix-grace-ms", type=int, default=3_600_000,
                        help="quixstreams window grace; its default 0 drops this workload's "
                             "late events (the peer check then reports it wrong)")
    parser.add_argument("--workload", choices=("high", "low"), default="high",
                        help="high: each envelope spread over ~250 customers; low: one "
                             "customer per envelope (one app instance)")
    parser.add_argument("--engines", type=_engines, default=("columnar",),
                        help="comma-separated [rollups] engines for the worker run, each "
                             "its own run on the same events (first: the ratios' worker)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if args.inprocess:
        from rollups_inprocess import run_inprocess

        from meterline.gc_tuning import tune_gc

        # As `meterline worker` does once started (METERLINE_WORKER_GC=default: off).
        tune_gc("METERLINE_WORKER_GC")
        for engine in args.engines:  # one after the other, same records
            result = run_inprocess(args.events, args.inprocess, args.checkpoint_interval_s,
                                   args.phases, engine=engine)
            print(json.dumps(result), flush=True)
            print(f"engine {engine}:")
            for label, us in result.get("phases_us_per_event", {}).items():
                print(f"  {label:<40}{us:>8.2f} us/event "
                      f"{result['phases_share'][label]:>7.1%}")
            print(f"  {'total':<40}{1e6 / result['events_per_s']:>8.2f} us/event")
        return 0

    from rollups_freshness import run_freshness
    from rollups_peers import run_naive_baseline, run_quix, run_raw
    from rollups_worker import USAGE_TOPIC, create_and_fill_usage_topic, run_throughput

    from meterline.testing.kafka import KafkaBroker

    runs = args.runs
    summary: dict[str, Any] = {"cpus": os.cpu_count(), "code_at_start": _git_head(),
                               "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="e2e-rollups-") as tmp_name:
        tmp = Path(tmp_name)
        broker = KafkaBroker(tmp / "kafka", partitions=PARTITIONS)
        try:
            broker.start()
            chdb_dir = tmp / "chdb"  # this process's one chDB data dir
            workload = None
            if {"worker", "raw", "quix", "naive"} & set(runs):
                workload = Workload(args.events, verify=not args.no_verify,
                                    keep_events="quix" in runs or "naive" in runs,
                                    cardinality=args.workload)
                summary["workload"] = args.workload
            if "worker" in runs:
                # One worker run per engine, same broker and events; the first on the
                # usage topic the raw loop reads, the others on topics of their own.
                by_engine = summary["throughput_by_engine"] = {}
                for i, engine in enumerate(args.engines):
                    by_engine[engine] = run_throughput(
                        broker, tmp, chdb_dir, args.events, not args.no_verify,
                        checkpoint_interval_s=args.checkpoint_interval_s,
                        loader_mode=args.loader, workload=workload, engine=engine,
                        topic=None if i == 0 else f"{USAGE_TOPIC}-{engine}")
                    log.info("throughput (%s): %s", engine, by_engine[engine])
                summary["throughput"] = by_engine[args.engines[0]]
            elif workload is not None and {"raw", "raw-aiokafka"} & set(runs):
                create_and_fill_usage_topic(broker, USAGE_TOPIC, workload.records)
            if "raw" in runs:
                assert workload is not None
                summary["raw"] = run_raw(broker.bootstrap, workload)
                log.info("raw: %s", summary["raw"])
            if "raw-aiokafka" in runs:
                assert workload is not None
                summary["raw_aiokafka"] = run_raw(broker.bootstrap, workload, "aiokafka")
                log.info("raw (aiokafka): %s", summary["raw_aiokafka"])
            if "quix" in runs:
                assert workload is not None
                summary["quix"] = run_quix(
                    broker, workload, grace_ms=args.quix_grace_ms,
                    idle_timeout_s=20 if args.quix_grace_ms >= 3_600_000 else 3)
                log.info("quix: %s", summary["quix"])
            if "naive" in runs:
                summary["naive"] = run_naive_baseline(broker, args.naive_events, workload)
                log.info("naive: %s", summary["naive"])
            workload = None  # its memory back before the freshness run
            if "freshness" in runs:
                summary["freshness"] = run_freshness(broker, tmp, chdb_dir,
                                                     args.freshness_seconds,
                                                     args.freshness_rate)
        finally:
            broker.stop(timeout_s=15)
    summary["code_at_end"] = _git_head()  # the workers import the tree as it is at start
    summary["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _ratios(summary)
    print(json.dumps(summary), flush=True)
    print(_table(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
