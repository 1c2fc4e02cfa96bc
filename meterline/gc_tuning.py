"""Cyclic-GC settings for Meterline's long-running processes: ``meterline serve``, the
rollup worker (``meterline worker``) and the embedded rollup stage (``meterline
rollup-local``).

Why: these processes allocate a burst of short-lived containers per unit of work (a
500-event envelope or request is ~1,000 dicts, lists and tuples, freed by reference
counting when it is done) while holding long-lived state (the registry and clients from
startup; in the rollup stage every open window, its group tuple and aggregator). With
CPython's default threshold (700 container allocations) that is several young-generation
collections per envelope, each walking every object allocated since the last one, and the
older generations are walked over and over as the state grows. Measured:
- server, in process: the collector took about a third of the CPU per batched event
  (docs/server.md, Performance);
- rollup worker, in process (`benchmarks/rollups_inprocess.py`, 600k events, fetches of
  64 records): 1.12-1.20x events/s with the per-event engine and 1.33-1.45x with the
  columnar one (docs/benchmarks.md).

So, once startup is done:
1. ``gc.collect()`` then ``gc.freeze()``: what startup built moves to the permanent
   generation, which collections no longer walk (what Instagram does for its servers).
   Reference counting still frees those objects; only cycles among them would stay.
2. A young-generation threshold of 10,000: per-envelope garbage is freed by reference
   counting long before that; the collector still runs, about every 10,000 net container
   allocations, to catch cycles. Memory is not at stake: the state is live either way,
   and garbage without cycles never waited for the collector.

An environment variable per process kind set to ``default`` keeps CPython's defaults
(for comparison, or if ever in doubt): ``METERLINE_SERVER_GC`` for the server,
``METERLINE_WORKER_GC`` for the rollup stages.
"""

from __future__ import annotations

import gc
import os

YOUNG_THRESHOLD = 10_000


def tune_gc(env_var: str) -> bool:
    """Apply the settings above; False (nothing changed) when ``env_var`` is ``default``."""
    if os.environ.get(env_var, "") == "default":
        return False
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    return True
