"""Test helpers: a real `meterline serve` process on loopback (keys made with the real
CLI) and a progress-based wait."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "meterline.cli"]


def meterline(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@dataclass
class ServerProcess:
    config: Path
    proc: subprocess.Popen[str]
    url: str
    keys: dict[str, str] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(workdir: Path, extra_toml: str = "",
                 keys: dict[str, tuple[str, list[str]]] | None = None) -> ServerProcess:
    """``keys``: {name: (tenant, scopes)}, created with `meterline keys create` first."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "meterline.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{workdir / "chdb"}"\n'
        "[rollups]\nflush_interval_s = 0.2\ncheckpoint_interval_s = 1.0\n"
        "[server]\nport = 0\n" + extra_toml)
    made: dict[str, str] = {}
    for name, (tenant, scopes) in (keys or {}).items():
        args = ["keys", "create", "--tenant", tenant, "--config", str(config)]
        for scope in scopes:
            args += ["--scope", scope]
        out = meterline(*args)
        assert out.returncode == 0, out.stderr
        made[name] = out.stdout.strip()
    proc = subprocess.Popen([*CLI, "serve", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    url: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on " in line and not url:
                url.append(line.split("listening on ", 1)[1].split()[0])
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    # Startup is bounded by the process: it either prints its address or exits.
    while not ready.wait(0.2):
        if proc.poll() is not None:
            break
    if not url:
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(lines))
    return ServerProcess(config, proc, url[0], made, lines)


def settle(fetch: Callable[[], Any], expected: Any, idle_s: float = 30.0,
           interval_s: float = 0.1) -> Any:
    """Poll ``fetch()`` until it equals ``expected``. The deadline follows progress: it is
    reset whenever the observed value changes, and the wait fails only after ``idle_s``
    without any change (the pipeline stalled), not after a fixed wall time."""
    last = fetch()
    changed_at = time.monotonic()
    while last != expected:
        if time.monotonic() - changed_at > idle_s:
            raise AssertionError(f"no progress for {idle_s}s: have {last!r}, want {expected!r}")
        time.sleep(interval_s)
        value = fetch()
        if value != last:
            last, changed_at = value, time.monotonic()
    return last
