"""The quality harness docs/anomalies.md quotes still runs (tiny size) and agrees with
itself. Numbers are not asserted here: benchmarks are not timed tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_quality_harness_runs_small() -> None:
    out = subprocess.run(
        [sys.executable, "benchmarks/anomaly_quality.py", "--series", "40", "--days", "14",
         "--partial-series", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(next(line for line in out.stdout.splitlines()
                              if line.startswith("{")))
    assert set(summary["detectors"]) == {"seasonal_robust", "static_threshold", "ewma_zscore"}
    assert summary["throughput"]["updates"] == 40 * 14 * 24
    assert summary["throughput"]["state_bytes_max"] <= 2048
    assert "series updates/s" in out.stdout
    traits = summary["detectors"]["seasonal_robust"]["shapes"]
    assert {"shape: business", "level shift: no", "noise: sigma < 0.1"} <= set(traits)
    for row in traits.values():  # F1 is the harmonic mean of what is reported beside it
        p, r = row["precision"], row["recall"]
        assert row["f1"] is None or abs(row["f1"] - 2 * p * r / (p + r)) < 1e-3


def test_stage_benchmark_runs_small_and_deltas_are_smaller() -> None:
    out = subprocess.run([sys.executable, "benchmarks/anomaly_stage.py", "--quick"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert r["rows_timed"] > 0 and r["rows_per_s"] > 0
    # Between window closes a checkpoint holds no detector state.
    assert 0 < r["delta_no_close_bytes"] < r["delta_close_bytes"] <= r["whole_bytes"] * 1.1
    assert r["per_hour_delta_bytes"] < r["per_hour_whole_bytes"]
