"""The usage topic's partition count: learned once, routed with for life, watched for drift.

A customer's events must all land on one partition (per-customer dedupe, unique_count and
latest in the rollup stage depend on it). The emitter therefore routes with the count it
first learned for as long as it runs. Adding partitions to the topic in place cannot be made
safe from here: this process keeps the old count, the next one to start uses the new count,
and a customer is split across partitions. What the SDK can do is notice and say so loudly;
docs/sdk.md ("Changing the partition count") has the safe procedure.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from meterline.core.errors import MeterlineError
from meterline.sdk.batching import PartitionCache
from meterline.sdk.transport import Transport

DOCS_POINTER = 'docs/sdk.md, "Changing the partition count"'


class PartitionCountChangedError(MeterlineError):
    """The topic's partition count differs from the one this emitter routes with."""

    def __init__(self, topic: str, routing: int, previous: int, observed: int) -> None:
        self.topic = topic
        self.routing = routing
        self.previous = previous
        self.observed = observed
        super().__init__(
            f"partition count of topic {topic!r} changed from {previous} to {observed}. "
            f"This emitter keeps routing customers over the {routing} partitions it started "
            f"with, but emitters started from now on will use {observed}, which splits "
            "customers across partitions and breaks per-customer dedupe, unique_count and "
            "latest in the rollup stage. Do not change the partition count of the usage "
            "topic in place: create a new topic with the new count, switch the emitters to "
            f"it and let the workers drain the old one (see {DOCS_POINTER})."
        )


class PartitionWatch:
    """Asks the transport for the partition count until it is known, then every
    ``refresh_s`` to detect a change. Not thread-safe: the background thread owns it."""

    def __init__(
        self,
        topic: str,
        *,
        refresh_s: float,
        retry_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._topic = topic
        self._refresh_s = refresh_s
        self._retry_s = retry_s
        self._clock = clock
        self._next_check = 0.0
        self._observed: int | None = None
        self.routing: PartitionCache | None = None  # fixed once set: never re-routed

    def check(self, transport: Transport) -> PartitionCountChangedError | None:
        """Ask when due. Returns an error once per observed change away from the last
        count seen (4 -> 6 reports once, however many refreshes still see 6)."""
        now = self._clock()
        if now < self._next_check:
            return None
        # Scheduled before asking: a transport that raises is not asked again at once.
        self._next_check = now + (self._retry_s if self.routing is None else self._refresh_s)
        count = transport.partition_count(self._topic, 1.0)
        if not count:
            return None  # unknown (broker away): keep what we have
        if self.routing is None:
            self.routing = PartitionCache(count)
            self._observed = count
            self._next_check = now + self._refresh_s
            return None
        previous = self._observed
        assert previous is not None
        if count == previous:
            return None
        self._observed = count
        if count == self.routing.partitions:
            return None  # back to the count we route with: nothing new to warn about
        return PartitionCountChangedError(self._topic, self.routing.partitions, previous, count)
