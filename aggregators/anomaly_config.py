"""Settings of `meterline anomalies`, from their own TOML file, every error at once.

    [detector]                     # AnomalySettings (docs/anomalies.md, section 4)
    min_abs_deviation = 20
    [detector.meters.storage_gb]
    direction = "up"

    [stage]
    group_id = "meterline-anomalies"
    early_warning = true           # alert on a window not final yet that already exceeds
    flush_interval_s = 1.0         # events are written at least this often
    checkpoint_interval_s = 30.0   # after a crash, at most about this much is replayed

    [webhook]                      # optional; the secret comes from the environment
    url = "https://ops.example/hooks/meterline"
    secret_env = "METERLINE_WEBHOOK_SECRET"
    max_attempts = 8
    dead_letters = "var/anomaly-webhook-dead-letters.db"

The application config (``meterline.toml``) rejects unknown sections, so these live in
their own file (``meterline anomalies --settings anomalies.toml``). When a window is final
follows the rollup stage's ``[rollups]`` lateness settings, which come from the
application config: the two must agree.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from meterline.alerts.webhook import WebhookSettings
from meterline.core.anomaly.feed import FeedSettings
from meterline.core.anomaly.settings import AnomalySettings
from meterline.core.errors import ConfigError

__all__ = ["AnomalyStageConfig", "StageSettings", "load_anomaly_config"]


@dataclass(frozen=True)
class StageSettings:
    group_id: str = "meterline-anomalies"
    early_warning: bool = True
    flush_interval_s: float = 1.0
    # The detector state changes when windows close (hourly), and a replay after a crash
    # is cheap (rows, not events), so checkpoints can be rarer than the rollups' 5 s.
    checkpoint_interval_s: float = 30.0

    def errors(self) -> list[str]:
        out = []
        if not isinstance(self.group_id, str) or not self.group_id:
            out.append("[stage] group_id must be a non-empty string")
        if not isinstance(self.early_warning, bool):
            out.append(f"[stage] early_warning must be true or false, got {self.early_warning!r}")
        for name in ("flush_interval_s", "checkpoint_interval_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                out.append(f"[stage] {name} must be a number > 0 (seconds), got {value!r}")
        return out


@dataclass(frozen=True)
class AnomalyStageConfig:
    detector: AnomalySettings = AnomalySettings()
    stage: StageSettings = StageSettings()
    webhook: WebhookSettings | None = None
    dead_letters: Path = Path("var/anomaly-webhook-dead-letters.db")

    def feed_settings(self, rollups: Any) -> FeedSettings:
        """The feed's finality rule from the application's ``[rollups]`` settings."""
        return FeedSettings(rollups.allowed_lateness_ms, rollups.watermark_delay_ms,
                            self.stage.early_warning)


def _table(doc: Mapping[str, Any], name: str, errors: list[str]) -> dict[str, Any]:
    raw = doc.get(name, {})
    if not isinstance(raw, Mapping):
        errors.append(f"[{name}] must be a table")
        return {}
    return dict(raw)


def load_anomaly_config(path: str | Path | None = None, *,
                        known_meters: set[str] | None = None,
                        env: Mapping[str, str] | None = None) -> AnomalyStageConfig:
    """Read and validate; raises one ConfigError listing every problem."""
    env = os.environ if env is None else env
    source = str(path) if path else "defaults"
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([str(exc)], source) from None
    errors = [f"unknown section [{k}] (known: detector, stage, webhook)"
              for k in sorted(set(doc) - {"detector", "stage", "webhook"})]
    detector = AnomalySettings()
    try:
        detector = AnomalySettings.from_mapping(_table(doc, "detector", errors), "[detector]")
        errors += [f"[detector] {e}" for e in detector.errors(known_meters)]
    except ConfigError as exc:
        errors += [f"[detector] {e}" for e in exc.errors]
    except TypeError as exc:
        errors.append(f"[detector] {exc}")
    raw_stage = _table(doc, "stage", errors)
    allowed = {f.name for f in fields(StageSettings)}
    errors += [f"[stage] unknown key {k!r} (known: {', '.join(sorted(allowed))})"
               for k in sorted(set(raw_stage) - allowed)]
    stage = StageSettings(**{k: v for k, v in raw_stage.items() if k in allowed})
    errors += stage.errors()
    if detector.interval_ms != 3_600_000:
        errors.append(f"[detector] interval_ms must be 3600000 (the rollups are hourly), got "
                      f"{detector.interval_ms!r}")
    webhook = None
    dead_letters = AnomalyStageConfig.dead_letters
    raw_hook = _table(doc, "webhook", errors)
    if raw_hook:
        hook_allowed = {f.name for f in fields(WebhookSettings)} - {"secret"} | {
            "secret_env", "dead_letters"}
        errors += [f"[webhook] unknown key {k!r} (known: {', '.join(sorted(hook_allowed))})"
                   for k in sorted(set(raw_hook) - hook_allowed)]
        var = raw_hook.get("secret_env", "METERLINE_WEBHOOK_SECRET")
        secret = env.get(str(var), "")
        if not secret:
            errors.append(f"[webhook] the secret is read from ${var}, which is not set")
        if "dead_letters" in raw_hook:
            dead_letters = Path(str(raw_hook["dead_letters"]))
        values = {k: v for k, v in raw_hook.items()
                  if k in hook_allowed and k not in ("secret_env", "dead_letters")}
        try:
            webhook = WebhookSettings(secret=secret, **values)
        except TypeError as exc:
            errors.append(f"[webhook] {exc}")
        else:
            errors += [f"[webhook] {e}" for e in webhook.errors()
                       if not (e.startswith("secret") and not secret)]
    if errors:
        raise ConfigError(errors, source)
    return AnomalyStageConfig(detector, stage, webhook, dead_letters)
