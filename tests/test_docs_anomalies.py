"""docs/anomalies.md is executable: every ```python block runs, its asserts hold, the
output it shows is the output it prints, and the settings table matches the code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from meterline.anomaly import AnomalySettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "anomalies.md"
TEXT = DOC.read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```$", TEXT, flags=re.DOTALL | re.MULTILINE)
# A python block followed by "prints:" and a plain block: (code, shown output).
SHOWN = re.findall(r"^```python\n(.*?)^```\n\nprints:\n\n```\n(.*?)\n```$", TEXT,
                   flags=re.DOTALL | re.MULTILINE)


def test_the_page_has_examples() -> None:
    assert len(BLOCKS) >= 4
    assert len(SHOWN) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    # Each block stands alone (its own imports), as a reader would paste it.
    code = compile(BLOCKS[index], f"{DOC.name}[python block {index}]", "exec")
    exec(code, {"__name__": f"docs_anomalies_{index}"})


@pytest.mark.parametrize("index", range(len(SHOWN)))
def test_shown_output_is_what_the_block_prints(index: int,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, shown = SHOWN[index]
    exec(compile(code, f"{DOC.name}[shown block {index}]", "exec"), {"__name__": "docs"})
    assert capsys.readouterr().out.strip() == shown.strip()


def test_settings_table_matches_the_defaults() -> None:
    table = TEXT.split("| setting | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, flags=re.MULTILINE)
    documented = {name: ast.literal_eval(default.strip()) for name, default in rows}
    defaults = AnomalySettings()
    assert set(documented) == set(AnomalySettings.__dataclass_fields__) - {"meters"}
    for name, value in documented.items():
        assert getattr(defaults, name) == value, name
