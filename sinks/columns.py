"""Column bundles and the checks every table writer shares (raw events, rollups, late events).

A bundle is a frozen dataclass with one list per column (index i is row i). Writers validate
per *row* (:func:`bad_ints`) so that one row a table cannot hold is set aside with a reason
instead of failing the whole insert; :func:`partition_groups` splits an insert so that no
block touches more partitions than ClickHouse accepts in one INSERT.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from meterline.sinks.exceptions import SinkConfigError

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "MAX_PARTITIONS_PER_INSERT",
    "UINT64_MAX",
    "Columns",
    "bad_ints",
    "check_ints",
    "check_lengths",
    "month_of_ms",
    "partition_groups",
    "pick",
    "range_errors",
    "require",
    "year_of_ms",
]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT64_MAX = 2**64 - 1
# ClickHouse's default max_partitions_per_insert_block: a block touching more partitions
# fails the whole INSERT ("Too many partitions for single INSERT block"), which a loader
# would retry forever. Inserts are split so that no block exceeds it.
MAX_PARTITIONS_PER_INSERT = 100


def check_lengths(columns: Mapping[str, Sequence[Any]], errors: list[str]) -> None:
    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        errors.append(f"columns have different lengths: {lengths}")


def check_ints(name: str, values: Sequence[Any], errors: list[str], low: int, high: int) -> None:
    """Whole-column check: every value an ``int`` in [low, high]."""
    # A float would be truncated on its way into an integer column; on the billing path
    # that is a silently wrong invoice, so every value is checked (~40 ms per million).
    if not values:
        return
    kinds = set(map(type, values))
    if kinds != {int}:
        bad = sorted(k.__name__ for k in kinds - {int})
        errors.append(f"{name} must hold only int values, found {', '.join(bad)}")
    elif min(values) < low or max(values) > high:
        errors.append(f"{name} has values outside [{low}, {high}]")


def bad_ints(name: str, values: Sequence[Any], low: int, high: int,
             bad: dict[int, str]) -> None:
    """Per-row check: record ``{row: reason}`` in ``bad`` for each value that is not an
    ``int`` in [low, high]. The common all-good column costs two C-level passes."""
    if not values:
        return
    if set(map(type, values)) == {int} and low <= min(values) and max(values) <= high:
        return
    for i, value in enumerate(values):
        if type(value) is not int:
            bad.setdefault(i, f"{name} must be an int, got {type(value).__name__}")
        elif not low <= value <= high:
            bad.setdefault(i, f"{name} {value} outside [{low}, {high}]")


class Columns:
    """Shared by the column bundles: length is the first column's, columns by field name."""

    def __len__(self) -> int:
        return len(getattr(self, fields(self)[0].name))  # type: ignore[arg-type]

    def as_columns(self) -> dict[str, Sequence[Any]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


def pick(columns: Mapping[str, Sequence[Any]], rows: Sequence[int]) -> dict[str, list[Any]]:
    return {name: [values[i] for i in rows] for name, values in columns.items()}


def range_errors(start_ms: int | None, end_ms: int | None) -> list[str]:
    errors = []
    for name, value in (("start_ms", start_ms), ("end_ms", end_ms)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            errors.append(f"{name} must be int milliseconds, got {value!r}")
    if not errors and start_ms is not None and end_ms is not None and start_ms >= end_ms:
        errors.append(f"empty range: start_ms {start_ms} >= end_ms {end_ms}")
    return errors


def require(errors: list[str], what: str) -> None:
    if errors:
        raise SinkConfigError(what, errors)


# --------------------------------------------------------------------------- partitions


def month_of_ms(ms: int) -> int:
    """``toYYYYMM(fromUnixTimestamp64Milli(ms, 'UTC'))`` in Python (integer seconds: exact)."""
    t = datetime.fromtimestamp(ms // 1000, UTC)
    return t.year * 100 + t.month


def year_of_ms(ms: int) -> int:
    """``toYear(fromUnixTimestamp64Milli(ms, 'UTC'))`` in Python."""
    return datetime.fromtimestamp(ms // 1000, UTC).year


def _span(key_of: Callable[[int], int], low_ms: int, high_ms: int) -> int:
    """An upper bound of the distinct partition keys between two times (months or years)."""
    low, high = key_of(low_ms), key_of(high_ms)
    if key_of is month_of_ms:
        return (high // 100 - low // 100) * 12 + high % 100 - low % 100 + 1
    return high - low + 1


def partition_groups(times_ms: Sequence[int], key_of: Callable[[int], int],
                     limit: int = MAX_PARTITIONS_PER_INSERT) -> list[list[int]] | None:
    """Row indices grouped so that each group spans at most ``limit`` partitions, or None
    when one insert is fine (the common case: decided from min/max alone, no per-row work).

    ``times_ms`` are the values of the table's partition column; ``key_of`` is the Python
    twin of its PARTITION BY expression (:func:`month_of_ms`, :func:`year_of_ms`).
    """
    if not times_ms or _span(key_of, min(times_ms), max(times_ms)) <= limit:
        return None
    by_key: dict[int, list[int]] = {}
    for i, ms in enumerate(times_ms):
        by_key.setdefault(key_of(ms), []).append(i)
    keys = sorted(by_key)
    return [[i for key in keys[n:n + limit] for i in by_key[key]]
            for n in range(0, len(keys), limit)]
