"""Cyclic-GC settings for the serving process (``meterline serve``).

Why: a 500-event batch is parsed into ~1,000 dicts and built into ~1,000 more tuples and
dicts, all freed by reference counting when the request ends. With CPython's default
threshold (700 container allocations) that is several young-generation collections per
request, each walking the objects of every request in flight, and a full collection every
so often walks everything the process built at startup too (chDB, confluent-kafka,
prometheus, the registry). Measured in process (docs/server.md, Performance): the
collector took about a third of the server's CPU per batched event.

So, once startup is done:
1. ``gc.collect()`` then ``gc.freeze()``: what startup built moves to the permanent
   generation, which collections no longer walk (what Instagram does for its servers).
   Reference counting still frees those objects; only cycles among them would stay.
2. A young-generation threshold of 10,000: request garbage is freed by reference
   counting long before that; the collector still runs, about every 10,000 net container
   allocations, to catch cycles.

``METERLINE_SERVER_GC=default`` keeps CPython's defaults (for comparison, or if ever in
doubt).
"""

from __future__ import annotations

import gc
import os

YOUNG_THRESHOLD = 10_000


def tune_for_serving() -> bool:
    """Apply the settings above; False (nothing changed) with METERLINE_SERVER_GC=default."""
    if os.environ.get("METERLINE_SERVER_GC", "") == "default":
        return False
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    return True
