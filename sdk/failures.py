"""Failure accounting for the emitter's background thread: count, log, tell ``on_error``.

Every failure the background thread survives goes through :class:`FailureLog`, so none is
silent even when the application set no ``on_error`` hook. A failure here never means an
event was dropped: the emitter keeps the events (buffer, memory, spool) and retries. Events
the emitter really could not keep are counted separately (``EmitterStats.lost``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("meterline.sdk")

# Where in the background path a failure happened (the ``cause`` label of the counters).
CAUSES = (
    "build",  # encoding events into envelopes raised; the events went back to the buffer
    "send",  # transport.send()/produce() raised (not backpressure); the batch was spooled
    "delivery",  # Kafka did not acknowledge a batch (outage, timeout); it was spooled
    "spool",  # a spool read or write by the thread failed (disk full, read-only, corrupt)
    "callback",  # a delivery callback failed (spooling an undelivered batch, deleting an
    #              acknowledged one, anything else); caught so librdkafka's poll() goes on
    "poll",  # transport.poll() raised
    "metadata",  # asking for the topic's partition count raised
    "on_error",  # the application's on_error hook raised; ignored
    "other",  # anything else in a background cycle; the cycle is retried
)

# One log line per cause per interval: a broker away for a day logs ~3,000 lines, not one
# per batch, and the line says how many were folded into it.
LOG_INTERVAL_S = 30.0

# Environmental failures are logged without a traceback (it would only show our own retry
# plumbing); the others are bugs or surprises, where the traceback is what one needs.
_NO_TRACEBACK = frozenset({"send", "delivery", "spool", "poll", "metadata"})

OnError = Callable[[BaseException], None]


class FailureLog:
    """Thread-safe: the background thread and ``close()`` (delivery callbacks served by the
    final flush) both record here."""

    def __init__(
        self,
        on_error: OnError | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        log_interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self._on_error = on_error
        self._clock = clock
        self._log_interval_s = log_interval_s
        self._counts = dict.fromkeys(CAUSES, 0)
        self._last_logged: dict[str, float] = {}
        self._folded = dict.fromkeys(CAUSES, 0)  # recorded since the last line, not logged
        self._lock = threading.Lock()

    def record(self, cause: str, exc: BaseException, consequence: str) -> None:
        """Count ``exc`` under ``cause``, log it (rate-limited) and pass it to ``on_error``.

        ``consequence`` says what happened to the events, e.g. "120 events stay in memory".
        Never raises.
        """
        self._count_and_log(cause, exc, consequence)
        self.notify(exc)

    def notify(self, exc: BaseException) -> None:
        """Pass ``exc`` to the application's hook; a hook that raises is recorded, not
        propagated (it runs on the background thread, inside delivery callbacks)."""
        hook = self._on_error
        if hook is None:
            return
        try:
            hook(exc)
        except Exception as hook_exc:
            # Not record(): calling the hook about its own failure could loop.
            self._count_and_log("on_error", hook_exc, "the on_error hook raised; ignored")

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _count_and_log(self, cause: str, exc: BaseException, consequence: str) -> None:
        now = self._clock()
        with self._lock:
            self._counts[cause] += 1
            last = self._last_logged.get(cause)
            if last is not None and now - last < self._log_interval_s:
                self._folded[cause] += 1
                return
            self._last_logged[cause] = now
            folded, self._folded[cause] = self._folded[cause], 0
        more = f" ({folded} more since the last report)" if folded else ""
        logger.error(
            "meterline emitter: %s failure: %s: %s. %s%s",
            cause,
            type(exc).__name__,
            exc,
            consequence,
            more,
            exc_info=None if cause in _NO_TRACEBACK else exc,
        )
