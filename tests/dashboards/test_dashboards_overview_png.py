"""`make demo`'s consumption overview PNG is drawn from the dashboard's own SQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meterline.grafana import ALL, QueryContext, Variable, expand, load_dashboard, targets
from meterline.overview import OVERVIEW_PANELS, dashboard_context, render_overview

pytestmark = pytest.mark.timeout(120)
HOUR_MS = 3_600_000


def test_overview_png_runs_the_dashboard_sql(seeded_usage: Any, tmp_path: Path) -> None:
    from matplotlib.image import imread

    dashboard = load_dashboard("consumption")
    now_ms = seeded_usage.data_end_ms + 60_000
    out = render_overview(seeded_usage.storage, tmp_path / "overview.png",
                          database=seeded_usage.database, now_ms=now_ms)

    # The dashboard's defaults: its time range, hourly windows, every meter.
    ctx = dashboard_context(seeded_usage.storage, dashboard, database=seeded_usage.database,
                            now_ms=now_ms)
    assert (ctx.from_ms, ctx.to_ms) == (now_ms - 7 * 24 * HOUR_MS, now_ms)
    raw = {t.panel_title: str(t.target["rawSql"]) for t in targets(dashboard)}
    assert set(out.sql) == set(OVERVIEW_PANELS)
    for title, sql in out.sql.items():
        assert sql == expand(raw[title], ctx), title
        assert out.rows[title] == seeded_usage.storage.query_rows(sql), title
    # The seed's 72 h of usage fall inside the 7 days: every counted event is drawn, and
    # the too-late ones too (10 h late: restated by the views, well inside 35 days).
    drawn = {m: sum(v for _, mm, v in out.rows["Usage per hour"] if mm == m)
             for m in ("api_calls",)}
    assert drawn["api_calls"] == sum(1 for e in seeded_usage.counted + seeded_usage.late
                                     if e.meter == "api_calls")
    assert {r[0] for r in out.rows["Top customers"]} == {e.meter for e in seeded_usage.counted}

    data = out.path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    height, width, _ = imread(str(out.path)).shape
    assert width >= 1000 and height >= 600


def test_overview_honours_a_given_context(seeded_usage: Any, tmp_path: Path) -> None:
    to_ms = seeded_usage.data_end_ms + 60_000
    ctx = QueryContext(to_ms - 6 * HOUR_MS, to_ms, HOUR_MS, {
        "database": Variable(seeded_usage.database), "interval": Variable("daily"),
        "meter": Variable(["llm_tokens"]), "customer": Variable(ALL)})
    out = render_overview(seeded_usage.storage, tmp_path / "sub" / "o.png", ctx=ctx)
    assert out.path.is_file()
    assert {r[1] for r in out.rows["Usage per hour"]} == {"llm_tokens"}
    assert len({r[0] for r in out.rows["Usage per hour"]}) in (6, 7)  # hours overlapping 6 h


def test_the_demo_draws_it(seeded_usage: Any, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    from meterline.demo import _overview_png

    path = _overview_png(seeded_usage.storage, tmp_path / "consumption-overview.png")
    assert path == tmp_path / "consumption-overview.png" and path.stat().st_size > 20_000
    assert capsys.readouterr().out == ""
