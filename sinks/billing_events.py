"""The billing event log in ClickHouse, and the ledger that appends to it.

:class:`BillingLedger` reads ``billing_events`` (``FINAL``, in ``seq`` order), replays it
into a :class:`~meterline.core.billing.BillingState`, and appends new events:

1. Build each event with a command (``meterline.core.billing.commands``) against the
   current state: a refused command raises with every reason and writes nothing.
2. Check that nobody appended since the state was read (the log's last ``seq``): if the
   log moved, refuse and let the caller retry against the new state.
3. Insert the events (one insert), then apply them to the in-memory state.
4. Read back that each new ``seq`` holds exactly one event: a writer that raced past step
   2 makes this fail loudly (and replay refuses the log) instead of silently forking it.

chDB allows one process per data directory, so on the embedded default the race of step
4 cannot happen; with a ClickHouse server it is detected, not prevented.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from meterline.core.billing import BillingEvent, BillingState, EventType, TransitionError
from meterline.sinks.billing_tables import billing_tables
from meterline.sinks.exceptions import SinkError
from meterline.sinks.storage import Storage

__all__ = ["BillingLedger", "EventsQuery"]

_COLUMNS = ("seq", "event_id", "type", "subject", "effective_ms", "recorded_at_ms", "actor",
            "reason", "payload")


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class EventsQuery:
    """Every event of the log, in ``seq`` order (duplicates of a retried insert collapsed)."""

    def __init__(self, database: str) -> None:
        self.database = database

    def to_sql(self) -> tuple[str, dict[str, Any]]:
        table = billing_tables().events.qualified(self.database)
        return (f"SELECT {', '.join(_COLUMNS)}\nFROM {table} FINAL\nORDER BY seq, event_id", {})

    def run(self, storage: Storage) -> list[BillingEvent]:
        return [BillingEvent(seq=int(seq), event_id=str(eid), type=EventType(str(kind)),
                             subject=str(subject), effective_ms=int(eff),
                             recorded_at_ms=int(rec), actor=str(actor), reason=str(reason),
                             payload=json.loads(payload))
                for seq, eid, kind, subject, eff, rec, actor, reason, payload
                in storage.query_rows(*self.to_sql())]


class BillingLedger:
    """Append-only billing events on a :class:`Storage`, with the state they replay to."""

    def __init__(self, storage: Storage, database: str | None = None,
                 clock_ms: Callable[[], int] = _wall_clock_ms) -> None:
        self.storage = storage
        self.database = database or storage.database
        self.clock_ms = clock_ms
        self._state: BillingState | None = None

    @property
    def state(self) -> BillingState:
        if self._state is None:
            self._state = BillingState.replay(EventsQuery(self.database).run(self.storage))
        return self._state

    def reload(self) -> BillingState:
        self._state = None
        return self.state

    def record(self, *commands: Callable[[BillingState, int], BillingEvent]) -> list[BillingEvent]:
        """Run ``command(state, now_ms) -> event`` for each command in order (each sees the
        state after the previous ones), then append them all, or nothing.

        The commands run against a state replayed from storage just now, not the cached
        one, so a refusal half way leaves the ledger untouched and a stale cache cannot
        validate a change.
        """
        scratch = BillingState.replay(EventsQuery(self.database).run(self.storage))
        now_ms = self.clock_ms()
        events: list[BillingEvent] = []
        for command in commands:
            event = command(scratch, now_ms)
            scratch.apply(event)
            events.append(event)
        self._insert(events, expected_last=scratch.last_seq - len(events))
        self._state = scratch
        return events

    def _insert(self, events: list[BillingEvent], expected_last: int) -> None:
        if not events:
            return
        table = billing_tables().events
        last = self.storage.query_rows(
            f"SELECT max(seq) FROM {table.qualified(self.database)}")[0][0]
        if int(last or 0) != expected_last:
            self._state = None
            raise TransitionError([f"the event log moved (last seq {last}, expected "
                                   f"{expected_last}): another writer appended; retry"],
                                  "billing ledger")
        columns: dict[str, list[Any]] = {name: [] for name in _COLUMNS}
        for e in events:
            for name, value in zip(_COLUMNS, (e.seq, e.event_id, e.type.value, e.subject,
                                              e.effective_ms, e.recorded_at_ms, e.actor,
                                              e.reason, e.payload_json()), strict=True):
                columns[name].append(value)
        self.storage.insert_columns(table.qualified(self.database), columns,
                                    table.insert_types(_COLUMNS))
        rows = self.storage.query_rows(
            f"SELECT seq FROM {table.qualified(self.database)} "
            "WHERE seq >= {first:UInt64} GROUP BY seq HAVING uniqExact(event_id) > 1",
            {"first": events[0].seq})
        if rows:
            self._state = None
            raise SinkError(f"billing event log forked: seq {', '.join(str(r[0]) for r in rows)}"
                            " written by two writers; resolve before rating")
