"""Fixtures for the export tests (factories in export_factories.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from export_factories import rated_line

from meterline.export.build import item_from_line
from meterline.export.items import ExportItem


@pytest.fixture
def make_items() -> Callable[..., list[ExportItem]]:
    def make(n: int, **kw: object) -> list[ExportItem]:
        return [item_from_line(rated_line(i, **kw)) for i in range(n)]  # type: ignore[arg-type]

    return make
