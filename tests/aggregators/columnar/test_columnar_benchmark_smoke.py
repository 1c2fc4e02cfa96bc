"""``benchmarks/columnar_fold.py`` still runs, and its equality check has teeth (tiny size;
numbers are not checked, benchmarks are not timed assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import columnar_fold  # noqa: E402


def test_columnar_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert columnar_fold.main(["--events", "4000", "--repeat", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [s["workload"] for s in lines] == ["high", "low"]
    for s in lines:
        assert s["reference"]["events"] == s["columnar"]["events"] > 0
        assert s["native"]["events"] == s["reference"]["events"]


def test_columnar_benchmark_refuses_different_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    from meterline.aggregators.columnar import fold

    original = fold.merge_accepted

    def drop_one(state, cols, accepted, dirty):  # type: ignore[no-untyped-def]
        accepted[accepted.argmax()] = False  # one accepted event goes missing
        return original(state, cols, accepted, dirty)

    monkeypatch.setattr("meterline.aggregators.columnar.processor.merge_accepted", drop_one)
    with pytest.raises(SystemExit, match="differ"):
        columnar_fold.main(["--events", "2000", "--repeat", "1"])
