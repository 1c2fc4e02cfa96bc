"""Re-aggregation of unique_count and latest windows from raw events (docs/rollups.md,
"Late usage is restated").

A late event cannot be added to a unique_count or latest window's value: whether it adds
a distinct user needs the window's set of users, and whether it is the newest needs the
window's newest timestamp, neither of which a rollup row keeps. ``raw_events_deduplicated``
keeps every counted event, so such a window is re-aggregated from it:

* unique_count: ``uniqExact`` of ``dimensions[value_property]`` over the window's events
  in the window's group (the property is in the meter registry, not in ClickHouse: the
  caller passes it as an SQL expression of ``meter``);
* latest: the quantity of the newest event by ``(timestamp_ms, event_id, quantity)``, the
  fold's own total order (``meterline.core.aggregations.Latest``), so a re-aggregated
  window agrees with what the fold would have written had the late event been on time.

Raw is only trusted when it holds exactly the window's events: ``raw_events`` must equal
the rollup's events plus the restated late events. Otherwise (raw not loaded yet, past raw
retention, an event raw kept but the rollup stage dead-lettered) the caller keeps the
window pending rather than report a value short or long of the truth.

The group of a raw event is matched against the window's ``dimensions`` map: the fold
writes every ``group_by`` key (``""`` when the event lacks it) and a missing Map key reads
as ``""`` in ClickHouse, so ``dimensions[k] = v`` for every group key is the fold's rule.
A unique_count's value property is not a group key, so it does not split the match.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meterline.sinks.ddl import sql_string

__all__ = ["REAGGREGATED", "reaggregated_windows_sql", "value_property_params"]

# Aggregations whose windows are re-aggregated rather than corrected additively.
REAGGREGATED = ("latest", "unique_count")


def reaggregated_windows_sql(window_ms: int, database: str, value_property: str,
                             aggregations: Iterable[str] = REAGGREGATED) -> str:
    """One row per ``(customer, meter, group_key, window_start_ms)`` of ``window_ms`` that
    has restated late events and a meter of ``aggregations``, with ``raw_events`` (the
    window's counted events in raw), ``raw_latest`` (Decimal(76, 9)) and ``raw_unique``
    (UInt64, distinct non-empty values of ``value_property``, an SQL String expression of
    the raw row's ``meter``; ``''`` counts nothing).

    ``database`` is inlined (a view passes the literal ``{database}`` placeholder)."""
    kinds = ", ".join(f"'{a}'" for a in aggregations)
    window = f"intDiv(window_start_ms, {window_ms}) * {window_ms}"
    # Late events beyond the horizon stay out of the value, so out of the re-aggregation
    # too (raw keeps them: it stores every well-formed event).
    return (
        "SELECT w.customer AS customer, w.meter AS meter, w.group_key AS group_key,\n"
        "    w.window_start_ms AS window_start_ms, count() AS raw_events,\n"
        "    argMax(r.quantity, (r.timestamp_ms, r.event_id, r.quantity)) AS raw_latest,\n"
        "    uniqExactIf(r.unique_value, r.unique_value != '') AS raw_unique\n"
        "FROM (\n"
        "    SELECT customer, meter, group_key, any(dimensions) AS dimensions,\n"
        "        bucket AS window_start_ms\n"
        "    FROM (SELECT customer, meter, group_key, dimensions,\n"
        f"              {window} AS bucket\n"
        f"          FROM {database}.late_events_restated\n"
        "          WHERE restated = 1\n"
        "            AND meter IN (SELECT meter FROM (\n"
        f"                SELECT meter, aggregation FROM {database}.hourly_rollups\n"
        "                UNION ALL\n"
        f"                SELECT meter, aggregation FROM {database}.daily_rollups)\n"
        f"                WHERE aggregation IN ({kinds})))\n"
        "    GROUP BY customer, meter, group_key, bucket\n"
        ") AS w\n"
        "INNER JOIN (\n"
        "    SELECT customer, meter, event_id, toDecimal256(quantity, 9) AS quantity,\n"
        "        timestamp_ms, dimensions,\n"
        f"        dimensions[{value_property}] AS unique_value,\n"
        f"        intDiv(timestamp_ms, {window_ms}) * {window_ms} AS raw_window_start_ms\n"
        f"    FROM {database}.raw_events_deduplicated\n"
        "    WHERE (customer, meter) IN (SELECT customer, meter\n"
        f"                                FROM {database}.late_events_restated\n"
        "                                WHERE restated = 1)\n"
        "      AND (customer, meter, event_id) NOT IN (\n"
        "          SELECT customer, meter, event_id\n"
        f"          FROM {database}.late_events_restated\n"
        "          WHERE reason = 'beyond_restatement_horizon')\n"
        ") AS r ON r.customer = w.customer AND r.meter = w.meter\n"
        "    AND r.raw_window_start_ms = w.window_start_ms\n"
        "WHERE arrayAll((k, v) -> r.dimensions[k] = v, mapKeys(w.dimensions),\n"
        "               mapValues(w.dimensions))\n"
        "GROUP BY w.customer, w.meter, w.group_key, w.window_start_ms"
    )


def value_property_params(properties: Mapping[str, str]) -> str:
    """``{meter: value_property}`` -> an SQL String expression of ``meter`` giving its
    property (``''`` for meters not listed). The names are inlined as escaped literals:
    the chDB session cannot bind Array parameters."""
    meters = sorted(properties)
    names = ", ".join(sql_string(m) for m in meters)
    props = ", ".join(sql_string(properties[m]) for m in meters)
    return f"transform(meter, [{names}], [{props}], '')"
