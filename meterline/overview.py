"""The consumption overview as a PNG, from the Grafana dashboard's own SQL.

``render_overview`` takes the main panels of dashboards/consumption.json ("Usage per hour",
"Top customers"), expands their macros and variables as Grafana would
(:mod:`meterline.grafana`), runs them on a storage and draws the result with matplotlib's
Agg backend (no display, no global pyplot state). What the PNG shows is therefore what the
dashboard shows for the same time range, down to the SQL.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meterline.grafana import ALL, QueryContext, Variable, expand, load_dashboard, targets

__all__ = ["OVERVIEW_PANELS", "Overview", "dashboard_context", "overview_sql",
           "render_overview"]

USAGE_PANEL = "Usage per hour"
TOP_PANEL = "Top customers"
OVERVIEW_PANELS = (USAGE_PANEL, TOP_PANEL)
HOUR_MS = 3_600_000
_RELATIVE = re.compile(r"^now(?:-(\d+)([smhdw]))?$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": HOUR_MS, "d": 24 * HOUR_MS, "w": 7 * 24 * HOUR_MS}


@dataclass(frozen=True)
class Overview:
    path: Path
    sql: Mapping[str, str]  # panel title -> the SQL that ran
    rows: Mapping[str, list[tuple[Any, ...]]]  # panel title -> its rows


def _relative_ms(text: str, now_ms: int) -> int:
    match = _RELATIVE.match(text.strip())
    if match is None:
        raise ValueError(f"only now / now-<n><s|m|h|d|w> time ranges are supported: {text!r}")
    n, unit = match.groups()
    return now_ms - (int(n) * _UNIT_MS[unit] if n else 0)


def _variable_query(dashboard: Mapping[str, Any], name: str) -> str:
    for var in dashboard.get("templating", {}).get("list", ()):
        if var.get("name") == name:
            query = var.get("query")
            return str(query["rawSql"] if isinstance(query, dict) else query)
    raise KeyError(f"dashboard has no variable {name!r}")


def dashboard_context(storage: Any, dashboard: Mapping[str, Any], *, database: str,
                      now_ms: int | None = None) -> QueryContext:
    """The dashboard's defaults: its time range, hourly windows, every meter and customer.
    The meter and customer options come from the variables' own queries, as in Grafana."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rng = dashboard.get("time", {"from": "now-7d", "to": "now"})
    from_ms = _relative_ms(str(rng["from"]), now_ms)
    to_ms = _relative_ms(str(rng["to"]), now_ms)
    base = {"database": Variable(database), "interval": Variable("hourly")}
    first = QueryContext(from_ms, to_ms, HOUR_MS, base)
    options = {name: [str(row[0]) for row in
                      storage.query_rows(expand(_variable_query(dashboard, name), first))]
               for name in ("meter", "customer")}
    return QueryContext(from_ms, to_ms, HOUR_MS, {
        **base,
        "meter": Variable([ALL], options["meter"]),
        "customer": Variable(ALL, options["customer"]),
    })


def overview_sql(dashboard: Mapping[str, Any], ctx: QueryContext) -> dict[str, str]:
    """The expanded SQL of the overview panels, by panel title."""
    found = {t.panel_title: str(t.target["rawSql"]) for t in targets(dashboard)
             if t.panel_title in OVERVIEW_PANELS}
    missing = set(OVERVIEW_PANELS) - set(found)
    if missing:
        raise KeyError(f"dashboard lacks the panels {sorted(missing)}")
    return {title: expand(found[title], ctx) for title in OVERVIEW_PANELS}


def _when(value: Any) -> datetime:
    # chDB returns DateTime columns as epoch seconds or as aware datetimes, by driver.
    if isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(int(value), UTC)


def _draw(path: Path, usage: Sequence[tuple[Any, ...]], top: Sequence[tuple[Any, ...]],
          ctx: QueryContext) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meters = sorted({str(row[1]) for row in usage}) or ["(no usage)"]
    fig = Figure(figsize=(13, 1.9 * max(len(meters), 3) + 1), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(meters), 2, width_ratios=(3, 2), hspace=0.55, wspace=0.25)
    span = (f"{_when(ctx.from_ms // 1000):%Y-%m-%d %H:%M} - "
            f"{_when(ctx.to_ms // 1000):%Y-%m-%d %H:%M} UTC")
    fig.suptitle(f"Meterline consumption overview, {span}", fontsize=12)
    for i, meter in enumerate(meters):
        ax = fig.add_subplot(grid[i, 0])
        times: list[Any] = [_when(t) for t, m, _ in usage if str(m) == meter]
        values = [float(v) for _, m, v in usage if str(m) == meter]
        if times:
            ax.plot(times, values, linewidth=1.2)
        ax.set_title(f"{USAGE_PANEL}: {meter}", fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(grid[:, 1])
    first_meter = min((str(row[0]) for row in top), default=None)
    chosen = next((m for m in ("api_calls",) if any(str(r[0]) == m for r in top)), first_meter)
    bars = [(str(r[1]), float(r[2])) for r in top if str(r[0]) == chosen][::-1]
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="#3274d9")
    ax.set_title(f"{TOP_PANEL}: {chosen or '(no usage)'}", fontsize=10, loc="left")
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def render_overview(storage: Any, path: str | Path, *, database: str | None = None,
                    now_ms: int | None = None, dashboard: Mapping[str, Any] | None = None,
                    ctx: QueryContext | None = None) -> Overview:
    """Run the overview panels' SQL on ``storage`` and draw them into ``path`` (PNG).

    ``ctx`` defaults to the dashboard's own defaults (:func:`dashboard_context`)."""
    dashboard = load_dashboard("consumption") if dashboard is None else dashboard
    database = database or storage.database
    ctx = ctx or dashboard_context(storage, dashboard, database=database, now_ms=now_ms)
    sql = overview_sql(dashboard, ctx)
    rows = {title: storage.query_rows(text) for title, text in sql.items()}
    out = Path(path)
    _draw(out, rows[USAGE_PANEL], rows[TOP_PANEL], ctx)
    return Overview(out, sql, rows)

