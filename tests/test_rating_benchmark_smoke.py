"""benchmarks/rating_month.py keeps working (a tiny run; the real figure is 100,000)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_rating_month_benchmark_small() -> None:
    out = subprocess.run([sys.executable, "benchmarks/rating_month.py", "--subscriptions", "300"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rating one month: 300 subscriptions x 5 meters" in out.stdout
    # The harness checks that the rated llm_tokens equal the rollups' sum.
    assert "llm_tokens rated = rollups" in out.stdout
    # The rated lines and rows of this run, as rated by the code before the speed-up of
    # the rating stage (same digests from a `git archive` of that commit): a change that
    # makes rating faster must not change them. A deliberate change of what is rated (or
    # of RatedLine / rated_usage's columns) updates these two lines, and says why.
    assert "digest of rated lines (Python, repr): c1fac5bbe44072ff" in out.stdout
    assert "digest of rated_usage rows (table, both runs): 3,454 rows, 301f678ea73d8416" \
        in out.stdout
