"""The benchmark commands the README and docs/benchmarks.md show still run (tiny sizes).

Numbers are not checked here (benchmarks are not timed assertions); only that each harness
completes, verifies its own results and prints its summary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]


def _run(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_micro_benchmarks_run_once() -> None:  # `make bench`, each benchmark once
    out = _run("-m", "pytest", "benchmarks", "-p", "no:cacheprovider", "-q",
               "--benchmark-disable")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_sdk_kafka_harness_small() -> None:  # `make bench-e2e`
    out = _run("benchmarks/e2e_sdk_kafka.py", "--events", "20000", "--baseline-events", "5000")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_rollups_harness_small() -> None:  # `make bench-rollups`
    # Both engines through a real `meterline worker`, each checked against the truth.
    out = _run("benchmarks/e2e_rollups.py", "--events", "20000", "--naive-events", "2000",
               "--freshness-seconds", "3", "--freshness-rate", "2000",
               "--engines", "columnar,per-event")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(next(line for line in out.stdout.splitlines()
                              if line.startswith("{")))
    assert summary["throughput"]["events"] == 20000
    by_engine = summary["throughput_by_engine"]
    assert sorted(by_engine) == ["columnar", "per-event"]
    assert all(t["verify"] == "exact" and t["events"] == 20000 for t in by_engine.values())


def test_rollups_inprocess_phases_small() -> None:  # e2e_rollups.py --inprocess, both engines
    out = _run("benchmarks/e2e_rollups.py", "--inprocess", "json", "--phases", "--events",
               "20000", "--engines", "columnar,per-event")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["engine"] for r in runs] == ["columnar", "per-event"]
    # Same records, same outcome, whichever engine folded them (rows, not bytes: an
    # Arrow block's dictionaries follow its rows' order, which the engines differ in).
    assert len({(r["accepted"], r["duplicate"], r["rejected"], r["output_rows"])
                for r in runs}) == 1
    assert all(r["output_rows"] > 0 and r["output_bytes"] > 0 for r in runs)
    assert all(r["accepted"] > 0 and r["phases_us_per_event"] for r in runs)


def test_open_windows_rss_small() -> None:  # benchmarks/rollup_windows_rss.py
    out = _run("benchmarks/rollup_windows_rss.py", "--windows", "5000")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["engine"] for r in runs] == ["per-event", "columnar"]
    for r in runs:  # every window held open, then flushed: one row each
        assert r["open_windows"] == r["flushed_rows"] == 5000
        assert r["accepted"] == r["events"] and r["bytes_per_open_window"] > 0


def test_checkpoint_state_harness_small() -> None:  # `make bench-state`
    out = _run("benchmarks/checkpoint_state.py", "--quick")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    by = {(r["scenario"], r["mode"], r["ids"]): r for r in runs}
    seq = by[("producers", "seq", "disk")]
    assert seq["producers_held"] == seq["n"]  # one entry per producer
    assert by[("ids", "seq", "disk")]["ids_held"] == by[("ids", "seq", "disk")]["n"]


def _summary(out: subprocess.CompletedProcess[str]) -> dict:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))


@pytest.mark.timeout(900)  # the first run on a fresh clone also makes quixstreams' venv
def test_rollups_peers_small() -> None:  # e2e_rollups.py --runs raw,quix: the new peers
    # 8,000 events = 4 batches 45 min apart: some events of the last batch arrive after
    # newer ones of the next hour, so quixstreams' 1 h grace is exercised, not idle.
    out = _run("benchmarks/e2e_rollups.py", "--runs", "raw,raw-aiokafka,quix", "--events",
               "8000", timeout=880)
    summary = _summary(out)
    raw, quix = summary["raw"], summary["quix"]
    assert raw["verify"] == "exact" and raw["events"] == 8000
    # The same loop on Faust's client (aiokafka): the same records, events and quantities.
    rak = summary["raw_aiokafka"]
    assert rak["verify"] == "exact" and rak["client"] == "aiokafka"
    assert (rak["records"], rak["events_decoded"], rak["quantity_nanos"]) == (
        raw["records"], raw["events_decoded"], raw["quantity_nanos"])
    # verify compares events_decoded with what was produced, resent envelopes included
    # (16 envelopes at a 3 % resend rate: a run may have none, so no "> 8000" here).
    assert raw["events_decoded"] >= 8000
    assert quix["verify"] == "exact" and quix["windows"] == quix["windows_expected"] > 0
    assert quix["truth_vs_usage_log"] == "consistent"
    assert raw["events_per_s"] > 0 and quix["events_per_s"] > 0
    assert "throughput" not in summary and "naive" not in summary


def test_rollups_wrong_peer_is_reported_wrong() -> None:
    # quixstreams' default grace (0) drops the late events of the same workload: the
    # harness must call its totals wrong and give it no ratio, however fast it was.
    out = _run("benchmarks/e2e_rollups.py", "--runs", "quix", "--events", "8000",
               "--quix-grace-ms", "0")
    quix = _summary(out)["quix"]
    assert quix["verify"] != "exact"
    assert "wrong/missing" in quix["verify"]


def test_server_quota_harness_small() -> None:  # benchmarks/server_quota.py --quick
    # The harness exits 1 on any wrong answer: every key's `used` equals the totals it
    # sent, after seeding and after ingest, and each answer during ingest lies between.
    out = _run("benchmarks/server_quota.py", "--quick", timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = json.loads(out.stdout.strip().splitlines()[-1])["in-memory totals"]
    assert run["checked"]["wrong"] == 0
    assert run["checked"]["after_seed"] == run["checked"]["after_ingest"] == run["keys"]
    ingest = run["phases"]["ingest"]
    assert ingest["requests"] > 0 and ingest["ingest_events_per_s"] > 0
    # Answered from the in-memory totals, never by reading the views (no late events).
    assert run["phases"]["idle"]["cache_hit_rate"] == ingest["cache_hit_rate"] == 1.0


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="no wrk on PATH: `make wrk` (tools/wrk/install.sh) installs it")
def test_server_ingest_singles_with_wrk_small() -> None:  # server_ingest.py --client wrk
    # The harness fails unless the server's accepted-events counter grew by exactly the
    # number of 204s each client counted.
    out = _run("benchmarks/server_ingest.py", "--quick", "--pipeline", "embedded",
               "--loads", "singles", "--variants", "after", "--client", "wrk,aiohttp",
               timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    checks = [line for line in out.stdout.splitlines() if "server accepted" in line]
    assert len(checks) == 2 and all(line.endswith(": exact") for line in checks), out.stdout
    assert "wrk: 200 sent, 200 x 204, 0 non-2xx" in out.stdout
