"""The self-service usage page (issue 11) in a real headless Chromium (Debian `chromium`,
installed by tools/chromium/install.sh) against a real `meterline serve` on loopback.

What the browser renders must equal what the usage API returns for the same customer and
period, and both must equal the truth written down here from what was sent.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
import uuid
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from server_proc import meterline, settle, start_server

pytestmark = pytest.mark.integration

HOSTILE = '<script>alert("x")</script>'


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium on PATH: run tools/chromium/install.sh (make test does)")


def _browse(url: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # --no-sandbox: the test may run as root (CI containers), where the sandbox refuses.
    return subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp / 'chromium-profile'}", *extra, url],
        capture_output=True, text=True, timeout=180)


class _Rows(HTMLParser):
    """The page's data rows as the browser left them: (class, attrs, [cell texts])."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, dict[str, str], list[str]]] = []
        self._cells: list[str] | None = None
        self._in_cell = False
        self.tags: set[str] = set()
        self.view: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        a = {k: v or "" for k, v in attrs}
        if a.get("id") == "view":
            self.view = a
        if tag == "tr" and a.get("class") in ("total", "day", "hour", "no-total", "empty"):
            self.rows.append((a["class"], a, []))
            self._cells = self.rows[-1][2]
        elif tag == "td" and self._cells is not None:
            self._cells.append("")
            self._in_cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_cell = False
        elif tag == "tr":
            self._cells = None

    def handle_data(self, data: str) -> None:
        if self._in_cell and self._cells is not None:
            self._cells[-1] += data


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = start_server(tmp_path_factory.mktemp("page"), keys={
        "ingest": ("acme", ["ingest"]), "read": ("acme", ["read"]),
        "other": ("bravo", ["read"])})
    yield srv
    assert srv.stop() in (0, -15), "".join(srv.output)
    assert "Traceback" not in "".join(srv.output), "".join(srv.output)


def _api(server: Any, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key}"},
                        timeout=30)


def _link(server: Any, key: str, customer: str, **body: Any) -> str:
    with _api(server, key) as c:
        r = c.post("/api/v1/usage-links", json={"customer": customer, **body})
    assert r.status_code == 200, r.text
    return server.url + r.json()["path"]


