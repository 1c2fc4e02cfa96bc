"""The anomaly stage's alert rules (dashboards/anomaly_alerts.yml): valid and passing their
promtool unit tests, each fired by one, documented with a runbook in docs/anomalies.md, low
cardinality, reading only metrics the stage really exports, and loaded by the example
Prometheus config."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from meterline.aggregators.anomaly_metrics import AnomalyCollector
from meterline.aggregators.anomaly_stage import AnomalyWorker, MemoryEventWriter
from meterline.aggregators.checkpoints import MemoryCheckpointStore
from meterline.alerts.webhook import MemoryDeadLetters, WebhookSender, WebhookSettings
from meterline.core.anomaly import AnomalySettings
from meterline.core.anomaly.feed import FeedSettings
from meterline.grafana import DASHBOARDS_DIR
from meterline.testing.prometheus import find_tools

DOCS = (Path(__file__).resolve().parents[2] / "docs" / "anomalies.md").read_text()


def _rules() -> list[dict]:
    doc = yaml.safe_load((DASHBOARDS_DIR / "anomaly_alerts.yml").read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"]]


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    tools = find_tools()
    if tools.missing:
        pytest.skip(tools.missing)
    assert tools.promtool is not None
    for args, expect in ((["check", "rules", "anomaly_alerts.yml"], "SUCCESS: 3 rules found"),
                         (["test", "rules", "anomaly_alerts.test.yml"], "SUCCESS")):
        out = subprocess.run([tools.promtool, *args], capture_output=True, text=True,
                             timeout=120, cwd=DASHBOARDS_DIR)
        assert out.returncode == 0 and expect in out.stdout + out.stderr, out.stdout + out.stderr
    config = yaml.safe_load((DASHBOARDS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    assert "anomaly_alerts.yml" in config["rule_files"]


def test_every_anomaly_alert_is_fired_by_a_unit_test_and_documented() -> None:
    tests = yaml.safe_load((DASHBOARDS_DIR / "anomaly_alerts.test.yml").read_text(
        encoding="utf-8"))
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]
             if case["exp_alerts"]}
    for rule in _rules():
        assert rule["alert"] in fired
        assert rule["annotations"]["runbook"] == f"docs/anomalies.md#{rule['alert'].lower()}"
        assert f"### {rule['alert']}" in DOCS
        assert "customer" not in rule["expr"]
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_rules_read_only_metrics_the_stage_exports() -> None:
    worker = AnomalyWorker(AnomalySettings(), FeedSettings(), MemoryEventWriter(),
                           MemoryCheckpointStore(), group="g")
    sender = WebhookSender(WebhookSettings(url="http://127.0.0.1:9/", secret="x" * 16),
                           dead_letters=MemoryDeadLetters())
    try:
        families = list(AnomalyCollector(worker, sender).collect())
    finally:
        sender.close()
    exported = set()
    for family in families:
        exported.add(family.name)
        if family.type == "counter":
            exported.add(family.name + "_total")
    for rule in _rules():
        used = set(re.findall(r"meterline_[a-z_]+", rule["expr"]))
        assert used <= exported, (rule["alert"], used - exported)
