"""Alert rules through promtool, and every pipeline panel through a real Prometheus.

Prometheus and promtool come from Debian (tools/prometheus/install.sh, run by `make test`).
The live test starts Meterline's components in this process - an SDK emitter, the embedded
rollup runner (RollupWorker + StorageWriter on chDB), the raw-events loader, an anomaly
stage (AnomalyWorker over synthetic rollup records, with a webhook to a loopback receiver)
and the HTTP server's app (ServerApp over the same local log, driven request by request) -
serves their /metrics on loopback the way the commands do, lets a real Prometheus scrape them
every second and checks that each panel's PromQL returns data and each alert rule
evaluates cleanly.
"""

from __future__ import annotations

import asyncio
import http.server
import math
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from meterline.grafana import DASHBOARDS_DIR, load_dashboard, targets
from meterline.testing.prometheus import PrometheusServer, Tools, find_tools

pytestmark = pytest.mark.timeout(300)

ALERTS = DASHBOARDS_DIR / "alerts.yml"
ANOMALY_ALERTS = DASHBOARDS_DIR / "anomaly_alerts.yml"
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for a 1 s scrape: at least 4 scrapes


@pytest.fixture(scope="module")
def tools() -> Tools:
    found = find_tools()
    if found.missing:
        pytest.skip(found.missing)
    return found


def _promtool(tools: Tools, *args: str, cwd: Path = DASHBOARDS_DIR) -> str:
    assert tools.promtool is not None
    out = subprocess.run([tools.promtool, *args], capture_output=True, text=True, timeout=120,
                         cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_alert_rules_pass_promtool_check(tools: Tools) -> None:
    out = _promtool(tools, "check", "rules", str(ALERTS))
    assert "SUCCESS: 7 rules found" in out


def test_alert_rules_pass_their_unit_tests(tools: Tools) -> None:
    out = _promtool(tools, "test", "rules", "alerts.test.yml")
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"][0]["rules"]
    tests = yaml.safe_load((DASHBOARDS_DIR / "alerts.test.yml").read_text(encoding="utf-8"))
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]
             if case["exp_alerts"]}
    assert fired == {r["alert"] for r in rules}


def test_example_prometheus_config_is_valid(tools: Tools) -> None:
    _promtool(tools, "check", "config", "prometheus.yml")


# --------------------------------------------------------------------------- live Prometheus


