"""The usage page's pure parts: signed links, the day and hour series, the chart and the
CSV, and the page's views through ServerApp.handle with a fixed reader. The page in a
browser against a real server is test_usage_page.py."""

from __future__ import annotations

import asyncio
import datetime as dt
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

import orjson
from hypothesis import given
from hypothesis import strategies as st

from meterline.config import DEFAULT_METERS
from meterline.core.meters import MeterRegistry
from meterline.server import links
from meterline.server.page import (
    MeterPanel,
    day_series,
    render_csv,
    svg_bars,
    window_series,
)
from meterline.server.usage import UsagePoint

REGISTRY = MeterRegistry.load(DEFAULT_METERS)
DAY = 86_400_000
UNIT = 10**9
SECRET = b"k" * 32
fields = st.text(min_size=1, max_size=40)


@given(fields, fields, fields, fields)
def test_a_signature_covers_exactly_its_fields(key_id: str, tenant: str, a: str, b: str) -> None:
    sig = links.sign(SECRET, key_id, tenant, a, 10_000)
    assert links.verify(SECRET, key_id, tenant, a, 10_000, sig, now_ms=9_999)
    assert not links.verify(SECRET, key_id, tenant, a, 10_000, sig, now_ms=10_000)  # expired
    assert not links.verify(SECRET, key_id, tenant, a, 10_001, sig, now_ms=0)  # stretched
    assert not links.verify(b"x" * 32, key_id, tenant, a, 10_000, sig, now_ms=0)
    if a != b:
        assert not links.verify(SECRET, key_id, tenant, b, 10_000, sig, now_ms=0)
    # moving a character from one field to the next signs different bytes
    assert links.sign(SECRET, key_id + tenant[:1], tenant[1:], a, 10_000) != sig or not tenant


def _p(day: int, value: int, **group: str) -> UsagePoint:
    return UsagePoint(day * DAY, (day + 1) * DAY, dict(group), value, 1)


def test_day_series_combines_groups_per_aggregation() -> None:
    days = [_p(0, 2 * UNIT, region="eu"), _p(0, 5 * UNIT, region="us"), _p(2, UNIT, region="eu")]
    assert day_series(REGISTRY.get("llm_tokens"), days, 0, 3 * DAY) == [  # type: ignore[arg-type]
        (0, 7 * UNIT), (DAY, None), (2 * DAY, UNIT)]
    assert day_series(REGISTRY.get("storage_gb"), days, 0, 3 * DAY)[0] == (  # type: ignore[arg-type]
        0, 5 * UNIT)
    # distinct users of two groups cannot be combined into one number
    assert day_series(REGISTRY.get("active_users"), days, 0, DAY) == [(0, None)]  # type: ignore[arg-type]


