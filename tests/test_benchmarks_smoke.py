"""The benchmark commands the README and docs/benchmarks.md show still run (tiny sizes).

Numbers are not checked here (benchmarks are not timed assertions); only that each harness
completes, verifies its own results and prints its summary.
"""

from __future__ import annotations

import json
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
    out = _run("benchmarks/e2e_rollups.py", "--events", "20000", "--naive-events", "2000",
               "--freshness-seconds", "3", "--freshness-rate", "2000")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(next(line for line in out.stdout.splitlines()
                              if line.startswith("{")))
    assert summary["throughput"]["events"] == 20000


def test_checkpoint_state_harness_small() -> None:  # `make bench-state`
    out = _run("benchmarks/checkpoint_state.py", "--quick")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    by = {(r["scenario"], r["mode"], r["ids"]): r for r in runs}
    seq = by[("producers", "seq", "disk")]
    assert seq["producers_held"] == seq["n"]  # one entry per producer
    assert by[("ids", "seq", "disk")]["ids_held"] == by[("ids", "seq", "disk")]["n"]
