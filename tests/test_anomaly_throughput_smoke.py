"""The throughput benchmark runs and measures something (small size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_anomaly_throughput_quick() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/anomaly_throughput.py"),
                          "--quick", "--warm-days", "22"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    r = json.loads(out.splitlines()[0])
    assert r["updates"] == 2000 * 2
    assert r["updates_per_s"] > 0
    assert r["events"] > 0  # the injected spikes opened episodes
    assert 0 < r["state_json_bytes"] < 2048