class Pipeline:
    """Meterline's components in this process, with their /metrics on loopback."""

    def __init__(self, workdir: Path, storage: Any) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from meterline.aggregators.checkpoints import MemoryCheckpointStore
        from meterline.aggregators.embedded import EmbeddedRollups
        from meterline.aggregators.metrics import serve_metrics
        from meterline.aggregators.outputs_io import StorageWriter
        from meterline.config import AppConfig
        from meterline.ingest.local_log import LocalLog, LocalLogTransport
        from meterline.ingest.metrics import (
            LagCollector,
            LoaderCollector,
            LocalLogLag,
            MetricsEndpoint,
            serve,
        )
        from meterline.ingest.raw_loader import RawEventLoader
        from meterline.ingest.sources import LocalLogRecordSource
        from meterline.sdk import Emitter, EmitterConfig, register_metrics

        registry = AppConfig().registry()
        self.log = LocalLog(workdir / "log.db", partitions=2)
        self.emitter = Emitter(EmitterConfig(topic="local", spool_dir=workdir / "spool",
                                             bootstrap_servers=None, linger_ms=20),
                               registry=registry, transport=LocalLogTransport(self.log))
        self.log.append(0, [b"not an envelope"])  # a dead letter for both stages
        self.runner = EmbeddedRollups(self.log, StorageWriter(storage), MemoryCheckpointStore(),
                                      registry, flush_interval_s=0.2,
                                      checkpoint_interval_s=0.5)
        self.runner.start()
        self.loader = RawEventLoader(storage, LocalLogRecordSource(self.log, "raw-events"),
                                     registry, max_records=8)
        self.servers: list[Any] = []
        self.ports: dict[str, int] = {}

        app = CollectorRegistry()  # an application exports the SDK's counters itself
        register_metrics(self.emitter, name="app", registry=app)
        self._keep(start_http_server(0, "127.0.0.1", registry=app), "app")
        self._keep(serve_metrics(self.runner.worker, 0, "127.0.0.1",
                                 registry=CollectorRegistry()), "worker")
        self._keep(serve([LoaderCollector("raw", self.loader.metric_totals),
                          LagCollector([LocalLogLag(self.log, "raw-events", stage="raw")])],
                         MetricsEndpoint("127.0.0.1", 0), registry=CollectorRegistry()),
                   "loader")
        self._start_anomalies(workdir)
        self._start_server(workdir)
        self._n = 0

    def _start_anomalies(self, workdir: Path) -> None:
        """An anomaly stage over synthetic rollup records whose last hours spike, so
        episodes are open; its webhook posts to a loopback receiver."""
        import orjson

        from meterline.aggregators.anomaly_metrics import AnomalyCollector
        from meterline.aggregators.anomaly_stage import AnomalyWorker, MemoryEventWriter
        from meterline.aggregators.checkpoints import MemoryCheckpointStore
        from meterline.aggregators.runner import TopicPartition
        from meterline.alerts.webhook import MemoryDeadLetters, WebhookSender, WebhookSettings
        from meterline.anomaly_demo import rollup_rows, synthetic_usage
        from meterline.core.anomaly import AnomalySettings
        from meterline.core.anomaly.feed import FeedSettings
        from meterline.ingest.metrics import MetricsEndpoint, serve
        from meterline.ingest.sources import SourceRecord

        class Receiver(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
        threading.Thread(target=self.receiver.serve_forever, daemon=True).start()
        self.sender = WebhookSender(
            WebhookSettings(url=f"http://127.0.0.1:{self.receiver.server_port}/",
                            secret="s" * 16), dead_letters=MemoryDeadLetters())
        usage = synthetic_usage(3, 15, 5)
        for key in usage:  # the last 6 hours at 25x: episodes that are still open
            values = usage[key]
            values[-6:] = [v * 25 + 1000 for v in values[-6:]]
        self.anomaly_tp = TopicPartition("usage.rollups", 0)
        self.anomaly_records = [
            SourceRecord(self.anomaly_tp.topic, 0, i,
                         orjson.dumps({"rollups": [r.to_dict() for r in record]}))
            for i, record in enumerate(rollup_rows(usage, partitions=1))]
        self.anomalies = AnomalyWorker(AnomalySettings(min_abs_deviation=20), FeedSettings(),
                                       MemoryEventWriter(), MemoryCheckpointStore(), group="g",
                                       on_written=self.sender.submit)
        self.anomalies.assign([self.anomaly_tp])
        self._anomaly_next = 0
        self._keep(serve([AnomalyCollector(self.anomalies, self.sender)],
                         MetricsEndpoint("127.0.0.1", 0), registry=CollectorRegistry()),
                   "anomalies")

    def _start_server(self, workdir: Path) -> None:
        """`meterline serve`'s app over the same local log, with its metrics collector."""
        from meterline.config import AppConfig
        from meterline.ingest.metrics import MetricsEndpoint, serve
        from meterline.server.app import ServerApp
        from meterline.server.keys import KeyStore
        from meterline.server.metrics import ServerMetrics
        from meterline.server.writers import LocalLogWriter

        self.keys = KeyStore(workdir / "keys.db")
        self.key, _ = self.keys.create("acme", ["ingest"])
        self.server_writer = LocalLogWriter(self.log)
        self.server_metrics = ServerMetrics()
        self.server = ServerApp(registry=AppConfig().registry(), keys=self.keys,
                                writer=self.server_writer, reader=None, quotas=None,
                                openapi={}, metrics=self.server_metrics)
        self._keep(serve([self.server_metrics], MetricsEndpoint("127.0.0.1", 0),
                         registry=CollectorRegistry()), "server")

    def _requests(self) -> None:
        """A valid and an invalid CloudEvents batch and a health check, through the app."""
        import orjson

        from meterline.server.app import Request

        def events(valid: bool) -> bytes:
            self._n += 1
            return orjson.dumps([{"specversion": "1.0", "id": f"srv-{self._n}-{i}",
                                  "source": "t", "subject": "cust-srv",
                                  "type": "api_calls" if valid or i else "no_such_meter",
                                  "data": {"endpoint": "/v1/search", "region": "eu-west"}}
                                 for i in range(3)])

        headers = {"authorization": f"Bearer {self.key}",
                   "content-type": "application/cloudevents-batch+json"}

        async def run() -> list[int]:
            return [(await self.server.handle(r)).status for r in (
                Request("POST", b"/api/v1/events", b"", headers, events(True)),
                Request("POST", b"/api/v1/events", b"", headers, events(False)),
                Request("GET", b"/healthz", b"", {}))]

        assert asyncio.run(run()) == [204, 400, 200]

    def _anomaly_step(self, records: int = 60) -> None:
        chunk = self.anomaly_records[self._anomaly_next:self._anomaly_next + records]
        for record in chunk:
            assert self.anomalies.process(record) is None
        self._anomaly_next += len(chunk)
        self.anomalies.flush(checkpoint=True)

    def _keep(self, served: tuple[Any, Any], job: str) -> None:
        self.servers.append(served[0])
        self.ports[job] = served[0].server_port

    def step(self, events: int = 40) -> None:
        """Some usage, then each stage does a bit of work (so rates and histograms move)."""
        for _ in range(events):
            self._n += 1
            self.emitter.emit(f"cust-{self._n % 7}", "api_calls", 1,
                              dimensions={"endpoint": "/v1/search", "region": "eu-west"})
        self.emitter.emit("cust-1", "llm_tokens", 100 + self._n, dimensions={"model": "small"})
        assert self.emitter.flush(10)
        for _ in range(4):
            if not self.runner.step().records:
                break
        self.runner.checkpoint()
        self.loader.run_once(timeout_s=0)  # one poll: some lag stays for the lag panel
        self._anomaly_step()
        self._requests()

    def close(self) -> None:
        for server in [*self.servers, self.receiver]:
            server.shutdown()
            server.server_close()
        self.sender.close()
        self.server_writer.close()
        self.keys.close()
        self.emitter.close(timeout=10)
        self.log.close()


@pytest.fixture
def pipeline(tmp_path: Path, migrated_storage: Any) -> Iterator[Pipeline]:
    running = Pipeline(tmp_path, migrated_storage)
    try:
        yield running
    finally:
        running.close()


def _panel_queries() -> list[tuple[str, str]]:
    return [(f"{t.panel_title} [{t.ref_id}]",
             str(t.target["expr"]).replace("$__rate_interval", RATE_INTERVAL))
            for t in targets(load_dashboard("pipeline"))]


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(r["value"][1])) for r in result)