def test_bar_heights_are_exact_integer_shares() -> None:
    # 1 nano-unit against 10**29 units: a float ratio would be 0; the bar is still drawn
    svg = svg_bars([(0, 10**38), (DAY, 1), (2 * DAY, None), (3 * DAY, 10**38 // 2)], "token")
    heights = [int(part.split('"', 1)[0]) for part in svg.split(' height="')[2:]]
    assert heights == [120, 1, 0, 60]


def test_csv_quotes_formula_like_text() -> None:
    panel = MeterPanel(REGISTRY.get("llm_tokens"),  # type: ignore[arg-type]
                       None, [_p(0, UNIT, model="=HYPERLINK(1)")])
    rows = render_csv("@cust", [panel]).splitlines()
    # the customer cell would start a formula: quoted; "model=..." cannot start one
    assert rows[1] == "'@cust,llm_tokens,token,1970-01-01,model==HYPERLINK(1),1,1"


# --------------------------------------------------------------------------- hourly view
# The page through ServerApp.handle with a reader that returns fixed windows: which reads
# the page makes for each view, and that every number it was given is on it, exactly.

HOUR = 3_600_000
NOW = int(dt.datetime(2025, 12, 1, 8, 20, tzinfo=dt.UTC).timestamp()) * 1000
DEC_1 = int(dt.datetime(2025, 12, 1, tzinfo=dt.UTC).timestamp()) * 1000
NOV_29 = int(dt.datetime(2025, 11, 29, tzinfo=dt.UTC).timestamp()) * 1000


class _Reader:
    """Fixed windows per (granularity, meter); records every read."""

    def __init__(self, points: dict[tuple[str, str], list[UsagePoint]]) -> None:
        self.points = points
        self.reads: list[tuple[str, str, int, int]] = []

    def usage_by_meter(self, customer: str, granularity: str, start_ms: int, end_ms: int
                       ) -> dict[str, list[UsagePoint]]:
        self.reads.append((customer, granularity, start_ms, end_ms))
        return {m: [p for p in self.points.get((granularity, m), [])
                    if start_ms <= p.window_start_ms < end_ms] for m in REGISTRY.names}


def _hp(start: int, value: int, events: int, **group: str) -> UsagePoint:
    return UsagePoint(start, start + HOUR, dict(group), value, events)


POINTS = {
    ("day", "llm_tokens"): [UsagePoint(DEC_1, DEC_1 + DAY, {"model": "m1"}, 12_500_000_001, 3)],
    ("hour", "llm_tokens"): [
        _hp(NOV_29 + 9 * HOUR, 1, 1, model="m1"),  # the first hour of the last 48
        _hp(NOV_29 + 8 * HOUR, 99 * UNIT, 1, model="m1"),  # one hour too early for them
        _hp(DEC_1 + 7 * HOUR, 12_500_000_000, 2, model="m1"),
        _hp(DEC_1 + 7 * HOUR, 3 * UNIT, 1, model="<i>x</i>"),
        _hp(DEC_1 + 8 * HOUR, 7, 1, model="m1"),  # the current hour, still filling
    ],
    ("hour", "active_users"): [_hp(DEC_1 + 7 * HOUR, 2 * UNIT, 3)],
}


def _page_app(tmp_path: Any) -> tuple[Any, _Reader, str]:
    from meterline.server.app import ServerApp
    from meterline.server.keys import KeyStore

    keys = KeyStore(tmp_path / "keys.db")
    key, _ = keys.create("acme", ["read"])
    reader = _Reader(POINTS)
    app = ServerApp(registry=REGISTRY, keys=keys, writer=None,  # type: ignore[arg-type]
                    reader=reader, quotas=None,  # type: ignore[arg-type]
                    openapi={}, clock_ms=lambda: NOW)
    return app, reader, key


def _get(app: Any, key: str, path: str) -> Any:
    from meterline.server.app import Request

    raw, _, query = path.partition("?")
    return asyncio.run(app.handle(Request("GET", raw.encode(), query.encode(),
                                          {"authorization": f"Bearer {key}"})))


class _Table(HTMLParser):
    """Rows of a class as (data attributes, cell texts); the links' hrefs."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.rows: list[tuple[dict[str, str], list[str]]] = []
        self.hrefs: dict[str, str] = {}
        self._cells: list[str] | None = None
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr":
            self._cells = None
            if a.get("class") == self.kind:
                self.rows.append((a, []))
                self._cells = self.rows[-1][1]
        elif tag == "td" and self._cells is not None:
            self._cells.append("")
            self._in_cell = True
        elif tag == "a" and "id" in a:
            self.hrefs[a["id"]] = a["href"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell and self._cells:
            self._cells[-1] += data


def test_hourly_view_of_the_last_48_hours(tmp_path: Any) -> None:
    app, reader, key = _page_app(tmp_path)
    r = _get(app, key, "/usage/c1?granularity=hour")
    assert r.status == 200, r.body
    # the month (for the period totals), then the 48 hours up to the end of the current one
    assert reader.reads == [("acme:c1", "day", DEC_1, DEC_1 + 31 * DAY),
                            ("acme:c1", "hour", NOV_29 + 9 * HOUR, DEC_1 + 9 * HOUR)]
    html = r.body.decode()
    table = _Table("hour")
    table.feed(html)
    assert [(a["data-hour"], a["data-group"], cells) for a, cells in table.rows] == [
        ("2025-11-29T09:00:00.000Z", "model=m1", ["2025-11-29 09:00", "model=m1", "1",
                                                  "0.000000001"]),
        ("2025-12-01T07:00:00.000Z", "model=m1", ["2025-12-01 07:00", "model=m1", "2",
                                                  "12.5"]),
        ("2025-12-01T07:00:00.000Z", "model=<i>x</i>", ["2025-12-01 07:00",
                                                        "model=<i>x</i>", "1", "3"]),
        ("2025-12-01T08:00:00.000Z", "model=m1", ["2025-12-01 08:00", "model=m1", "1",
                                                  "0.000000007"]),
        ("2025-12-01T07:00:00.000Z", "", ["2025-12-01 07:00", "all", "3", "2"]),
    ]
    assert "<i>" not in html  # a dimension value is text
    # one bar per hour in every chart; the llm_tokens peak is 7:00's two groups together
    assert html.count('<rect x="') == 48 * len(REGISTRY.names)
    assert "2025-12-01 07:00: 15.5 token" in html and "peak 15.5 token" in html
    # the period total still comes from the days
    assert '<td class="value">12.500000001</td>' in html
    # links to the other views keep nothing of this one's parameters
    assert table.hrefs["view-day"] == "/usage/c1?granularity=day"


def test_hourly_view_of_one_day_keeps_the_signed_links_parameters(tmp_path: Any) -> None:
    app, reader, key = _page_app(tmp_path)
    r = _get(app, key, "/usage/c1?granularity=hour&day=2025-12-01&x=a%26b")
    assert r.status == 200, r.body
    assert reader.reads[1] == ("acme:c1", "hour", DEC_1, DEC_1 + DAY)
    table = _Table("hour")
    table.feed(r.body.decode())
    assert [a["data-hour"] for a, _ in table.rows] == [
        "2025-12-01T07:00:00.000Z", "2025-12-01T07:00:00.000Z", "2025-12-01T08:00:00.000Z",
        "2025-12-01T07:00:00.000Z"]
    assert table.hrefs["view-prev"] == "/usage/c1?x=a%26b&granularity=hour&day=2025-11-30"
    assert table.hrefs["view-next"] == "/usage/c1?x=a%26b&granularity=hour&day=2025-12-02"
    csv_rows = _get(app, key, "/usage/c1?granularity=hour&day=2025-12-01&format=csv"
                    ).body.decode().splitlines()
    assert csv_rows[0] == "customer,meter,unit,hour,dimensions,events,value"
    assert csv_rows[1:] == [
        "c1,llm_tokens,token,2025-12-01T07:00:00.000Z,model=m1,2,12.5",
        "c1,llm_tokens,token,2025-12-01T07:00:00.000Z,model=<i>x</i>,1,3",
        "c1,llm_tokens,token,2025-12-01T08:00:00.000Z,model=m1,1,0.000000007",
        "c1,active_users,user,2025-12-01T07:00:00.000Z,,3,2"]


def test_day_view_is_one_read_and_links_each_day_to_its_hours(tmp_path: Any) -> None:
    app, reader, key = _page_app(tmp_path)
    r = _get(app, key, "/usage/c1")
    assert r.status == 200 and len(reader.reads) == 1  # one query for every meter
    table = _Table("day")
    table.feed(r.body.decode())
    assert [cells for _, cells in table.rows] == [
        ["2025-12-01", "model=m1", "3", "12.500000001"]]
    assert 'href="/usage/c1?granularity=hour&amp;day=2025-12-01"' in r.body.decode()


def test_bad_view_parameters_are_refused_with_the_reason(tmp_path: Any) -> None:
    app, reader, key = _page_app(tmp_path)
    for query, words in [("granularity=month", "'day' or 'hour'"),
                         ("granularity=hour&day=2025-13-01", "YYYY-MM-DD"),
                         ("granularity=hour&day=1969-12-31", "1970-01-01 or later"),
                         # digits, but not ASCII ones
                         ("granularity=hour&day=" + quote("２０２５-１２-０１"), "YYYY-MM-DD"),
                         ("day=2025-12-01", "granularity=hour")]:
        r = _get(app, key, f"/usage/c1?{query}")
        assert r.status == 400, query
        assert words in orjson.loads(r.body)["detail"], (query, r.body)
    assert reader.reads == []  # refused before any read


def test_hour_series_and_bars_label_hours() -> None:
    points = [_hp(2 * HOUR, 5 * UNIT, 1, region="eu"), _hp(2 * HOUR, 4 * UNIT, 1, region="us")]
    series = window_series(REGISTRY.get("storage_gb"), points, 0, 3 * HOUR, HOUR)  # type: ignore[arg-type]
    assert series == [(0, None), (HOUR, None), (2 * HOUR, 5 * UNIT)]
    svg = svg_bars(series, "GB", HOUR)
    assert "GB per hour" in svg and "1970-01-01 02:00: 5 GB" in svg
