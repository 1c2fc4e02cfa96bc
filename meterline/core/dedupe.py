"""Batch-id and event-id dedupe within an explicit horizon, held until windows close.

Two levels, both keyed by ids the producer chose:

- **Batch ids.** SDK retries and spool replays resend whole batches under the same batch
  id, so one entry per batch (a few hundred to thousands of events) catches them. Events
  without an explicit id are implied as ``"{batch_id}-{index}"`` and need nothing more.
- **Explicit event ids** (idempotency keys set by the application or an HTTP client) can be
  resent in a *different* batch, so they are remembered one by one. Their scope is
  ``(customer, meter, id)`` (``scoped_id``): a request id used for two meters, or by two
  customers, names two events.

Two clocks, one guarantee
-------------------------
Expiry runs on the **log clock**: every call takes ``now_ms`` from the caller (the Kafka
record timestamp of the batch, log-append time on our topic); this module never reads a
clock. That is what retry and replay delays are measured in, and it is stored in the log,
so replaying a partition reproduces every decision. Event time would be the wrong clock for
expiry: a retry is sent minutes after the original whatever the events' own timestamps say.
A ``now_ms`` smaller than one seen before is treated as the largest seen so far.

Windows close on the **event-time watermark** (``lateness.py``), a different clock: on a
quiet partition it can stand still for days while log time runs on. An id forgotten by log
time alone could then be resent into a window that is still open and be counted twice. So
every entry also carries ``until_ms``, the end of the latest window its events were folded
into, and the caller reports the partition's close frontier with ``close_before`` (windows
ending at or before it are closed for good). An entry is forgotten only when **both** hold:

- its horizon has passed on the log clock (first seen at ``t``: ``now_ms >= t + horizon``);
- ``until_ms <= closed_before_ms``: every window it counted in is closed.

So a resend whose id was forgotten can only find its window closed (it becomes a late
event, never a second count in an open rollup). A repeat does not extend the horizon (it is
measured from first sight). Decisions are exact whenever ``expire`` happens to run: lookups
re-check both conditions.

Memory: the in-memory driver keeps ~250 bytes per id (dict entry, deque entry, the str).
Held are the ids first seen in the last horizon of log time, plus ids whose windows are
still open: at most the events of the partition's open hours (``allowed_lateness +
watermark_delay`` plus the current hour of event time, ~3 h by default). With clocks that
move together that second set is inside the first; on a stalled watermark it is the traffic
into those few open hours, the same traffic those windows already hold. Batch ids are cheap
(10k batches/s for 24 h ~ 200 MB). Explicit event ids at 1,000/s for 24 h are 86 M entries
(~20 GB): beyond one process, such volumes live on disk (``aggregators/id_store.py``)
behind the same ``Deduper`` protocol.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Protocol

__all__ = [
    "DEFAULT_DEDUPE_HORIZON_MS",
    "NO_PIN",
    "BatchDeduper",
    "Deduper",
    "EventDeduper",
    "InMemoryDeduper",
    "SequenceDeduper",
    "scoped_id",
]

# 24 h: covers SDK retries with backoff, a worker restart, and a spool replay after a
# Kafka outage of most of a day. Ids are also held while their windows are open (see
# above), so the horizon need not be compared with the lateness settings: it only decides
# how long a resend into an already *closed* window is still recognised as one.
DEFAULT_DEDUPE_HORIZON_MS = 86_400_000
# "No window holds this entry": only the log-clock horizon applies.
NO_PIN = -(2**63)


def scoped_id(customer: str, meter: str, event_id: str) -> str:
    """The dedupe key of an explicit id: ``(customer, meter, id)`` in one string.

    Length-prefixed, so it is unambiguous whatever characters the parts hold (a separator
    could occur inside a customer name): ``("a1", "b", "x")`` and ``("a", "1b", "x")`` differ.
    """
    return f"{len(customer)}:{customer}{len(meter)}:{meter}{event_id}"


class Deduper(Protocol):
    """What rollups need from a dedupe store; a persistent driver implements the same."""

    horizon_ms: int

    def seen_or_add(self, key: str, now_ms: int, until_ms: int = NO_PIN) -> bool:
        """True when ``key`` is still held; otherwise remember it, held at least until
        ``until_ms`` is closed, and return False."""
        ...

    def forget(self, key: str) -> None:
        """Undo the ``seen_or_add`` that just added ``key``: its event was not counted."""
        ...

    def close_before(self, closed_before_ms: int) -> None:
        """Windows ending at or before this are closed for good (monotone)."""
        ...

    def expire(self, now_ms: int) -> int:
        """Forget entries that may be forgotten; returns how many were."""
        ...


class InMemoryDeduper:
    """Ids in a dict plus a deque in first-seen order, so expiry pops from the front in
    O(1) per id instead of scanning; entries whose horizon passed while a window still
    holds them wait in a heap ordered by that window's end. Expiry runs on every
    ``seen_or_add`` (amortised), so memory stays bounded without a separate timer."""

    def __init__(self, horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> None:
        if type(horizon_ms) is not int or horizon_ms <= 0:
            raise ValueError(f"horizon_ms must be a positive int, got {horizon_ms!r}")
        self.horizon_ms = horizon_ms
        self._seen: dict[str, int] = {}  # key -> first seen (log ms)
        self._order: deque[tuple[int, str, int]] = deque()  # (first seen, key, until)
        self._held: list[tuple[int, str]] = []  # heap of (until, key): horizon passed
        self._now_ms = -(2**63)  # the largest now_ms seen: time never runs backwards here
        self.closed_ms = NO_PIN  # the close frontier (see close_before)

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    @property
    def held_by_windows(self) -> int:
        """Entries past their horizon, kept only because a window is still open."""
        return len(self._held)

    def _advance(self, now_ms: int) -> int:
        if now_ms > self._now_ms:
            self._now_ms = now_ms
        return self._now_ms

    def close_before(self, closed_before_ms: int) -> None:
        if closed_before_ms > self.closed_ms:
            self.closed_ms = closed_before_ms

    def seen_or_add(self, key: str, now_ms: int, until_ms: int = NO_PIN) -> bool:
        now = self._advance(now_ms)
        self.expire(now)
        if key in self._seen:
            return True
        self._seen[key] = now
        self._order.append((now, key, until_ms))
        return False

    def forget(self, key: str) -> None:
        if self._order and self._order[-1][1] == key:
            self._order.pop()
        else:  # not the newest entry: rare, so a scan is fine
            self._order = deque(e for e in self._order if e[1] != key)
        self._seen.pop(key, None)

    def export(self) -> tuple[int, list[tuple[int, str, int]]]:
        """``(clock, [(first_seen_ms, id, until_ms), ...] in first-seen order)`` for a
        checkpoint, entries held by windows included."""
        held = sorted((self._seen[k], k, until) for until, k in self._held)
        return self._now_ms, held + list(self._order)

    def restore(self, now_ms: int, entries: list[tuple[int, str, int]] | list[tuple[int, str]],
                default_until_ms: int = NO_PIN) -> None:
        """Replace the contents with an ``export()`` (entries in first-seen order; pairs
        without ``until_ms``, from older checkpoints, get ``default_until_ms``)."""
        self._now_ms = now_ms
        rows = [(int(e[0]), str(e[1]), int(e[2]) if len(e) > 2 else default_until_ms)
                for e in entries]
        self._order = deque(rows)
        self._held = []
        self._seen = {k: t for t, k, _ in rows}

    def expire(self, now_ms: int) -> int:
        cutoff = self._advance(now_ms) - self.horizon_ms  # seen at <= cutoff: horizon passed
        order, seen, held, closed, dropped = self._order, self._seen, self._held, self.closed_ms, 0
        while order and order[0][0] <= cutoff:
            _, key, until = order.popleft()
            if until <= closed:
                del seen[key]
                dropped += 1
            else:
                heapq.heappush(held, (until, key))
        while held and held[0][0] <= closed:
            del seen[heapq.heappop(held)[1]]
            dropped += 1
        return dropped


class BatchDeduper(InMemoryDeduper):
    """Remembers batch ids (one entry per envelope)."""


class EventDeduper(InMemoryDeduper):
    """Remembers explicit event ids (idempotency keys), one entry per event."""


# Past this many disjoint runs of sequence numbers for one producer (a run ends where a
# batch is missing), the oldest run is forgotten: its batches would count again if resent.
# Runs only split when batches are lost or arrive out of order, so real producers hold one
# or two; the cap keeps one broken producer from growing the state without bound.
MAX_RUNS_PER_PRODUCER = 64


class SequenceDeduper:
    """Batch dedupe by ``(producer, seq)``, as Kafka's idempotent producer does it.

    An SDK instance numbers its batches per partition 0, 1, 2, ... under a producer id it
    picks at start, and resends a batch only under the same pair. So what a partition has
    seen from one producer is a few *runs* of consecutive numbers - normally one, growing
    at its end - and the state is O(producers), whatever the traffic: 10,000 producers is
    10,000 small entries, where remembering batch ids would keep every batch of the last
    24 hours.

    Expiry: a run is forgotten once it has not grown for ``horizon_ms`` (on the caller's
    clock, as ``InMemoryDeduper``) *and* the latest window any of its batches counted in
    has closed (its ``until_ms``, see the module docstring); a producer once all its runs
    are. A resend is therefore recognised for at least the horizon after the batch was
    first seen, and for as long as a window it counted in is open.
    """

    def __init__(self, horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> None:
        if type(horizon_ms) is not int or horizon_ms <= 0:
            raise ValueError(f"horizon_ms must be a positive int, got {horizon_ms!r}")
        self.horizon_ms = horizon_ms
        # producer -> runs [first seq, last seq, last grown at ms, until ms], sorted, disjoint
        self._runs: dict[str, list[list[int]]] = {}
        self._now_ms = -(2**63)
        self.closed_ms = NO_PIN
        self.forgotten_runs = 0  # dropped by MAX_RUNS_PER_PRODUCER (a metric)

    def __len__(self) -> int:
        return len(self._runs)

    def close_before(self, closed_before_ms: int) -> None:
        if closed_before_ms > self.closed_ms:
            self.closed_ms = closed_before_ms

    def seen_or_add(self, producer: str, seq: int, now_ms: int,
                    until_ms: int = NO_PIN) -> bool:
        if now_ms > self._now_ms:
            self._now_ms = now_ms
        now = self._now_ms
        runs = self._runs.get(producer)
        if runs is None:
            self._runs[producer] = [[seq, seq, now, until_ms]]
            return False
        cutoff, closed = now - self.horizon_ms, self.closed_ms
        # Expire exactly here (not only in expire()), so decisions never depend on when
        # the caller happened to call expire().
        if any(r[2] <= cutoff and r[3] <= closed for r in runs):
            runs[:] = [r for r in runs if r[2] > cutoff or r[3] > closed]
            if not runs:
                runs.append([seq, seq, now, until_ms])
                return False
        i = self._find(runs, seq)
        if i < len(runs) and runs[i][0] <= seq <= runs[i][1]:
            return True
        # New: extend the run ending just below, the run starting just above, or both.
        before = runs[i - 1] if i > 0 and runs[i - 1][1] == seq - 1 else None
        after = runs[i] if i < len(runs) and runs[i][0] == seq + 1 else None
        if before is not None and after is not None:
            before[1], before[2], before[3] = after[1], now, max(before[3], after[3], until_ms)
            del runs[i]
        elif before is not None:
            before[1], before[2], before[3] = seq, now, max(before[3], until_ms)
        elif after is not None:
            after[0], after[2], after[3] = seq, now, max(after[3], until_ms)
        else:
            runs.insert(i, [seq, seq, now, until_ms])
            if len(runs) > MAX_RUNS_PER_PRODUCER:
                oldest = min(range(len(runs)), key=lambda j: runs[j][2])
                del runs[oldest]
                self.forgotten_runs += 1
        return False

    @staticmethod
    def _find(runs: list[list[int]], seq: int) -> int:
        """Index of the first run whose last seq is >= seq (runs are few: linear is fine,
        and the common case - the newest run - is checked first)."""
        if runs[-1][1] < seq:
            return len(runs)
        for i, run in enumerate(runs):
            if run[1] >= seq:
                return i
        return len(runs)  # pragma: no cover - unreachable given the check above

    def expire(self, now_ms: int) -> int:
        if now_ms > self._now_ms:
            self._now_ms = now_ms
        cutoff, closed = self._now_ms - self.horizon_ms, self.closed_ms
        gone = [p for p, runs in self._runs.items()
                if all(r[2] <= cutoff and r[3] <= closed for r in runs)]
        for p in gone:
            del self._runs[p]
        return len(gone)

    def export(self) -> tuple[int, dict[str, list[list[int]]]]:
        return self._now_ms, {p: [list(r) for r in runs] for p, runs in self._runs.items()}

    def restore(self, now_ms: int, runs: dict[str, list[list[int]]],
                default_until_ms: int = NO_PIN) -> None:
        """Runs without ``until_ms`` (older checkpoints) get ``default_until_ms``."""
        self._now_ms = now_ms
        self._runs = {str(p): [[int(r[0]), int(r[1]), int(r[2]),
                                int(r[3]) if len(r) > 3 else default_until_ms] for r in rs]
                      for p, rs in runs.items()}
