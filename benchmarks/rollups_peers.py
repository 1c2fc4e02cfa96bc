"""The peers of the Meterline worker in benchmarks/e2e_rollups.py, on the same broker and the
same events: the naive Faust agent, quixstreams, and a raw confluent-kafka decode loop.

Each peer's totals are checked against truths built from the generator's events (never
from a peer's own output), so a fast but wrong peer shows as wrong rather than as fast:

- **raw** (``raw_consume.py``, a subprocess): reads the worker's usage topic (the same
  envelopes, resends included) and must decode every record: records, events and the sum
  of quantities must equal those of the produced payloads (read here with plain orjson;
  the first-time records must also add up to the generator's event count).
- **quix** (``quix_peer.py``, a subprocess in its own venv): reads a second topic with the
  same workload's *distinct* events, one per message, in the partition of their envelope
  (resent envelopes and reused idempotency keys are left out: quixstreams does no dedupe,
  so with them its totals could not be right). Its (sum, count) of every
  (customer, meter, group, hour) window must equal ``EventLog.windows``.
- **naive** (``faust_naive.run_naive``): the first ``--naive-events`` of the same
  distinct events, one per message (it is ~10x slower than the worker, so all of them
  would take minutes); its stored total must equal their sum of quantities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from rollups_common import (
    HOUR_MS,
    PARTITIONS,
    REPO,
    USAGE_TOPIC,
    Workload,
    _produce_messages,
    log,
)

QUIX_VERSION = "3.28.1"
EVENTS_TOPIC = "usage-events"  # one distinct event per message: the quixstreams peer's input
NAIVE_TOPIC = "usage-events-naive"  # the naive agent's prefix of the same events
SENTINEL_KEY = "~sentinel"  # as in quix_peer.py


# --------------------------------------------------------------------------- naive
def run_naive_baseline(broker: Any, events: int,
                       workload: Workload | None = None) -> dict[str, Any]:
    """With a ``workload`` (kept events): the agent reads the first ``events`` of its
    distinct events, one per message (``NAIVE_TOPIC``), and its stored total must equal
    their sum; without one, its own random events (the standalone script's behaviour)."""
    from faust_naive import run_naive

    if workload is None or workload.log is None:
        return run_naive(events, PARTITIONS, bootstrap=broker.bootstrap)
    n = min(events, len(workload.log))
    broker.create_topic(NAIVE_TOPIC, PARTITIONS)
    produced, produce_s = _produce_messages(broker.bootstrap, NAIVE_TOPIC,
                                            workload.log.messages(limit=n))
    expected = sum(workload.log.quantity[:n])
    result = run_naive(produced, PARTITIONS, bootstrap=broker.bootstrap, topic=NAIVE_TOPIC,
                       expected_quantity=expected)  # raises if the stored total differs
    return {**result, "input": f"the workload's first {n} distinct events",
            "produce_seconds": round(produce_s, 3), "verify": "exact"}


def _run_child(argv: list[str], cfg: dict[str, Any], timeout_s: float,
               what: str) -> dict[str, Any]:
    out = subprocess.run([*argv, json.dumps(cfg)], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout_s)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{what} exited with {out.returncode}:\n{out.stdout[-2000:]}"
                           f"\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --------------------------------------------------------------------------- raw
def run_raw(bootstrap: str, workload: Workload, client: str = "confluent-kafka"
            ) -> dict[str, Any]:
    """The raw decode loop over the usage topic (already filled with ``workload``), on
    librdkafka (``confluent-kafka``) or on ``aiokafka`` (the client under Faust)."""
    import orjson

    want_events = want_quantity = first_time_events = 0
    for rec in workload.records:  # what was produced, read without Meterline's decoder
        doc = orjson.loads(rec.payload)
        want_events += len(doc["customer"])
        want_quantity += sum(doc["quantity"])
        if not rec.resend:
            first_time_events += len(doc["customer"])
    if first_time_events != workload.events:
        raise RuntimeError(f"harness: first-time envelopes hold {first_time_events} events, "
                           f"the generator made {workload.events}")
    cfg = {"bootstrap": bootstrap, "topic": USAGE_TOPIC, "records": len(workload.records),
           "group": f"bench-raw-{uuid.uuid4().hex[:8]}", "client": client}
    got = _run_child([sys.executable, str(REPO / "benchmarks" / "raw_consume.py")], cfg,
                     120 + workload.events / 20_000, "raw consume loop")
    problems = []
    for name, have, want in (("records", got["records"], len(workload.records)),
                             ("events", got["events_decoded"], want_events),
                             ("quantity", got["quantity_nanos"], want_quantity)):
        if have != want:
            problems.append(f"{name} {have} != {want}")
    seconds = got["seconds"]
    return {"events": workload.events, "client": client, **got,
            "events_per_s": round(workload.events / seconds) if seconds else None,
            "events_decoded_per_s": round(got["events_decoded"] / seconds) if seconds else None,
            "verify": "exact" if not problems else "; ".join(problems)}


# --------------------------------------------------------------------------- quixstreams
def quix_python() -> str:
    """An interpreter with quixstreams ``QUIX_VERSION``: ``$METERLINE_QUIX_PYTHON``, else a
    venv under ``.cache/quixstreams/<version>`` made on first use (pip, from the registry).
    Its own venv because quixstreams 3.x requires confluent-kafka < 2.13, and installing it
    next to Meterline would downgrade the Kafka client the product and its tests run on."""
    override = os.environ.get("METERLINE_QUIX_PYTHON")
    if override:
        return override
    home = REPO / ".cache" / "quixstreams" / QUIX_VERSION
    python = home / "bin" / "python"
    if python.exists():
        return str(python)
    staging = home.with_name(f"{QUIX_VERSION}.tmp-{os.getpid()}")
    base = getattr(sys, "_base_executable", sys.executable)
    log.info("creating the quixstreams venv in %s", home)
    subprocess.run([base, "-m", "venv", str(staging)], check=True, timeout=300)
    subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "-q",
                    f"quixstreams=={QUIX_VERSION}"], check=True, timeout=900)
    try:
        staging.rename(home)  # atomic: a concurrent first run keeps whichever came first
    except OSError:
        if not python.exists():
            raise
    return str(python)


