"""ChargebeeTarget: the official chargebee client against the local Chargebee peer.

The peer (meterline/testing/chargebee_peer.py) checks site, auth, path and form fields
against Chargebee's documented usages API; the last tests check the peer itself refuses
what Chargebee refuses, so the target tests cannot pass against a peer that takes anything.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import logging
import socket
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import chargebee
import httpx
import pytest

from meterline.export.chargebee_target import (
    ChargebeeConfig,
    ChargebeeConfigError,
    ChargebeeTarget,
)
from meterline.export.items import ExportItem, item_key
from meterline.testing.chargebee_peer import ChargebeePeer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SITE = "acme-test"
API_KEY = "test_cbSecretDoNotLeak_4f9a7c"
NOV_MS = calendar.timegm((2026, 11, 1, 0, 0, 0)) * 1000
DEC_MS = calendar.timegm((2026, 12, 1, 0, 0, 0)) * 1000
USAGES = "/api/v2/subscriptions/cb-sub-1/usages"


def route_to(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Send the client's http://acme-test.chargebee.com/... requests to ``url``."""
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, url)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(chargebee.Chargebee, "verify_ca_certs", False)


@pytest.fixture
def peer(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChargebeePeer]:
    with ChargebeePeer(SITE, API_KEY) as p:
        route_to(monkeypatch, p.url)
        p.add_subscription("cb-sub-1", {"api-calls-usd", "storage-usd"})
        p.add_subscription("cb-sub-2", {"api-calls-usd"})
        yield p


def make_target(api_key: str = API_KEY) -> ChargebeeTarget:
    return ChargebeeTarget(ChargebeeConfig(
        site=SITE, api_key=api_key, protocol="http", timeout_s=5,
        item_prices={"api_calls:count": "api-calls-usd", "storage_gb:max": "storage-usd"},
        subscriptions={"sub-1": "cb-sub-1", "sub-2": "cb-sub-2"}))


@pytest.fixture
def target(peer: ChargebeePeer) -> Iterator[ChargebeeTarget]:
    with make_target() as t:
        yield t


def item(*, kind: str = "usage", meter: str = "api_calls", aggregation: str = "count",
         quantity: str = "1250", subscription: str = "sub-1", correction: int = 0,
         corrects: str = "", seg_start_ms: int = NOV_MS, seg_end_ms: int = DEC_MS
         ) -> ExportItem:
    if kind == "base_fee":
        meter = aggregation = ""
    line_id = f"{seg_start_ms}/{kind}" + (f"/{meter}:{aggregation}" if meter else "")
    return ExportItem(
        key=item_key(subscription, NOV_MS, line_id, correction), customer="acme",
        subscription_id=subscription, period_start_ms=NOV_MS, period_end_ms=DEC_MS,
        line_id=line_id, correction=correction, corrects=corrects, kind=kind, meter=meter,
        aggregation=aggregation, quantity=Decimal(quantity), amount=Decimal("1.00"),
        currency="USD", plan_id="pro", plan_version=1, segment_start_ms=seg_start_ms,
        segment_end_ms=seg_end_ms)


def hour(i: int, subscription: str = "sub-1") -> ExportItem:
    """The i-th of consecutive one-hour segments (plan changes fall on whole hours)."""
    return item(subscription=subscription, seg_start_ms=NOV_MS + i * 3_600_000,
                seg_end_ms=NOV_MS + (i + 1) * 3_600_000)


def expected_id(key: str) -> str:
    return "ml-" + hashlib.sha256(key.encode()).hexdigest()[:48]


def one(results: list) -> object:
    assert len(results) == 1, results
    return results[0]


# -- happy path -------------------------------------------------------------------------

def test_usage_line_is_one_usage_record(target: ChargebeeTarget, peer: ChargebeePeer) -> None:
    it = item(quantity="1250")
    res = one(target.send([it]))
    uid = expected_id(it.key)
    assert (res.outcome, res.status, res.remote_id) == ("sent", 200, uid)
    [req] = peer.requests()
    assert (req.method, req.host, req.path, req.authorized) == (
        "POST", "acme-test.chargebee.com", USAGES, True)
    assert req.form == {
        "id": uid,
        "item_price_id": "api-calls-usd",
        "quantity": "1250",
        "usage_date": "1796083199",  # 2026-11-30T23:59:59Z, the line's last second
        "note": "meterline ml1:sub-1:1793491200000:1793491200000/usage/api_calls:count:0",
    }
    assert req.idempotency_key == uid
    assert peer.usages()[uid]["subscription_id"] == "cb-sub-1"


