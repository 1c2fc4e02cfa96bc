"""AnomalySettings: defaults, per-meter overrides, and every error reported at once."""

from __future__ import annotations

import math

import pytest

from meterline.core.anomaly.settings import AnomalySettings, MeterAnomalySettings
from meterline.core.errors import ConfigError


def test_defaults_are_valid_and_hourly() -> None:
    settings = AnomalySettings()
    settings.validate()
    assert settings.interval_ms == 3_600_000
    assert (settings.warmup_windows, settings.resolve_windows, settings.adapt_windows) == (
        168, 3, 6)
    assert settings.direction == "both" and settings.sensitivity == 1.0


def test_bad_config_lists_every_error_at_once() -> None:
    settings = AnomalySettings(
        interval_ms=7 * 60_000,  # 7 minutes do not divide a day
        direction="sideways",
        sensitivity=-1.0,
        min_abs_deviation=-5,
        min_ratio=1.0,
        warmup_windows=0,
        resolve_windows=0,
        adapt_windows=-2,
        meters={
            "api_calls": MeterAnomalySettings(direction="left", sensitivity=0),
            "tokens_typo": MeterAnomalySettings(min_ratio=0.5),
        },
    )
    with pytest.raises(ConfigError) as caught:
        settings.validate(known_meters={"api_calls", "tokens"})
    errors = caught.value.errors
    expected = [
        "interval_ms (420000) must divide a day",
        "direction must be one of up, down, both, got 'sideways'",
        "sensitivity must be a number > 0, got -1.0",
        "min_abs_deviation must be a number >= 0",
        "min_ratio must be a number > 1, got 1.0",
        "warmup_windows must be an int >= 1",
        "resolve_windows must be an int >= 1",
        "adapt_windows must be an int >= 1",
        "meters.api_calls.direction must be one of up, down, both, got 'left'",
        "meters.api_calls.sensitivity must be a number > 0, got 0",
        "meters.tokens_typo: no meter 'tokens_typo' is defined (known: api_calls, tokens)",
        "meters.tokens_typo.min_ratio must be a number > 1, got 0.5",
    ]
    for fragment in expected:
        assert any(fragment in e for e in errors), (fragment, errors)
    assert len(errors) == len(expected)
    assert f"has {len(expected)} error(s)" in str(caught.value)


def test_unknown_meter_is_only_checked_against_a_given_set() -> None:
    settings = AnomalySettings(meters={"nope": MeterAnomalySettings(direction="up")})
    settings.validate()  # no registry given: nothing to compare with
    with pytest.raises(ConfigError, match="no meter 'nope'"):
        settings.validate(known_meters=set())


@pytest.mark.parametrize("bad", [True, math.nan, math.inf, "1.0", None])
def test_sensitivity_must_be_a_real_positive_number(bad: object) -> None:
    errors = AnomalySettings(sensitivity=bad).errors()  # type: ignore[arg-type]
    assert errors == [f"sensitivity must be a number > 0, got {bad!r}"]


@pytest.mark.parametrize("bad", [0, -3_600_000, 1.5, "3600000"])
def test_interval_must_be_a_positive_int(bad: object) -> None:
    errors = AnomalySettings(interval_ms=bad).errors()  # type: ignore[arg-type]
    assert len(errors) == 1 and errors[0].startswith("interval_ms must be an int > 0")


def test_for_interval_keeps_the_durations() -> None:
    five = AnomalySettings.for_interval(5 * 60_000, sensitivity=2.0)
    five.validate()
    assert (five.warmup_windows, five.resolve_windows, five.adapt_windows) == (2016, 36, 72)
    assert five.sensitivity == 2.0
    daily = AnomalySettings.for_interval(86_400_000)
    assert (daily.warmup_windows, daily.resolve_windows, daily.adapt_windows) == (7, 1, 1)
    assert AnomalySettings.for_interval(-1).errors()  # reported, not raised


def test_per_meter_overrides_inherit_the_rest() -> None:
    settings = AnomalySettings(
        min_abs_deviation=10.0,
        meters={"storage_gb": MeterAnomalySettings(direction="up", sensitivity=0.5),
                "debug_calls": MeterAnomalySettings(enabled=False)})
    storage = settings.for_meter("storage_gb")
    assert (storage.direction, storage.sensitivity, storage.min_abs_deviation) == (
        "up", 0.5, 10.0)
    assert settings.for_meter("api_calls").direction == "both"
    assert settings.for_meter("debug_calls").enabled is False


def test_from_mapping_reads_a_toml_table_and_rejects_typos() -> None:
    settings = AnomalySettings.from_mapping(
        {"sensitivity": 1.5, "meters": {"tokens": {"direction": "up"}}})
    assert settings.sensitivity == 1.5
    assert settings.for_meter("tokens").direction == "up"
    with pytest.raises(ConfigError) as caught:
        AnomalySettings.from_mapping({"sensitivty": 2, "direction": "both",
                                      "meters": {"tokens": {"diretion": "up"}}})
    assert len(caught.value.errors) == 2
    assert "unknown key 'sensitivty'" in caught.value.errors[0]
    assert "meters.tokens: unknown key 'diretion'" in caught.value.errors[1]
