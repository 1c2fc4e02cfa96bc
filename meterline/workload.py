"""Synthetic but realistic usage for the demo and end-to-end tests.

A few large customers and a long tail (Zipf-like weights), five meters of different kinds,
event times spread over a period ending now, fractional and whole quantities. Deterministic
for a seed, and every event's exact quantity is known, so a test or the demo can compare
what ClickHouse says with the ground truth.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal

from meterline.core.quantity import to_nanos

ENDPOINTS = ("/v1/search", "/v1/ingest", "/v1/export", "/v1/users", "/v1/billing")
REGIONS = ("eu-west", "us-east", "ap-south")
MODELS = ("small", "medium", "large")
TIERS = ("standard", "priority")


@dataclass(frozen=True, slots=True)
class SyntheticEvent:
    customer: str
    meter: str
    quantity: int | Decimal  # what the app passes to emit()
    timestamp_ms: int
    dimensions: dict[str, str]
    id: str | None = None


@dataclass
class GroundTruth:
    """Exact per (customer, meter) totals in nano-units and event counts."""

    sums: dict[tuple[str, str], int] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, customer: str, meter: str, nanos: int) -> None:
        key = (customer, meter)
        self.sums[key] = self.sums.get(key, 0) + nanos
        self.counts[key] = self.counts.get(key, 0) + 1

    @property
    def events(self) -> int:
        return sum(self.counts.values())


def customers(n: int) -> list[str]:
    return [f"cust-{i:05d}" for i in range(n)]


def generate(
    events: int,
    n_customers: int,
    *,
    end_ms: int,
    span_ms: int = 48 * 3_600_000,
    seed: int = 7,
    truth: GroundTruth | None = None,
) -> Iterator[SyntheticEvent]:
    rnd = random.Random(seed)
    names = customers(n_customers)
    # Zipf-like: customer i is used in proportion to 1/(i+1).
    weights = [1.0 / (i + 1) for i in range(n_customers)]
    picks = rnd.choices(names, weights=weights, k=events)
    start_ms = end_ms - span_ms
    for customer in picks:
        ts = start_ms + rnd.randrange(span_ms)
        kind = rnd.random()
        if kind < 0.55:
            ev = SyntheticEvent(customer, "api_calls", 1, ts,
                                {"endpoint": rnd.choice(ENDPOINTS), "region": rnd.choice(REGIONS)})
        elif kind < 0.80:
            ev = SyntheticEvent(customer, "llm_tokens", rnd.randint(20, 4_000), ts,
                                {"model": rnd.choice(MODELS)})
        elif kind < 0.90:
            # Fractional CPU seconds with millisecond precision.
            ev = SyntheticEvent(customer, "compute_seconds",
                                Decimal(rnd.randint(1, 120_000)).scaleb(-3), ts,
                                {"tier": rnd.choice(TIERS)})
        elif kind < 0.95:
            ev = SyntheticEvent(customer, "storage_gb", Decimal(rnd.randint(1, 50_000)).scaleb(-2),
                                ts, {"region": rnd.choice(REGIONS)})
        else:
            ev = SyntheticEvent(customer, "active_users", 1, ts,
                                {"user_id": f"u{rnd.randrange(5_000)}"})
        if truth is not None:
            truth.add(ev.customer, ev.meter, to_nanos(ev.quantity))
        yield ev
