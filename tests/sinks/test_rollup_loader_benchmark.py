"""``benchmarks/rollup_loader.py`` runs, and its equality check has teeth (tiny size;
the numbers are not checked: benchmarks are not timed assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import rollup_loader  # noqa: E402


def test_rollup_loader_benchmark_runs(capsys: pytest.CaptureFixture[str],
                                      migrated_storage: Any) -> None:
    assert rollup_loader.main(["--rows", "600", "--repeat", "1"], migrated_storage) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["rows"]["rows"] == line["json-columns"]["rows"] == line["arrow"]["rows"] == 600
    assert (line["arrow"]["bytes_per_row"] < line["json-columns"]["bytes_per_row"]
            < line["rows"]["bytes_per_row"])


def test_rollup_loader_benchmark_refuses_a_lossy_decode(monkeypatch: pytest.MonkeyPatch,
                                                        migrated_storage: Any) -> None:
    original = rollup_loader.decode_outputs

    def lose_one(records):  # type: ignore[no-untyped-def]
        flush, bad = original(records)
        if flush.arrow_blocks:  # Arrow blocks: one row of one goes missing
            flush.rollups += flush.arrow_blocks.pop().records()[1:]
        elif flush.rollup_blocks:  # JSON column blocks: the same
            flush.rollups += flush.rollup_blocks.pop().records()[1:]
        else:
            flush.rollups.pop()
        return flush, bad

    monkeypatch.setattr(rollup_loader, "decode_outputs", lose_one)
    with pytest.raises(SystemExit, match="differ"):
        rollup_loader.main(["--rows", "300", "--repeat", "1"], migrated_storage)
