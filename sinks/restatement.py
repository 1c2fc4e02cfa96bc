"""The usage views' restatement of late events (docs/rollups.md, "Late usage is restated").

Rendered here, applied by :func:`meterline.sinks.schema.migrate`. The rollup rows never
change for a late event; the views add it to what readers see:

* ``late_events_restated`` collapses ``late_events`` to one row per idempotency scope
  ``(customer, meter, event_id)`` and says whether it is restated and why not;
* ``hourly_usage`` / ``daily_usage`` combine the rollup rows of a window (FINAL, then per
  aggregation, as before) and add the window's restated late events.

``{restatement_horizon_ms}`` and ``{database}`` are filled in by ``View.create_sql``.
"""

from __future__ import annotations

from meterline.sinks.ddl import Table, View
from meterline.sinks.reaggregation import reaggregated_windows_sql

__all__ = ["DAY_MS", "HOUR_MS", "late_events_restated_view", "usage_view"]

HOUR_MS = 3_600_000
DAY_MS = 86_400_000

# Late events, one row per (customer, meter, event_id) - its first copy in log order, the
# idempotency scope - with whether the usage views restate it, and why not:
# * beyond_restatement_horizon: it arrived more than the horizon after its hourly window
#   ended (``RetentionPolicy.restatement_horizon_days``, baked in by migrate);
# * counted_before: raw_events holds an earlier delivery of the same id. The fold forgets
#   an id once its dedupe horizon has passed and its window closed, so a resend after that
#   reaches late_events although the original was counted (on time, in a rollup, or as an
#   earlier late copy): restating it would count it twice.
#   Both tables are fed from the usage topic, so log positions compare. When raw has no
#   row for the id (not loaded yet, or past raw retention) or no log position (-1) this
#   cannot be checked and the event is restated.
# Grouping by the scope (rather than FINAL) also collapses a resend in another window.
_LATE_FIRST = ("group_key", "dimensions", "quantity", "timestamp_ms", "window_start_ms",
               "received_at_ms", "source", "source_partition", "source_offset", "position")
_LATE_RESTATED_QUERY = (
    "SELECT customer, meter, event_id, group_key, dimensions, quantity, timestamp_ms,\n"
    "    window_start_ms, received_at_ms, source, source_partition, source_offset, position,\n"
    "    received_at_ms - (window_start_ms + 3600000) AS delay_ms,\n"
    "    multiIf(delay_ms > {restatement_horizon_ms}, 'beyond_restatement_horizon',\n"
    "            raw.found = 1 AND raw.source_offset >= 0 AND\n"
    "            (raw.source_partition, raw.source_offset, raw.position)\n"
    "                < (source_partition, source_offset, position), 'counted_before',\n"
    "            '') AS reason,\n"
    "    reason = '' AS restated\n"
    "FROM (\n"
    "    SELECT customer, meter, event_id,\n"
    + ",\n".join(f"        first.{i} AS {name}" for i, name in enumerate(_LATE_FIRST, 1))
    + "\n"
    "    FROM (\n"
    "        SELECT customer, meter, event_id,\n"
    f"            argMin(({', '.join(_LATE_FIRST)}),\n"
    "                   (source_partition, source_offset, position)) AS first\n"
    "        FROM {source}\n"
    "        GROUP BY customer, meter, event_id\n"
    "    )\n"
    ") AS late\n"
    "LEFT JOIN (\n"
    "    SELECT customer, meter, event_id, source_partition, source_offset, position,\n"
    "        toUInt8(1) AS found\n"
    "    FROM {database}.raw_events_deduplicated\n"
    "    WHERE (customer, meter, event_id) IN (SELECT customer, meter, event_id FROM {source})\n"
    ") AS raw ON raw.customer = late.customer AND raw.meter = late.meter\n"
    "    AND raw.event_id = late.event_id\n"
)



def late_events_restated_view(late_events: Table) -> View:
    """``late_events_restated``: every late event once, with ``delay_ms``, ``restated`` and
    ``reason``. Reads ``raw_events_deduplicated``, so it is created after that view."""
    return View(name="late_events_restated", source=late_events, query=_LATE_RESTATED_QUERY)

