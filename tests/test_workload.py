"""The synthetic workload's ground truth, computed from first principles."""

from __future__ import annotations

import pytest

from meterline.config import DEFAULT_METERS
from meterline.core.meters import MeterRegistry
from meterline.core.quantity import SCALE
from meterline.workload import DAY_MS, HOUR_MS, GroundTruth, generate

REGISTRY = MeterRegistry.load(DEFAULT_METERS)
D = 1_700_006_400_000 - 1_700_006_400_000 % DAY_MS  # a UTC midnight


def test_window_values_per_aggregation() -> None:
    t = GroundTruth(registry=REGISTRY)
    t.add("c", "api_calls", 1, D + 5, {"endpoint": "/a", "region": "eu"})
    t.add("c", "api_calls", 1, D + 6, {"endpoint": "/b"})
    t.add("c", "api_calls", 1, D + HOUR_MS, {"endpoint": "/a", "region": "eu"})
    t.add("c", "storage_gb", 7 * SCALE, D, {"region": "eu"})
    t.add("c", "storage_gb", 3 * SCALE, D + 1, {"region": "eu"})
    t.add("c", "storage_gb", 2 * SCALE, D + HOUR_MS, {"region": "us"})
    t.add("c", "storage_gb", 9 * SCALE, D + 2 * HOUR_MS, {"region": "eu"})
    t.add("c", "active_users", SCALE, D, {"user_id": "u1"})
    t.add("c", "active_users", SCALE, D + 1, {"user_id": "u1"})
    t.add("c", "active_users", SCALE, D + HOUR_MS, {"user_id": "u1"})
    t.add("c", "active_users", SCALE, D + HOUR_MS, {"user_id": "u2"})
    t.add("c", "llm_tokens", 5, D + DAY_MS, {"model": "s"})
    assert t.window_totals("hour") == {
        ("c", "api_calls", D): 2 * SCALE, ("c", "api_calls", D + HOUR_MS): SCALE,
        ("c", "storage_gb", D): 7 * SCALE, ("c", "storage_gb", D + HOUR_MS): 2 * SCALE,
        ("c", "storage_gb", D + 2 * HOUR_MS): 9 * SCALE,
        ("c", "active_users", D): SCALE, ("c", "active_users", D + HOUR_MS): 2 * SCALE,
        ("c", "llm_tokens", D + DAY_MS): 5,
    }
    assert t.window_totals("day") == {
        ("c", "api_calls", D): 3 * SCALE,
        ("c", "storage_gb", D): 9 * SCALE + 2 * SCALE,  # per-region peaks, summed
        ("c", "active_users", D): 2 * SCALE,  # distinct over the day, not a sum of hours
        ("c", "llm_tokens", D + DAY_MS): 5,
    }
    groups = t.window_values("day")
    assert groups[("c", "api_calls", (("endpoint", "/b"), ("region", "")), D)] == SCALE
    assert t.events == 12 and t.sums[("c", "api_calls")] == 3


def test_windows_need_a_registry_and_known_meters() -> None:
    with pytest.raises(ValueError):
        GroundTruth().window_totals("hour")
    with pytest.raises(ValueError):
        GroundTruth(registry=REGISTRY).add("c", "nope", 1, D)


def test_generate_is_in_time_order_with_bounded_disorder() -> None:
    end = D + 2 * DAY_MS
    events = list(generate(5_000, 20, end_ms=end, seed=3, disorder_ms=60_000))
    assert all(end - 48 * HOUR_MS <= e.timestamp_ms < end for e in events)
    newest = events[0].timestamp_ms
    for e in events:
        assert e.timestamp_ms > newest - 60_000 - 48 * HOUR_MS // 5_000
        newest = max(newest, e.timestamp_ms)
