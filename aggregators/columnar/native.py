"""The compiled decoder and column builder (``native/``, Rust via PyO3), when installed.

``columns.build_columns`` reads envelopes that orjson has turned into Python objects: a
str per customer and meter and a dict per event's dimensions, then walks them again to
factorise, validate and group (docs/benchmarks.md: decode ~1.4 and columns ~1.0 µs per
event). ``meterline_native`` does both over the envelope bytes with no Python object per
event, and releases the GIL while it does (the embedded server answers requests meanwhile).

It decides nothing on its own: its decoder takes a strict subset of what
``decode_batch`` takes, with the same values, and returns None for anything else (the
processor hands such a record to the per-event reference fold); the limits, the verdict
codes and every meter rule come from here, i.e. from ``meterline.core``. The equivalence
property test runs the columnar fold with and without it against the per-event fold.

``METERLINE_NATIVE=0`` turns it off (the numpy builder is then used, as without the
module); ``make install`` builds it (``pip install ./native``: maturin + cargo).
"""

from __future__ import annotations

import os
from itertools import accumulate
from typing import Any

import numpy as np

from meterline.aggregators.columnar.columns import REASONS, Columns
from meterline.core.envelope import MAX_BATCH_EVENTS, MAX_ENVELOPE_BYTES
from meterline.core.events import (
    MAX_CUSTOMER_LEN,
    MAX_DIMENSION_KEY_LEN,
    MAX_DIMENSION_VALUE_LEN,
    MAX_DIMENSIONS,
    MAX_ID_LEN,
    MAX_METER_LEN,
    MAX_SOURCE_LEN,
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
)
from meterline.core.meters import Aggregation, MeterRegistry
from meterline.core.rollup import (
    DIMENSION_NOT_ALLOWED,
    MAX_FUTURE_SKEW_MS,
    MISSING_CUSTOMER,
    MISSING_UNIQUE_VALUE,
    NEGATIVE_QUANTITY,
    TIMESTAMP_OUT_OF_RANGE,
    UNKNOWN_METER,
    MeterPlan,
)
from meterline.core.windows import HOUR_MS

try:  # built by `make install`; the fold runs without it, only slower
    import meterline_native as _native
except ImportError:  # pragma: no cover - exercised where the module is not built
    _native = None

__all__ = ["NativeColumns", "available", "enabled"]

# Verdict codes in the order Rules.build takes them: its precedence is fixed in Rust
# (MeterPlan.check's order), the codes themselves are columns.REASONS indexes.
_CODES = [REASONS.index(r) for r in (UNKNOWN_METER, MISSING_CUSTOMER, TIMESTAMP_OUT_OF_RANGE,
                                     NEGATIVE_QUANTITY, DIMENSION_NOT_ALLOWED,
                                     MISSING_UNIQUE_VALUE)]


def available() -> bool:
    """Whether the compiled module is installed."""
    return _native is not None


def enabled() -> bool:
    """Installed and not turned off with ``METERLINE_NATIVE=0``."""
    return _native is not None and os.environ.get("METERLINE_NATIVE", "1").strip() != "0"


class NativeColumns:
    """One registry's decoder and column builder."""

    def __init__(self, registry: MeterRegistry) -> None:
        if _native is None:
            raise RuntimeError("meterline_native is not installed (make install builds it)")
        self.registry = registry
        self._decoder = _native.Decoder(
            MAX_ENVELOPE_BYTES, MAX_BATCH_EVENTS, MAX_ID_LEN, MAX_CUSTOMER_LEN,
            MAX_METER_LEN, MAX_SOURCE_LEN, MAX_DIMENSIONS, MAX_DIMENSION_KEY_LEN,
            MAX_DIMENSION_VALUE_LEN)
        self._rules = _native.Rules(
            [(m.name, list(m.dimensions), list(m.group_by), m.value_property,
              m.aggregation is Aggregation.UNIQUE_COUNT, m.allow_negative) for m in registry],
            MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS, MAX_FUTURE_SKEW_MS, _CODES)

    def window_store(self) -> Any:
        """An empty compiled window store (``native_state.NativeRollupState``)."""
        assert _native is not None
        return _native.WindowStore()

    def decode(self, payload: object) -> Any:
        """A ``NativeBatch`` (``batch_id``, ``created_ms``, ``producer``, ``seq``,
        ``abs_sum``, ``len()``), or None: ``decode_batch`` must decide this record."""
        if type(payload) is not bytes:  # bytearray, memoryview, garbage: the Python reader
            return None
        return self._decoder.decode(payload)

    def columns(self, batches: list[Any], now_ms: list[int],
                plans: dict[str, MeterPlan | None]) -> Columns:
        """``build_columns`` for a run of native batches: the same Columns."""
        (customer, customers, meter, meters, quantity, timestamp, group, group_values,
         reason, has_id, ids, unique_values, max_timestamp) = self._rules.build(batches, now_ms)
        counts = [len(b) for b in batches]
        starts = [0, *accumulate(counts)]
        n = starts[-1]
        record = np.repeat(np.arange(len(batches), dtype=np.int64), counts)
        position = np.arange(n, dtype=np.int64) - np.repeat(np.array(starts[:-1], np.int64),
                                                             counts)
        for name in meters:
            if name not in plans:
                found = self.registry.get(name)
                plans[name] = None if found is None else MeterPlan(found)
        meter_plans = [plans[name] for name in meters]
        groups = [[] if plan is None
                  else [tuple(zip(plan.group_by, values, strict=True)) for values in found]
                  for plan, found in zip(meter_plans, group_values, strict=True)]
        ts = np.frombuffer(timestamp, dtype=np.int64)
        hour_start = ts - ts % HOUR_MS
        return Columns(
            starts=starts, batch_ids=[b.batch_id for b in batches], record=record,
            position=position, quantity=np.frombuffer(quantity, dtype=np.int64),
            timestamp=ts, hour_start=hour_start, hour_end=hour_start + HOUR_MS,
            customer=np.frombuffer(customer, dtype=np.int64),
            meter=np.frombuffer(meter, dtype=np.int64),
            group=np.frombuffer(group, dtype=np.int64),
            reason=np.frombuffer(reason, dtype=np.int8),
            has_id=np.frombuffer(has_id, dtype=np.bool_),
            ids=[None] * n if ids is None else ids,
            unique_values=[None] * n if unique_values is None else unique_values,
            customers=customers, meters=meters, plans=meter_plans, groups=groups,
            max_timestamp=max_timestamp)