def test_page_in_chromium_shows_the_apis_exact_numbers(server: Any, tmp_path: Path) -> None:
    customer = f"page-{uuid.uuid4().hex[:8]}"
    events = [  # (meter, data): sent once each, at receive time (this month)
        ("llm_tokens", {"quantity": "12.5", "model": "m1"}),
        ("llm_tokens", {"quantity": "0.000000001", "model": "m1"}),
        ("llm_tokens", {"quantity": "7", "model": HOSTILE}),
        ("api_calls", {"endpoint": "/a"}),
        ("api_calls", {"endpoint": "/a", "quantity": "5"}),  # a count meter counts 1
        ("api_calls", {"endpoint": "/a"}),
        ("storage_gb", {"quantity": "3.25", "region": "eu"}),
        ("storage_gb", {"quantity": "2", "region": "eu"}),
        ("active_users", {"user_id": "u1"}),
        ("active_users", {"user_id": "u2"}),
        ("active_users", {"user_id": "u1"}),
    ]
    with _api(server, server.keys["ingest"]) as c:
        r = c.post("/api/v1/events", headers={"content-type":
                                              "application/cloudevents-batch+json"},
                   json=[{"specversion": "1.0", "id": f"e{i}", "source": "test",
                          "type": meter, "subject": customer, "data": data}
                         for i, (meter, data) in enumerate(events)])
    assert r.status_code == 204, r.text
    # The truth, by hand: per (meter, group) the period's value and events.
    truth = {
        ("llm_tokens", "model=m1"): ("12.500000001", 2),
        ("llm_tokens", f"model={HOSTILE}"): ("7", 1),
        ("api_calls", "endpoint=/a,region="): ("3", 3),
        ("storage_gb", "region=eu"): ("3.25", 2),
    }
    now = time.time_ns() // 1_000_000
    month = dt.datetime.fromtimestamp(now // 1000, dt.UTC).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0)
    start = int(month.timestamp()) * 1000
    read = server.keys["read"]

    def api_doc(meter: str, granularity: str) -> dict[str, Any]:
        with _api(server, read) as c:
            r = c.get(f"/api/v1/usage/{quote(customer, safe='')}/{meter}",
                      params={"granularity": granularity, "from": str(start), "to": str(now + 1)})
        assert r.status_code in (200, 422), r.text
        return dict(r.json())

    def api_totals() -> dict[tuple[str, str], tuple[str, int]]:
        out = {}
        for meter in ("llm_tokens", "api_calls", "storage_gb"):
            for p in api_doc(meter, "month")["data"]:
                group = ",".join(f"{k}={v}" for k, v in sorted(p["dimensions"].items()))
                out[(meter, group)] = (p["value"], p["events"])
        return out

    settle(api_totals, truth)
    days = {m: api_doc(m, "day")["data"] for m in ("llm_tokens", "api_calls", "storage_gb",
                                                   "active_users")}
    assert [(p["value"], p["events"]) for p in days["active_users"]] == [("2", 3)]

    url = _link(server, read, customer)
    shot = tmp_path / "usage-page.png"  # the test's artifact: what a customer sees
    dom = _browse(url, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown = _browse(url, tmp_path, f"--screenshot={shot}", "--window-size=1000,1600")
    assert shown.returncode == 0 and shot.stat().st_size > 5_000, shown.stderr[-2000:]
    print(f"usage page screenshot: {shot}")

    parser = _Rows()
    parser.feed(dom.stdout)
    rendered = {(a["data-meter"], a["data-group"]): (cells[3], int(cells[2]))
                for kind, a, cells in parser.rows if kind == "total"}
    assert rendered == truth == api_totals()
    # unique_count has no period total (distinct users per day); the page says so
    assert [a["data-meter"] for kind, a, _ in parser.rows if kind == "no-total"] == [
        "active_users"]
    rendered_days = sorted((a["data-group"], a["data-day"], cells[3], int(cells[2]))
                           for kind, a, cells in parser.rows if kind == "day")
    api_days = sorted((",".join(f"{k}={v}" for k, v in sorted(p["dimensions"].items())),
                       p["window_start"][:10], p["value"], p["events"])
                      for data in days.values() for p in data)
    assert rendered_days == api_days
    # the hostile dimension value is text on the page, never markup
    assert "script" not in parser.tags
    assert HOSTILE in dom.stdout.replace("&lt;", "<").replace("&gt;", ">").replace(
        "&quot;", '"')
    total = sum(Decimal(v) for (m, _), (v, _) in rendered.items() if m == "llm_tokens")
    assert total == Decimal("19.500000001")

    # The hourly view of the last 48 hours, in the browser: every hour row is the API's
    # hour read of the range the page names, and the hours add up to the truth.
    hourly = _browse(url + "&granularity=hour", tmp_path, "--dump-dom")
    assert hourly.returncode == 0, hourly.stderr[-2000:]
    shown_hours = _Rows()
    shown_hours.feed(hourly.stdout)
    view = shown_hours.view
    assert view["data-granularity"] == "hour"
    hour_from = int(dt.datetime.fromisoformat(view["data-from"]).timestamp() * 1000)
    hour_to = int(dt.datetime.fromisoformat(view["data-to"]).timestamp() * 1000)
    assert hour_to - hour_from == 48 * 3_600_000 and hour_from <= now < hour_to
    with _api(server, read) as c:
        api_hours = sorted(
            (meter, ",".join(f"{k}={v}" for k, v in sorted(p["dimensions"].items())),
             p["window_start"], p["value"], p["events"])
            for meter in ("llm_tokens", "api_calls", "storage_gb", "active_users")
            for p in c.get(f"/api/v1/usage/{quote(customer, safe='')}/{meter}",
                           params={"granularity": "hour", "from": str(hour_from),
                                   "to": str(hour_to)}).json()["data"])
    rendered_hours = sorted((a["data-meter"], a["data-group"], a["data-hour"], cells[3],
                             int(cells[2]))
                            for kind, a, cells in shown_hours.rows if kind == "hour")
    assert rendered_hours == api_hours and rendered_hours
    for meter in ("llm_tokens", "api_calls"):  # additive: the hours sum to the period
        for (m, group), (value, events) in truth.items():
            if m == meter:
                hours = [(Decimal(v), n) for hm, g, _, v, n in rendered_hours
                         if (hm, g) == (m, group)]
                assert (sum(v for v, _ in hours), sum(n for _, n in hours)) == (
                    Decimal(value), events)

    # Tenants: bravo's link to a customer of the same name shows bravo's usage (none),
    # never acme's; and a revoked key's links stop working.
    bravo = _link(server, server.keys["other"], customer)
    page = httpx.get(bravo, timeout=30)
    assert page.status_code == 200
    seen = _Rows()
    seen.feed(page.text)
    assert [kind for kind, _, _ in seen.rows if kind in ("total", "day")] == []
    assert [kind for kind, _, _ in seen.rows].count("empty") == 4  # + active_users' note
    key_id = server.keys["other"].split("_")[1]
    out = meterline("keys", "revoke", key_id, "--config", str(server.config))
    assert out.returncode == 0, out.stderr
    assert httpx.get(bravo, timeout=30).status_code == 401


def test_page_headers_csv_and_links(server: Any) -> None:
    customer = f"links-{uuid.uuid4().hex[:8]}"
    read = server.keys["read"]
    url = _link(server, read, customer)
    with httpx.Client(timeout=30) as c:
        page = c.get(url)
        assert page.status_code == 200
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert page.headers["referrer-policy"] == "no-referrer"
        assert "<script" not in page.text and "src=" not in page.text
        csv = c.get(url + "&format=csv")
        assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
        assert csv.text.splitlines()[0] == "customer,meter,unit,day,dimensions,events,value"

        # a link is for its customer only, and cannot be stretched
        other = url.replace(f"/usage/{customer}?", "/usage/someone-else?")
        assert c.get(other).status_code == 401
        later = url.replace("&exp=", "&exp=9")
        assert c.get(later).status_code == 401
        assert c.get(url.split("?")[0]).status_code == 401  # no link, no key
    # an ingest key cannot make links; lengths are bounded
    with _api(server, server.keys["ingest"]) as c:
        assert c.post("/api/v1/usage-links", json={"customer": customer}).status_code == 403
    with _api(server, read) as c:
        r = c.post("/api/v1/usage-links", json={"customer": customer,
                                                "expires_in_s": 32 * 86400})
        assert r.status_code == 400


def test_chromium_install_script_is_idempotent_when_installed() -> None:
    script = Path(__file__).resolve().parents[2] / "tools" / "chromium" / "install.sh"
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed here (the script would install it)")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == found
