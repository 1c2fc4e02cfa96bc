"""``[retention]`` in the application config -> RetentionPolicy (meterline.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterline.config import load_config
from meterline.core.errors import ConfigError
from meterline.sinks.schema import RAW_EVENTS, RetentionPolicy


def _load(tmp_path: Path, text: str) -> RetentionPolicy:
    path = tmp_path / "meterline.toml"
    path.write_text(text, encoding="utf-8")
    policy = load_config(path, env={}).retention_policy()
    assert isinstance(policy, RetentionPolicy)
    return policy


def _errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "meterline.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return list(info.value.errors)


def test_defaults_without_a_retention_section(tmp_path: Path) -> None:
    assert _load(tmp_path, "") == RetentionPolicy()
    assert load_config(None, env={}).retention_policy() == RetentionPolicy()


def test_table_days_and_per_meter_overrides(tmp_path: Path) -> None:
    policy = _load(tmp_path, """
[retention]
raw_events_days = 40
late_events_days = 30

[retention.meters.storage_gb]
raw_events_days = 90
daily_rollups_days = 3650

[retention.meters.llm_tokens]
hourly_rollups_days = 500
""")
    assert policy.raw_events_days == 40
    assert policy.late_events_days == 30
    assert policy.meters == {"storage_gb": {"raw_events_days": 90, "daily_rollups_days": 3650},
                             "llm_tokens": {"hourly_rollups_days": 500}}
    assert RAW_EVENTS.ttl is not None
    assert "toIntervalDay(90) DELETE WHERE meter = 'storage_gb'" in (
        RAW_EVENTS.ttl.expression(policy))


def test_every_retention_error_is_reported_at_once(tmp_path: Path) -> None:
    errors = _errors(tmp_path, """
[retention]
raw_events_days = "35"
dead_letters_days = 0
keep_forever = true

[retention.meters.storage_gb]
raw_events_days = 1.5
dead_letters_days = 5
nope_days = 3

[retention.meters.no_such_meter]
raw_events_days = 10
""")
    joined = "\n".join(errors)
    for fragment in (
        "[retention] unknown key 'keep_forever'",
        "[retention] raw_events_days must be an int",
        "[retention] dead_letters_days must be >= 1",
        "[retention] meters.storage_gb.raw_events_days must be an int",
        "[retention] meters.storage_gb.dead_letters_days: dead_letters has no meter column",
        "[retention] meters.storage_gb.nope_days: unknown field",
        "[retention.meters.no_such_meter] no meter 'no_such_meter'",
    ):
        assert fragment in joined, joined
    assert len(errors) == 7, joined


def test_meters_must_be_tables(tmp_path: Path) -> None:
    errors = _errors(tmp_path, "[retention]\nmeters = 5\n")
    assert errors == ["[retention.meters] must hold one table per meter, "
                      "e.g. [retention.meters.storage_gb]"]
    errors = _errors(tmp_path, "retention = 5\n")
    assert errors == ["[retention] must be a table"]
