"""A real `meterline serve` process over loopback, driven by the real OpenMeter and Lago
clients and plain HTTP. Ground truth is what each test sent, summed here in Decimal."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable
from decimal import Decimal, localcontext
from typing import Any

import httpx
import pytest
from server_proc import meterline, start_server

from meterline.core.envelope import Batch, encode_batch

pytestmark = pytest.mark.integration

HOUR_MS = 3_600_000
QUOTA = '[[server.quotas]]\nmeter = "llm_tokens"\nlimit = "1000.5"\nperiod = "month"\n'


def _hour_start(ms: int) -> int:
    return ms - ms % HOUR_MS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # One server process for the module keeps the test count and time bounded.
    srv = start_server(tmp_path_factory.mktemp("serve"), QUOTA, keys={
        "a": ("acme", ["ingest", "read"]), "b": ("bravo", ["admin"]),
        "a_read": ("acme", ["read"]), "a_ingest": ("acme", ["ingest"]),
        "revoked": ("acme", ["admin"])})
    yield srv
    # SIGTERM: a graceful stop, after which uvicorn re-raises the signal (-15).
    assert srv.stop() in (0, -15), "".join(srv.output)
    assert "meterline serve: stopped" in "".join(srv.output), "".join(srv.output)
    assert "Traceback" not in "".join(srv.output), "".join(srv.output)


def _client(server: Any, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key}"},
                        timeout=30)


def _usage(server: Any, key: str, customer: str, meter: str, **params: Any) -> dict[str, Any]:
    with _client(server, key) as c:
        r = c.get(f"/api/v1/usage/{_quote(customer)}/{meter}", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _quote(segment: str) -> str:
    from urllib.parse import quote

    return quote(segment, safe="")


def _total(server: Any, key: str, customer: str, meter: str, **params: Any) -> Decimal:
    points = _usage(server, key, customer, meter, **params)["data"]
    with localcontext(prec=100):  # the default 28 digits would round large totals
        return sum((Decimal(p["value"]) for p in points), Decimal(0))


def test_openmeter_client_ingests_and_usage_reads_back_exactly(
        server: Any, settle: Callable[..., Any]) -> None:
    from openmeter import Client
    from openmeter._generated.models import Event

    customer = f"om-{uuid.uuid4().hex[:8]}"
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    values = ["0.1", "7", "12.000000001", "3.5"]
    client = Client(endpoint=server.url, token=server.keys["a"])
    client.events.ingest_event(Event(id="e-0", source="app", specversion="1.0",
                                     type="llm_tokens", subject=customer, time=now,
                                     data={"quantity": values[0], "model": "m1"}))
    client.events.ingest_events([
        Event(id=f"e-{i}", source="app", specversion="1.0", type="llm_tokens",
              subject=customer, time=now, data={"quantity": v, "model": "m1"})
        for i, v in enumerate(values[1:], start=1)])
    # A resend of e-1 (same source and id) counts once; the same id from another source
    # is another event.
    client.events.ingest_events([
        Event(id="e-1", source="app", specversion="1.0", type="llm_tokens",
              subject=customer, time=now, data={"quantity": values[1], "model": "m1"}),
        Event(id="e-1", source="other-app", specversion="1.0", type="llm_tokens",
              subject=customer, time=now, data={"quantity": "100", "model": "m1"})])
    expected = sum(map(Decimal, values)) + 100  # 23.600000001: within 28 digits
    settle(lambda: _total(server, server.keys["a"], customer, "llm_tokens"), expected)
    doc = _usage(server, server.keys["a"], customer, "llm_tokens")
    assert [p["dimensions"] for p in doc["data"]] == [{"model": "m1"}]
    assert doc["data"][0]["events"] == 5
    assert doc["data"][0]["window_start_ms"] == _hour_start(int(now.timestamp()) * 1000)


def test_lago_client_create_and_batch(server: Any, settle: Callable[..., Any]) -> None:
    from lago_python_client.client import Client
    from lago_python_client.models import BatchEvent, Event

    sub = f"sub-{uuid.uuid4().hex[:8]}"
    customer = f"lago-{uuid.uuid4().hex[:8]}"
    client = Client(api_key=server.keys["a"], api_url=server.url)
    ts = int(time.time())
    created = client.events.create(Event(
        transaction_id="tx-1", external_subscription_id=sub, code="api_calls", timestamp=ts,
        properties={"endpoint": "/a", "ignored": 1}))
    assert created is not None and created.transaction_id == "tx-1"
    client.events.batch_create(BatchEvent(events=[
        Event(transaction_id=f"tx-{i}", external_subscription_id=sub, code="api_calls",
              timestamp=ts, properties={"endpoint": "/a"}) for i in range(1, 6)]))
    # tx-1 again (a retry) is a duplicate: 5 distinct transactions in all.
    settle(lambda: _total(server, server.keys["a"], sub, "api_calls"), Decimal(5))
    # external_customer_id (older Lago clients; this one's model has no field for it)
    # names the customer when given.
    with _client(server, server.keys["a"]) as c:
        r = c.post("/api/v1/events", json={"event": {
            "transaction_id": "tx-c", "external_subscription_id": sub,
            "external_customer_id": customer, "code": "compute_seconds",
            "timestamp": ts + 0.5, "properties": {"quantity": 0.25, "tier": "x"}}})
        assert r.status_code == 200, r.text
        assert r.json()["event"]["timestamp"].endswith(".500Z")
    settle(lambda: _total(server, server.keys["a"], customer, "compute_seconds"),
           Decimal("0.25"))


def test_native_envelope_endpoint(server: Any, settle: Callable[..., Any]) -> None:
    customer = f"nat-{uuid.uuid4().hex[:8]}"
    now = time.time_ns() // 1_000_000
    batch = Batch(batch_id=uuid.uuid4().hex, created_ms=now, customers=[customer] * 3,
                  meters=["llm_tokens"] * 3, quantities=[1, 2 * 10**9, 10**30],
                  timestamps_ms=[now] * 3)
    payload = encode_batch(batch)
    with _client(server, server.keys["a"]) as c:
        for _ in range(2):  # a resend of the same envelope counts once
            r = c.post("/api/v1/batches", content=payload,
                       headers={"content-type": "application/vnd.meterline.envelope+json"})
            assert r.status_code == 200, r.text
        bad = c.post("/api/v1/batches", content=b'{"v": 2}',
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "unsupported_version" in bad.json()["detail"]
    settle(lambda: _total(server, server.keys["a"], customer, "llm_tokens"),
           Decimal("1000000000000000000002.000000001"))


def test_every_invalid_event_is_listed_and_nothing_is_written(
        server: Any, settle: Callable[..., Any]) -> None:
    customer = f"bad-{uuid.uuid4().hex[:8]}"
    events = [
        {"specversion": "1.0", "id": "ok", "source": "s", "type": "llm_tokens",
         "subject": customer, "data": {"quantity": 5}},
        {"specversion": "1.0", "id": "1", "source": "s", "type": "unknown", "subject": "c"},
        {"specversion": "1.0", "id": "2", "source": "s", "type": "llm_tokens",
         "subject": customer, "data": {"quantity": "0.0000000001"}},
        "not an object",
        {"specversion": "1.0", "id": "4", "source": "s", "type": "llm_tokens",
         "subject": customer, "data": {"quantity": 1, "model": {"x": 1}}},
        {"specversion": "1.0", "id": "5", "source": "s", "type": "llm_tokens",
         "subject": customer, "time": "yesterday", "data": {"quantity": 1}},
    ]
    with _client(server, server.keys["a"]) as c:
        r = c.post("/api/v1/events", json=events,
                   headers={"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 400
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["status"] == 400 and problem["type"].endswith("invalid-events")
        assert [(e["index"], e["field"]) for e in problem["errors"]] == [
            (1, "meter"), (2, "quantity"), (3, "event"), (4, "dimensions.model"), (5, "time")]
        # The valid first event was not written either (all or nothing): send a marker
        # event and wait for it; the total must be the marker's alone.
        ok = c.post("/api/v1/events", json=events[0] | {"id": "marker"},
                    headers={"content-type": "application/cloudevents+json"})
        assert ok.status_code == 204
    settle(lambda: _total(server, server.keys["a"], customer, "llm_tokens"), Decimal(5))


def test_body_and_media_type_limits(server: Any) -> None:
    with _client(server, server.keys["a"]) as c:
        huge = b"[" + b" " * (9 * 1024 * 1024) + b"]"
        r = c.post("/api/v1/events", content=huge,
                   headers={"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 413 and r.json()["status"] == 413
        r = c.post("/api/v1/events", content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = c.post("/api/v1/events", content=b"{not json",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.headers["content-type"] == "application/problem+json"


def test_keys_are_scoped_to_tenant_and_purpose(server: Any, settle: Callable[..., Any]) -> None:
    customer = f"shared-{uuid.uuid4().hex[:8]}"  # the same customer id in both tenants
    event = {"specversion": "1.0", "source": "s", "type": "llm_tokens", "subject": customer}
    ce = {"content-type": "application/cloudevents+json"}
    with _client(server, server.keys["a"]) as a, _client(server, server.keys["b"]) as b:
        assert a.post("/api/v1/events", json=event | {"id": "x", "data": {"quantity": 3}},
                      headers=ce).status_code == 204
        # Same id, other tenant: a different event (ids are per tenant), not a duplicate.
        assert b.post("/api/v1/events", json=event | {"id": "x", "data": {"quantity": 40}},
                      headers=ce).status_code == 204
    settle(lambda: (_total(server, server.keys["a"], customer, "llm_tokens"),
                    _total(server, server.keys["b"], customer, "llm_tokens")),
           (Decimal(3), Decimal(40)))
    with _client(server, server.keys["a_read"]) as r, \
            _client(server, server.keys["a_ingest"]) as w:
        assert r.post("/api/v1/events", json=event | {"id": "y"}, headers=ce).status_code == 403
        assert w.get(f"/api/v1/usage/{customer}/llm_tokens").status_code == 403
        assert r.get(f"/api/v1/usage/{customer}/llm_tokens").status_code == 200
    # Naming the other tenant's stored id does not reach it: it is just another
    # customer of one's own tenant.
    assert _total(server, server.keys["a"], f"bravo:{customer}", "llm_tokens") == 0
    # Revoking with the CLI while the server runs takes effect on the next request.
    revoked = server.keys["revoked"]
    assert _usage(server, revoked, customer, "llm_tokens")["data"]
    out = meterline("keys", "revoke", revoked.split("_")[1], "--config", str(server.config))
    assert out.returncode == 0, out.stderr
    with _client(server, revoked) as c:
        assert c.get(f"/api/v1/usage/{customer}/llm_tokens").status_code == 401


def test_hostile_customer_ids_and_dimension_values(server: Any,
                                                   settle: Callable[..., Any]) -> None:
    hostile = ["x'); DROP TABLE meterline.hourly_rollups; --", "a/b?c#d%2F..%00",
               "{customer:String}", "naïve\\'\"`", "SELECT 1 FORMAT JSON"]
    values = ["' OR 1=1 --", "}{", "\\", "\"\n\t", "é/%"]
    ce = {"content-type": "application/cloudevents-batch+json"}
    with _client(server, server.keys["a"]) as c:
        r = c.post("/api/v1/events", headers=ce, json=[
            {"specversion": "1.0", "id": f"h{i}", "source": "s", "type": "llm_tokens",
             "subject": cust, "data": {"quantity": i + 1, "model": values[i]}}
            for i, cust in enumerate(hostile)])
        assert r.status_code == 204, r.text
    for i, cust in enumerate(hostile):
        settle(lambda cust=cust: _total(server, server.keys["a"], cust, "llm_tokens"),
               Decimal(i + 1))
        doc = _usage(server, server.keys["a"], cust, "llm_tokens",
                     **{"dimension.model": values[i]})
        assert [(p["dimensions"], p["value"]) for p in doc["data"]] == [
            ({"model": values[i]}, str(i + 1))]
        other = _usage(server, server.keys["a"], cust, "llm_tokens",
                       **{"dimension.model": values[i] + "x"})
        assert other["data"] == []


def test_quota_and_month_granularity(server: Any, settle: Callable[..., Any]) -> None:
    customer = f"q-{uuid.uuid4().hex[:8]}"
    ce = {"content-type": "application/cloudevents+json"}

    def quota() -> dict[str, Any]:
        with _client(server, server.keys["a"]) as c:
            r = c.get(f"/api/v1/quota/{customer}/llm_tokens")
        assert r.status_code == 200, r.text
        return dict(r.json())

    assert quota()["used"] == "0" and quota()["remaining"] == "1000.5"
    with _client(server, server.keys["a"]) as c:
        for i, q in enumerate(["600", "400.25"]):
            assert c.post("/api/v1/events", headers=ce, json={
                "specversion": "1.0", "id": f"q{i}", "source": "s", "type": "llm_tokens",
                "subject": customer, "data": {"quantity": q}}).status_code == 204
            # The cached total is dropped when the rollups write: the quota catches up.
            settle(lambda: quota()["used"], ["600", "1000.25"][i])
        no_quota = c.get(f"/api/v1/quota/{customer}/api_calls")
        assert no_quota.status_code == 404
        unique = c.get(f"/api/v1/usage/{customer}/active_users",
                       params={"granularity": "month"})
        assert unique.status_code == 422
    status = quota()
    assert (status["limit"], status["remaining"], status["exceeded"]) == (
        "1000.5", "0.25", False)
    month = _usage(server, server.keys["a"], customer, "llm_tokens", granularity="month")
    assert [p["value"] for p in month["data"]] == ["1000.25"]
    start = dt.datetime.fromisoformat(month["data"][0]["window_start"])
    assert (start.day, start.hour) == (1, 0)


def test_openapi_document_is_valid(server: Any) -> None:
    from openapi_spec_validator import validate

    r = httpx.get(f"{server.url}/api/v1/openapi.json", timeout=30)
    assert r.status_code == 200
    doc = r.json()
    validate(doc)
    assert {"/api/v1/events", "/api/v1/events/batch", "/api/v1/batches",
            "/api/v1/usage/{customer}/{meter}", "/api/v1/quota/{customer}/{meter}"} <= set(
                doc["paths"])


def test_unknown_or_missing_key_is_401(server: Any) -> None:
    r = httpx.get(f"{server.url}/api/v1/usage/c/llm_tokens", timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    fake = server.keys["a"][:-4] + "AAAA"
    r = httpx.get(f"{server.url}/api/v1/usage/c/llm_tokens", timeout=30,
                  headers={"authorization": f"Bearer {fake}"})
    assert r.status_code == 401


def test_the_embedded_pipeline_runs_the_anomaly_detectors(
        server: Any, settle: Callable[..., Any]) -> None:
    """`serve` runs the same detectors as `rollup-local` (on by default), checkpointed with
    the rollups: their state appears in the rollup checkpoint store once rows flowed."""
    import sqlite3

    customer = f"anom-{uuid.uuid4().hex[:8]}"
    with _client(server, server.keys["a"]) as c:
        r = c.post("/api/v1/events", json={"event": {
            "transaction_id": "an-1", "external_subscription_id": customer,
            "code": "api_calls", "timestamp": int(time.time()), "properties": {}}})
        assert r.status_code == 200, r.text
    settle(lambda: _total(server, server.keys["a"], customer, "api_calls"), Decimal(1))
    store = server.config.parent / "local-log.rollup-checkpoints.db"

    def detector_keys() -> bool:
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        try:
            return bool(db.execute("SELECT count() FROM checkpoints "
                                   "WHERE key LIKE 'rollups.anomalies/%'").fetchone()[0])
        finally:
            db.close()

    settle(detector_keys, True)
