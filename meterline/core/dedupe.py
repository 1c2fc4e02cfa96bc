"""Batch-id and event-id dedupe within an explicit horizon.

Two levels, both keyed by ids the producer chose:

- **Batch ids.** SDK retries and spool replays resend whole batches under the same batch
  id, so one entry per batch (a few hundred to thousands of events) catches them. Events
  without an explicit id are implied as ``"{batch_id}-{index}"`` and need nothing more.
- **Explicit event ids** (idempotency keys set by the application or an HTTP client) can be
  resent in a *different* batch, so they are remembered one by one.

Which clock: every call takes ``now_ms`` from the caller; this module never reads a clock.
The rollup passes the Kafka record timestamp of the batch (log-append time on our topic):
a real processing-time clock, which is what retry and replay delays are measured in, but
one stored in the log, so replaying a partition reproduces every expiry decision.
Event time would be the wrong clock: a retry is sent minutes after the original whatever
the events' own timestamps say, and one client with a skewed clock would expire everybody's
ids. A ``now_ms`` smaller than one seen before is treated as the largest seen so far, so a
clock step back cannot resurrect expired ids or keep them forever.

Horizon semantics: an id first seen at ``t`` is a duplicate for any ``now_ms < t + horizon``
and forgotten from ``t + horizon`` on. A repeat does not extend the horizon (it is measured
from first sight), so the memory bound is simply "ids first seen in the last horizon".

Memory: the in-memory driver keeps ~250 bytes per id (dict entry, deque entry, the str).
Batch ids are cheap (10k batches/s for 24 h ~ 200 MB). Explicit event ids at 1,000/s for
24 h are 86 M entries (~20 GB): beyond one process, such volumes belong in a persistent
store (a RocksDB-backed Faust table or ClickHouse) behind the same ``Deduper`` protocol.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

__all__ = [
    "DEFAULT_DEDUPE_HORIZON_MS",
    "BatchDeduper",
    "Deduper",
    "EventDeduper",
    "InMemoryDeduper",
    "SequenceDeduper",
]

# 24 h: covers SDK retries with backoff, a worker restart, and a spool replay after a
# Kafka outage of most of a day. It must exceed an hour plus the watermark delay plus the
# allowed lateness (see lateness.py; ~3 h by default): then a resend that comes after its
# id was forgotten finds its window closed and goes to the late table, not into a rollup
# a second time (as long as the partition's watermark keeps moving).
DEFAULT_DEDUPE_HORIZON_MS = 86_400_000


class Deduper(Protocol):
    """What rollups need from a dedupe store; a persistent driver implements the same."""

    horizon_ms: int

    def seen_or_add(self, key: str, now_ms: int) -> bool:
        """True when ``key`` was seen within the horizon; otherwise remember it, return False."""
        ...

    def expire(self, now_ms: int) -> int:
        """Forget ids whose horizon has passed; returns how many were forgotten."""
        ...


class InMemoryDeduper:
    """Ids in a dict plus a deque in first-seen order, so expiry pops from the front in
    O(1) per id instead of scanning. Expiry runs on every ``seen_or_add`` (amortised), so
    memory stays bounded without a separate timer."""

    def __init__(self, horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> None:
        if type(horizon_ms) is not int or horizon_ms <= 0:
            raise ValueError(f"horizon_ms must be a positive int, got {horizon_ms!r}")
        self.horizon_ms = horizon_ms
        self._seen: dict[str, int] = {}
        self._order: deque[tuple[int, str]] = deque()
        self._now_ms = -(2**63)  # the largest now_ms seen: time never runs backwards here

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def _advance(self, now_ms: int) -> int:
        if now_ms > self._now_ms:
            self._now_ms = now_ms
        return self._now_ms

    def seen_or_add(self, key: str, now_ms: int) -> bool:
        now = self._advance(now_ms)
        self.expire(now)
        if key in self._seen:
            return True
        self._seen[key] = now
        self._order.append((now, key))
        return False

    def export(self) -> tuple[int, list[tuple[int, str]]]:
        """``(clock, [(first_seen_ms, id), ...] in first-seen order)`` for a checkpoint."""
        return self._now_ms, list(self._order)

    def restore(self, now_ms: int, entries: list[tuple[int, str]]) -> None:
        """Replace the contents with an ``export()``; entries must be in first-seen order."""
        self._now_ms = now_ms
        self._order = deque((int(t), str(k)) for t, k in entries)
        self._seen = {k: t for t, k in self._order}

    def expire(self, now_ms: int) -> int:
        cutoff = self._advance(now_ms) - self.horizon_ms  # seen at <= cutoff: forgotten
        order, seen, dropped = self._order, self._seen, 0
        while order and order[0][0] <= cutoff:
            _, key = order.popleft()
            del seen[key]
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
    clock, as ``InMemoryDeduper``), a producer once all its runs are. A resend is therefore
    recognised for at least the horizon after the batch was first seen.
    """

    def __init__(self, horizon_ms: int = DEFAULT_DEDUPE_HORIZON_MS) -> None:
        if type(horizon_ms) is not int or horizon_ms <= 0:
            raise ValueError(f"horizon_ms must be a positive int, got {horizon_ms!r}")
        self.horizon_ms = horizon_ms
        # producer -> runs [first seq, last seq, last grown at ms], sorted, disjoint
        self._runs: dict[str, list[list[int]]] = {}
        self._now_ms = -(2**63)
        self.forgotten_runs = 0  # dropped by MAX_RUNS_PER_PRODUCER (a metric)

    def __len__(self) -> int:
        return len(self._runs)

    def seen_or_add(self, producer: str, seq: int, now_ms: int) -> bool:
        if now_ms > self._now_ms:
            self._now_ms = now_ms
        now = self._now_ms
        runs = self._runs.get(producer)
        if runs is None:
            self._runs[producer] = [[seq, seq, now]]
            return False
        cutoff = now - self.horizon_ms
        # Expire exactly here (not only in expire()), so decisions never depend on when
        # the caller happened to call expire().
        if any(r[2] <= cutoff for r in runs):
            runs[:] = [r for r in runs if r[2] > cutoff]
            if not runs:
                runs.append([seq, seq, now])
                return False
        i = self._find(runs, seq)
        if i < len(runs) and runs[i][0] <= seq <= runs[i][1]:
            return True
        # New: extend the run ending just below, the run starting just above, or both.
        before = runs[i - 1] if i > 0 and runs[i - 1][1] == seq - 1 else None
        after = runs[i] if i < len(runs) and runs[i][0] == seq + 1 else None
        if before is not None and after is not None:
            before[1], before[2] = after[1], now
            del runs[i]
        elif before is not None:
            before[1], before[2] = seq, now
        elif after is not None:
            after[0], after[2] = seq, now
        else:
            runs.insert(i, [seq, seq, now])
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
        cutoff = self._now_ms - self.horizon_ms
        gone = [p for p, runs in self._runs.items() if max(r[2] for r in runs) <= cutoff]
        for p in gone:
            del self._runs[p]
        return len(gone)

    def export(self) -> tuple[int, dict[str, list[list[int]]]]:
        return self._now_ms, {p: [list(r) for r in runs] for p, runs in self._runs.items()}

    def restore(self, now_ms: int, runs: dict[str, list[list[int]]]) -> None:
        self._now_ms = now_ms
        self._runs = {str(p): [[int(a), int(b), int(t)] for a, b, t in rs]
                      for p, rs in runs.items()}
