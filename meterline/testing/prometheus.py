"""A real Prometheus (and promtool) for tests: scrapes loopback targets, answers PromQL.

The binaries come from Debian's ``prometheus`` package (``tools/prometheus/install.sh``,
run by ``make test``). :func:`find_tools` says why they are missing, so tests can skip with
that reason. The server listens on a free loopback port, keeps its data in a temporary
directory, is started in its own process group and killed when stopped or when the test
process dies.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterline.testing.kafka import _kill_group, _pdeathsig_preexec, free_ports

__all__ = ["PrometheusServer", "Tools", "find_tools"]

INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "prometheus" / "install.sh"


@dataclass(frozen=True)
class Tools:
    prometheus: str | None
    promtool: str | None
    missing: str  # why they are not usable ("" when both are)


def find_tools(install: bool = True, timeout_s: float = 600) -> Tools:
    """prometheus and promtool on PATH; with ``install``, run the idempotent install script
    first when one is missing (``make test`` has usually run it already)."""
    if install and not (shutil.which("prometheus") and shutil.which("promtool")) \
            and INSTALL_SCRIPT.is_file():
        proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                              timeout=timeout_s)
        note = proc.stderr.strip()
    else:
        note = ""
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    missing = "" if prometheus and promtool else (
        "prometheus/promtool not installed and not installable here"
        + (f" ({note})" if note else "") + f"; see {INSTALL_SCRIPT}")
    return Tools(prometheus, promtool, missing)


class PrometheusServer:
    """``prometheus`` scraping ``targets`` ({job: ["127.0.0.1:port", ...]}) every
    ``scrape_interval_s``, with ``rule_files`` loaded."""

    def __init__(self, binary: str, targets: Mapping[str, Sequence[str]], *,
                 rule_files: Sequence[Path] = (), scrape_interval_s: int = 1,
                 workdir: Path | None = None) -> None:
        self._binary = binary
        self._targets = {job: list(t) for job, t in targets.items()}
        self._rule_files = [Path(p).resolve() for p in rule_files]
        self._interval = f"{scrape_interval_s}s"
        self._owned_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="meterline-prometheus-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self._interval, "evaluation_interval": self._interval,
                       "scrape_timeout": self._interval},
            "rule_files": [str(p) for p in self._rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                               for job, targets in self._targets.items()],
        }

    def start(self, timeout_s: float = 30) -> PrometheusServer:
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [self._binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_pdeathsig_preexec())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}: "
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout_s}s: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.load(resp)
        if doc.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {doc}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query now; the result vector (or matrix/scalar as a one-item list)."""
        data = self.api("query", query=expr)
        result = data["result"]
        return result if isinstance(result, list) else [{"value": result}]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        if self._owned_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
