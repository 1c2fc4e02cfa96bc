"""`python benchmarks/export_throughput.py` still runs (tiny size) and verifies itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]


def test_export_throughput_harness_small() -> None:
    out = subprocess.run([sys.executable, "benchmarks/export_throughput.py", "--items", "300",
                          "--concurrency", "3", "--lines-per-request", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.startswith("$ python benchmarks/export_throughput.py --items 300")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["items"] == 300 and summary["exact"] is True and summary["items_per_s"] > 0
