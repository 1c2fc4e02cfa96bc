"""N x 0.1 is exactly N / 10: through the rollup stage into ClickHouse.

Binary floats cannot hold 0.1 and summing many of them drifts (ten million give
999,999.9998, one million 100,000.0000013); the pipeline carries int nano-units end to end
(envelope -> aggregation -> Decimal(38, 9) via Int128), so the hourly and daily totals must
come out exact. ``make test`` folds 1,000,000 events; the full size is
``METERLINE_EXACTNESS_EVENTS=10000000`` (totals beyond 2**53 nano-units are covered by
tests/sinks/test_restatement.py).
"""

from __future__ import annotations

import os
import time
from decimal import Decimal

import pytest

from meterline.aggregators.processor import PartitionProcessor
from meterline.core.envelope import Batch, encode_batch
from meterline.core.meters import MeterRegistry
from meterline.core.quantity import SCALE, to_nanos
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.ingest.sources import SourceRecord
from meterline.sinks.rollups import RollupTotalsQuery, write_flush
from meterline.sinks.storage import Storage

pytestmark = pytest.mark.slow

EVENTS = int(os.environ.get("METERLINE_EXACTNESS_EVENTS", 1_000_000))
PER_BATCH = 20_000
REGISTRY = MeterRegistry.from_mapping({"meters": {"credits": {"aggregation": "sum"}}})


def test_many_tenths_sum_exactly(migrated_storage: Storage) -> None:
    tenth = to_nanos(Decimal("0.1"))
    assert tenth == SCALE // 10
    now = time.time_ns() // 1_000_000
    day = now - now % DAY_MS - DAY_MS  # yesterday, inside every TTL
    proc = PartitionProcessor("usage", 0, REGISTRY)
    n_batches = EVENTS // PER_BATCH
    for b in range(n_batches):
        # Spread over the day's 24 hours, in time order.
        ts = day + b * (DAY_MS // n_batches)
        batch = Batch(f"b{b}", ts, ["acme"] * PER_BATCH, ["credits"] * PER_BATCH,
                      [tenth] * PER_BATCH, [ts] * PER_BATCH)
        proc.process(SourceRecord("usage", 0, b, encode_batch(batch), now))
        if b % 50 == 49:
            write_flush(migrated_storage, proc.take_flush())
    write_flush(migrated_storage, proc.take_flush())
    assert proc.counters.accepted == EVENTS

    db = migrated_storage.database
    hourly = RollupTotalsQuery("hour", "acme", "credits", db).run(migrated_storage)
    daily = RollupTotalsQuery("day", "acme", "credits", db).run(migrated_storage)
    assert len(hourly) == 24 and all(k[2] % HOUR_MS == 0 for k in hourly)
    # Truth: EVENTS tenths are EVENTS // 10 units (EVENTS is a multiple of PER_BATCH).
    assert sum(hourly.values()) == EVENTS // 10 * SCALE
    assert daily == {("acme", "credits", day): EVENTS // 10 * SCALE}
    # The float the naive pipeline would have reported, for the record:
    assert sum([0.1] * 1000) != 100.0
