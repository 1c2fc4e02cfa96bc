"""Retention policy: how many days each table keeps rows, per table and per meter.

Pure configuration with validation that reports every error at once; ``schema.py`` renders
it into ClickHouse TTL clauses and ``migrate`` applies changes in place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

from meterline.core.events import METER_NAME_RE
from meterline.sinks.exceptions import SinkConfigError, SinkError

__all__ = ["DATETIME_MAX_S", "PER_METER_FIELDS", "RETENTION_MARGIN_MS", "RetentionPolicy"]


# The last second ClickHouse DateTime holds (2106-02-07T06:28:15Z): TTLs saturate there.
DATETIME_MAX_S = 2**32 - 1
# Rows whose TTL falls within this margin of the writer's clock are treated as already
# expired: the ClickHouse server's clock may run a little ahead of the writer's, and the
# insert happens a moment after the check. Such a row would be deleted right away anyway.
RETENTION_MARGIN_MS = 10 * 60_000

# Retention fields a per-meter override may set: those of the tables with a meter column
# (a dead letter may not even have a readable meter).
PER_METER_FIELDS = ("raw_events_days", "late_events_days", "hourly_rollups_days",
                    "daily_rollups_days", "anomalies_days")
# Coarser data outliving finer data is the point of rollups; the reverse is almost
# certainly a typo in the config.
_FINER_TO_COARSER = ("raw_events_days", "hourly_rollups_days", "daily_rollups_days")


def _days_error(name: str, value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be an int number of days, got {value!r}"
    if value < 1:
        return f"{name} must be >= 1 day, got {value}"
    return None


@dataclass(frozen=True)
class RetentionPolicy:
    """How many days each table keeps rows, applied as ClickHouse TTL.

    ``meters`` overrides fields of :data:`PER_METER_FIELDS` for single meters, e.g.
    ``{"storage_gb": {"raw_events_days": 90}}``. Changing a value and re-running
    :func:`migrate` alters the TTL in place.
    """

    raw_events_days: int = 35  # a full billing month plus a few days to re-rate it
    dead_letters_days: int = 90  # a quarter: time to notice, fix and replay
    hourly_rollups_days: int = 400  # ~13 months: compare a month with the same month last year
    daily_rollups_days: int = 2557  # ~7 years: common statutory retention for billing records
    late_events_days: int = 400  # as long as the hourly rollups they would have corrected
    anomalies_days: int = 400  # anomaly events: as long as the hourly rollups they explain
    # Not a TTL: how long after its hourly window ended a late event may still arrive and be
    # restated into hourly_usage/daily_usage (docs/rollups.md, "Late usage is restated").
    # 35 days: Stripe accepts usage backdated that far, and a spool replay after a long
    # outage must land. Baked into the views by migrate. Not checked against
    # late_events_days: a late event already past that retention is a dead letter
    # (event.outside_retention) at write, visible with its reason either way.
    restatement_horizon_days: int = 35
    meters: Mapping[str, Mapping[str, int]] = field(default_factory=dict, hash=False)

    @classmethod
    def day_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "meters")

    @property
    def restatement_horizon_ms(self) -> int:
        return self.restatement_horizon_days * 86_400_000

    def days_for(self, key: str, meter: str | None = None) -> int:
        """Days for ``key``; with ``meter``, that meter's override if it has one."""
        value = getattr(self, key, None)
        if key not in self.day_fields() or not isinstance(value, int):
            raise SinkError(f"RetentionPolicy has no field {key!r}")
        if meter is not None:
            override = self.meters.get(meter, {}).get(key)
            if override is not None:
                return override
        return value

    def expires_at_ms(self, key: str, age_ms: int, meter: str | None = None) -> int:
        """When ClickHouse's TTL deletes a row whose age column is ``age_ms``: the Python
        twin of ``TtlRule`` (whole seconds, saturating at DateTime's last second)."""
        return _expires_at_ms(age_ms, self.days_for(key, meter))

    def expiry(self, key: str) -> Callable[[int, str | None], int]:
        """``expires_at_ms`` for one ``key``, the days looked up once per meter: for a
        loader checking every row of a flush (``days_for`` validates ``key`` each call)."""
        days: dict[str | None, int] = {}

        def expires_at_ms(age_ms: int, meter: str | None = None) -> int:
            d = days.get(meter)
            if d is None:
                d = days[meter] = self.days_for(key, meter)
            return _expires_at_ms(age_ms, d)

        return expires_at_ms

    def overrides(self, key: str) -> list[tuple[str, int]]:
        """``(meter, days)`` overriding ``key``, sorted by meter so the TTL text is stable."""
        return sorted((m, o[key]) for m, o in self.meters.items() if key in o)

    def validate(self) -> None:
        """Raise :class:`SinkConfigError` listing every problem found."""
        errors = [e for name in self.day_fields()
                  if (e := _days_error(name, getattr(self, name))) is not None]
        errors += self._meter_errors()
        if not errors:
            for meter in (None, *sorted(self.meters)):
                chain = [(name, self.days_for(name, meter)) for name in _FINER_TO_COARSER]
                for (finer, a), (coarser, b) in zip(chain, chain[1:], strict=False):
                    if a > b:
                        scope = "" if meter is None else f"meters.{meter}: "
                        errors.append(f"{scope}{finer} ({a}) exceeds {coarser} ({b})")
        if errors:
            raise SinkConfigError("retention policy", errors)

    def _meter_errors(self) -> list[str]:
        if not isinstance(self.meters, Mapping):
            return [f"meters must map meter names to {{field: days}}, got {self.meters!r}"]
        errors: list[str] = []
        for meter, table in self.meters.items():
            # Meter names end up in TTL text: only registry-valid names are accepted.
            if not isinstance(meter, str) or not METER_NAME_RE.match(meter):
                errors.append(f"meters: {meter!r} is not a meter name "
                              f"(must match {METER_NAME_RE.pattern})")
            if not isinstance(table, Mapping):
                errors.append(f"meters.{meter} must map fields to days, got {table!r}")
                continue
            for key, value in table.items():
                name = f"meters.{meter}.{key}"
                if key in PER_METER_FIELDS:
                    if (error := _days_error(name, value)) is not None:
                        errors.append(error)
                elif key in self.day_fields():
                    errors.append(f"{name}: {key.removesuffix('_days')} has no meter column, "
                                  f"only {', '.join(PER_METER_FIELDS)} can be set per meter")
                else:
                    errors.append(f"{name}: unknown field (per meter: "
                                  f"{', '.join(PER_METER_FIELDS)})")
        return errors


def _expires_at_ms(age_ms: int, days: int) -> int:
    return min(age_ms // 1000 + days * 86_400, DATETIME_MAX_S) * 1000