def produce_events_topic(broker: Any, workload: Workload) -> dict[str, Any]:
    """The distinct events one per message, then one sentinel per partition a day ahead."""
    import orjson

    assert workload.log is not None, "the workload was generated without keep_events"
    broker.create_topic(EVENTS_TOPIC, PARTITIONS)
    newest = max(workload.log.ts) if len(workload.log) else 0
    sentinel = orjson.dumps({"customer": "", "meter": "", "group": "", "quantity": 0,
                             "timestamp_ms": newest + 24 * HOUR_MS})

    def messages() -> Any:
        yield from workload.log.messages()  # type: ignore[union-attr]
        for p in range(PARTITIONS):
            yield SENTINEL_KEY.encode(), sentinel, p

    n, seconds = _produce_messages(broker.bootstrap, EVENTS_TOPIC, messages())
    return {"messages": n, "produce_s": round(seconds, 2)}


def run_quix(broker: Any, workload: Workload, *, grace_ms: int = HOUR_MS,
             idle_timeout_s: float = 20) -> dict[str, Any]:
    """``idle_timeout_s``: how long quixstreams may go without a message once its windows
    fall short of the expected ones (only when some were dropped) before it gives up."""
    assert workload.log is not None, "the workload was generated without keep_events"
    python = quix_python()
    produced = produce_events_topic(broker, workload)
    expected = workload.log.windows
    with tempfile.TemporaryDirectory(prefix="quix-state-") as state_dir:
        cfg = {"bootstrap": broker.bootstrap, "topic": EVENTS_TOPIC,
               "group": f"bench-quix-{uuid.uuid4().hex[:8]}", "state_dir": state_dir,
               "windows": len(expected), "messages": produced["messages"],
               "grace_ms": grace_ms, "idle_timeout_s": idle_timeout_s}
        t0 = time.perf_counter()
        got = _run_child([python, str(REPO / "benchmarks" / "quix_peer.py")], cfg,
                         180 + len(workload.log) / 2_000, "quixstreams peer")
        wall = time.perf_counter() - t0
    have: dict[tuple[str, str, str, int], tuple[int, int]] = {}
    for key, start, total, count in got.pop("windows"):
        c, m, g = key.split("|", 2)
        have[(c, m, g, start)] = (total, count)
    wrong = sum(1 for k, (s, n) in expected.items() if have.get(k) != (s, n))
    extra = sum(1 for k in have if k not in expected)
    events = len(workload.log)
    seconds = got["seconds"]
    return {"events": events, **produced, **got, "grace_ms": grace_ms, "windows": len(have),
            "windows_expected": len(expected), "process_wall_s": round(wall, 2),
            "events_per_s": round(events / seconds) if seconds else None,
            "truth_vs_usage_log": check_peer_truth(workload),
            "verify": "exact" if not wrong and not extra and have
            else f"{wrong} wrong/missing, {extra} unexpected of {len(expected)} windows"}


def check_peer_truth(workload: Workload) -> str:
    """Harness self-check: the peers' (sum, count) windows agree with ``usage_log.Truth``
    where the meter's aggregation is a sum or a count (the other meters have no (sum,
    count) counterpart there)."""
    from meterline.core.quantity import SCALE
    from meterline.testing.usage_log import METERS

    assert workload.log is not None
    hourly = workload.log.truth.hourly
    bad = 0
    for (c, m, g, h), (total, count) in workload.log.windows.items():
        want = {"sum": total, "count": count * SCALE}.get(METERS[m])
        if want is not None and hourly.get((c, m, g, h)) != want:
            bad += 1
    return "consistent" if not bad else f"{bad} windows differ from usage_log.Truth"