@pytest.mark.parametrize(("quantity", "sent"), [
    ("12.5", "12.5"), ("0.000000001", "0.000000001"), ("1E+3", "1000"), ("7.250", "7.25"),
])
def test_quantity_goes_as_exact_decimal_text(target: ChargebeeTarget, peer: ChargebeePeer,
                                             quantity: str, sent: str) -> None:
    it = item(meter="storage_gb", aggregation="max", quantity=quantity)
    assert one(target.send([it])).outcome == "sent"
    assert peer.usages()[expected_id(it.key)]["quantity"] == sent


def test_lines_chargebee_does_not_take_fail_with_the_reason(target: ChargebeeTarget,
                                                            peer: ChargebeePeer) -> None:
    fee, trial, unmapped = (item(kind="base_fee"), item(kind="trial_usage"),
                            item(meter="seats", aggregation="max"))
    results = {r.key: r for r in target.send([fee, trial, unmapped])}
    assert {r.outcome for r in results.values()} == {"failed"}
    assert "base fees" in results[fee.key].response
    assert "trial_usage" in results[trial.key].response
    assert "no Chargebee item price for seats:max" in results[unmapped.key].response
    assert peer.requests() == []


def test_correction_is_its_own_record_referencing_the_original(target: ChargebeeTarget,
                                                               peer: ChargebeePeer) -> None:
    original = item(quantity="1250")
    more = item(quantity="40", correction=1, corrects=original.key)
    less = item(quantity="-5", correction=2, corrects=original.key)
    results = {r.key: r for r in target.send([original, more, less])}
    assert results[original.key].outcome == results[more.key].outcome == "sent"
    assert results[less.key].outcome == "failed" and "negative" in results[less.key].response
    held = peer.usages()
    assert set(held) == {expected_id(original.key), expected_id(more.key)}
    assert held[expected_id(original.key)]["quantity"] == "1250"  # untouched
    fix = held[expected_id(more.key)]
    # one record per (item price, date): the n-th correction sits n seconds earlier
    assert fix["usage_date"] == 1796083199 - 1
    assert fix["note"].endswith(f"corrects {original.key}")


# -- exactly once, outcomes -------------------------------------------------------------

def test_resend_is_recognised_not_duplicated(target: ChargebeeTarget,
                                            peer: ChargebeePeer) -> None:
    it = item()
    assert one(target.send([it])).outcome == "sent"
    again = one(target.send([it]))
    assert again.outcome == "sent" and "already held" in again.response
    assert len(peer.usages()) == 1


def test_same_id_with_other_content_is_a_permanent_failure(target: ChargebeeTarget,
                                                           peer: ChargebeePeer) -> None:
    assert one(target.send([item(quantity="10")])).outcome == "sent"
    changed = one(target.send([item(quantity="11")]))
    assert changed.outcome == "failed" and "different content" in changed.response
    assert [u["quantity"] for u in peer.usages().values()] == ["10"]


def test_503_is_retried_and_recovery_delivers_each_once(target: ChargebeeTarget,
                                                        peer: ChargebeePeer) -> None:
    items = [hour(i, f"sub-{1 + i % 2}") for i in range(6)]
    peer.fail_next(3, 503)
    first = {r.key: r for r in target.send(items)}
    assert sorted(r.outcome for r in first.values()) == ["retry"] * 3 + ["sent"] * 3
    assert {r.status for r in first.values() if r.outcome == "retry"} == {503}
    pending = [it for it in items if first[it.key].outcome == "retry"]
    assert {r.outcome for r in target.send(pending)} == {"sent"}
    assert set(peer.usages()) == {expected_id(it.key) for it in items}


def test_answer_lost_after_commit_is_retried_and_found_held(target: ChargebeeTarget,
                                                            peer: ChargebeePeer) -> None:
    it = item()
    peer.fail_next(1, 503, commit=True)
    assert one(target.send([it])).outcome == "retry"
    assert one(target.send([it])).outcome == "sent"
    assert len(peer.usages()) == 1


