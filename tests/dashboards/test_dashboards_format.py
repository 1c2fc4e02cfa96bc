"""The dashboard JSON, provisioning files and docs agree with Grafana, the plugins and each
other (no Grafana needed: the panels' queries are run in the other test_dashboards_* files)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from meterline.grafana import (
    CLICKHOUSE_PLUGIN,
    DASHBOARDS_DIR,
    annotation_targets,
    load_dashboard,
    targets,
)

REPO = DASHBOARDS_DIR.parent
DOCS = (REPO / "docs" / "dashboards.md").read_text(encoding="utf-8")
DASHBOARDS = {"consumption": CLICKHOUSE_PLUGIN, "pipeline": "prometheus"}
# Grafana's global variables and the ClickHouse plugin's macros.
GRAFANA_NAMES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
                 "__from", "__to"}
PLUGIN_MACROS = {"timeFilter", "timeFilter_ms", "fromTime", "toTime", "fromTime_ms",
                 "toTime_ms", "dateFilter", "dateTimeFilter", "dt", "timeInterval",
                 "timeInterval_ms", "interval_s", "conditionalAll"}
REFERENCE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out += _panels(panel.get("panels", []))
    return out


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_is_importable_json(name: str) -> None:
    doc = json.loads((DASHBOARDS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    assert doc["uid"] == f"meterline-{name}" and doc["title"].startswith("Meterline")
    assert doc["id"] is None, "no instance id: importable into any Grafana"
    assert isinstance(doc["schemaVersion"], int) and doc["time"]["from"].startswith("now-")
    panels = _panels(doc["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        assert {"type", "title", "gridPos"} <= set(panel), panel.get("title")
        assert panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel.get("description"), f"{panel['title']}: say what it answers"
            assert panel["targets"], panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


def test_clickhouse_targets_follow_the_plugin_format() -> None:
    doc = load_dashboard("consumption")
    found = [*targets(doc), *annotation_targets(doc)]
    assert len(found) >= 12
    for t in found:
        target = t.target
        assert target["datasource"] == {"type": CLICKHOUSE_PLUGIN, "uid": "${datasource}"}
        assert target["editorType"] == "sql"
        assert isinstance(target["rawSql"], str) and target["rawSql"].strip()
        # sqlutil's FormatQueryOption: 0 time series, 1 table; the plugin's queryType.
        if t.panel_type == "timeseries":
            assert (target["queryType"], target["format"]) == ("timeseries", 0), t.panel_title
            assert re.search(r"\bAS time\b", target["rawSql"]), "a time column for Grafana"
        else:
            assert (target["queryType"], target["format"]) == ("table", 1), t.panel_title


def test_prometheus_targets_follow_the_datasource_format() -> None:
    found = list(targets(load_dashboard("pipeline")))
    assert len(found) >= 13
    for t in found:
        assert t.target["datasource"] == {"type": "prometheus", "uid": "${prometheus}"}
        assert isinstance(t.target["expr"], str) and "meterline_" in t.target["expr"]
        assert "customer" not in t.target["expr"]


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_variable_a_panel_uses_is_defined(name: str) -> None:
    doc = load_dashboard(name)
    defined = {v["name"] for v in doc["templating"]["list"]}
    texts = [p.get("title", "") for p in _panels(doc["panels"])]
    texts += [str(t.target.get("rawSql") or t.target.get("expr"))
              for t in [*targets(doc), *annotation_targets(doc)]]
    texts += [str(v.get("query", "")) for v in doc["templating"]["list"] if v["type"] == "query"]
    for text in texts:
        for match in REFERENCE.finditer(text):
            ref = next(g for g in match.groups() if g)
            if ref.startswith("__"):
                assert ref in GRAFANA_NAMES or ref[2:] in PLUGIN_MACROS, (ref, text)
            else:
                assert ref in defined, (ref, text)
    datasource = {v["name"]: v for v in doc["templating"]["list"] if v["type"] == "datasource"}
    assert len(datasource) == 1
    (var,) = datasource.values()
    assert var["query"] == DASHBOARDS[name]


def test_consumption_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard("consumption")["templating"]["list"]}
    assert {"customer", "meter", "interval", "database"} <= set(variables)
    assert variables["meter"]["multi"] and variables["meter"]["includeAll"]
    assert variables["customer"]["includeAll"]
    assert variables["interval"]["query"] == "hourly,daily"
    for name in ("customer", "meter"):
        assert variables[name]["datasource"]["type"] == CLICKHOUSE_PLUGIN
        assert variables[name]["query"] == variables[name]["definition"]


def test_anomaly_annotation() -> None:
    """Grafana draws an annotation query's rows by the column names time, timeEnd (a
    region), text and tags; the annotation sits on the dashboard's ClickHouse datasource
    and is on by default."""
    doc = load_dashboard("consumption")
    (annotation,) = [a for a in doc["annotations"]["list"] if a["name"] == "Anomalies"]
    assert annotation["enable"] and not annotation["hide"] and annotation["iconColor"]
    assert annotation["datasource"] == {"type": CLICKHOUSE_PLUGIN, "uid": "${datasource}"}
    (target,) = list(annotation_targets(doc))
    sql = str(target.target["rawSql"])
    for column in ("time", "timeEnd", "text", "tags"):
        assert re.search(rf"\bAS {column}\b", sql), column
    assert "$customer" in sql and "$meter" in sql and "$__toTime" in sql
    assert f"| {annotation['name']} (annotation) |" in DOCS


def test_backend_macro_arguments_are_plain_names() -> None:
    """Older plugin versions split macro arguments at every comma and stop at the first
    ')': plain column names and aliases work in all of them."""
    doc = load_dashboard("consumption")
    for t in [*targets(doc), *annotation_targets(doc)]:
        sql = str(t.target["rawSql"])
        for macro, arg in re.findall(r"\$__(\w+)\(([^)]*)\)", sql):
            if macro != "conditionalAll":  # expanded by the plugin's frontend, by brackets
                assert re.fullmatch(r"\w+", arg), (t.panel_title, macro, arg)


def test_provisioning_files() -> None:
    root = DASHBOARDS_DIR / "provisioning"
    (ds_file,) = sorted((root / "datasources").glob("*.yaml"))
    ds = yaml.safe_load(ds_file.read_text(encoding="utf-8"))
    assert ds["apiVersion"] == 1
    by_type = {d["type"]: d for d in ds["datasources"]}
    assert set(by_type) == {CLICKHOUSE_PLUGIN, "prometheus"}
    ch = by_type[CLICKHOUSE_PLUGIN]
    assert {"host", "port", "protocol", "username", "defaultDatabase"} <= set(ch["jsonData"])
    assert isinstance(ch["jsonData"]["port"], int)
    assert "password" in ch["secureJsonData"]
    assert by_type["prometheus"]["url"]
    # The dashboards' data source variables default to the provisioned data sources.
    for name, kind in DASHBOARDS.items():
        (var,) = [v for v in load_dashboard(name)["templating"]["list"]
                  if v["type"] == "datasource"]
        assert var["current"]["value"] == by_type[kind]["uid"]
        assert var["current"]["text"] == by_type[kind]["name"]
    (db_file,) = sorted((root / "dashboards").glob("*.yaml"))
    providers = yaml.safe_load(db_file.read_text(encoding="utf-8"))
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./dashboards:{provider['options']['path']}:ro" in mounts
    assert "./dashboards/provisioning/datasources:/etc/grafana/provisioning/datasources:ro" \
        in mounts


def test_docs_cover_every_panel_and_alert() -> None:
    for name in DASHBOARDS:
        for panel in _panels(load_dashboard(name)["panels"]):
            if panel["type"] != "row":
                assert f"| {panel['title']} |" in DOCS, panel["title"]
    rules = yaml.safe_load((DASHBOARDS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    for rule in rules["groups"][0]["rules"]:
        assert f"### {rule['alert']}" in DOCS, rule["alert"]
        assert rule["annotations"]["runbook"] == f"docs/dashboards.md#{rule['alert'].lower()}"
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_install_script_is_idempotent_when_installed(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.skip("prometheus is not installed here (the script would install it)")
    out = subprocess.run(["bash", str(REPO / "tools" / "prometheus" / "install.sh")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == shutil.which("prometheus")
