"""The emitter's background thread: buffer -> batches -> Kafka or the spool -> replay.

Each cycle (every ``linger_ms``, sooner when woken):

1. serve delivery reports (``poll(0)``) and, when due, re-read the partition count;
2. take what ``emit`` buffered and cut it into per-partition envelopes (durable mode: take
   the events ``emit`` committed to the spool and seal them into spooled batches);
3. send them to Kafka, or append them to the spool when Kafka is unreachable, pushing back,
   or when older batches are still spooled (so order is kept);
4. replay spooled batches, oldest first, deleting each only after Kafka acknowledged it.

Every event is at all times in exactly one of: the buffer, the thread's hands, the held
batches (cut, waiting in memory because the spool failed), librdkafka's queue, or the spool.
Failure of a send moves its batch to the spool, never to the floor. Failure of anything else
(encoding, the spool, a callback, the on_error hook) leaves the events where they were or
puts them back, pauses the step that failed (back-off) and is counted and logged by
``FailureLog``. Only ``stop()`` can give events up, when even the spool refuses them: they
are counted as lost and logged.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from meterline.core.envelope import decode_batch, encode_batch
from meterline.sdk.batching import (
    EncodedBatch,
    Item,
    Sequencer,
    build_batches,
    full_item,
    split_for_partitions,
)
from meterline.sdk.config import EmitterConfig
from meterline.sdk.failures import FailureLog, logger
from meterline.sdk.metadata import PartitionWatch
from meterline.sdk.spool import Spool, SpooledBatch
from meterline.sdk.transport import Backpressure, OnDone, Transport

_METADATA_RETRY_S = 1.0
_REPLAY_BACKOFF_S = 0.5
# After a failed encode or spool write the batching step pauses, doubling from 50 ms to 2 s:
# a passing hiccup costs ~50 ms, a full disk one attempt per 2 s instead of one per linger.
_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 2.0
_time_ns = time.time_ns

COUNTERS = (
    "drained", "delivered", "spooled", "replayed", "lost", "undelivered_at_close",
    "partition_count_changes",
)


class Delivery:
    """Owns the background thread and everything it touches except the buffer's right end
    (``emit`` appends there) and the spool's events table in durable mode."""

    def __init__(
        self,
        config: EmitterConfig,
        transport: Transport,
        spool: Spool,
        buffer: deque[Item],
        *,
        durable: bool,
    ) -> None:
        self.config = config
        # This emitter's producer id and batch numbers (see batching.Sequencer).
        self._sequencer = Sequencer()
        self._transport = transport
        self._spool = spool
        self._buffer = buffer
        self._durable = durable
        self.failures = FailureLog(config.on_error)
        self._watch = PartitionWatch(
            config.topic, refresh_s=config.metadata_refresh_s, retry_s=_METADATA_RETRY_S
        )
        # Batches the thread cut but could not hand to Kafka or the spool yet (the spool
        # failed). Kept whole: a batch Kafka may have seen must keep its batch id.
        self._held: deque[EncodedBatch] = deque()
        self._held_events = 0
        self._retry_after = 0.0  # batching pauses until then after a failure
        self._backoff_s = 0.0
        self._replay_inflight: set[int] = set()
        self._unreported: dict[str, EncodedBatch] = {}
        self._replay_after = 0.0
        self._holding = False
        waiting_events, spooled_events = spool.counts()
        self._spool_pending = spooled_events  # events in spooled batches, kept in memory
        # Events a durable emitter accepted but had not cut into batches before it stopped:
        # batched and sent by this emitter too, even when it is not durable itself.
        self._adopt_events = waiting_events > 0
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._count_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meterline-emitter", daemon=True)

    # -- control, called from the application's threads ---------------------------------
    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def counts(self) -> dict[str, int]:
        with self._count_lock:
            counts = dict(self._counts)
        counts["pending_in_spool"] = self._spool_pending
        counts["held"] = self._held_events
        return counts

    def stop(self, timeout: float) -> int:
        """Stop the thread, then put every event still in memory or librdkafka into the
        spool. Returns how many events Kafka has not acknowledged (spooled or lost)."""
        self.stopping.set()
        self.wake.set()
        self._thread.join(timeout=max(1.0, timeout))
        lost = self._settle_buffer()
        try:
            self._transport.close(min(timeout, 5.0))
        except Exception as exc:
            self.failures.record("poll", exc, "unreported batches go to the spool")
        self._hold(list(self._unreported.values()))
        self._unreported.clear()
        if self._held and not self._spool_held():
            lost += self._held_events
            self._unhold(len(self._held))
        try:
            undelivered = lost + sum(self._spool.counts())
        except Exception:
            undelivered = lost + self._spool_pending
        with self._count_lock:
            self._counts["lost"] += lost
            self._counts["undelivered_at_close"] += undelivered
        spool_dir = self.config.resolved_spool_dir()
        if lost:
            logger.error(
                "meterline emitter: close() could neither deliver nor spool %d events (the "
                "spool %s failed, see the errors above); they are lost",
                lost,
                spool_dir,
            )
        elif undelivered:
            logger.warning(
                "meterline emitter: close(): %d events not acknowledged by Kafka are in the "
                "spool %s; the next emitter on that spool_dir delivers them",
                undelivered,
                spool_dir,
            )
        return undelivered

    def drained(self) -> bool:
        if (
            self._buffer
            or self._held
            or self._holding
            or self._transport.in_flight()
            or self._spool_pending
        ):
            return False
        if self._durable or self._adopt_events:
            events, batched = self._spool.counts()
            return events == 0 and batched == 0
        return True

    def _run(self) -> None:
        linger_s = self.config.linger_ms / 1000
        while not self.stopping.is_set():
            try:
                self._cycle()
                if self._transport.in_flight():
                    self._poll(min(linger_s, 0.01) if self.wake.is_set() else linger_s)
                else:
                    self.wake.wait(linger_s)
            except Exception as exc:  # keep the thread alive; count and log, never swallow
                self.failures.record("other", exc, "the background cycle is retried")
                self.stopping.wait(0.1)
            self.wake.clear()

    def _cycle(self) -> None:
        self._poll(0)
        self._refresh_partitions()
        if self._durable or self._adopt_events:
            self._batch_durable_events()
        if not self._durable:
            self._send_buffered()
        self._replay()

    def _poll(self, timeout_s: float) -> None:
        try:
            self._transport.poll(timeout_s)
        except Exception as exc:
            # confluent-kafka raises here what a callback raised (ours are guarded) or a
            # fatal error; the reports not served yet stay queued for the next poll.
            self.failures.record("poll", exc, "delivery reports are served by the next poll")
            self.stopping.wait(0.1)

    def _refresh_partitions(self) -> None:
        try:
            changed = self._watch.check(self._transport)
        except Exception as exc:
            self.failures.record("metadata", exc, "the partition count is asked again later")
            return
        if changed is not None:
            with self._count_lock:
                self._counts["partition_count_changes"] += 1
            # Once per change, not rate-limited: it is rare and needs an operator.
            logger.error("meterline emitter: %s", changed)
            self.failures.notify(changed)

    def _take_buffered(self) -> list[Item]:
        buffer = self._buffer
        n = len(buffer)
        popleft = buffer.popleft
        # Fast-path tuples (customer, meter, units, seconds) stay short; build_batches
        # scales them column-wise, which is far cheaper than rebuilding each tuple here.
        return [popleft() for _ in range(n)]

    def _build(self, items: list[Item]) -> list[EncodedBatch]:
        return build_batches(
            items,
            self._watch.routing,
            max_events=self.config.batch_max_events,
            max_bytes=self.config.batch_max_bytes,
            source=self.config.source,
            now_ms=_time_ns() // 1_000_000,
            sequencer=self._sequencer,
        )

    def _back_off(self) -> float:
        self._backoff_s = min(max(self._backoff_s * 2, _BACKOFF_MIN_S), _BACKOFF_MAX_S)
        self._retry_after = time.monotonic() + self._backoff_s
        return self._backoff_s

    def _send_buffered(self) -> None:
        if time.monotonic() < self._retry_after:
            return  # backing off; the buffer waits (bounded: emit() pushes back when full)
        self._holding = True
        try:
            if self._held and not self._place_held():
                return  # older batches first: keeps order and bounds memory
            items = self._take_buffered()
            if not items:
                return
            with self._count_lock:
                self._counts["drained"] += len(items)
            try:
                batches = self._build(items)
            except Exception as exc:
                # Back to the front, in order, as if never taken (emit() only appends right).
                self._buffer.extendleft(reversed(items))
                with self._count_lock:
                    self._counts["drained"] -= len(items)
                self.failures.record(
                    "build", exc,
                    f"{len(items)} events went back to the buffer, retried in "
                    f"{self._back_off():.2f} s",
                )
                return
            self._hold(batches)
            self._place_held()
        finally:
            self._holding = False

    def _hold(self, batches: list[EncodedBatch]) -> None:
        self._held.extend(batches)
        self._held_events += sum(b.count for b in batches)

    def _unhold(self, n: int) -> None:
        for _ in range(n):
            self._held_events -= self._held.popleft().count

    def _place_held(self) -> bool:
        """Hand held batches, oldest first, to Kafka, or to the spool when Kafka cannot take
        them now or older batches wait in the spool. True when none is left held."""
        held = self._held
        while held:
            batch = held[0]
            # Straight to Kafka only when nothing older waits in the spool, the batch was
            # cut per partition and the broker is not known to be down.
            direct = (
                batch.partition is not None
                and self._spool_pending == 0
                and not getattr(self._transport, "broker_down", _NEVER).is_set()
            )
            if not (direct and self._send_direct(batch)):
                return self._spool_held()
            self._unhold(1)  # a callback run by send() may have held more: they are behind
        self._backoff_s = 0.0
        return True

    def _send_direct(self, batch: EncodedBatch) -> bool:
        assert batch.partition is not None
        on_done = self._direct_done(batch)
        try:
            self._transport.send(self.config.topic, batch.partition, batch.payload, on_done)
        except Backpressure:
            self._unreported.pop(batch.batch_id, None)  # never reached librdkafka
            return False
        except Exception as exc:
            # Taken as not sent. Should librdkafka have queued it after all, its report finds
            # it gone from _unreported and is ignored; the spooled copy is resent with the
            # same batch id, a duplicate that downstream dedupe drops.
            self._unreported.pop(batch.batch_id, None)
            self.failures.record(
                "send", exc, f"batch {batch.batch_id} ({batch.count} events) goes to the spool"
            )
            return False
        return True

    def _spool_held(self) -> bool:
        batches = list(self._held)
        try:
            self._to_spool(batches)
        except Exception as exc:
            self.failures.record(
                "spool", exc,
                f"{sum(b.count for b in batches)} events stay in memory, retried in "
                f"{self._back_off():.2f} s",
            )
            return False
        self._unhold(len(batches))
        self._backoff_s = 0.0
        return True

    def _guarded(self, report: OnDone) -> OnDone:
        def guarded(err: BaseException | None) -> None:
            try:
                report(err)
            except Exception as exc:
                # Never into librdkafka: an exception from a callback ends its poll() and
                # would surface far from here, where it is still clear what failed.
                self.failures.record("callback", exc, "a delivery report was not handled")

        return guarded

    def _direct_done(self, batch: EncodedBatch) -> OnDone:
        # Remember the batch until librdkafka reports on it: if close() gives up waiting
        # (broker away), the unreported batches are spooled instead of vanishing with the
        # producer. A batch that Kafka did store meanwhile is resent with the same ids.
        self._unreported[batch.batch_id] = batch

        def done(err: BaseException | None) -> None:
            if self._unreported.pop(batch.batch_id, None) is None:
                return  # already spooled by close(); the replay will deliver it
            if err is None:
                with self._count_lock:
                    self._counts["delivered"] += batch.count
                return
            where = "spooled"
            try:
                self._to_spool([batch])
            except Exception as exc:
                # The same bytes stay in memory (Kafka may have stored them: same batch id
                # on the resend) and are placed again after the back-off.
                self._hold([batch])
                where = "kept in memory"
                self.failures.record(
                    "callback", exc,
                    f"spooling undelivered batch {batch.batch_id} failed; its {batch.count} "
                    f"events stay in memory, retried in {self._back_off():.2f} s",
                )
            self.failures.record(
                "delivery", err, f"batch {batch.batch_id} ({batch.count} events) was {where}"
            )

        return self._guarded(done)

    def _to_spool(self, batches: list[EncodedBatch]) -> None:
        self._spool.append_batches(batches)
        n = sum(b.count for b in batches)
        self._spool_pending += n
        with self._count_lock:
            self._counts["spooled"] += n

    def _batch_durable_events(self) -> None:
        if time.monotonic() < self._retry_after:
            return
        # Bounded per cycle so replay gets its turn; the loop comes back within linger.
        for _ in range(8):
            try:
                up_to, items = self._spool.take_events(self.config.batch_max_events * 8)
                if not items:
                    self._adopt_events = False
                    return
            except Exception as exc:
                self.failures.record("spool", exc, f"retried in {self._back_off():.2f} s")
                return
            try:
                batches = self._build(items)
            except Exception as exc:
                self.failures.record(
                    "build", exc,
                    f"{len(items)} events stay in the spool, retried in {self._back_off():.2f} s",
                )
                return
            try:
                self._spool.seal_events(up_to, batches)  # atomic: events stay on failure
            except Exception as exc:
                self.failures.record("spool", exc, f"retried in {self._back_off():.2f} s")
                return
            n = sum(b.count for b in batches)
            self._spool_pending += n
            with self._count_lock:
                self._counts["spooled"] += n

    def _replay(self) -> None:
        if self._spool_pending == 0 or time.monotonic() < self._replay_after:
            return
        room = self.config.replay_in_flight - len(self._replay_inflight)
        if room <= 0:
            return
        try:
            rows = self._spool.oldest_batches(room + len(self._replay_inflight))
        except Exception as exc:
            self._replay_after = time.monotonic() + _REPLAY_BACKOFF_S
            self.failures.record("spool", exc, f"replay retried in {_REPLAY_BACKOFF_S} s")
            return
        for row in rows:
            if row.seq in self._replay_inflight:
                continue
            if row.batch.partition is None:
                if self._watch.routing is None:
                    return  # cannot split yet; metadata refresh will retry
                try:
                    self._split_spooled(row)
                except Exception as exc:
                    self._replay_after = time.monotonic() + _REPLAY_BACKOFF_S
                    self.failures.record("spool", exc, "splitting is retried")
                return  # the parts replace it; pick them up next cycle, in order
            # In flight before send(): its report can come back inside send() (which polls),
            # and a report that finds the batch not yet marked would leave it marked forever.
            self._replay_inflight.add(row.seq)
            try:
                self._transport.send(
                    self.config.topic, row.batch.partition, row.batch.payload,
                    self._replay_done(row),
                )
            except Backpressure:
                self._replay_inflight.discard(row.seq)
                self._replay_after = time.monotonic() + _REPLAY_BACKOFF_S / 10
                return
            except Exception as exc:
                self._replay_inflight.discard(row.seq)
                self._replay_after = time.monotonic() + _REPLAY_BACKOFF_S
                self.failures.record(
                    "send", exc, f"spooled batch {row.batch.batch_id} is replayed again"
                )
                return
            room -= 1
            if room <= 0:
                return

    def _split_spooled(self, row: SpooledBatch) -> None:
        assert self._watch.routing is not None
        parent = decode_batch(row.batch.payload)
        parts = [
            EncodedBatch(part, sub.batch_id, len(sub), encode_batch(sub))
            for part, sub in split_for_partitions(parent, self._watch.routing)
        ]
        self._spool.replace_batch(row.seq, parts)

    def _replay_done(self, row: SpooledBatch) -> OnDone:
        def done(err: BaseException | None) -> None:
            self._replay_inflight.discard(row.seq)
            if err is not None:
                self._replay_after = time.monotonic() + _REPLAY_BACKOFF_S
                self.failures.record(
                    "delivery", err, f"spooled batch {row.batch.batch_id} is replayed again"
                )
                return
            try:
                self._spool.delete_batch(row.seq)
            except Exception as exc:
                # Kafka has it but the row stays, so it is replayed again with the same batch
                # id (downstream dedupe drops the copy); counted delivered when the row goes.
                self._replay_after = time.monotonic() + _REPLAY_BACKOFF_S
                self.failures.record(
                    "callback", exc,
                    f"acknowledged batch {row.batch.batch_id} stays in the spool and is resent",
                )
                return
            self._spool_pending -= row.batch.count
            with self._count_lock:
                self._counts["delivered"] += row.batch.count
                self._counts["replayed"] += row.batch.count

        return self._guarded(done)

    def _settle_buffer(self) -> int:
        """At stop: move what is still buffered into held batches or, when it cannot be
        encoded, into the spool as raw events that the next emitter on it batches. Returns
        how many events it could do neither with."""
        if self._durable:
            return 0  # every event already is on disk
        items = self._take_buffered()
        if not items:
            return 0
        with self._count_lock:
            self._counts["drained"] += len(items)
        try:
            self._hold(self._build(items))
            return 0
        except Exception as exc:
            self.failures.record("build", exc, f"{len(items)} events are spooled unencoded")
        try:
            self._spool.append_events([full_item(it) for it in items])
        except Exception as exc:
            self.failures.record("spool", exc, f"{len(items)} unencoded events are lost")
            return len(items)
        with self._count_lock:
            self._counts["spooled"] += len(items)
        return 0


class _Never:
    def is_set(self) -> bool:
        return False


_NEVER = _Never()
