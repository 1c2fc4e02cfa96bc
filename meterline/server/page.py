"""The self-service usage page (``GET /usage/{customer}``): server-rendered HTML, no
JavaScript, no external assets (inline CSS, inline SVG charts), so it works behind any
proxy and under ``Content-Security-Policy: default-src 'none'``.

Pure functions of the numbers the usage API returns (the same ``UsageReader`` reads):
the current UTC month per meter and dimension group, then a chart view - a bar per day of
the month (default) or per hour (``?granularity=hour``: the last 48 hours, or one UTC day
with ``&day=YYYY-MM-DD``) - with the same windows as a table. Every value is the exact
decimal the API serves; the chart's bar heights are integer arithmetic on nano-units.
Everything from a request or the data is HTML-escaped.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Literal

from meterline.core.meters import Aggregation, Meter
from meterline.core.quantity import format_nanos
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.server.usage import UsagePoint, iso_ms

PAGE_HEADERS = {
    # Nothing may load from elsewhere; inline styles are the only styling.
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "img-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "referrer-policy": "no-referrer",  # the signed link must not leak to other sites
    "cache-control": "private, no-store",
    "x-content-type-options": "nosniff",
}

_CHART_W, _CHART_H, _BAR_GAP = 620, 120, 2


ChartGranularity = Literal["day", "hour"]
_STEP_MS: Mapping[str, int] = {"day": DAY_MS, "hour": HOUR_MS}


@dataclass(frozen=True)
class ChartView:
    """The windows the charts and window tables show: [start_ms, end_ms) by day or hour."""

    granularity: ChartGranularity
    start_ms: int
    end_ms: int
    caption: str  # what the reader is looking at, e.g. "the last 48 hours, by hour"
    day: str = ""  # the UTC day shown by hour, "" otherwise

    @property
    def step_ms(self) -> int:
        return _STEP_MS[self.granularity]


@dataclass(frozen=True)
class MeterPanel:
    meter: Meter
    month: list[UsagePoint] | None  # the period per dimension group; None: not foldable
    windows: list[UsagePoint]  # the view's windows (days or hours), per dimension group
    note: str = ""


def window_series(meter: Meter, points: Sequence[UsagePoint], start_ms: int, end_ms: int,
                  step_ms: int) -> list[tuple[int, int | None]]:
    """One value per window of ``step_ms`` in [start_ms, end_ms): the window's groups
    combined per the meter's aggregation (sum/count add, min/max take the extreme), None
    for a window without usage. A latest or unique_count meter with several groups has
    no single value per window: those windows are None and the table lists the groups."""
    by_window: dict[int, list[int]] = {}
    for p in points:
        by_window.setdefault(p.window_start_ms, []).append(p.value_nanos)
    out: list[tuple[int, int | None]] = []
    for window in range(start_ms, end_ms, step_ms):
        values = by_window.get(window)
        if not values:
            out.append((window, None))
        elif meter.aggregation in (Aggregation.SUM, Aggregation.COUNT):
            out.append((window, sum(values)))
        elif meter.aggregation is Aggregation.MAX:
            out.append((window, max(values)))
        elif meter.aggregation is Aggregation.MIN:
            out.append((window, min(values)))
        else:
            out.append((window, values[0] if len(values) == 1 else None))
    return out


def day_series(meter: Meter, days: Sequence[UsagePoint], start_ms: int, end_ms: int
               ) -> list[tuple[int, int | None]]:
    """``window_series`` of day windows."""
    return window_series(meter, days, start_ms, end_ms, DAY_MS)


def svg_bars(series: Sequence[tuple[int, int | None]], unit: str, step_ms: int = DAY_MS
             ) -> str:
    """A bar per window; heights proportional to the exact values (integer maths)."""
    top = max((v for _, v in series if v is not None and v > 0), default=0)
    n = max(len(series), 1)
    width = _CHART_W // n
    bars = []
    for i, (window, value) in enumerate(series):
        label = (f"{_label(window, step_ms)}: "
                 f"{'no usage' if value is None else format_nanos(value)} {unit}")
        height = 0 if not value or value < 0 or not top else max(1, value * _CHART_H // top)
        bars.append(f'<rect x="{i * width}" y="{_CHART_H - height}" '
                    f'width="{max(width - _BAR_GAP, 1)}" height="{height}">'
                    f"<title>{escape(label)}</title></rect>")
    first = _label(series[0][0], step_ms) if series else ""
    last = _label(series[-1][0], step_ms) if series else ""
    peak = f"peak {format_nanos(top)} {unit}" if top else "no usage"
    per = "hour" if step_ms == HOUR_MS else "day"
    h = _CHART_H + 16  # room for the axis labels under the bars
    return (f'<svg class="chart" role="img" width="{_CHART_W}" height="{h}" '
            f'viewBox="0 0 {_CHART_W} {h}" xmlns="http://www.w3.org/2000/svg">'
            f'<title>{escape(unit)} per {per}</title>{"".join(bars)}'
            f'<line x1="0" y1="{_CHART_H}" x2="{_CHART_W}" y2="{_CHART_H}" stroke="#999"/>'
            f'<text x="0" y="{h - 3}" font-size="11">{first}</text>'
            f'<text x="{_CHART_W}" y="{h - 3}" font-size="11" text-anchor="end">{last}</text>'
            f'<text x="{_CHART_W // 2}" y="{h - 3}" font-size="11" text-anchor="middle">'
            f"{escape(peak)}</text></svg>")


def _date(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms // 1000, dt.UTC).strftime("%Y-%m-%d")


def _label(ms: int, step_ms: int) -> str:
    """A window's start as people read it: the day, or the day and hour (UTC)."""
    fmt = "%Y-%m-%d %H:00" if step_ms == HOUR_MS else "%Y-%m-%d"
    return dt.datetime.fromtimestamp(ms // 1000, dt.UTC).strftime(fmt)


def _group(group: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(group.items()) if v) or "all"


def _group_key(group: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(group.items()))


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:60em}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .8em;border-bottom:1px solid #ddd}
td.value,td.events{text-align:right;font-variant-numeric:tabular-nums}
.chart rect{fill:#3572b0}.note{color:#666}
details{margin:.5em 0}
"""


# ``href(changes)`` -> a link to this page with the view parameters replaced by
# ``changes`` (a signed link's own parameters kept): the page never builds URLs itself.
Href = Callable[[Mapping[str, str]], str]


def render_page(customer: str, period_start_ms: int, period_end_ms: int,
                panels: Sequence[MeterPanel], now_ms: int, view: ChartView,
                href: Href) -> str:
    title = f"Usage of {customer}"
    month = dt.datetime.fromtimestamp(period_start_ms // 1000, dt.UTC).strftime("%B %Y")
    csv_href = href({"format": "csv", "granularity": view.granularity, "day": view.day})
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>", f"<style>{_STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p>Current period: <span id="period" data-from="{iso_ms(period_start_ms)}" '
        f'data-to="{iso_ms(period_end_ms)}">{escape(month)} (UTC)</span>. '
        f'As of <span id="as-of">{iso_ms(now_ms)}</span>; exact values from the rollups, '
        "late usage included. "
        f'<a href="{escape(csv_href)}" download>Download CSV</a> '
        f"({escape(view.caption)})</p>",
        '<table id="summary"><thead><tr><th>meter</th><th>dimensions</th><th>events</th>'
        "<th>this period</th><th>unit</th></tr></thead><tbody>",
    ]
    for panel in panels:
        m = panel.meter
        rows = panel.month if panel.month is not None else []
        for p in rows:
            parts.append(
                f'<tr class="total" data-meter="{escape(m.name)}" '
                f'data-group="{escape(_group_key(p.group))}"><td>{escape(m.name)}</td>'
                f"<td>{escape(_group(p.group))}</td><td class=\"events\">{p.events}</td>"
                f'<td class="value">{format_nanos(p.value_nanos)}</td>'
                f"<td>{escape(m.unit)}</td></tr>")
        if panel.month is None:
            parts.append(f'<tr class="no-total" data-meter="{escape(m.name)}">'
                         f"<td>{escape(m.name)}</td><td colspan=\"4\" class=\"note\">"
                         f"{escape(panel.note)}</td></tr>")
        elif not rows:
            parts.append(f'<tr class="empty" data-meter="{escape(m.name)}">'
                         f'<td>{escape(m.name)}</td><td colspan="4" class="note">'
                         "no usage this period</td></tr>")
    parts.append("</tbody></table>")
    parts.append(_view_nav(view, href))
    for panel in panels:
        parts.extend(_meter_section(panel, view, href))
    parts.append("</body></html>")
    return "\n".join(parts)


def _view_nav(view: ChartView, href: Href) -> str:
    """Links between the views (plain links: no JavaScript), and the view's own range."""
    links = [f'<a id="view-day" href="{escape(href({"granularity": "day"}))}">'
             "by day, this period</a>",
             f'<a id="view-hour" href="{escape(href({"granularity": "hour"}))}">'
             "by hour, last 48 hours</a>"]
    if view.day:
        for rel, ms in (("prev", view.start_ms - DAY_MS), ("next", view.start_ms + DAY_MS)):
            day = _date(ms)
            target = href({"granularity": "hour", "day": day})
            links.append(f'<a id="view-{rel}" href="{escape(target)}">'
                         f'{"previous" if rel == "prev" else "next"} day ({day})</a>')
    return (f'<p class="views">Charts <span id="view" data-granularity="{view.granularity}" '
            f'data-from="{iso_ms(view.start_ms)}" data-to="{iso_ms(view.end_ms)}">'
            f"{escape(view.caption)}</span>: {' | '.join(links)}</p>")


def _meter_section(panel: MeterPanel, view: ChartView, href: Href) -> list[str]:
    m = panel.meter
    kind = view.granularity  # the table rows' class and data attribute: day / hour
    series = window_series(m, panel.windows, view.start_ms, view.end_ms, view.step_ms)
    parts = [f'<section class="meter" data-meter="{escape(m.name)}">'
             f"<h2>{escape(m.name)} <small>({escape(m.aggregation.value)}, "
             f"{escape(m.unit)})</small></h2>"]
    if m.description:
        parts.append(f'<p class="note">{escape(m.description)}</p>')
    parts.append(svg_bars(series, m.unit, view.step_ms))
    parts.append(f"<details><summary>{escape(m.name)} per {kind}</summary>"
                 f'<table class="{kind}s" data-meter="{escape(m.name)}"><thead><tr>'
                 f"<th>{kind} (UTC)</th><th>dimensions</th><th>events</th><th>value</th>"
                 "</tr></thead><tbody>")
    for p in panel.windows:
        if kind == "day":  # the day links to its hours
            day = _date(p.window_start_ms)
            target = escape(href({"granularity": "hour", "day": day}))
            window, cell = day, f'<a href="{target}">{day}</a>'
        else:
            window, cell = iso_ms(p.window_start_ms), _label(p.window_start_ms, HOUR_MS)
        parts.append(f'<tr class="{kind}" data-meter="{escape(m.name)}" '
                     f'data-{kind}="{window}" data-group="{escape(_group_key(p.group))}">'
                     f"<td>{cell}</td><td>{escape(_group(p.group))}"
                     f'</td><td class="events">{p.events}</td>'
                     f'<td class="value">{format_nanos(p.value_nanos)}</td></tr>')
    parts.append("</tbody></table></details></section>")
    return parts


def _cell(text: str) -> str:
    # A dimension value is the customer's text: one starting like a formula would run as
    # one when the CSV is opened in a spreadsheet (CSV injection). Quote it as text.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def render_csv(customer: str, panels: Sequence[MeterPanel],
               granularity: ChartGranularity = "day") -> str:
    """The window rows of the page: customer, meter, unit, day (or hour: its start in
    RFC 3339), dimensions, events, value."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["customer", "meter", "unit", granularity, "dimensions", "events",
                     "value"])
    for panel in panels:
        for p in panel.windows:
            window = _date(p.window_start_ms) if granularity == "day" else iso_ms(
                p.window_start_ms)
            writer.writerow([_cell(customer), panel.meter.name, panel.meter.unit, window,
                             _cell(_group_key(p.group)), p.events,
                             format_nanos(p.value_nanos)])
    return out.getvalue()
