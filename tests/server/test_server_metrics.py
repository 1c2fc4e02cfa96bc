"""/metrics of a real `meterline serve` process (embedded pipeline) over loopback: the
requests it answered, their latency histogram and the events it took, counted against what
this test sent; the stages' collectors; no customer or tenant label anywhere."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_proc import ServerProcess, start_server

from meterline.core.envelope import Batch, encode_batch
from meterline.server.metrics import LATENCY_BUCKETS_S

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("METERLINE_METRICS_PORT", "0")  # what --metrics-port 0 sets
        env.delenv("METERLINE_METRICS_ADDR", raising=False)
        srv = start_server(tmp_path_factory.mktemp("serve-metrics"),
                           keys={"a": ("acme", ["ingest", "read"])})
    yield srv
    assert srv.stop() in (0, -15), "".join(srv.output)
    assert "Traceback" not in "".join(srv.output), "".join(srv.output)


def _metrics_url(server: ServerProcess) -> str:
    (line,) = [x for x in server.output if "metrics on " in x]
    return line.split("metrics on ", 1)[1].strip()


def _scrape(server: ServerProcess) -> tuple[str, Samples]:
    r = httpx.get(_metrics_url(server), timeout=30)
    assert r.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return r.text, samples


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _get(after, name, **labels) - _get(before, name, **labels)


def _client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30,
                        headers={"authorization": f"Bearer {server.keys['a']}"})


def _cloudevent(customer: str, i: int, **data: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"{customer}-{i}", "source": "test",
            "type": "api_calls", "subject": customer,
            "data": {"endpoint": "/v1/search", "region": "eu-west"} | data}


def test_metrics_listen_on_loopback_by_default_and_not_on_the_api_port(
        server: ServerProcess) -> None:
    url = urlsplit(_metrics_url(server))
    assert url.hostname == "127.0.0.1" and url.port != urlsplit(server.url).port
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 404  # not on the (possibly public) API port


def test_requests_latency_and_events_count_what_was_sent(server: ServerProcess) -> None:
    customer = f"met-{uuid.uuid4().hex[:8]}"
    _, before = _scrape(server)
    now = time.time_ns() // 1_000_000
    native = encode_batch(Batch(batch_id=uuid.uuid4().hex, created_ms=now,
                                customers=[customer] * 4, meters=["api_calls"] * 4,
                                quantities=[1] * 4, timestamps_ms=[now] * 4))
    sent = {"ce_ok": 7, "ce_bad": 5, "lago": 3, "native": 4}
    with _client(server) as c:
        ok = c.post("/api/v1/events", json=[_cloudevent(customer, i)
                                             for i in range(sent["ce_ok"])],
                    headers={"content-type": "application/cloudevents-batch+json"})
        assert ok.status_code == 204, ok.text
        bad = [_cloudevent(customer, 100 + i) for i in range(sent["ce_bad"])]
        bad[2]["type"] = "no_such_meter"  # one bad event refuses all five
        r = c.post("/api/v1/events", json=bad,
                   headers={"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 400, r.text
        lago = {"events": [{"transaction_id": f"{customer}-l{i}",
                            "external_subscription_id": customer, "code": "api_calls",
                            "properties": {"endpoint": "/v1/search", "region": "eu-west"}}
                           for i in range(sent["lago"])]}
        assert c.post("/api/v1/events/batch", json=lago).status_code == 200
        r = c.post("/api/v1/batches", content=native,
                   headers={"content-type": "application/vnd.meterline.envelope+json"})
        assert r.status_code == 200, r.text
        for _ in range(2):
            assert c.get(f"/api/v1/usage/{customer}/api_calls").status_code == 200
        assert c.get("/no/such/path").status_code == 404
        assert c.get(f"/api/v1/usage/{customer}").status_code == 405  # no such route
        huge = c.post("/api/v1/batches", content=b" " * (9 * 1024 * 1024),
                      headers={"content-type": "application/json"})
        assert huge.status_code == 413  # refused by the adapter, still counted
    assert httpx.get(server.url + "/healthz").status_code == 200
    text, after = _scrape(server)

    def requests(route: str, code: str) -> float:
        return _delta(before, after, "meterline_server_requests_total", route=route, code=code)

    assert requests("/api/v1/events", "2xx") == 1
    assert requests("/api/v1/events", "4xx") == 1
    assert requests("/api/v1/events/batch", "2xx") == 1
    assert requests("/api/v1/batches", "2xx") == 1
    assert requests("/api/v1/batches", "4xx") == 1
    assert requests("/api/v1/usage/{customer}/{meter}", "2xx") == 2
    assert requests("other", "4xx") == 2
    assert requests("/healthz", "2xx") == 1

    def events(fmt: str, outcome: str) -> float:
        return _delta(before, after, "meterline_server_events_total", format=fmt,
                      outcome=outcome)

    assert events("cloudevents", "accepted") == sent["ce_ok"]
    assert events("cloudevents", "rejected") == sent["ce_bad"]
    assert events("lago", "accepted") == sent["lago"]
    assert events("native", "accepted") == sent["native"]
    assert events("native", "rejected") == 0 and events("lago", "rejected") == 0

    # The histogram: one observation per request of the route, cumulative buckets with the
    # documented boundaries, +Inf equal to the count.
    route = "/api/v1/usage/{customer}/{meter}"
    count = _get(after, "meterline_server_request_seconds_count", route=route)
    assert count == _get(after, "meterline_server_requests_total", route=route, code="2xx")
    buckets = [_get(after, "meterline_server_request_seconds_bucket", route=route,
                    le=repr(float(le))) for le in LATENCY_BUCKETS_S]
    assert buckets == sorted(buckets)
    assert _get(after, "meterline_server_request_seconds_bucket", route=route,
                le="+Inf") == count
    assert 0 < _get(after, "meterline_server_request_seconds_sum", route=route) < 60 * count

    # Cardinality: route templates only; no customer, tenant or path text in any label.
    assert customer not in text and "acme" not in text and "/no/such" not in text
    labels = {k for (_, ls) in after for k, _ in ls}
    assert not labels & {"customer", "customer_id", "tenant", "key", "path"}


def test_embedded_stages_export_their_collectors(server: ServerProcess,
                                                 settle: Callable[..., Any]) -> None:
    customer = f"stage-{uuid.uuid4().hex[:8]}"
    _, before = _scrape(server)
    with _client(server) as c:
        r = c.post("/api/v1/events", json=[_cloudevent(customer, i) for i in range(11)],
                   headers={"content-type": "application/cloudevents-batch+json"})
        assert r.status_code == 204, r.text

    def progress() -> tuple[float, float]:
        _, now = _scrape(server)
        return (_delta(before, now, "meterline_loader_rows_total", loader="raw"),
                _delta(before, now, "meterline_rollup_events_total", outcome="accepted"))

    # Only this test writes to the server now: both stages take exactly these 11 events.
    settle(progress, (11.0, 11.0))
    _, after = _scrape(server)
    stages = {dict(ls).get("stage") for (name, ls) in after
              if name == "meterline_consumer_lag_records"}
    assert stages == {"raw", "rollup"}
    tables = {dict(ls)["table"] for (name, ls), v in after.items()
              if name == "meterline_clickhouse_insert_seconds_count" and v > 0}
    assert {"raw_events", "hourly_rollups"} <= tables
    assert _get(after, "meterline_rollup_checkpoint_age_seconds") >= 0


def test_without_a_port_no_metrics_are_served(tmp_path: Any) -> None:
    with pytest.MonkeyPatch.context() as env:  # whatever other tests left in os.environ
        env.delenv("METERLINE_METRICS_PORT", raising=False)
        env.delenv("METERLINE_METRICS_ADDR", raising=False)
        srv = start_server(tmp_path / "plain")
    try:
        assert not [x for x in srv.output if "metrics on " in x]
    finally:
        srv.stop()
