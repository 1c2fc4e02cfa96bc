"""README "Try the server": its commands, run as written (curl and the CLI, through bash)
against a fresh `meterline serve`, with only the address and the printed key filled in."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from server_proc import settle, start_server

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Try the server", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def test_readme_server_commands_work_as_written(tmp_path: Path) -> None:
    if not any(os.access(Path(p) / "curl", os.X_OK) for p in os.environ["PATH"].split(":")):
        pytest.skip("curl is not installed")
    commands = _commands()
    assert commands[0].startswith(".venv/bin/meterline serve")
    assert commands[1].startswith("KEY=ml_...")
    server = start_server(tmp_path / "srv")  # no keys: the first start makes one
    try:
        printed = "".join(server.output)
        assert "listening on http://127.0.0.1:" in printed
        [key] = re.findall(r"^\s+(ml_[0-9a-f]{12}_\S+)$", printed, re.M)
        host = server.url.removeprefix("http://")
        env = {**os.environ, "KEY": key}

        def run(command: str) -> str:
            command = (command.replace("localhost:8080", host)
                       .replace(".venv/bin/meterline", f"{sys.executable} -m meterline.cli"))
            out = subprocess.run(["bash", "-c", f"set -o pipefail; {command} --fail-with-body"
                                  if command.startswith("curl") else command],
                                 capture_output=True, text=True, env=env, timeout=120)
            assert out.returncode == 0, (command, out.stdout, out.stderr)
            return out.stdout

        ingest, read, cli_usage, link = commands[2:]
        run(ingest)

        def value() -> list[str]:
            return [p["value"] for p in orjson.loads(run(read))["data"]]

        settle(value, ["12.5"])  # once the rollup stage has flushed the hour
        table = run(cli_usage).splitlines()
        [row] = [line.split() for line in table if line.startswith("llm_tokens")]
        assert row == ["llm_tokens", "sum", "model=m1", "1", "12.5", "token"]
        path = orjson.loads(run(link))["path"]
        assert path.startswith("/usage/cust-42?")
        page = run(f"curl -s '{server.url}{path}'")
        assert 'data-meter="llm_tokens" data-group="model=m1"' in page
        assert '<td class="value">12.5</td>' in page
    finally:
        server.stop()
