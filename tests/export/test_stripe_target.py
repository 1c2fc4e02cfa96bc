"""StripeTarget against real stripe-mock, through the recording proxy (what Stripe got).

Expected values are written out by hand from Stripe's documented rules (minor units, the
35-day / 5-minute window, the 100-character identifier), not computed with the target's
helpers.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from meterline.export.items import ExportItem, item_key
from meterline.export.stripe_target import StripeConfig, StripeConfigError, StripeTarget
from meterline.testing.stripe_mock import (
    STRIPE_MOCK_VERSION,
    RecordingProxy,
    StripeMock,
    stripe_mock_or_skip,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DAY_MS = 86_400_000
NOW_MS = calendar.timegm((2026, 12, 1, 0, 0, 0)) * 1000  # 1796083200000
NOV_MS = calendar.timegm((2026, 11, 1, 0, 0, 0)) * 1000
API_KEY = "sk_test_51MeterlineSecretDoNotLeak0123456789"
METER_EVENTS = "/v1/billing/meter_events"
INVOICE_ITEMS = "/v1/invoiceitems"


@pytest.fixture(scope="module")
def stripe_server() -> Iterator[StripeMock]:
    with stripe_mock_or_skip() as server:
        yield server


@pytest.fixture
def proxy(stripe_server: StripeMock) -> Iterator[RecordingProxy]:
    with RecordingProxy(stripe_server.url) as p:
        yield p


@pytest.fixture
def target(proxy: RecordingProxy) -> Iterator[StripeTarget]:
    with make_target(proxy) as t:
        yield t


def make_target(proxy: RecordingProxy, *, now_ms: int = NOW_MS, timeout_s: float = 10,
                api_key: str = API_KEY) -> StripeTarget:
    config = StripeConfig(api_key=api_key, api_base=proxy.url, timeout_s=timeout_s,
                          customers={"acme": "cus_acme", "globex": "cus_globex"},
                          meters={"api_calls:count": "api_calls"}, concurrency=4)
    return StripeTarget(config, clock_ms=lambda: now_ms)


def item(*, kind: str = "usage", meter: str = "api_calls", aggregation: str = "count",
         quantity: str = "1250", amount: str = "2.50", currency: str = "USD",
         customer: str = "acme", subscription: str = "sub-1", correction: int = 0,
         corrects: str = "", seg_start_ms: int = NOV_MS, seg_end_ms: int = NOW_MS,
         period: tuple[int, int] = (NOV_MS, NOW_MS)) -> ExportItem:
    if kind == "base_fee":
        meter = aggregation = ""
    line_id = f"{seg_start_ms}/{kind}" + (f"/{meter}:{aggregation}" if meter else "")
    return ExportItem(
        key=item_key(subscription, period[0], line_id, correction), customer=customer,
        subscription_id=subscription, period_start_ms=period[0], period_end_ms=period[1],
        line_id=line_id, correction=correction, corrects=corrects, kind=kind, meter=meter,
        aggregation=aggregation, quantity=Decimal(quantity), amount=Decimal(amount),
        currency=currency, plan_id="pro", plan_version=1, segment_start_ms=seg_start_ms,
        segment_end_ms=seg_end_ms)


def one(results: list) -> object:
    assert len(results) == 1, results
    return results[0]


# -- happy path per line kind -----------------------------------------------------------

def test_mapped_usage_line_is_one_meter_event(target: StripeTarget, proxy: RecordingProxy
                                              ) -> None:
    it = item(quantity="1250")
    res = one(target.send([it]))
    assert (res.key, res.outcome, res.status) == (it.key, "sent", 200)
    [rec] = proxy.records()
    assert rec.path == METER_EVENTS and rec.accepted
    assert rec.form == {
        "event_name": "api_calls",
        "payload[stripe_customer_id]": "cus_acme",
        "payload[value]": "1250",
        "identifier": "ml1:sub-1:1793491200000:1793491200000/usage/api_calls:count:0",
        # the line's last second: 2026-11-30T23:59:59Z
        "timestamp": "1796083199",
    }
    assert rec.idempotency_key == rec.identifier == it.key


def test_base_fee_is_an_invoice_item_in_cents_with_its_identity(
        target: StripeTarget, proxy: RecordingProxy) -> None:
    it = item(kind="base_fee", quantity="1", amount="26.67")
    res = one(target.send([it]))
    assert res.outcome == "sent" and res.remote_id.startswith("ii_")
    [rec] = proxy.records()
    assert rec.path == INVOICE_ITEMS and rec.idempotency_key == it.key
    assert rec.form["customer"] == "cus_acme"
    assert rec.form["amount"] == "2667" and rec.form["currency"] == "usd"
    assert rec.form["metadata[meterline_key]"] == "ml1:sub-1:1793491200000:1793491200000/base_fee:0"
    assert rec.form["metadata[meterline_line_id]"] == "1793491200000/base_fee"
    assert rec.form["metadata[meterline_period]"] == "1793491200000/1796083200000"
    assert rec.form["period[start]"] == "1793491200" and rec.form["period[end]"] == "1796083199"
    assert "meterline_corrects" not in json.dumps(rec.form)


def test_unmapped_usage_and_trial_usage_are_invoice_items(target: StripeTarget,
                                                          proxy: RecordingProxy) -> None:
    storage = item(meter="storage_gb", aggregation="max", quantity="12.5", amount="10.00")
    trial = item(kind="trial_usage", quantity="300", amount="0")
    results = {r.key: r for r in target.send([storage, trial])}
    assert {r.outcome for r in results.values()} == {"sent"}
    by_key = {r.idempotency_key: r for r in proxy.records()}
    assert {r.path for r in by_key.values()} == {INVOICE_ITEMS}
    assert by_key[storage.key].form["amount"] == "1000"
    assert by_key[storage.key].form["metadata[meterline_quantity]"] == "12.5"
    assert by_key[trial.key].form["amount"] == "0"


@pytest.mark.parametrize(("currency", "amount", "minor"), [
    ("JPY", "1234", "1234"), ("BHD", "1.250", "1250"), ("EUR", "-0.07", "-7"),
    ("USD", "123456789012.34", "12345678901234"),
])
def test_amounts_go_in_exact_minor_units(target: StripeTarget, proxy: RecordingProxy,
                                         currency: str, amount: str, minor: str) -> None:
    res = one(target.send([item(kind="base_fee", amount=amount, currency=currency)]))
    assert res.outcome == "sent"
    [rec] = proxy.records()
    assert (rec.form["amount"], rec.form["currency"]) == (minor, currency.lower())


@pytest.mark.parametrize(("currency", "amount", "why"), [
    ("USD", "0.005", "not a whole number of minor units"),
    ("KWD", "1.255", "end in 0"),  # Stripe: three-decimal amounts must end in 0
    ("XYZ", "1.00", "unknown currency"),
])
def test_amounts_stripe_cannot_take_fail_before_sending(
        target: StripeTarget, proxy: RecordingProxy, currency: str, amount: str, why: str
) -> None:
    res = one(target.send([item(kind="base_fee", amount=amount, currency=currency)]))
    assert res.outcome == "failed" and why in res.response
    assert proxy.records() == []


def test_correction_is_its_own_invoice_item_referencing_the_original(
        target: StripeTarget, proxy: RecordingProxy) -> None:
    original = item(quantity="1250", amount="2.50")
    fix = item(quantity="-100", amount="-0.20", correction=1, corrects=original.key)
    results = {r.key: r for r in target.send([original, fix])}
    assert results[original.key].outcome == results[fix.key].outcome == "sent"
    by_key = {r.idempotency_key: r for r in proxy.records()}
    assert by_key[original.key].path == METER_EVENTS  # untouched: sent once, as it was
    corr = by_key[fix.key]
    assert fix.key == "ml1:sub-1:1793491200000:1793491200000/usage/api_calls:count:1"
    assert corr.path == INVOICE_ITEMS and corr.form["amount"] == "-20"
    assert corr.form["metadata[meterline_corrects]"] == original.key
    assert corr.form["metadata[meterline_correction]"] == "1"
    assert corr.form["description"].startswith("correction 1 of ")


# -- Stripe's rules ---------------------------------------------------------------------

def test_meter_event_window_35_days_back_5_minutes_ahead(target: StripeTarget,
                                                         proxy: RecordingProxy) -> None:
    # The event's time is the segment's last millisecond, segment_end_ms - 1.
    oldest_ok = item(subscription="old-ok", seg_end_ms=NOW_MS - 35 * DAY_MS + 1)
    too_old = item(subscription="too-old", seg_end_ms=NOW_MS - 35 * DAY_MS)
    latest_ok = item(subscription="ahead-ok", seg_end_ms=NOW_MS + 300_000 + 1)
    too_new = item(subscription="too-new", seg_end_ms=NOW_MS + 300_000 + 2)
    results = {r.key: r for r in target.send([oldest_ok, too_old, latest_ok, too_new])}
    assert results[oldest_ok.key].outcome == "sent"
    assert results[latest_ok.key].outcome == "sent"
    assert results[too_old.key].outcome == "failed"
    assert "more than 35 days" in results[too_old.key].response
    assert results[too_new.key].outcome == "retry"
    assert "5 minutes ahead" in results[too_new.key].response
    sent = {r.identifier: r.form["timestamp"] for r in proxy.records()}
    assert sent == {oldest_ok.key: str((NOW_MS - 35 * DAY_MS) // 1000),
                    latest_ok.key: str((NOW_MS + 300_000) // 1000)}


def test_fractional_quantity_cannot_be_a_meter_event(target: StripeTarget,
                                                     proxy: RecordingProxy) -> None:
    res = one(target.send([item(quantity="10.5")]))
    assert res.outcome == "failed" and "whole number" in res.response
    assert proxy.records() == []


def test_long_key_is_hashed_to_fit_stripes_100_characters(target: StripeTarget,
                                                         proxy: RecordingProxy) -> None:
    it = item(subscription="s" * 90)
    assert len(it.key) > 100
    first = one(target.send([it]))
    again = one(target.send([it]))
    assert first.outcome == again.outcome == "sent"
    expected = "ml1h:" + hashlib.sha256(it.key.encode()).hexdigest()
    assert [r.identifier for r in proxy.records()] == [expected, expected]
    assert [r.idempotency_key for r in proxy.records()] == [expected, expected]
    assert proxy.accepted_count_by_key() == {expected: 1}  # the second was a replay
    assert first.key == again.key == it.key  # the ledger keeps the full key


def test_customers_come_from_the_mapping_or_are_stripe_ids(target: StripeTarget,
                                                          proxy: RecordingProxy) -> None:
    unknown = item(customer="initech")
    direct = item(customer="cus_DirectId", kind="base_fee")
    results = {r.key: r for r in target.send([unknown, direct])}
    assert results[unknown.key].outcome == "failed"
    assert "no Stripe customer for Meterline customer 'initech'" in results[unknown.key].response
    [rec] = proxy.records()
    assert rec.form["customer"] == "cus_DirectId"


def test_meter_events_of_one_customer_and_meter_go_one_at_a_time(
        target: StripeTarget, proxy: RecordingProxy) -> None:
    # Stripe allows one concurrent meter event call per customer per meter.
    same = [item(subscription=f"acme-{i}") for i in range(3)]
    others = [item(subscription=f"g-{i}", customer=f"cus_other{i}") for i in range(3)]
    proxy.fail_next(6, 200, forward=True, delay_s=0.15, path_prefix=METER_EVENTS)
    assert {r.outcome for r in target.send(same + others)} == {"sent"}
    spans = {r.identifier: (r.started_s, r.ended_s) for r in proxy.records()}

    def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] < b[1] and b[0] < a[1]

    acme = [spans[it.key] for it in same]
    assert not any(overlap(a, b) for i, a in enumerate(acme) for b in acme[i + 1:])
    assert any(overlap(spans[it.key], acme[0]) or overlap(spans[it.key], acme[1])
               for it in others)  # ... while other customers' calls ran alongside


# -- outcomes ---------------------------------------------------------------------------

def test_4xx_is_a_permanent_failure_with_stripes_message(target: StripeTarget,
                                                         proxy: RecordingProxy) -> None:
    proxy.fail_next(1, 400, message="No such customer: 'cus_acme'",
                    type_="invalid_request_error", code="resource_missing")
    res = one(target.send([item(kind="base_fee")]))
    assert (res.outcome, res.status) == ("failed", 400)
    assert "No such customer: 'cus_acme'" in res.response


@pytest.mark.parametrize(("status", "expected"), [
    (500, "retry"), (502, "retry"), (503, "retry"), (429, "retry"), (409, "retry"),
    (401, "failed"), (403, "failed"), (404, "failed"),
])
def test_status_classification(target: StripeTarget, proxy: RecordingProxy, status: int,
                               expected: str) -> None:
    proxy.fail_next(1, status, message=f"injected {status}")
    res = one(target.send([item()]))
    assert (res.outcome, res.status) == (expected, status)


def test_5xx_then_recovery_delivers_exactly_once(target: StripeTarget,
                                                 proxy: RecordingProxy) -> None:
    items = [item(subscription=f"sub-{i}") for i in range(6)]
    proxy.fail_next(3, 503)
    first = target.send(items)
    retry = [it for it in items if {r.key: r for r in first}[it.key].outcome == "retry"]
    assert len(retry) == 3
    second = target.send(retry)
    assert {r.outcome for r in second} == {"sent"}
    assert proxy.accepted_count_by_key() == {it.key: 1 for it in items}


def test_lost_answer_timeout_and_dropped_connection_are_retried_without_duplicates(
        proxy: RecordingProxy) -> None:
    with make_target(proxy, timeout_s=0.5) as target:
        lost, slow, dropped = (item(subscription=s, kind="base_fee")
                               for s in ("lost", "slow", "dropped"))
        # Stripe takes it, but the answer never arrives: the dangerous case.
        proxy.fail_next(1, forward=True, drop=True)
        assert one(target.send([lost])).outcome == "retry"
        proxy.fail_next(1, 200, delay_s=1.5)  # answers after the client gave up
        res = one(target.send([slow]))
        assert res.outcome == "retry" and "timeout" in res.response
        proxy.fail_next(1, drop=True)
        assert one(target.send([dropped])).outcome == "retry"
        again = {r.key: r for r in target.send([lost, slow, dropped])}
        assert {r.outcome for r in again.values()} == {"sent"}
        assert "idempotent replay" in again[lost.key].response
        assert proxy.accepted_count_by_key() == {lost.key: 1, slow.key: 1, dropped.key: 1}


def test_same_key_with_different_content_is_a_permanent_failure(
        target: StripeTarget, proxy: RecordingProxy) -> None:
    it = item(kind="base_fee", amount="30.00")
    assert one(target.send([it])).outcome == "sent"
    changed = item(kind="base_fee", amount="31.00")
    assert changed.key == it.key
    res = one(target.send([changed]))
    assert res.outcome == "failed" and "different parameters" in res.response
    assert proxy.accepted_count_by_key() == {it.key: 1}


def test_api_key_never_in_results_logs_or_errors(proxy: RecordingProxy,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with make_target(proxy) as target:
        # Worst case: the server echoes the key back (Stripe itself masks it).
        proxy.fail_next(1, 401, message=f"Invalid API Key provided: {API_KEY}",
                        type_="invalid_request_error")
        proxy.fail_next(1, 503, message=f"upstream said {API_KEY}")
        results = target.send([item(subscription="a")]) + target.send([item(subscription="b")])
        results += target.send([item(subscription="c")])  # a normal success, logged too
        assert [r.outcome for r in results] == ["failed", "retry", "sent"]
        texts = [repr(r) for r in results] + [repr(target), repr(target.config)]
    assert "stripe" in caplog.text.lower()  # the SDK did log its requests and bodies
    assert "[redacted]" in caplog.text  # ... including the echo, redacted
    for text in [caplog.text, *texts]:
        assert API_KEY not in text and "DoNotLeak" not in text
    with pytest.raises(StripeConfigError) as err:
        StripeConfig(api_key="pk_live_DoNotLeak1", customers={"x": "acme"}).check()
    assert "DoNotLeak" not in str(err.value)


def test_config_reports_every_error_at_once() -> None:
    with pytest.raises(StripeConfigError) as err:
        StripeConfig(api_key="", customers={"acme": "acme"}, meters={"api_calls": ""},
                     api_base="ftp://x", timeout_s=0, concurrency=0).check()
    assert len(err.value.errors) == 7, err.value.errors


def test_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "export.toml"
    path.write_text('[stripe]\nconcurrency = 3\n[stripe.customers]\nacme = "cus_1"\n'
                    '[stripe.meters]\n"api_calls:count" = "api_calls"\n')
    config = StripeConfig.from_toml(path, API_KEY)
    assert (config.concurrency, dict(config.customers), dict(config.meters)) == (
        3, {"acme": "cus_1"}, {"api_calls:count": "api_calls"})


# -- reconcile's last hop ---------------------------------------------------------------

def test_received_lists_invoice_items_by_metadata_across_pages(
        target: StripeTarget, proxy: RecordingProxy) -> None:
    a, b, c = (item(kind="base_fee", subscription=s) for s in ("a", "b", "c"))

    def page(keys: list[str], has_more: bool) -> bytes:
        data = [{"id": f"ii_{i}", "object": "invoiceitem", "metadata": {"meterline_key": k}}
                for i, k in enumerate(keys)]
        return json.dumps({"object": "list", "data": data, "has_more": has_more,
                           "url": "/v1/invoiceitems"}).encode()

    proxy.fail_next(1, 200, body=page([a.key, "someone-else"], True), path_prefix=INVOICE_ITEMS)
    proxy.fail_next(1, 200, body=page([b.key], False), path_prefix=INVOICE_ITEMS)
    assert target.received([a.key, b.key, c.key]) == {a.key, b.key}
    listed = [r for r in proxy.records() if r.method == "GET"]
    assert len(listed) == 2 and re.search(r"starting_after=ii_1", listed[1].query)


def test_received_error_names_the_problem_not_the_key(target: StripeTarget,
                                                      proxy: RecordingProxy) -> None:
    proxy.fail_next(1, 401, message=f"Invalid API Key provided: {API_KEY}",
                    type_="invalid_request_error", path_prefix=INVOICE_ITEMS)
    with pytest.raises(RuntimeError, match="listing Stripe invoice items failed") as err:
        target.received([item(kind="base_fee").key])
    assert API_KEY not in str(err.value) and err.value.__cause__ is None


def test_received_cannot_tell_for_meter_events(target: StripeTarget) -> None:
    assert target.received([item().key, item(kind="base_fee").key]) is None


def test_stripe_mock_pin_matches_install_script() -> None:
    script = (Path(__file__).resolve().parents[2] / "tools" / "stripe-mock" / "install.sh")
    assert f'STRIPE_MOCK_VERSION:-{STRIPE_MOCK_VERSION}}}' in script.read_text()


def test_install_script_is_idempotent_and_builds_the_pin() -> None:
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    cached = repo / ".cache" / "bin" / "stripe-mock"
    if not cached.exists() or shutil.which("go") is None:
        pytest.skip("stripe-mock not built here yet (make stripe-mock builds it)")
    done = subprocess.run(["bash", "tools/stripe-mock/install.sh"], cwd=repo,
                          capture_output=True, text=True, timeout=600, check=True)
    assert done.stdout.strip().splitlines()[-1] == str(cached)
    info = subprocess.run(["go", "version", "-m", str(cached)], capture_output=True,
                          text=True, check=True).stdout
    assert re.search(rf"\bmod\s+github\.com/stripe/stripe-mock\s+{STRIPE_MOCK_VERSION}\b",
                     info)


def test_missing_stripe_mock_skips_with_the_reason_but_fails_under_ci(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from meterline.testing.stripe_mock import StripeMockUnavailable

    monkeypatch.setenv("METERLINE_STRIPE_MOCK", str(tmp_path / "nope"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="stripe-mock unavailable"), \
            stripe_mock_or_skip():
        pass
    monkeypatch.setenv("CI", "true")
    with pytest.raises(StripeMockUnavailable), stripe_mock_or_skip():
        pass


def test_no_blind_resend_after_stripes_24_hour_idempotency_window(
        proxy: RecordingProxy, tmp_path: Path) -> None:
    """Stripe forgets an idempotency key 24 h after first seeing it: an invoice item whose
    first attempt got no answer is not sent again a day later (it could be billed twice)."""
    import random

    from meterline.export.engine import EngineSettings, Exporter
    from meterline.export.ledger import ExportLedger, RetryPolicy

    clock = {"ms": NOW_MS}
    long_key = item(kind="base_fee", subscription="s" * 120)  # hashed: ml1h:<sha256>
    items = [item(kind="base_fee"), long_key]
    ledger = ExportLedger(tmp_path / "ledger.db", rng=random.Random(1),
                          policy=RetryPolicy(max_attempts=50))
    with make_target(proxy, now_ms=NOW_MS) as target:
        target._clock_ms = lambda: clock["ms"]
        exporter = Exporter(ledger, target, settings=EngineSettings(10, 1),
                            clock_ms=lambda: clock["ms"], sleep=lambda s: None)
        exporter.enqueue(items)
        # Stripe took both, the answers were lost (a timeout after Stripe committed).
        proxy.fail_next(2, 503, forward=True)
        assert exporter.run().retried == 2
        assert len(proxy.accepted(INVOICE_ITEMS)) == 2
        clock["ms"] = NOW_MS + 25 * 3_600_000  # the next day's run
        report = exporter.run()
    assert (report.held, report.sent) == (2, 0)
    assert len(proxy.records()) == 2  # nothing more went on the wire
    reasons = {e.key: e.last_response for e in ledger.entries("stripe")}
    hashed = "ml1h:" + hashlib.sha256(long_key.key.encode()).hexdigest()
    assert reasons[long_key.key].startswith(
        f"idempotency window passed: check stripe for {hashed} before replaying")
    assert f"check stripe for {items[0].key} " in reasons[items[0].key]
    ledger.close()


def test_the_window_stripe_target_declares_is_inside_24_hours() -> None:
    from meterline.export.stripe_target import IDEMPOTENCY_WINDOW_MS

    assert 0 < IDEMPOTENCY_WINDOW_MS < 24 * 3_600_000
    assert StripeTarget.idempotency_window_ms == IDEMPOTENCY_WINDOW_MS
