"""Fixtures for the server tests (helpers in server_proc.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from server_proc import ServerProcess, settle, start_server


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def make(extra_toml: str = "", keys: dict[str, tuple[str, list[str]]] | None = None,
             name: str = "srv") -> ServerProcess:
        server = start_server(tmp_path / name, extra_toml, keys)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(name="settle")
def settle_fixture() -> Callable[..., Any]:
    return settle
