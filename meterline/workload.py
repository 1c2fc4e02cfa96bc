"""Synthetic but realistic usage for the demo and end-to-end tests.

A few large customers and a long tail (Zipf-like weights), five meters of different kinds,
event times spread over a period ending now, fractional and whole quantities. Events come in
time order, each a little behind the stream's clock (many app instances, SDK linger), as a
live stream does. Deterministic for a seed, and every event's exact quantity is known, so a
test or the demo can compare what ClickHouse says with the ground truth.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from meterline.core.meters import MeterRegistry
from meterline.core.quantity import SCALE, to_nanos

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


HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
Cell = tuple[str, str, tuple[tuple[str, str], ...], int]  # customer, meter, group, hour start


@dataclass
class GroundTruth:
    """Exact per (customer, meter) totals in nano-units and event counts.

    With a ``registry`` it also keeps the exact value of every hourly window per dimension
    group, computed here from first principles (not with the pipeline's aggregators):
    count = events * 10**9, sum, min, max, unique_count = distinct values * 10**9. Daily
    values merge the hours of the day. Only events the pipeline should count belong here.
    """

    sums: dict[tuple[str, str], int] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    registry: MeterRegistry | None = None
    hourly_cells: dict[Cell, Any] = field(default_factory=dict)
    _plans: dict[str, tuple[str, tuple[str, ...], str]] = field(default_factory=dict,
                                                                repr=False)

    def add(self, customer: str, meter: str, nanos: int, timestamp_ms: int | None = None,
            dimensions: Mapping[str, str] | None = None) -> None:
        key = (customer, meter)
        self.sums[key] = self.sums.get(key, 0) + nanos
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.registry is None:
            return
        plan = self._plans.get(meter)
        if plan is None:
            spec = self.registry.get(meter)
            if spec is None:
                raise ValueError(f"windowed ground truth needs a known meter, got {meter!r}")
            plan = self._plans[meter] = (spec.aggregation.value, spec.group_by,
                                         spec.value_property)
        if timestamp_ms is None:
            raise ValueError("windowed ground truth needs event timestamps")
        kind, group_by, value_property = plan
        dims = dimensions or {}
        group = tuple([(d, dims.get(d, "")) for d in group_by])
        cell = (customer, meter, group, timestamp_ms - timestamp_ms % HOUR_MS)
        cells = self.hourly_cells
        old = cells.get(cell)
        if kind == "count":
            cells[cell] = (old or 0) + 1
        elif kind == "sum":
            cells[cell] = (old or 0) + nanos
        elif kind == "unique_count":
            if old is None:
                old = cells[cell] = set()
            old.add(dims[value_property])
        elif kind == "max":
            cells[cell] = nanos if old is None or nanos > old else old
        elif kind == "min":
            cells[cell] = nanos if old is None or nanos < old else old
        else:  # latest breaks ties by event id, which only the SDK assigns
            raise ValueError(f"no ground truth for {kind} meters")

    @property
    def events(self) -> int:
        return sum(self.counts.values())

    def window_values(self, granularity: Literal["hour", "day"]) -> dict[Cell, int]:
        """Exact value per (customer, meter, group, window start)."""
        if self.registry is None:
            raise ValueError("GroundTruth(registry=...) keeps windows")
        merged: dict[Cell, Any] = {}
        kinds = {m.name: m.aggregation.value for m in self.registry}
        for (customer, meter, group, hour), state in self.hourly_cells.items():
            if granularity == "hour":
                merged[(customer, meter, group, hour)] = state
                continue
            key = (customer, meter, group, hour - hour % DAY_MS)
            old = merged.get(key)
            kind = kinds[meter]
            if old is None:
                merged[key] = set(state) if kind == "unique_count" else state
            elif kind == "unique_count":
                old |= state
            elif kind in ("count", "sum"):
                merged[key] = old + state
            else:
                merged[key] = (max if kind == "max" else min)(old, state)
        out = {}
        for key, state in merged.items():
            kind = kinds[key[1]]
            if kind == "unique_count":
                out[key] = len(state) * SCALE
            elif kind == "count":
                out[key] = state * SCALE
            else:
                out[key] = state
        return out

    def window_totals(self, granularity: Literal["hour", "day"]) -> dict[tuple[str, str, int], int]:
        """``{(customer, meter, window start): value}`` summed over dimension groups, as
        ``meterline.sinks.rollups.RollupTotalsQuery`` reports them."""
        out: dict[tuple[str, str, int], int] = {}
        for (customer, meter, _group, start), value in self.window_values(granularity).items():
            key = (customer, meter, start)
            out[key] = out.get(key, 0) + value
        return out


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
    disorder_ms: int = 5 * 60_000,
) -> Iterator[SyntheticEvent]:
    """``events`` events over ``[end_ms - span_ms, end_ms)`` in time order, each up to
    ``disorder_ms`` behind the stream's clock (well inside the rollups' allowed lateness,
    so every event counts)."""
    rnd = random.Random(seed)
    names = customers(n_customers)
    # Zipf-like: customer i is used in proportion to 1/(i+1).
    weights = [1.0 / (i + 1) for i in range(n_customers)]
    picks = rnd.choices(names, weights=weights, k=events)
    start_ms = end_ms - span_ms
    for i, customer in enumerate(picks):
        clock = start_ms + (i * span_ms) // max(events, 1)
        ts = max(start_ms, clock - rnd.randrange(disorder_ms + 1))
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
            truth.add(ev.customer, ev.meter, to_nanos(ev.quantity), ev.timestamp_ms,
                      ev.dimensions)
        yield ev
