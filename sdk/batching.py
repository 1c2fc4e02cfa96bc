"""Pure batching: buffered emit() tuples -> per-partition envelopes.

Kept free of threads and I/O so the grouping rules are unit-testable with plain data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meterline.core.envelope import Batch, encode_batch
from meterline.core.ids import new_id
from meterline.core.partitioning import partition_for
from meterline.core.quantity import SCALE

# (customer, meter, quantity_nanos, timestamp_ms, dimensions | None, id | None, source | None)
Item = tuple[str, str, int, int, dict[str, str] | None, str | None, str | None]
# emit()'s fast path buffers (customer, meter, whole units: int, time.time(): float) instead;
# both shapes may be mixed in one drain.
FastItem = tuple[str, str, int, float]


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    partition: int | None  # None: partition count unknown when the batch was made
    batch_id: str
    count: int
    payload: bytes


class Sequencer:
    """Batch numbers per partition under one producer id: 0, 1, 2, ... for each partition.

    The rollup stage remembers what it saw of a producer as runs of consecutive numbers
    (O(producers) state, ``meterline.core.dedupe.SequenceDeduper``), so numbers must not be
    skipped: one is *taken* only when its batch is final (after any halving), and a build
    that fails gives back every number it took (:meth:`mark` / :meth:`rewind`). A batch is
    encoded once and resent as those bytes, so a resend always carries its own number.
    """

    def __init__(self, producer: str | None = None) -> None:
        self.producer = producer or new_id()
        self._next: dict[int, int] = {}

    def peek(self, partition: int) -> int:
        return self._next.get(partition, 0)

    def take(self, partition: int) -> int:
        seq = self._next.get(partition, 0)
        self._next[partition] = seq + 1
        return seq

    def mark(self) -> dict[int, int]:
        return dict(self._next)

    def rewind(self, mark: dict[int, int]) -> None:
        self._next = dict(mark)


class PartitionCache(dict[str, int]):
    """customer -> partition, computed once per customer (murmur2 is ~1 us in Python)."""

    def __init__(self, partitions: int) -> None:
        super().__init__()
        self.partitions = partitions

    def __missing__(self, customer: str) -> int:
        part = self[customer] = partition_for(customer, self.partitions)
        return part


def build_batches(
    items: Sequence[Item | FastItem],
    partitions: PartitionCache | None,
    *,
    max_events: int,
    max_bytes: int,
    source: str | None,
    now_ms: int,
    make_id: Callable[[int], str] = new_id,
    sequencer: Sequencer | None = None,
) -> list[EncodedBatch]:
    """Group items by partition (keeping emit order inside a partition), cut them into
    batches of at most ``max_events`` events and ``max_bytes`` encoded bytes. With a
    ``sequencer``, batches of a known partition carry its producer id and their number."""
    if partitions is None or partitions.partitions == 1:
        groups: dict[int | None, list[Item | FastItem]] = {
            None if partitions is None else 0: list(items)
        }
    else:
        groups = {}
        part: int | None
        for item in items:
            part = partitions[item[0]]
            group = groups.get(part)
            if group is None:
                groups[part] = [item]
            else:
                group.append(item)
    out: list[EncodedBatch] = []
    mark = sequencer.mark() if sequencer is not None else None
    try:
        for part, group in groups.items():
            for start in range(0, len(group), max_events):
                _encode_into(out, part, group[start : start + max_events], max_bytes, source,
                             now_ms, make_id, sequencer)
    except BaseException:
        if sequencer is not None and mark is not None:
            sequencer.rewind(mark)  # the caller retries these items: no number is skipped
        raise
    return out


def _encode_into(
    out: list[EncodedBatch],
    part: int | None,
    chunk: Sequence[Item | FastItem],
    max_bytes: int,
    source: str | None,
    now_ms: int,
    make_id: Callable[[int], str],
    sequencer: Sequencer | None = None,
) -> None:
    stamped = sequencer is not None and part is not None
    producer = sequencer.producer if sequencer is not None and part is not None else None
    seq = sequencer.peek(part) if sequencer is not None and part is not None else None
    if set(map(len, chunk)) == {4}:
        # Only fast-path items: transpose, then scale whole columns at once.
        customers, meters, units, seconds = zip(*chunk, strict=True)
        batch = Batch(
            batch_id=make_id(now_ms),
            created_ms=now_ms,
            customers=list(customers),
            meters=list(meters),
            quantities=[u * SCALE for u in units],
            timestamps_ms=[int(t * 1000) for t in seconds],
            source=source,
            producer=producer,
            seq=seq,
        )
    else:
        full = [it if len(it) == 7 else _widen(it) for it in chunk]
        customers, meters, quantities, timestamps, dims, ids, sources = zip(*full, strict=True)
        batch = Batch(
            batch_id=make_id(now_ms),
            created_ms=now_ms,
            customers=list(customers),
            meters=list(meters),
            quantities=list(quantities),
            timestamps_ms=list(timestamps),
            ids=list(ids),
            dimensions=list(dims),
            sources=list(sources),
            source=source,
            producer=producer,
            seq=seq,
        )
    payload = encode_batch(batch)
    if len(payload) > max_bytes and len(chunk) > 1:
        # Too big for one Kafka record: halve until it fits. Halving keeps every event and
        # the order; each half gets its own batch id.
        mid = len(chunk) // 2
        _encode_into(out, part, chunk[:mid], max_bytes, source, now_ms, make_id, sequencer)
        _encode_into(out, part, chunk[mid:], max_bytes, source, now_ms, make_id, sequencer)
        return
    if stamped:
        assert sequencer is not None and part is not None
        sequencer.take(part)  # final: this number is this batch's for good
    out.append(EncodedBatch(part, batch.batch_id, len(chunk), payload))


def _widen(item: FastItem) -> Item:
    customer, meter, units, seconds = item
    return (customer, meter, units * SCALE, int(seconds * 1000), None, None, None)


def full_item(item: Item | FastItem) -> Item:
    """The 7-field form of a buffered item (what the spool's events table stores)."""
    return item if len(item) == 7 else _widen(item)


def split_for_partitions(batch: Batch, partitions: PartitionCache) -> list[tuple[int, Batch]]:
    """Split a batch made while the partition count was unknown.

    Deterministic: the same batch and partition count always give the same sub-batches
    with the same ids (``{batch_id}.p{partition}``) and the same event ids (implied ids
    are materialised from the parent), so a crash during replay cannot create new ids.
    """
    ids = batch.event_ids()
    dims = batch.event_dimensions()
    sources = batch.event_sources()
    by_part: dict[int, list[int]] = {}
    for i, customer in enumerate(batch.customers):
        by_part.setdefault(partitions[customer], []).append(i)
    out = []
    for part, idx in sorted(by_part.items()):
        out.append(
            (
                part,
                Batch(
                    batch_id=f"{batch.batch_id}.p{part}",
                    created_ms=batch.created_ms,
                    customers=[batch.customers[i] for i in idx],
                    meters=[batch.meters[i] for i in idx],
                    quantities=[batch.quantities[i] for i in idx],
                    timestamps_ms=[batch.timestamps_ms[i] for i in idx],
                    ids=[ids[i] for i in idx],
                    dimensions=[dims[i] or None for i in idx],
                    sources=[sources[i] for i in idx],
                    source=None,
                ),
            )
        )
    return out
