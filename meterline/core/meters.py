"""Meter definitions and the registry loaded from a TOML file.

A meter names a billable quantity and says how its events aggregate. Example::

    [meters.api_calls]
    aggregation = "count"
    unit = "request"
    dimensions = ["endpoint", "region"]

    [meters.active_users]
    aggregation = "unique_count"
    value_property = "user_id"      # counts distinct values of this dimension
    dimensions = ["user_id", "plan"]

Loading validates every meter and reports *all* problems at once (``ConfigError.errors``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from meterline.core.errors import ConfigError
from meterline.core.events import MAX_DIMENSION_KEY_LEN, MAX_DIMENSIONS, METER_NAME_RE


class Aggregation(StrEnum):
    SUM = "sum"
    COUNT = "count"
    MIN = "min"
    MAX = "max"
    LATEST = "latest"
    UNIQUE_COUNT = "unique_count"


_KNOWN_KEYS = {
    "aggregation",
    "unit",
    "description",
    "value_property",
    "dimensions",
    "allow_negative",
}


@dataclass(frozen=True, slots=True)
class Meter:
    name: str
    aggregation: Aggregation
    unit: str = "unit"
    description: str = ""
    # Where the value comes from: "quantity" (the event's quantity) for sum/min/max/latest;
    # for unique_count, the dimension whose distinct values are counted. HTTP ingest maps
    # CloudEvents `data.<value_property>` onto it.
    value_property: str = "quantity"
    # Allowed dimension keys. Events carrying other keys are rejected, which keeps the
    # rollup key space (customer x meter x group) bounded and predictable.
    dimensions: tuple[str, ...] = ()
    allow_negative: bool = False

    @property
    def group_by(self) -> tuple[str, ...]:
        """Dimensions that split rollups. A unique_count's value dimension is counted, not
        grouped by."""
        if self.aggregation is Aggregation.UNIQUE_COUNT:
            return tuple(d for d in self.dimensions if d != self.value_property)
        return self.dimensions


class MeterRegistry:
    """Immutable lookup of meters by name."""

    def __init__(self, meters: Iterable[Meter]) -> None:
        self._meters = {m.name: m for m in meters}

    def get(self, name: str) -> Meter | None:
        return self._meters.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._meters

    def __iter__(self) -> Iterator[Meter]:
        return iter(self._meters.values())

    def __len__(self) -> int:
        return len(self._meters)

    @property
    def names(self) -> list[str]:
        return sorted(self._meters)

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], source: str = "meters") -> MeterRegistry:
        meters, errors = _parse(doc)
        if errors:
            raise ConfigError(errors, source)
        return cls(meters)

    @classmethod
    def load(cls, path: str | Path) -> MeterRegistry:
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"cannot read: {exc}"], str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
        return cls.from_mapping(doc, str(path))


def _parse(doc: Mapping[str, Any]) -> tuple[list[Meter], list[str]]:
    errors: list[str] = []
    table = doc.get("meters")
    if not isinstance(table, Mapping) or not table:
        return [], ["needs a non-empty [meters.<name>] table"]
    meters = []
    for name, spec in table.items():
        where = f"meters.{name}"
        if not METER_NAME_RE.match(name):
            errors.append(f"{where}: name must match {METER_NAME_RE.pattern}")
        if not isinstance(spec, Mapping):
            errors.append(f"{where}: must be a table")
            continue
        unknown = sorted(set(spec) - _KNOWN_KEYS)
        if unknown:
            errors.append(f"{where}: unknown key(s) {', '.join(unknown)}")
        agg_name = spec.get("aggregation")
        try:
            if not isinstance(agg_name, str):
                raise ValueError(agg_name)
            aggregation = Aggregation(agg_name)
        except ValueError:
            errors.append(
                f"{where}.aggregation: {agg_name!r} is not one of "
                f"{', '.join(a.value for a in Aggregation)}"
            )
            aggregation = Aggregation.SUM
        dims = spec.get("dimensions", [])
        if not isinstance(dims, list) or not all(isinstance(d, str) and d for d in dims):
            errors.append(f"{where}.dimensions: must be a list of non-empty strings")
            dims = []
        if len(dims) > MAX_DIMENSIONS:
            errors.append(f"{where}.dimensions: more than {MAX_DIMENSIONS}")
        if len(set(dims)) != len(dims):
            errors.append(f"{where}.dimensions: duplicates")
        if any(len(d) > MAX_DIMENSION_KEY_LEN for d in dims):
            errors.append(f"{where}.dimensions: keys longer than {MAX_DIMENSION_KEY_LEN}")
        value_property = spec.get("value_property", "quantity")
        if not isinstance(value_property, str) or not value_property:
            errors.append(f"{where}.value_property: must be a non-empty string")
            value_property = "quantity"
        if aggregation is Aggregation.UNIQUE_COUNT and value_property not in dims:
            errors.append(
                f"{where}.value_property: unique_count needs value_property to name one of "
                f"its dimensions, got {value_property!r}"
            )
        for key, kind in (("unit", str), ("description", str), ("allow_negative", bool)):
            if key in spec and not isinstance(spec[key], kind):
                errors.append(f"{where}.{key}: must be a {kind.__name__}")
        meters.append(
            Meter(
                name=name,
                aggregation=aggregation,
                unit=str(spec.get("unit", "unit")),
                description=str(spec.get("description", "")),
                value_property=value_property,
                dimensions=tuple(dims),
                allow_negative=bool(spec.get("allow_negative", False)),
            )
        )
    return meters, errors
