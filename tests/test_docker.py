"""Dockerfile and docker-compose.yml describe a stack that can start (issue 11).

No image can be pulled or built here, so: `docker compose config` validates the file where
Docker Compose exists (skipped, with the reason, where it does not), and the rest is
checked against the code itself - every container command is parsed by the real
`meterline` argument parser, the Prometheus targets match the metrics ports, the server's
port is the published one, the init steps gate the pipeline, and the image copies every
package pyproject.toml installs.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from meterline import cli

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def _dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments (exec-form JSON arrays as lists); later ones win."""
    import json

    out: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        value = json.loads(rest) if rest.startswith("[") else rest.split()
        if word.upper() == "COPY":
            out.setdefault("COPY", []).extend(value[:-1])
        else:
            out[word.upper()] = value
    return out


def _meterline_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _compose()["services"].items() if "build" in s}


def _parse(argv: list[str], monkeypatch: Any) -> argparse.Namespace:
    """``argv`` (after ``meterline``) through the CLI's own parser; nothing runs."""
    seen: list[argparse.Namespace] = []

    def capture(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(cli, "_dispatch", capture)
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse refused it
        raise AssertionError(f"meterline {' '.join(argv)}: rejected (exit {exc.code})") from None
    assert code == 0 and len(seen) == 1, argv
    return seen[0]


@functools.cache
def _compose_command() -> tuple[str, ...]:
    """``docker compose`` (the v2 plugin) or ``docker-compose`` (v1, Debian's package that
    tools/docker-compose/install.sh installs), whichever answers ``version``. Neither
    needs a daemon to validate a file. Skips, with the reason, when neither works."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True,
                               timeout=60)
        if probe.returncode == 0:
            return tuple(command)
    pytest.skip("neither `docker compose` nor `docker-compose` works here: run "
                "tools/docker-compose/install.sh (make test does); the structure is "
                "checked by the other tests of this file")


def _config(path: Path) -> subprocess.CompletedProcess[str]:
    # The repository is the project directory wherever the file lies: `build: .` and the
    # dashboards' bind mounts resolve as they would for the real file.
    return subprocess.run([*_compose_command(), "-f", str(path), "--project-directory",
                           str(REPO), "config", "--quiet"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_docker_compose_config_validates() -> None:
    out = _config(COMPOSE)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("old, new", [
    # an init-step condition Compose does not know
    ("condition: service_completed_successfully", "condition: service_finished"),
    # a dependency on a service that does not exist
    ("    depends_on: *after-init", "    depends_on: [no-such-service]"),
])
def test_docker_compose_config_refuses_a_broken_file(tmp_path: Path, old: str,
                                                     new: str) -> None:
    # Without this the test above could pass on a validator that checks nothing.
    text = COMPOSE.read_text(encoding="utf-8")
    assert old in text, old
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new), encoding="utf-8")
    out = _config(broken)
    assert out.returncode != 0, f"{new!r} was accepted"


def test_docker_compose_install_script_is_idempotent_when_installed() -> None:
    command = _compose_command()
    script = REPO / "tools" / "docker-compose" / "install.sh"
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == " ".join(command), out.stderr


def test_every_container_command_is_a_real_cli_command(monkeypatch: Any) -> None:
    docker = _dockerfile()
    assert docker["ENTRYPOINT"] == ["meterline"]
    image_default = _parse(docker["CMD"], monkeypatch)
    assert image_default.command == "serve" and image_default.host == "0.0.0.0"
    assert [str(image_default.port)] == docker["EXPOSE"]
    commands = {}
    for name, service in _meterline_services().items():
        assert service["build"] == ".", name  # the Dockerfile's image
        commands[name] = _parse(list(service["command"]), monkeypatch)
    assert {n: a.command for n, a in commands.items()} == {
        "migrate": "migrate", "topics": "topics", "worker": "worker", "load-raw": "load-raw",
        "load-rollups": "load-rollups", "anomalies": "anomalies",
        "anomalies-load": "anomalies", "serve": "serve"}
    assert commands["topics"].topics_command == "create"
    assert commands["anomalies-load"].load is True
    serve = commands["serve"]
    assert serve.kafka and serve.host == "0.0.0.0"
    assert f"{serve.port}:{serve.port}" in _meterline_services()["serve"]["ports"]


def test_init_steps_gate_the_pipeline() -> None:
    services = _meterline_services()
    compose = _compose()["services"]
    assert services["migrate"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("worker", "load-raw", "load-rollups", "anomalies", "anomalies-load", "serve"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["topics"]["condition"] == "service_completed_successfully", name
    for step in ("migrate", "topics"):
        assert services[step]["restart"] == "no"  # an init step that fails stays failed
    # Every process reaches Kafka and ClickHouse by the names compose gives them.
    env = services["serve"]["environment"]
    assert env["METERLINE_KAFKA_BOOTSTRAP"].split(":")[0] in compose
    assert re.match(r"https?://[^@]*@?clickhouse:8123/", env["METERLINE_CLICKHOUSE_URL"])
    config_py = (REPO / "meterline" / "config.py").read_text(encoding="utf-8")
    for var in env:
        assert var in config_py, f"{var} is not an environment variable Meterline reads"


def test_prometheus_targets_are_the_services_metrics_ports(monkeypatch: Any) -> None:
    prom = yaml.safe_load((REPO / "dashboards" / "prometheus.yml").read_text(encoding="utf-8"))
    services = _meterline_services()
    targets = [t for job in prom["scrape_configs"] for c in job["static_configs"]
               for t in c["targets"]]
    for target in targets:
        host, port = target.rsplit(":", 1)
        if host == "app":  # the application instrumented with the SDK: not in this stack
            continue
        assert host in services, f"prometheus scrapes {target}: no such service"
        args = _parse(list(services[host]["command"]), monkeypatch)
        assert (args.metrics_port, args.metrics_addr) == (int(port), "0.0.0.0"), target
    mounted = {v.split(":")[1] for v in _compose()["services"]["prometheus"]["volumes"]}
    for rule_file in prom["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounted, rule_file


def test_image_copies_every_installed_package() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {c.rstrip("/").removeprefix("./") for c in _dockerfile()["COPY"]}
    assert package_dirs <= copied, package_dirs - copied
    assert {"pyproject.toml", "README.md"} <= copied  # the build reads both
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert not package_dirs & set(ignored)