@pytest.mark.parametrize(("status", "param", "expected"), [
    (400, "quantity", "failed"), (404, "", "failed"), (429, "", "retry"), (500, "", "retry"),
    (503, "", "retry"),
])
def test_status_classification(target: ChargebeeTarget, peer: ChargebeePeer, status: int,
                               param: str, expected: str) -> None:
    peer.fail_next(1, status, param=param)
    res = one(target.send([item()]))
    assert (res.outcome, res.status) == (expected, status)
    if param:
        assert "quantity : invalid value" in res.response


def test_real_refusals_are_permanent(peer: ChargebeePeer) -> None:
    with make_target() as target:
        unknown_sub = item(subscription="sub-9")  # not in the mapping: same id in Chargebee
        res = one(target.send([unknown_sub]))
        assert (res.outcome, res.status) == ("failed", 404)
        assert "couldn't find the subscription sub-9" in res.response
    with make_target(api_key="test_wrongKey") as wrong:
        res = one(wrong.send([item()]))
        assert (res.outcome, res.status) == ("failed", 401)
        assert "api_authentication_failed" in res.response


def test_connection_refused_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    route_to(monkeypatch, f"http://127.0.0.1:{port}")
    with make_target() as target:
        res = one(target.send([item()]))
    assert res.outcome == "retry" and "connection error" in res.response