def test_every_pipeline_panel_returns_data_from_a_real_prometheus(
        tools: Tools, pipeline: Pipeline, tmp_path: Path) -> None:
    assert tools.prometheus is not None
    scrape = {job: [f"127.0.0.1:{port}"] for job, port in pipeline.ports.items()}
    queries = _panel_queries()
    assert len(queries) >= 15
    with PrometheusServer(tools.prometheus, scrape, rule_files=[ALERTS, ANOMALY_ALERTS],
                          workdir=tmp_path / "prometheus") as prom:
        deadline = time.monotonic() + 90
        missing = [name for name, _ in queries]
        while time.monotonic() < deadline:
            pipeline.step()
            missing = [name for name, expr in queries if not _has_data(prom.query(expr))]
            if not missing:
                break
            time.sleep(0.5)
        assert not missing, f"no data for {missing}; prometheus log:\n{prom.log_tail()}"

        targets_up = {r["metric"]["job"]: r["value"][1] for r in prom.query("up")}
        assert targets_up == {"app": "1", "worker": "1", "loader": "1", "anomalies": "1",
                              "server": "1"}
        # The anomaly stage really had open episodes and really delivered its webhooks.
        assert pipeline.anomalies.open_totals()
        assert pipeline.sender.flush(30) and pipeline.sender.counters.delivered > 0

        # The lag panel sees both consumers of the log, labelled by stage.
        stages = {r["metric"]["stage"] for r in prom.query("meterline_consumer_lag_records")}
        assert stages == {"rollup", "raw"}
        tables = {r["metric"]["table"] for r in
                  prom.query("meterline_clickhouse_insert_seconds_count > 0")}
        assert {"raw_events", "hourly_rollups", "daily_rollups", "dead_letters"} <= tables

        # Every metric an alert rule reads is exported, under the labels it groups by.
        names = set(prom.api("label/__name__/values"))
        rules_text = ALERTS.read_text(encoding="utf-8") + ANOMALY_ALERTS.read_text("utf-8")
        for metric in set(re.findall(r"\bmeterline_\w+", rules_text)):
            assert metric in names, metric
        # No metric carries a per-customer (or per-tenant) label.
        assert not {"customer", "customer_id", "tenant"} & set(prom.api("labels"))

        # The rules load and evaluate without errors against the real series.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            groups = prom.api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if rules and all(r.get("lastEvaluation", "").startswith("2") and
                             not r["lastEvaluation"].startswith("0001") for r in rules):
                break
            time.sleep(0.5)
        assert len(rules) == 10
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                         for r in rules]
