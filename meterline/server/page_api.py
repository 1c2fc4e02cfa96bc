"""The usage page's handlers: ``POST /api/v1/usage-links`` (a signed, expiring link to
one customer's page) and ``GET /usage/{customer}`` (the page, its hourly view and its CSV),
reached with such a link or a read key's header (links.py, page.py).

A page is two reads at most, each one query for every meter (``UsageReader.
usage_by_meter``): the month's day windows (the period totals, and the day charts), and
for the hourly view the hour windows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable, Mapping
from urllib.parse import quote

from meterline.core.meters import MeterRegistry
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.server import links, problems
from meterline.server.formats.common import parse_json
from meterline.server.keys import KeyStore, Principal
from meterline.server.messages import Request, Response, json_response, one, query_params
from meterline.server.page import (
    PAGE_HEADERS,
    ChartView,
    MeterPanel,
    render_csv,
    render_page,
)
from meterline.server.usage import (
    NotFoldable,
    UsagePoint,
    UsageReader,
    iso_ms,
    month_start_ms,
    months_from_days,
    next_month_ms,
)
from meterline.server.usage_api import stored_customer

# The hourly view without a day: the last 48 hours, so "yesterday" is always whole.
RECENT_HOURS = 48
# The page's own parameters; every other one (a signed link's k, exp, sig) is kept as it
# is in the links the page makes to its other views.
VIEW_PARAMS = ("granularity", "day", "format")
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # ASCII digits only (\d takes any)


class PageApi:
    def __init__(self, *, registry: MeterRegistry, keys: KeyStore, reader: UsageReader | None,
                 authenticate: Callable[[Request], Principal],
                 clock_ms: Callable[[], int]) -> None:
        self._registry = registry
        self._keys = keys
        self._reader = reader
        self._authenticate = authenticate
        self._clock_ms = clock_ms
        self._link_secret: bytes | None = None

    def _secret(self) -> bytes:
        if self._link_secret is None:
            self._link_secret = self._keys.secret(links.SECRET_NAME)
        return self._link_secret

    async def usage_link(self, request: Request, principal: Principal, _: list[str]
                         ) -> Response:
        doc = parse_json(request.body)
        if not isinstance(doc, dict) or not isinstance(doc.get("customer"), str):
            raise problems.bad_request('send {"customer": "<id>", "expires_in_s": <seconds>}')
        customer = doc["customer"]
        stored_customer(principal, customer)  # checks it as every read does
        ttl_s = doc.get("expires_in_s", links.DEFAULT_TTL_MS // 1000)
        if type(ttl_s) is not int or not 0 < ttl_s * 1000 <= links.MAX_TTL_MS:
            raise problems.bad_request(f"expires_in_s must be an integer in "
                                       f"1..{links.MAX_TTL_MS // 1000}")
        expires = self._clock_ms() + ttl_s * 1000
        sig = links.sign(await asyncio.to_thread(self._secret), principal.key_id,
                         principal.tenant, customer, expires)
        path = f"/usage/{quote(customer, safe='')}?k={principal.key_id}&exp={expires}&sig={sig}"
        return json_response(200, {"customer": customer, "path": path,
                                   "expires": iso_ms(expires)})

    async def _link_principal(self, query: dict[str, list[str]], customer: str) -> Principal:
        key_id, sig, exp = (one(query, name, "") for name in ("k", "sig", "exp"))
        principal = await asyncio.to_thread(self._keys.principal, key_id) if key_id else None
        if principal is None or not exp.isdigit():
            raise problems.unauthorized("this usage link is not valid (or its key was revoked)")
        secret = await asyncio.to_thread(self._secret)
        if not links.verify(secret, key_id, principal.tenant, customer, int(exp), sig,
                            self._clock_ms()):
            raise problems.unauthorized("this usage link is not valid or has expired; "
                                        "ask for a new one")
        return principal

    async def page(self, request: Request, customer: str) -> Response:
        if self._reader is None:
            raise problems.unavailable("usage reads are not configured", 60)
        query = query_params(request)
        if "sig" in query:
            principal = await self._link_principal(query, customer)
        else:
            principal = self._authenticate(request)
        if not principal.may("read"):
            raise problems.forbidden("this key may not read usage")
        stored = stored_customer(principal, customer)
        now = self._clock_ms()
        start = month_start_ms(now)
        end = next_month_ms(start)
        view = chart_view(query, now, start, end)
        panels = await asyncio.to_thread(self._panels, stored, start, end, view)
        headers = dict(PAGE_HEADERS)
        if one(query, "format", "html") == "csv":
            headers["content-disposition"] = (f'attachment; filename="usage-'
                                              f'{view.granularity}.csv"')
            return Response(200, render_csv(customer, panels, view.granularity)
                            .encode("utf-8"), "text/csv; charset=utf-8", headers)
        path = request.raw_path.split(b"?", 1)[0].decode("ascii")
        html = render_page(customer, start, end, panels, now, view,
                                lambda changes: view_href(path, query, changes))
        return Response(200, html.encode("utf-8"), "text/html; charset=utf-8", headers)

    def _panels(self, stored: str, start_ms: int, end_ms: int, view: ChartView
                ) -> list[MeterPanel]:
        """Per meter: the period per group (what the API's month read returns) folded
        from the day windows (its day read), and the view's windows; every meter in one
        query per granularity."""
        assert self._reader is not None
        days = self._reader.usage_by_meter(stored, "day", start_ms, end_ms)
        hours = (self._reader.usage_by_meter(stored, "hour", view.start_ms, view.end_ms)
                 if view.granularity == "hour" else None)
        panels = []
        for meter in self._registry:
            try:  # [start_ms, end_ms) is one whole month: the API's month read, folded here
                month: list[UsagePoint] | None = months_from_days(meter, days[meter.name])
                note = ""
            except NotFoldable:
                month = None
                note = (f"{meter.aggregation.value}: the period has no single total "
                        "(distinct values are kept per day); see the days below")
            windows = days[meter.name] if hours is None else hours[meter.name]
            panels.append(MeterPanel(meter, month, windows, note))
        return panels


def chart_view(query: dict[str, list[str]], now_ms: int, period_start_ms: int,
               period_end_ms: int) -> ChartView:
    """The chart view a page request asks for: the period by day (default), or by hour
    for one UTC day (``day=YYYY-MM-DD``) or else the last 48 hours up to the current one."""
    granularity = one(query, "granularity", "day")
    day = one(query, "day", "")
    if granularity == "day":
        if day:
            raise problems.bad_request("'day' selects the hours of a day: use it with "
                                       "granularity=hour")
        return ChartView("day", period_start_ms, period_end_ms,
                              "this period, by day")
    if granularity != "hour":
        raise problems.bad_request("granularity must be 'day' or 'hour'")
    if not day:
        end = now_ms - now_ms % HOUR_MS + HOUR_MS  # the current hour, still filling
        return ChartView("hour", end - RECENT_HOURS * HOUR_MS, end,
                              f"the last {RECENT_HOURS} hours, by hour")
    try:
        if not _DAY.fullmatch(day):
            raise ValueError
        date = dt.date.fromisoformat(day)
    except ValueError:
        raise problems.bad_request(f"day must be a date as YYYY-MM-DD, got {day[:40]!r}"
                                   ) from None
    start = (date - dt.date(1970, 1, 1)).days * DAY_MS
    if start < 0:
        raise problems.bad_request("day must be 1970-01-01 or later")
    return ChartView("hour", start, start + DAY_MS, f"{day} (UTC), by hour", day)


def view_href(path: str, query: Mapping[str, list[str]], changes: Mapping[str, str]) -> str:
    """``path`` with the query's other parameters kept (a signed link's k, exp, sig) and
    the view parameters set to ``changes`` (empty values left out)."""
    kept = [(k, v[-1]) for k, v in query.items() if k not in VIEW_PARAMS]
    given = [(k, v) for k, v in changes.items() if v]
    return path + "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}"
                                 for k, v in kept + given)