_WINDOW_KEY = ("customer", "meter", "group_key", "dimensions", "window_start_ms",
               "window_end_ms", "aggregation")
_AGGREGATES = ("rollup_value", "rollup_events", "source_partitions", "updated_at_ms",
               "late_count", "late_sum", "late_min", "late_max", "late_beyond", "has_rollup")
_ZERO_DECIMAL = "toDecimal256(0, 9)"


def usage_view(name: str, rollups: Table, window_ms: int) -> View:
    """A usage view (``hourly_usage`` / ``daily_usage``) over ``rollups``: reads
    ``late_events_restated`` and both rollup tables, so it is created after them."""
    return View(name=name, source=rollups, query=_usage_query(window_ms))


def _usage_query(window_ms: int) -> str:
    """The usage view of one window length: rollup rows combined per window, plus the late
    events restated into it (see the module docstring and docs/rollups.md)."""
    rollups = (
        f"    SELECT {', '.join(_WINDOW_KEY)},\n"
        "        toDecimal256(multiIf(aggregation = 'min', min(value),\n"
        "                             aggregation = 'max', max(value),\n"
        "                             aggregation = 'latest',\n"
        "                             argMax(value, (source, source_partition)),\n"
        "                             sum(value)), 9) AS rollup_value,\n"
        "        sum(events) AS rollup_events, count() AS source_partitions,\n"
        "        max(updated_at_ms) AS updated_at_ms,\n"
        f"        toUInt64(0) AS late_count, {_ZERO_DECIMAL} AS late_sum,\n"
        f"        {_ZERO_DECIMAL} AS late_min, {_ZERO_DECIMAL} AS late_max,\n"
        "        toUInt64(0) AS late_beyond, toUInt8(1) AS has_rollup\n"
        "    FROM {source} FINAL\n"
        f"    GROUP BY {', '.join(_WINDOW_KEY)}\n"
    )
    # (The alias is long on purpose: ClickHouse resolves a one-letter alias such as ``m``
    # before a database of that name, and ``m.late_events_restated`` then fails.)
    # The meter's aggregation is not in late_events: take it from the meter's rollup rows
    # in either table (a meter has one aggregation). A meter with no rollup row at all gets
    # '' and its late events stay pending (not restated) rather than guessed.
    late = (
        "    SELECT customer, meter, group_key, any(dimensions) AS dimensions,\n"
        "        window_start_ms,\n"
        f"        window_start_ms + {window_ms} AS window_end_ms, aggregation,\n"
        f"        {_ZERO_DECIMAL} AS rollup_value, toUInt64(0) AS rollup_events,\n"
        "        toUInt64(0) AS source_partitions, toInt64(0) AS updated_at_ms,\n"
        "        countIf(restated) AS late_count,\n"
        "        sumIf(toDecimal256(quantity, 9), restated) AS late_sum,\n"
        "        minIf(toDecimal256(quantity, 9), restated) AS late_min,\n"
        "        maxIf(toDecimal256(quantity, 9), restated) AS late_max,\n"
        "        countIf(reason = 'beyond_restatement_horizon') AS late_beyond,\n"
        "        toUInt8(0) AS has_rollup\n"
        "    FROM (\n"
        "        SELECT l.customer AS customer, l.meter AS meter, l.group_key AS group_key,\n"
        "            l.dimensions AS dimensions,\n"
        f"            intDiv(l.window_start_ms, {window_ms}) * {window_ms} AS window_start_ms,\n"
        "            l.quantity AS quantity, l.restated AS restated, l.reason AS reason,\n"
        "            meter_aggregation.aggregation AS aggregation\n"
        "        FROM {database}.late_events_restated AS l\n"
        "        LEFT JOIN (SELECT meter, any(aggregation) AS aggregation FROM (\n"
        "                       SELECT meter, aggregation FROM {database}.hourly_rollups\n"
        "                       UNION ALL\n"
        "                       SELECT meter, aggregation FROM {database}.daily_rollups)\n"
        "                   GROUP BY meter) AS meter_aggregation\n"
        "            ON meter_aggregation.meter = l.meter\n"
        "    )\n"
        "    GROUP BY customer, meter, group_key, window_start_ms, aggregation\n"
    )
    # ``value`` keeps the type readers (dashboards) had, Decimal(38, 9); ``value_exact`` is
    # Decimal(76, 9), which late events cannot overflow. A restated window beyond
    # Decimal(38, 9) (10^29 units: only absurd quantities reach it) makes reading ``value``
    # of it fail loudly rather than wrap; the query helpers read ``value_exact``.
    # Aggregation-specific restatement: sum adds the late quantities, count the late
    # events, min/max take the extreme. unique_count and latest cannot be corrected from a
    # quantity (their value needs the window's users / its newest timestamp, neither stored
    # per window): they are re-aggregated from raw events (below and in the helpers).
    combined = ", ".join(
        f"{'max' if name in ('updated_at_ms', 'has_rollup') else 'sum'}({name}) AS c_{name}"
        if name not in ("late_min", "late_max") else f"{name[5:]}If({name}, late_count > 0)"
        f" AS c_{name}" for name in _AGGREGATES)
    # latest is re-aggregated from raw here (it needs no registry: sinks/reaggregation.py);
    # unique_count needs the meter's value_property, so the query helpers do it and the
    # view reports its late events as pending. ``reaggregated``: raw holds exactly the
    # window's counted events (the rollup's and the restated late ones), so its newest
    # event is the window's; otherwise the window stays pending, not guessed.
    latest = reaggregated_windows_sql(window_ms, "{database}", "''", ("latest",))
    return (
        f"SELECT {', '.join('u.' + k + ' AS ' + k for k in _WINDOW_KEY)},\n"
        "    u.aggregation = 'latest' AND u.c_late_count > 0\n"
        "        AND r.raw_events = u.c_rollup_events + u.c_late_count AS reaggregated,\n"
        "    multiIf(reaggregated, r.raw_latest,\n"
        "            c_late_count = 0 OR NOT additive, c_rollup_value,\n"
        "            aggregation = 'sum', c_rollup_value + c_late_sum,\n"
        "            aggregation = 'count', c_rollup_value + toDecimal256(c_late_count, 9),\n"
        "            aggregation = 'min',\n"
        "            if(c_has_rollup = 1, least(c_rollup_value, c_late_min), c_late_min),\n"
        "            if(c_has_rollup = 1, greatest(c_rollup_value, c_late_max), c_late_max)\n"
        "    ) AS value_exact,\n"
        "    toDecimal128(value_exact, 9) AS value,\n"
        "    c_rollup_events + late_events AS events,\n"
        "    c_source_partitions AS source_partitions,\n"
        "    c_updated_at_ms AS updated_at_ms,\n"
        "    if(additive OR reaggregated, c_late_count, 0) AS late_events,\n"
        "    toUInt8(late_events > 0) AS restated,\n"
        "    if(additive OR reaggregated, 0, c_late_count) AS late_pending,\n"
        "    c_late_beyond AS late_beyond_horizon,\n"
        "    c_rollup_value AS rollup_value,\n"
        "    c_rollup_events AS rollup_events\n"
        "FROM (\n"
        "    SELECT customer, meter, group_key, any(dimensions) AS dimensions,\n"
        "        window_start_ms, max(window_end_ms) AS window_end_ms,\n"
        "        max(aggregation) AS aggregation,\n"
        "        aggregation IN ('sum', 'count', 'min', 'max') AS additive,\n"
        f"        {combined}\n"
        "    FROM (\n"
        f"{rollups}"
        "    UNION ALL\n"
        f"{late}"
        "    )\n"
        "    GROUP BY customer, meter, group_key, window_start_ms\n"
        ") AS u\n"
        "LEFT JOIN (\n"
        f"{latest}\n"
        ") AS r ON r.customer = u.customer AND r.meter = u.meter\n"
        "    AND r.group_key = u.group_key AND r.window_start_ms = u.window_start_ms\n"
        "WHERE c_has_rollup = 1 OR c_late_count > 0"
    )