def test_api_key_never_in_results_or_logs(peer: ChargebeePeer,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    basic = base64.b64encode(f"{API_KEY}:".encode()).decode()
    with make_target() as target:
        peer.fail_next(1, 400, message=f"bad key {API_KEY}", param="quantity")
        peer.fail_next(1, 503, message=f"overloaded for {API_KEY}")
        results = [*target.send([item(subscription="sub-1")]),
                   *target.send([item(subscription="sub-2")]),
                   *target.send([item(subscription="sub-2", quantity="3")])]
        texts = [repr(r) for r in results] + [repr(target), repr(target.config)]
    assert [r.outcome for r in results] == ["failed", "retry", "sent"]
    assert "PAYLOAD" in caplog.text and "[redacted]" in caplog.text  # the client did log
    for text in [caplog.text, *texts]:
        assert API_KEY not in text and "DoNotLeak" not in text and basic not in text
    with pytest.raises(ChargebeeConfigError) as err:
        ChargebeeConfig(site="Bad Site", api_key=API_KEY).check()
    assert "DoNotLeak" not in str(err.value)


def test_config_reports_every_error_at_once() -> None:
    with pytest.raises(ChargebeeConfigError) as err:
        ChargebeeConfig(site="", api_key="", item_prices={"api_calls": ""}, protocol="ftp",
                        timeout_s=0, concurrency=0).check()
    assert len(err.value.errors) == 7, err.value.errors


def test_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "export.toml"
    path.write_text('[chargebee]\nsite = "acme"\n[chargebee.item_prices]\n'
                    '"api_calls:count" = "api-calls-usd"\n[chargebee.subscriptions]\n'
                    'sub-1 = "cb-1"\n')
    config = ChargebeeConfig.from_toml(path, API_KEY)
    assert (config.site, dict(config.item_prices), dict(config.subscriptions)) == (
        "acme", {"api_calls:count": "api-calls-usd"}, {"sub-1": "cb-1"})
    path.write_text('[chargebee]\nsite = "acme"\napi_key = "x"\n')
    with pytest.raises(ChargebeeConfigError, match="unknown setting 'api_key'"):
        ChargebeeConfig.from_toml(path, API_KEY)


# -- reconcile's last hop ---------------------------------------------------------------

def test_received_lists_held_usages_across_pages_and_subscriptions(
        target: ChargebeeTarget, peer: ChargebeePeer) -> None:
    # Small chunks and pages (100 each in production; each request here costs ~0.2 s
    # because the client builds a new HTTP client, TLS context included, per request).
    target.list_chunk, target.page_limit = 5, 2
    sent = [hour(i) for i in range(7)] + [hour(i, "sub-2") for i in range(2)]
    never = [hour(200), hour(201, "sub-2"), item(subscription="sub-2", kind="base_fee")]
    assert {r.outcome for r in target.send(sent)} == {"sent"}
    got = target.received([it.key for it in sent + never])
    assert got == {it.key for it in sent}
    lists = [r for r in peer.requests() if r.path == "/api/v2/usages"]
    assert {r.form["subscription_id[is]"] for r in lists} == {"cb-sub-1", "cb-sub-2"}
    # sub-1: 8 ids asked (7 held) in chunks of 5 and 3, pages of 2: held 5+2 -> 3+1
    # requests, or 4+3 -> 2+2; either way 4. sub-2: 3 ids asked, 2 held -> one page.
    per_sub = {s: sum(r.form["subscription_id[is]"] == s for r in lists)
               for s in ("cb-sub-1", "cb-sub-2")}
    assert per_sub == {"cb-sub-1": 4, "cb-sub-2": 1}
    assert any("offset" in r.form for r in lists)


# -- the peer refuses what Chargebee refuses --------------------------------------------

def test_peer_checks_site_auth_and_fields(peer: ChargebeePeer) -> None:
    auth = {"Authorization": "Basic " + base64.b64encode(f"{API_KEY}:".encode()).decode()}
    good = {"item_price_id": "api-calls-usd", "quantity": "5", "usage_date": "1796083199"}

    def post(form: dict[str, str], host: str = "acme-test.chargebee.com",
             headers: dict[str, str] = auth) -> tuple[int, dict]:
        r = httpx.post(f"{peer.url}{USAGES}", data=form, headers={**headers, "Host": host},
                       trust_env=False)
        return r.status_code, r.json()

    assert post(good, headers={})[1]["api_error_code"] == "api_authentication_failed"
    assert post(good, host="other.chargebee.com")[0] == 404
    for field_, value, code in [("quantity", "", "param_required"),
                                ("quantity", "5 units", "param_wrong_value"),
                                ("usage_date", "1.5", "param_wrong_value"),
                                ("item_price_id", "gold-usd", "param_wrong_value"),
                                ("id", "x" * 101, "param_wrong_value"),
                                ("subscription_id", "cb-sub-1", "param_not_allowed")]:
        status, body = post({**good, field_: value})
        assert (status, body["api_error_code"], body["param"]) == (400, code, field_)
    assert post({**good, "id": "u1"})[0] == 200
    status, body = post({**good, "id": "u1"})
    assert (status, body["api_error_code"], body["param"]) == (400, "duplicate_entry", "id")
    status, body = post({**good, "id": "u2"})  # same item price and date, another id
    assert (status, body["param"]) == (400, "usage_date")


# -- api_base: a private endpoint, or this peer without a proxy ---------------------------

def test_api_base_reaches_the_peer_without_proxy_or_patching(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert chargebee.Chargebee.verify_ca_certs is True  # the client's default: https only
    with ChargebeePeer(SITE, API_KEY) as p:
        p.add_subscription("cb-sub-1", {"api-calls-usd"})
        config = ChargebeeConfig(site=SITE, api_key=API_KEY, api_base=p.url, timeout_s=5,
                                 item_prices={"api_calls:count": "api-calls-usd"},
                                 subscriptions={"sub-1": "cb-sub-1"})
        with ChargebeeTarget(config) as target:
            it = item()
            assert one(target.send([it])).outcome == "sent"
            assert target.received([it.key]) == {it.key}
        [create, listing] = p.requests()
        assert (create.method, create.path, create.host, create.authorized) == (
            "POST", USAGES, p.url.removeprefix("http://"), True)
        assert listing.path == "/api/v2/usages"
    # Plain http was allowed for that target only: the client is back to https-only.
    assert chargebee.Chargebee.verify_ca_certs is True


@pytest.mark.parametrize(("base", "problem"), [
    ("http://chargebee-gw.example.com", "http:// is allowed only for a loopback address"),
    ("ftp://127.0.0.1:9", "is not an http(s) URL"),
    ("https://", "is not an http(s) URL"),
])
def test_api_base_refuses_clear_text_off_loopback(base: str, problem: str) -> None:
    with pytest.raises(ChargebeeConfigError) as err:
        ChargebeeConfig(site=SITE, api_key=API_KEY, api_base=base).check()
    assert problem in str(err.value) and API_KEY not in str(err.value)
    ChargebeeConfig(site=SITE, api_key=API_KEY, api_base="https://cb.internal:8443").check()
