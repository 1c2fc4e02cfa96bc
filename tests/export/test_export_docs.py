"""docs/export.md: its python blocks run, and the commands and metric names it shows exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meterline.export.commands import TARGETS
from meterline.export.metrics import ExportMetrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "export.md"
TEXT = DOC.read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```$", TEXT, flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"{DOC.name}[python block {index}]", "exec"), {})


def test_metric_names_are_the_ones_exported() -> None:
    metrics = ExportMetrics()
    metrics.sent.labels("files").inc()
    metrics.retries.labels("files").inc()
    metrics.failed.labels("files").inc()
    metrics.backlog.labels("files").set(1)
    metrics.send_seconds.labels("files").observe(0.1)
    exported = {s.name for m in metrics.registry.collect() for s in m.samples}
    shown = set(re.findall(r"`(meterline_export_\w+)`", TEXT))
    assert shown and shown <= exported | {"meterline_export_send_seconds"}
    assert "meterline_export_send_seconds_count" in exported


def test_every_target_is_documented() -> None:
    for target in TARGETS:
        assert f"--target {target}" in TEXT
