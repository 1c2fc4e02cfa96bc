"""Dependency rules that keep the layers honest.

- ``meterline/core`` is pure: stdlib, orjson and itself only.
- ``meterline.sdk`` is what applications install: it must work without the server extras
  (Faust, chDB, the ClickHouse client).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "meterline" / "core"
CORE_ALLOWED_THIRD_PARTY = {"orjson"}
SERVER_ONLY = ("faust", "chdb", "clickhouse_connect")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file; relative imports resolved
    against the package they are in."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = "meterline.core"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def _allowed_in_core(module: str) -> bool:
    top = module.split(".")[0]
    return (
        top in sys.stdlib_module_names
        or top in CORE_ALLOWED_THIRD_PARTY
        or module == "meterline.core"
        or module.startswith("meterline.core.")
    )


def test_core_imports_only_stdlib_orjson_and_core() -> None:
    files = sorted(CORE.glob("**/*.py"))
    assert files, f"no modules found in {CORE}"
    offenders = [
        f"{path.relative_to(REPO)}:{line}: imports {module}"
        for path in files
        for line, module in _imports(path)
        if not _allowed_in_core(module)
    ]
    assert not offenders, "meterline/core must stay pure:\n" + "\n".join(offenders)


def test_import_checker_catches_offenders(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\nimport faust\nfrom meterline.sdk import Emitter\nfrom . import quantity\n"
        "from .. import cli\nfrom orjson import dumps\n",
        encoding="utf-8",
    )
    modules = [m for _, m in _imports(bad)]
    assert modules == ["os", "faust", "meterline.sdk", "meterline.core", "meterline", "orjson"]
    assert [m for m in modules if not _allowed_in_core(m)] == [
        "faust",
        "meterline.sdk",
        "meterline",
    ]


BLOCKED_IMPORT = textwrap.dedent(
    """
    import importlib.abc
    import sys
    import tempfile

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is a server dependency, blocked for this test")
            return None

    sys.meta_path.insert(0, Block())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    import meterline.sdk
    from meterline.sdk import Emitter, EmitterConfig, MemoryTransport

    # Use it, not just import it: lazy imports inside the emitter must not need them either.
    transport = MemoryTransport()
    config = EmitterConfig(bootstrap_servers=None, spool_dir=tempfile.mkdtemp(), linger_ms=5)
    with Emitter(config, transport=transport) as em:
        em.emit("cust", "api_calls", "0.5", dimensions={{"region": "eu"}})
        assert em.flush(10)
    assert len(transport.records) == 1
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
    print("sdk ok without", ", ".join(sorted(BLOCKED)))
    """
)


def test_sdk_works_without_server_dependencies() -> None:
    code = BLOCKED_IMPORT.format(blocked=set(SERVER_ONLY))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("sdk ok without chdb, clickhouse_connect, faust")


def test_blocker_really_blocks() -> None:
    # Guard against a vacuous pass: the same finder makes an import of chdb fail.
    code = BLOCKED_IMPORT.format(blocked=set(SERVER_ONLY)).replace(
        "import meterline.sdk\n", "import chdb\n", 1
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "server dependency, blocked" in proc.stderr


def test_sdk_public_api_is_locked() -> None:
    import meterline.sdk

    assert sorted(meterline.sdk.__all__) == [
        "BufferFullError",
        "ConfigError",
        "Emitter",
        "EmitterConfig",
        "EmitterStats",
        "InvalidEventError",
        "KafkaTransport",
        "MemoryTransport",
        "MeterRegistry",
        "SpoolLockedError",
        "Transport",
        "register_metrics",
    ]
    for name in meterline.sdk.__all__:
        assert hasattr(meterline.sdk, name), name
