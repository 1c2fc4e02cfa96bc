"""``meterline.testing.usage_log``'s low-cardinality shape: one customer per envelope,
and the same counts of events as the default shape."""

from __future__ import annotations

from collections import Counter

from meterline.core.envelope import decode_batch
from meterline.testing.usage_log import Truth, usage_records

START_MS = 1_704_067_200_000


def test_one_customer_per_envelope() -> None:
    records = list(usage_records(40_000, 100, 4, start_ms=START_MS, events_per_batch=2_000,
                                 one_customer_per_envelope=True))
    first_time = [decode_batch(r.payload) for r in records if not r.resend]
    assert sum(len(b) for b in first_time) == 40_000
    # Client retries included: an app instance re-sends its own customer's events.
    spread = Counter(len(set(b.customers)) for b in first_time)
    assert spread == {1: len(first_time)}, spread
    customers = {c for b in first_time for c in b.customers}
    assert len(customers) > 50  # the rounds rotate through the customers


def test_the_default_shape_spreads_envelopes_over_many_customers() -> None:
    records = list(usage_records(8_000, 100, 4, start_ms=START_MS, events_per_batch=2_000))
    batches = [decode_batch(r.payload) for r in records if not r.resend]
    assert min(len(set(b.customers)) for b in batches) > 10


def test_both_shapes_count_every_distinct_event_once() -> None:
    for low in (False, True):
        truth = Truth()
        records = list(usage_records(20_000, 100, 4, start_ms=START_MS, truth=truth,
                                     events_per_batch=2_000, one_customer_per_envelope=low))
        sent = sum(len(decode_batch(r.payload)) for r in records if not r.resend)
        assert sent == 20_000
        assert 0 < truth.events < sent  # client retries under one id count once
