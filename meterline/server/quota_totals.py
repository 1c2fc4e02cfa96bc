"""Quota totals kept in memory by the embedded server's rollup writer.

Why: a quota check must answer in milliseconds, but its read of ``daily_usage`` costs
hundreds of milliseconds to seconds in chDB (the view combines partition rows FINAL and
restates late events against raw_events), holds the one chDB engine that the pipeline
stages share, and a cache keyed on the rollup generation was emptied by every flush
(0.5 s): under ingest nearly every check was such a read. docs/server.md "Quota checks".

What: a mirror of the ``daily_rollups`` rows (one per window, group and source
partition, highest version wins, exactly as ``ReplacingMergeTree(version)`` and the view's
FINAL keep them) for the day windows of the current quota periods. It is loaded once
before the stages start and then updated by the writer with each flush *after* the flush
is durable and before the rollup generation moves, so an answer from it includes every
write the rollups have made: it is never staler than the rollups. Without late events a
day window of the view is exactly its partition rows combined (sum; min or max), so a
quota's ``used`` folds those rows the way the view and ``UsageReader.used`` do.

What it does not answer (``None``: the caller reads the views as before):
- a customer's meter with late events in the period (the view restates them by rules
  that live in SQL: within the restatement horizon, not counted before in raw_events);
- a flush some of whose rows the writer refused (they are not in the table);
- a meter whose daily rollups are kept for less than a quota period could last (the
  table's TTL drops its days, the mirror would not);
- periods starting before the mirror's first day, and everything from a failed write until
  the next flush (which writes the failed one's outputs again) is applied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from meterline.core.meters import Aggregation, Meter
from meterline.core.outputs import Flush, group_key
from meterline.core.windows import DAY_MS

# (group_key, day window start, source, partition) -> (version, value_nanos)
Rows = dict[tuple[str, int, str, int], tuple[int, int]]

# A month has at most 31 days: a meter whose daily rollups live shorter than that could
# lose a period's first days to the TTL while the mirror still holds them.
MIN_RETENTION_DAYS = 32
# Rows applied per hold of the lock: ~0.1 ms of dict updates, so a reader on the event
# loop waits at most about that for a flush of any size.
APPLY_CHUNK = 256


class RollupTotals:
    """Thread-safe: the rollup stage's thread applies flushes, request handlers read."""

    def __init__(self, since_ms: int, *, short_retention_meters: Iterable[str] = ()) -> None:
        self.since_ms = since_ms - since_ms % DAY_MS
        self._rows: dict[tuple[str, str], Rows] = {}
        # (customer, meter) -> the latest day window with late events, or the load time
        # for those the load found (their windows are earlier: late means closed)
        self._late: dict[tuple[str, str], int] = {}
        self._short = frozenset(short_retention_meters)
        self._broken = False
        self._lock = threading.Lock()

    def load(self, storage: Any, database: str, now_ms: int) -> None:
        """The table's rows and the late events since ``since_ms``; call before the rollup
        stage writes (the embedded server does, before it starts the stages)."""
        from meterline.sinks.rollup_queries import DailyRollupRowsQuery, LateEventsQuery

        rows = DailyRollupRowsQuery(self.since_ms, database).run(storage)
        late = LateEventsQuery(start_ms=self.since_ms, database=database).run(storage)
        with self._lock:
            for r in rows:
                self._put(r.customer, r.meter, (r.group_key, r.window_start_ms, r.source,
                                                r.partition), r.version, r.value_nanos)
            for key in late:
                self._late[key] = max(self._late.get(key, now_ms), now_ms)

    def _late_at(self, key: tuple[str, str], window_start_ms: int) -> None:
        day = window_start_ms - window_start_ms % DAY_MS
        self._late[key] = max(self._late.get(key, day), day)

    def _put(self, customer: str, meter: str, key: tuple[str, int, str, int], version: int,
             value: int) -> None:
        rows = self._rows.setdefault((customer, meter), {})
        old = rows.get(key)
        # Equal versions: the later insert is the one FINAL keeps.
        if old is None or version >= old[0]:
            rows[key] = (version, value)

    def apply(self, flush: Flush, *, all_written: bool = True) -> None:
        """A flush the writer made durable. ``all_written``: False when the writer refused
        some of its rows (dead letters): its customers' meters are then read from the
        views, since the mirror cannot tell which rows the table lacks."""
        since = self.since_ms
        rollups = flush.rollup_rows()
        # Keys are built outside the lock, and rows go in by chunks: request handlers read
        # on the event loop, and a flush of thousands of windows must not hold them up.
        # Keys that go to the views are marked first, before any of their rows change.
        marked = [((r.customer, r.meter), r.window_start_ms) for r in rollups
                  if not all_written and r.window_start_ms >= since]
        marked += [((late.customer, late.meter), late.window_start_ms) for late in flush.late
                   if late.window_start_ms >= since]
        rows = [] if not all_written else [
            (r.customer, r.meter, (group_key(r.group), r.window_start_ms, r.source,
                                   r.partition), r.version, r.value_nanos)
            for r in rollups if r.window == "daily" and r.window_start_ms >= since]
        with self._lock:
            for pair, window_start_ms in marked:
                self._late_at(pair, window_start_ms)
        for i in range(0, len(rows), APPLY_CHUNK):
            with self._lock:
                for customer, meter, key, version, value in rows[i:i + APPLY_CHUNK]:
                    self._put(customer, meter, key, version, value)
        with self._lock:
            # After a failed write the runner puts that flush's outputs back and writes
            # them with the next one: once that one is durable the mirror holds every row
            # the failed attempt may have left in the table, at the same or a later version.
            self._broken = False

    def prune(self, before_ms: int) -> None:
        """Forget the day windows before ``before_ms`` (a new period began): memory stays
        about one period of rows. Cheap when there is nothing to do."""
        if before_ms <= self.since_ms:
            return
        with self._lock:
            self.since_ms = before_ms - before_ms % DAY_MS
            for key, rows in list(self._rows.items()):
                kept = {k: v for k, v in rows.items() if k[1] >= self.since_ms}
                if kept:
                    self._rows[key] = kept
                else:
                    del self._rows[key]
            self._late = {k: d for k, d in self._late.items() if d >= self.since_ms}

    def invalidate(self) -> None:
        """A write failed, maybe part way: the table may hold rows the mirror has not
        seen, until the next flush (which rewrites them) is applied."""
        with self._lock:
            self._broken = True

    def used(self, customer: str, meter: Meter, start_ms: int, end_ms: int) -> int | None:
        """The meter's value over the day windows starting in [start_ms, end_ms), all
        groups together, as ``UsageReader.used`` reads it; None when only the views know."""
        if meter.aggregation in (Aggregation.UNIQUE_COUNT, Aggregation.LATEST):
            return None  # not foldable: the reader raises the reason
        key = (customer, meter.name)
        with self._lock:
            if (self._broken or start_ms < self.since_ms or meter.name in self._short
                    or self._late.get(key, -1) >= start_ms):
                return None
            rows = self._rows.get(key)
            values = ([] if rows is None else
                      [v for (_, day, _, _), (_, v) in rows.items() if start_ms <= day < end_ms])
        if not values:
            return 0
        combine: Callable[[Iterable[int]], int] = (
            min if meter.aggregation is Aggregation.MIN else
            max if meter.aggregation is Aggregation.MAX else sum)
        return combine(values)
