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
