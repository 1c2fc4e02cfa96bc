"""Cyclic-GC settings for the serving process (``meterline serve``): the shared settings of
:mod:`meterline.gc_tuning` (why, and what was measured, is there), switched off with
``METERLINE_SERVER_GC=default``."""

from __future__ import annotations

from meterline.gc_tuning import YOUNG_THRESHOLD, tune_gc

__all__ = ["YOUNG_THRESHOLD", "tune_for_serving"]


def tune_for_serving() -> bool:
    """Apply the settings; False (nothing changed) with METERLINE_SERVER_GC=default."""
    return tune_gc("METERLINE_SERVER_GC")
