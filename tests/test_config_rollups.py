"""``[rollups]`` in the application config: defaults equal the core's, env overrides,
every error at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterline.config import RollupConfig, load_config
from meterline.core.dedupe import DEFAULT_DEDUPE_HORIZON_MS
from meterline.core.errors import ConfigError


def test_defaults_are_the_documented_ones() -> None:
    config = load_config(None, env={})
    assert config.rollups == RollupConfig()
    assert config.rollups.dedupe_horizon_ms == DEFAULT_DEDUPE_HORIZON_MS == 86_400_000
    docs = (Path(__file__).parents[1] / "docs" / "rollups.md").read_text(encoding="utf-8")
    assert "86400000" in docs or "86,400,000" in docs  # stated identically in the docs


def test_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[rollups]\ngroup_id = 'g'\nallowed_lateness_ms = 0\n"
                    "checkpoint_interval_s = 2\n", encoding="utf-8")
    config = load_config(path, env={"METERLINE_FLUSH_INTERVAL_S": "0.25"})
    assert (config.rollups.group_id, config.rollups.allowed_lateness_ms,
            config.rollups.checkpoint_interval_s, config.rollups.flush_interval_s) == (
        "g", 0, 2, 0.25)
    assert config.rollups.engine == "columnar"  # the default
    path.write_text("[rollups]\nengine = 'per-event'\n", encoding="utf-8")
    assert load_config(path, env={}).rollups.engine == "per-event"
    assert load_config(path, env={"METERLINE_ROLLUP_ENGINE": "columnar"}).rollups.engine == (
        "columnar")


def test_every_error_at_once(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("[rollups]\ngroup_id = ''\nallowed_lateness_ms = -1\n"
                    "flush_interval_s = 0\nbogus = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"METERLINE_CHECKPOINT_INTERVAL_S": "soon",
                               "METERLINE_ROLLUP_ENGINE": "fast"})
    text = str(info.value)
    for needle in ("group_id", "allowed_lateness_ms", "flush_interval_s", "bogus",
                   "METERLINE_CHECKPOINT_INTERVAL_S", "engine must be"):
        assert needle in text


def test_the_horizon_is_not_compared_with_the_lateness(tmp_path: Path) -> None:
    """Dedupe expiry runs on log time and windows close on the event-time watermark: no
    inequality between the settings holds on a partition whose watermark stalls, so none
    is demanded. Ids are held until their window closes instead (core/dedupe.py)."""
    path = tmp_path / "m.toml"
    path.write_text("[rollups]\ndedupe_horizon_ms = 3600000\n", encoding="utf-8")
    assert load_config(path, env={}).rollups.dedupe_horizon_ms == 3_600_000
    path.write_text("[rollups]\ndedupe_horizon_ms = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="dedupe_horizon_ms must be an int >= 1"):
        load_config(path, env={})
