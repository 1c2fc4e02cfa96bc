"""docs/rating.md is executable: every ```python block runs, and its asserts hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meterline.core.pricing.currencies import MINOR_UNITS

DOC = Path(__file__).resolve().parents[1] / "docs" / "rating.md"
TEXT = DOC.read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```$", TEXT, flags=re.DOTALL | re.MULTILINE)


def test_the_page_has_examples() -> None:
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    # Each block stands alone (its own imports), as a reader would paste it.
    code = compile(BLOCKS[index], f"{DOC.name}[python block {index}]", "exec")
    exec(code, {"__name__": f"docs_rating_{index}"})


def test_quick_start_output_is_what_the_page_shows(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BLOCKS[0], "quick start", "exec"), {})
    printed = capsys.readouterr().out.strip()
    shown = re.search(r"prints:\n\n```\n(.*?)\n```", TEXT, flags=re.DOTALL)
    assert shown is not None
    assert printed == shown.group(1)


def test_currency_table_matches_the_code() -> None:
    rows = re.findall(r"^\| ([023]) \| ([A-Z, ]+) \|$", TEXT, flags=re.MULTILINE)
    documented = {code.strip(): int(minor) for minor, codes in rows for code in codes.split(",")}
    assert documented == MINOR_UNITS
