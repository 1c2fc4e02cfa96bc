"""Seed a chDB data dir with rated lines (run as a subprocess: chDB allows one data dir
per process, and the CLI under test opens this one after it).

    python tests/export/seed_lines.py DATA_DIR N     # N final lines of 2026-11 + extras
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_factories import rated_line  # noqa: E402


def main(data_dir: str, n: int) -> None:
    from meterline.config import AppConfig
    from meterline.sinks.rated_usage import write_lines
    from meterline.sinks.schema import migrate
    from meterline.sinks.storage import StorageConfig, open_storage

    config = AppConfig()
    storage = open_storage(StorageConfig(data_dir=data_dir))
    try:
        migrate(storage, storage.database, config.retention_policy())
        lines = [rated_line(i) for i in range(n)]
        lines.append(rated_line(0, correction=1, amount="-0.25"))  # a correction of line 0
        lines.append(rated_line(n, status="in_progress"))  # not exported by default
        lines.append(rated_line(n + 1, month="2026-12"))  # another month
        write_lines(storage, lines, rated_at_ms=1)
    finally:
        storage.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
