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
