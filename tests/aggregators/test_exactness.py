"""10,000,000 x 0.1 is exactly 1,000,000: through the rollup stage into ClickHouse.

Binary floats cannot hold 0.1 and summing ten million of them drifts; the pipeline carries
int nano-units end to end (envelope -> aggregation -> Decimal(38, 9) via Int128), so the
hourly and daily totals must come out exactly 1,000,000, not 999,999.9998.
"""

from __future__ import annotations

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

EVENTS = 10_000_000
PER_BATCH = 20_000
REGISTRY = MeterRegistry.from_mapping({"meters": {"credits": {"aggregation": "sum"}}})


def test_ten_million_tenths_sum_to_exactly_one_million(migrated_storage: Storage) -> None:
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
    assert sum(hourly.values()) == 1_000_000 * SCALE
    assert daily == {("acme", "credits", day): 1_000_000 * SCALE}
    # The float the naive pipeline would have reported, for the record:
    assert sum([0.1] * 1000) != 100.0
