"""Dump the exact hourly and daily usage views of the configured ClickHouse as JSON.

For tests that run the pipeline in subprocesses: chDB allows one process per data
directory, so the test reads the loader's tables through this, after the loader exited.
``python -m meterline.testing.dump_rollups OUT.json`` (config from the environment).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from meterline.config import load_config
    from meterline.sinks.raw_events import nano_from_decimal
    from meterline.sinks.storage import open_storage

    out = Path((argv if argv is not None else sys.argv[1:])[0])
    storage = open_storage(load_config().storage_config())
    try:
        doc = {}
        for view in ("hourly_usage", "daily_usage"):
            rows = storage.query_rows(
                f"SELECT customer, meter, group_key, window_start_ms, value "
                f"FROM {storage.database}.{view}")
            doc[view] = [[c, m, g, int(s), nano_from_decimal(v)] for c, m, g, s, v in rows]
    finally:
        storage.close()
    out.write_text(json.dumps(doc))  # stdlib json: totals may exceed 64 bits
    return 0


if __name__ == "__main__":
    sys.exit(main())
