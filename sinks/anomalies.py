"""The ``anomalies`` table: every episode event and early warning, once per key.

Rows are :class:`~meterline.core.anomaly.model.EpisodeEvent` as written by the anomaly
stage (``aggregators/anomaly_stage.py``). ``event_key`` (series, episode start, sequence;
``...|early`` for early warnings) is deterministic, so a replayed write is the same row and
``ReplacingMergeTree`` keeps one; readers use the ``anomaly_events`` view (FINAL) or the
query objects here, never the table. Values are floats in the detector (they explain
usage, never bill it; exact totals are in the rollups), stored as Decimal(38, 9) rounded to
9 decimals (the chDB insert path takes no floats).

Retention is a TTL on ``since_ms`` (the episode's start, so an episode's events expire
together): ``[retention] anomalies_days`` (400 by default, like the hourly rollups the
episodes are about), overridable per meter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from meterline.core.anomaly.model import EVENT_KINDS, EpisodeEvent
from meterline.core.outputs import group_key
from meterline.sinks.anomaly_ddl import anomaly_ddl
from meterline.sinks.exceptions import SinkConfigError
from meterline.sinks.storage import DEFAULT_DATABASE, Storage, is_identifier

__all__ = ["ANOMALIES", "ANOMALY_EVENTS", "AnomalyCopiesQuery", "AnomalyEventRow",
           "AnomalyEventsQuery", "OpenEpisodesQuery", "write_events"]

ANOMALIES, ANOMALY_EVENTS = anomaly_ddl()
_INSERT = tuple(c.name for c in ANOMALIES.columns if c.kind in (None, "EPHEMERAL"))
_TYPES = ANOMALIES.insert_types(_INSERT)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _nanos(x: float) -> int:
    # Decimal(38, 9) like every other number in ClickHouse here (the chDB insert path
    # takes no floats); 9 decimals are far finer than any explanation needs.
    return round(x * 10**9)


def _row(event: EpisodeEvent, written_at_ms: int) -> tuple[Any, ...]:
    a = event.anomaly
    s = event.series
    return (event.key, event.kind, s.customer, s.meter, group_key(s.group), dict(s.group),
            event.since_ms, event.seq, event.window_start_ms,
            0 if event.until_ms is None else event.until_ms, event.windows, a.detector,
            a.direction, a.severity, _nanos(a.observed), _nanos(a.expected), _nanos(a.lower),
            _nanos(a.upper), _nanos(a.score),
            a.window_start_ms, a.explain(), written_at_ms)


def write_events(storage: Storage, events: Sequence[EpisodeEvent], *,
                 database: str | None = None,
                 clock_ms: Callable[[], int] = _wall_clock_ms) -> int:
    """Insert ``events`` (idempotent per key); every problem is reported at once."""
    database = database or storage.database
    errors = []
    if not is_identifier(database):
        errors.append(f"database {database!r} is not a plain identifier")
    errors += [f"event {e.key}: kind {e.kind!r} is not one of {', '.join(EVENT_KINDS)}"
               for e in events if e.kind not in EVENT_KINDS]
    if errors:
        raise SinkConfigError("anomaly events", errors)
    if not events:
        return 0
    now = clock_ms()
    rows = [_row(e, now) for e in events]
    columns = {name: [r[i] for r in rows] for i, name in enumerate(_INSERT)}
    storage.insert_columns(ANOMALIES.qualified(database), columns, _TYPES)
    return len(rows)


# --------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class AnomalyEventRow:
    event_key: str
    kind: str
    customer: str
    meter: str
    dimensions: dict[str, str]
    since_ms: int
    seq: int
    window_start_ms: int
    direction: str
    severity: str
    observed: float
    expected: float
    explanation: str


_ROW_COLUMNS = ("event_key", "kind", "customer", "meter", "dimensions", "since_ms", "seq",
                "window_start_ms", "direction", "severity", "observed", "expected",
                "explanation")


def _parse(rows: Sequence[Sequence[Any]]) -> list[AnomalyEventRow]:
    return [AnomalyEventRow(str(k), str(kind), str(c), str(m), dict(d), int(since), int(seq),
                            int(w), str(direction), str(sev), float(obs), float(exp), str(x))
            for k, kind, c, m, d, since, seq, w, direction, sev, obs, exp, x in rows]


@dataclass(frozen=True)
class AnomalyEventsQuery:
    """Events of episodes that started in ``[start_ms, end_ms)``, optionally of one
    customer / meter / kind, in a fixed order (episode, then sequence)."""

    start_ms: int
    end_ms: int
    customer: str | None = None
    meter: str | None = None
    kinds: tuple[str, ...] | None = None
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        errors = []
        if not is_identifier(self.database):
            errors.append(f"database {self.database!r} is not a plain identifier")
        if not (isinstance(self.start_ms, int) and isinstance(self.end_ms, int)
                and self.start_ms < self.end_ms):
            errors.append(f"need int start_ms < end_ms, got {self.start_ms!r}, {self.end_ms!r}")
        if self.kinds is not None:
            errors += [f"kind {k!r} is not one of {', '.join(EVENT_KINDS)}"
                       for k in self.kinds if k not in EVENT_KINDS]
        if errors:
            raise SinkConfigError("anomaly events query", errors)
        where = ["since_ms >= {start_ms:Int64}", "since_ms < {end_ms:Int64}"]
        params: dict[str, Any] = {"start_ms": self.start_ms, "end_ms": self.end_ms}
        if self.customer is not None:
            where.append("customer = {customer:String}")
            params["customer"] = self.customer
        if self.meter is not None:
            where.append("meter = {meter:String}")
            params["meter"] = self.meter
        if self.kinds is not None:
            # One scalar parameter per kind: array parameters are not portable to chDB.
            names = [f"kind{i}" for i in range(len(self.kinds))]
            where.append("kind IN (" + ", ".join(f"{{{n}:String}}" for n in names) + ")")
            params.update(zip(names, self.kinds, strict=True))
        sql = (f"SELECT {', '.join(_ROW_COLUMNS)}\n"
               f"FROM {ANOMALY_EVENTS.qualified(self.database)}\n"
               "WHERE " + "\n  AND ".join(where) + "\n"
               "ORDER BY customer, meter, group_key, since_ms, seq")
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> list[AnomalyEventRow]:
        return _parse(rows)

    def run(self, storage: Storage) -> list[AnomalyEventRow]:
        return self.parse(storage.query_rows(*self.to_sql()))


@dataclass(frozen=True)
class OpenEpisodesQuery:
    """Episodes opened and not resolved (as far as the table knows), newest first: their
    ``open`` event, optionally of one meter."""

    meter: str | None = None
    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        if not is_identifier(self.database):
            raise SinkConfigError("open episodes query",
                                  [f"database {self.database!r} is not a plain identifier"])
        source = ANOMALY_EVENTS.qualified(self.database)
        params: dict[str, Any] = {}
        meter = ""
        if self.meter is not None:
            meter = "  AND meter = {meter:String}\n"
            params["meter"] = self.meter
        sql = (f"SELECT {', '.join(_ROW_COLUMNS)}\n"
               f"FROM {source}\n"
               "WHERE kind = 'open'\n"
               f"{meter}"
               "  AND (customer, meter, group_key, since_ms) NOT IN (\n"
               f"    SELECT customer, meter, group_key, since_ms FROM {source}"
               " WHERE kind = 'resolve')\n"
               "ORDER BY since_ms DESC, customer, meter, group_key")
        return sql, params

    def parse(self, rows: Sequence[Sequence[Any]]) -> list[AnomalyEventRow]:
        return _parse(rows)

    def run(self, storage: Storage) -> list[AnomalyEventRow]:
        return self.parse(storage.query_rows(*self.to_sql()))


@dataclass(frozen=True)
class AnomalyCopiesQuery:
    """Per event key: how many rows the table holds before ReplacingMergeTree collapses
    them, and how many *different* contents among them (``written_at_ms`` aside). A replay
    after a crash writes a key again; an exact replay writes the same content, so
    ``distinct`` is 1 for every episode event (early warnings may differ: their partial
    totals depend on what a flush happened to see). For audits and the kill -9 tests."""

    database: str = DEFAULT_DATABASE

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        if not is_identifier(self.database):
            raise SinkConfigError("anomaly copies query",
                                  [f"database {self.database!r} is not a plain identifier"])
        content = ", ".join(c.name for c in ANOMALIES.columns if c.kind != "EPHEMERAL"
                            and c.name not in ("event_key", "written_at_ms"))
        sql = (f"SELECT event_key, any(kind), count(), uniqExact(tuple({content}))\n"
               f"FROM {ANOMALIES.qualified(self.database)}\n"
               "GROUP BY event_key\n"
               "ORDER BY event_key")
        return sql, {}

    def parse(self, rows: Sequence[Sequence[Any]]) -> dict[str, tuple[str, int, int]]:
        return {str(k): (str(kind), int(n), int(d)) for k, kind, n, d in rows}

    def run(self, storage: Storage) -> dict[str, tuple[str, int, int]]:
        return self.parse(storage.query_rows(*self.to_sql()))
