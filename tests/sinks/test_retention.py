"""``RetentionPolicy`` (sinks/retention.py): defaults, per-meter fallbacks, and validation
that reports every error at once. Plain data, no storage; how a policy becomes TTLs and
migrations is in test_schema.py."""

from __future__ import annotations

from typing import Any

import pytest

from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.schema import RetentionPolicy


def test_retention_defaults() -> None:
    policy = RetentionPolicy()
    policy.validate()
    assert (policy.raw_events_days, policy.dead_letters_days) == (35, 90)
    assert (policy.hourly_rollups_days, policy.daily_rollups_days) == (400, 2557)
    assert policy.late_events_days == 400
    assert policy.meters == {}


def test_days_for_a_meter_falls_back_to_the_table_default() -> None:
    policy = RetentionPolicy(meters={"storage_gb": {"raw_events_days": 90}})
    assert policy.days_for("raw_events_days", "storage_gb") == 90
    assert policy.days_for("raw_events_days", "api_calls") == 35
    assert policy.days_for("hourly_rollups_days", "storage_gb") == 400
    assert policy.overrides("raw_events_days") == [("storage_gb", 90)]
    assert policy.overrides("daily_rollups_days") == []
    with pytest.raises(SinkError):
        policy.days_for("meters")


def _untyped(value: Any) -> Any:
    """Lets a test pass a wrongly typed value, as a config file could."""
    return value


def test_retention_validate_collects_every_error() -> None:
    policy = RetentionPolicy(
        raw_events_days=0,
        dead_letters_days=-1,
        hourly_rollups_days=_untyped(1.5),
        daily_rollups_days=_untyped(True),
    )
    with pytest.raises(SinkConfigError) as info:
        policy.validate()
    assert len(info.value.errors) == 4
    joined = " ".join(info.value.errors)
    for name in ("raw_events_days", "dead_letters_days", "hourly_rollups_days",
                 "daily_rollups_days"):
        assert name in joined


def test_retention_validate_collects_every_per_meter_error() -> None:
    policy = RetentionPolicy(
        late_events_days=0,
        meters=_untyped({
            "storage_gb": {"raw_events_days": 0, "hourly_rollups_days": "9",
                           "dead_letters_days": 5, "cold_days": 3},
            "Bad Meter'": {"raw_events_days": 10},
            "api_calls": 7,
        }),
    )
    with pytest.raises(SinkConfigError) as info:
        policy.validate()
    errors = info.value.errors
    joined = "\n".join(errors)
    assert len(errors) == 7, joined
    for fragment in ("late_events_days must be >= 1",
                     "meters.storage_gb.raw_events_days must be >= 1",
                     "meters.storage_gb.hourly_rollups_days must be an int",
                     "meters.storage_gb.dead_letters_days: dead_letters has no meter column",
                     "meters.storage_gb.cold_days: unknown field",
                     "\"Bad Meter'\" is not a meter name",
                     "meters.api_calls must map fields to days"):
        assert fragment in joined


def test_retention_meters_must_be_a_mapping() -> None:
    with pytest.raises(SinkConfigError, match="meters must map"):
        RetentionPolicy(meters=_untyped([("storage_gb", 1)])).validate()


def test_retention_rejects_rollups_shorter_than_their_source() -> None:
    policy = RetentionPolicy(raw_events_days=500, hourly_rollups_days=400,
                             daily_rollups_days=300)
    with pytest.raises(SinkConfigError) as info:
        policy.validate()
    assert len(info.value.errors) == 2


def test_retention_chain_is_checked_per_meter() -> None:
    policy = RetentionPolicy(meters={"storage_gb": {"raw_events_days": 500},
                                     "llm_tokens": {"raw_events_days": 400}})
    with pytest.raises(SinkConfigError) as info:
        policy.validate()
    assert info.value.errors == [
        "meters.storage_gb: raw_events_days (500) exceeds hourly_rollups_days (400)"
    ]


def test_days_for_unknown_field() -> None:
    with pytest.raises(SinkError):
        RetentionPolicy().days_for("validate")
