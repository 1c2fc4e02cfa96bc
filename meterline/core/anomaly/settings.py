"""Settings of the anomaly detectors: one ``AnomalySettings`` plus per-meter overrides.

    settings = AnomalySettings(
        direction="both", sensitivity=1.0, min_abs_deviation=10.0,
        meters={"storage_gb": MeterAnomalySettings(direction="up", sensitivity=0.5)},
    )
    settings.validate(known_meters={"api_calls", "storage_gb"})  # every error at once

Window counts (warm-up, resolve, adapt) are counts of windows of ``interval_ms``; the
defaults are for hourly rollups. ``AnomalySettings.for_interval(5 * 60_000)`` rescales them so
they keep the same durations (one week of warm-up is 2,016 five-minute windows).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from meterline.core.errors import ConfigError
from meterline.core.windows import DAY_MS, HOUR_MS

__all__ = [
    "DIRECTIONS",
    "AnomalySettings",
    "MeterAnomalySettings",
    "MeterParams",
]

DIRECTIONS = ("up", "down", "both")

# The durations the default window counts stand for, so other intervals can keep them.
_WARMUP_MS = 7 * DAY_MS  # each hour of the week seen once: weekends and Mondays are learned
_RESOLVE_MS = 3 * HOUR_MS  # an episode ends after 3 h back to normal (hysteresis, no flapping)
_ADAPT_MS = 6 * HOUR_MS  # a shift that lasts 6 h is accepted as the series' new level


@dataclass(frozen=True)
class MeterAnomalySettings:
    """Overrides for one meter; ``None`` inherits the global value."""

    direction: str | None = None
    sensitivity: float | None = None
    min_abs_deviation: float | None = None
    min_ratio: float | None = None
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class MeterParams:
    """The effective settings of one meter (globals with its overrides applied)."""

    interval_ms: int
    direction: str
    sensitivity: float
    min_abs_deviation: float
    min_ratio: float
    warmup_windows: int
    resolve_windows: int
    adapt_windows: int
    enabled: bool


@dataclass(frozen=True)
class AnomalySettings:
    """What every series is judged by. ``validate()`` raises one ``ConfigError`` listing all
    problems; detectors validate the settings they are given before they run."""

    # Length of a window; must divide a day so windows line up with hours of the week.
    interval_ms: int = HOUR_MS
    # Which deviations alert: "up" (spikes), "down" (drops, silence) or "both".
    direction: str = "both"
    # Multiplies how narrow the band is: 2.0 halves its width (in log space), 0.5 doubles it.
    sensitivity: float = 1.0
    # In meter units: a window alerts only if it is at least this far from the expected
    # value, so a customer going from 1 to 6 calls an hour never pages anyone.
    min_abs_deviation: float = 10.0
    # The band is never narrower than expected x min_ratio / expected / min_ratio (roughly;
    # see docs/anomalies.md): growth steps below it are not alerts, a 5x spike is.
    min_ratio: float = 3.5
    # No alert before this many windows of a series were seen.
    warmup_windows: int = _WARMUP_MS // HOUR_MS
    # An episode resolves after this many consecutive windows back near the expected value.
    resolve_windows: int = _RESOLVE_MS // HOUR_MS
    # After this many consecutive abnormal windows the baseline jumps to the new level
    # (a silent series excepted: silence stays an open episode until usage returns).
    adapt_windows: int = _ADAPT_MS // HOUR_MS
    meters: Mapping[str, MeterAnomalySettings] = field(default_factory=dict)

    @classmethod
    def for_interval(cls, interval_ms: int, **overrides: Any) -> AnomalySettings:
        """Defaults rescaled to ``interval_ms`` windows (same durations as the hourly
        defaults), then ``overrides`` applied."""
        if type(interval_ms) is int and interval_ms > 0:
            counts = {
                "warmup_windows": max(1, _WARMUP_MS // interval_ms),
                "resolve_windows": max(1, _RESOLVE_MS // interval_ms),
                "adapt_windows": max(1, _ADAPT_MS // interval_ms),
            }
        else:
            counts = {}  # validate() reports the bad interval
        return cls(**{"interval_ms": interval_ms, **counts, **overrides})

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: str = "[anomalies]") -> AnomalySettings:
        """Build from a TOML/JSON table: ``{..., "meters": {"api_calls": {...}}}``. Unknown
        keys are errors (a typo must not silently keep a default)."""
        errors: list[str] = []
        allowed = {f.name for f in fields(cls)}
        meter_allowed = {f.name for f in fields(MeterAnomalySettings)}
        errors += [f"unknown key {k!r} (known: {', '.join(sorted(allowed))})"
                   for k in sorted(set(raw) - allowed)]
        values = {k: v for k, v in raw.items() if k in allowed and k != "meters"}
        meters: dict[str, MeterAnomalySettings] = {}
        raw_meters = raw.get("meters", {})
        if not isinstance(raw_meters, Mapping):
            errors.append("meters must be a table of per-meter tables")
            raw_meters = {}
        for name, table in raw_meters.items():
            if not isinstance(table, Mapping):
                errors.append(f"meters.{name} must be a table")
                continue
            errors += [f"meters.{name}: unknown key {k!r} "
                       f"(known: {', '.join(sorted(meter_allowed))})"
                       for k in sorted(set(table) - meter_allowed)]
            meters[str(name)] = MeterAnomalySettings(
                **{k: v for k, v in table.items() if k in meter_allowed})
        settings = cls(**values, meters=meters)
        errors += settings.errors()
        if errors:
            raise ConfigError(errors, source)
        return settings

    def errors(self, known_meters: Collection[str] | None = None) -> list[str]:
        """Every problem with these settings (empty when valid). ``known_meters``, when
        given, makes an override for a meter that does not exist an error."""
        out: list[str] = []
        interval = self.interval_ms
        if type(interval) is not int or interval <= 0:
            out.append(f"interval_ms must be an int > 0 (milliseconds), got {interval!r}")
        elif DAY_MS % interval:
            out.append(f"interval_ms ({interval}) must divide a day ({DAY_MS} ms) so windows "
                       "line up with the hours of the week")
        out += _value_errors("", self.direction, self.sensitivity, self.min_abs_deviation,
                             self.min_ratio)
        for name in ("warmup_windows", "resolve_windows", "adapt_windows"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                out.append(f"{name} must be an int >= 1 (windows), got {value!r}")
        if not isinstance(self.meters, Mapping):
            out.append("meters must map meter names to MeterAnomalySettings")
            return out
        for meter, over in self.meters.items():
            where = f"meters.{meter}."
            if not isinstance(over, MeterAnomalySettings):
                out.append(f"{where[:-1]} must be a MeterAnomalySettings, "
                           f"got {type(over).__name__}")
                continue
            if known_meters is not None and meter not in known_meters:
                out.append(f"{where[:-1]}: no meter {meter!r} is defined "
                           f"(known: {', '.join(sorted(known_meters)) or 'none'})")
            out += _value_errors(where, over.direction, over.sensitivity,
                                 over.min_abs_deviation, over.min_ratio, optional=True)
            if not isinstance(over.enabled, bool):
                out.append(f"{where}enabled must be true or false, got {over.enabled!r}")
        return out

    def validate(self, known_meters: Collection[str] | None = None) -> None:
        """Raise one ``ConfigError`` listing every problem."""
        found = self.errors(known_meters)
        if found:
            raise ConfigError(found, "anomaly settings")

    def for_meter(self, meter: str) -> MeterParams:
        """The effective settings of ``meter`` (assumes ``validate()`` passed)."""
        over = self.meters.get(meter) if isinstance(self.meters, Mapping) else None
        base = MeterParams(
            interval_ms=self.interval_ms, direction=self.direction,
            sensitivity=float(self.sensitivity),
            min_abs_deviation=float(self.min_abs_deviation), min_ratio=float(self.min_ratio),
            warmup_windows=self.warmup_windows, resolve_windows=self.resolve_windows,
            adapt_windows=self.adapt_windows, enabled=True,
        )
        if over is None:
            return base
        return replace(
            base,
            direction=base.direction if over.direction is None else over.direction,
            sensitivity=base.sensitivity if over.sensitivity is None else float(
                over.sensitivity),
            min_abs_deviation=base.min_abs_deviation if over.min_abs_deviation is None
            else float(over.min_abs_deviation),
            min_ratio=base.min_ratio if over.min_ratio is None else float(over.min_ratio),
            enabled=over.enabled,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What saved detector state depends on: state saved under another interval would
        put values in the wrong hour-of-week slots, so a restore compares this."""
        return {"interval_ms": self.interval_ms}


def _value_errors(where: str, direction: Any, sensitivity: Any, min_abs: Any, min_ratio: Any,
                  optional: bool = False) -> list[str]:
    out = []
    if not (optional and direction is None) and direction not in DIRECTIONS:
        out.append(f"{where}direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if not (optional and sensitivity is None) and not _number(sensitivity, above=0.0):
        out.append(f"{where}sensitivity must be a number > 0, got {sensitivity!r}")
    if not (optional and min_abs is None) and not _number(min_abs, at_least=0.0):
        out.append(f"{where}min_abs_deviation must be a number >= 0 (meter units), "
                   f"got {min_abs!r}")
    if not (optional and min_ratio is None) and not _number(min_ratio, above=1.0):
        out.append(f"{where}min_ratio must be a number > 1, got {min_ratio!r}")
    return out


def _number(value: Any, above: float | None = None, at_least: float | None = None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if not math.isfinite(value):
        return False
    if above is not None and not value > above:
        return False
    return at_least is None or value >= at_least
