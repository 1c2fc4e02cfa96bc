"""DDL of the ``anomalies`` table and its ``anomaly_events`` view (see sinks/anomalies.py).

``sinks/schema.py`` (the one DDL source) lists them in its migrations by calling
:func:`tables` / :func:`views`. They are built lazily, after schema's ``Table`` classes
exist, so importing either module first works (as ``billing_tables.py`` does).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meterline.sinks.ddl import Table, View

__all__ = ["anomaly_ddl", "tables", "views"]


@cache
def anomaly_ddl() -> tuple[Table, View]:
    """``(anomalies table, anomaly_events view)``."""
    from meterline.sinks.ddl import Column, Table, TtlRule, View, exact_decimal

    table = Table(
        name="anomalies",
        columns=(
            Column("event_key", "String", comment="series|since_ms|seq (or |early): idempotency"),
            Column("kind", "LowCardinality(String)", comment="open | update | resolve | early"),
            Column("customer", "String"),
            Column("meter", "LowCardinality(String)"),
            Column("group_key", "String", comment="canonical k=v&k=v text of dimensions"),
            Column("dimensions", "Map(String, String)"),
            Column("since_ms", "Int64", comment="episode start (early: the window), UTC ms"),
            Column("seq", "Int32", comment="0 open, then updates and resolve; -1 early"),
            Column("window_start_ms", "Int64", comment="the window that caused the event"),
            Column("until_ms", "Int64", comment="resolve: end of the last abnormal window; else 0"),
            Column("windows", "UInt32", comment="abnormal windows in the episode so far"),
            Column("detector", "LowCardinality(String)"),
            Column("direction", "LowCardinality(String)", comment="up | down"),
            Column("severity", "LowCardinality(String)", comment="minor | major | critical"),
            *exact_decimal("observed", "observed value (so far, for an early warning)"),
            *exact_decimal("expected", "expected value"),
            *exact_decimal("lower", "lower end of the normal band"),
            *exact_decimal("upper", "upper end of the normal band"),
            *exact_decimal("score", "signed robust z"),
            Column("anomaly_window_ms", "Int64", comment="window of the anomaly (resolve: peak)"),
            Column("explanation", "String"),
            Column("written_at_ms", "Int64", comment="write time, UTC ms (informational)"),
        ),
        # A replayed event is the same key with the same values: any copy may win.
        engine="ReplacingMergeTree",
        partition_by="toYYYYMM(fromUnixTimestamp64Milli(since_ms, 'UTC'))",
        order_by=("customer", "meter", "since_ms", "event_key"),
        ttl=TtlRule("toDateTime(intDiv(since_ms, 1000))", "anomalies_days", meter_column="meter"),
        comment="Anomaly episode events and early warnings; read through anomaly_events",
    )

    columns = tuple(c.name for c in table.columns if c.name != "written_at_ms")
    return table, View(name="anomaly_events", source=table, columns=columns)


def tables() -> tuple[Table, ...]:
    return (anomaly_ddl()[0],)


def views() -> tuple[View, ...]:
    return (anomaly_ddl()[1],)
