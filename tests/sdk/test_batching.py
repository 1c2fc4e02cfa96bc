"""Pure batching: buffered items -> per-partition envelopes, and deterministic splits."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from meterline.core.envelope import Batch, decode_batch, encode_batch
from meterline.core.partitioning import partition_for
from meterline.sdk.batching import (
    EncodedBatch,
    Item,
    PartitionCache,
    Sequencer,
    build_batches,
    split_for_partitions,
)

TS = 1_700_000_000_000


def counter_ids() -> Callable[[int], str]:
    seq = itertools.count()
    return lambda now_ms: f"B{now_ms}-{next(seq):04d}"


def item(
    customer: str,
    q: int = 10**9,
    *,
    dims: dict[str, str] | None = None,
    id: str | None = None,
    source: str | None = None,
) -> Item:
    return (customer, "api_calls", q, TS, dims, id, source)


def build(items: list[Item], partitions: int | None, **kw: object) -> list[EncodedBatch]:
    kw.setdefault("max_events", 1000)
    kw.setdefault("max_bytes", 1_000_000)
    kw.setdefault("source", None)
    return build_batches(
        items,
        None if partitions is None else PartitionCache(partitions),
        now_ms=TS,
        make_id=counter_ids(),
        **kw,  # type: ignore[arg-type]
    )


def test_partition_cache_matches_partition_for() -> None:
    cache = PartitionCache(7)
    assert cache["cust-1"] == partition_for("cust-1", 7)
    assert "cust-1" in cache  # memoised
    assert cache.partitions == 7


def test_empty_input() -> None:
    assert build([], 4) == []
    assert build([], None) == []


def test_groups_by_partition_and_keeps_order() -> None:
    items = [item(f"c{i % 10}", q=i, id=f"e{i}") for i in range(200)]
    out = build(items, 4)
    seen_ids = []
    for eb in out:
        batch = decode_batch(eb.payload)
        assert eb.batch_id == batch.batch_id and eb.count == len(batch)
        assert {partition_for(c, 4) for c in batch.customers} == {eb.partition}
        ids = batch.event_ids()
        assert ids == sorted(ids, key=lambda x: int(x[1:]))  # emit order inside a partition
        seen_ids += ids
    assert sorted(seen_ids) == sorted(f"e{i}" for i in range(200))
    assert len({eb.partition for eb in out}) == len(out)  # one batch per partition here


def test_unknown_partition_count_gives_one_unpartitioned_group() -> None:
    out = build([item("a"), item("b"), item("c")], None)
    assert [(eb.partition, eb.count) for eb in out] == [(None, 3)]


def test_single_partition() -> None:
    out = build([item("a"), item("b")], 1)
    assert [(eb.partition, eb.count) for eb in out] == [(0, 2)]


def test_max_events() -> None:
    out = build([item("same") for _ in range(25)], 4, max_events=10)
    assert [eb.count for eb in out] == [10, 10, 5]
    assert len({eb.batch_id for eb in out}) == 3


def test_max_bytes_halves_until_it_fits() -> None:
    items = [item("c", dims={"blob": "x" * 200}, id=f"e{i}") for i in range(64)]
    out = build(items, 1, max_bytes=3_000)
    assert len(out) > 1
    assert all(len(eb.payload) <= 3_000 for eb in out)
    ids = [i for eb in out for i in decode_batch(eb.payload).event_ids()]
    assert ids == [f"e{i}" for i in range(64)]  # every event, in order


def test_single_event_larger_than_max_bytes_is_still_sent() -> None:
    out = build([item("c", dims={"blob": "x" * 250})], 1, max_bytes=10)
    assert len(out) == 1 and out[0].count == 1


def test_fields_and_source_are_encoded() -> None:
    items = [
        item("c", q=2**70, dims={"region": "eu"}, id="k", source="svc-b"),
        item("c", q=-5),
    ]
    (eb,) = build(items, 1, source="svc-a")
    batch = decode_batch(eb.payload)
    assert batch.quantities == [2**70, -5]
    assert batch.event_dimensions() == [{"region": "eu"}, {}]
    assert batch.event_sources() == ["svc-b", "svc-a"]
    assert batch.event_ids() == ["k", f"{eb.batch_id}-1"]
    assert batch.created_ms == TS


def test_build_is_deterministic_given_ids() -> None:
    items = [item(f"c{i % 5}", q=i) for i in range(100)]
    assert build(items, 3) == build(items, 3)


# -- split_for_partitions -----------------------------------------------------------------
def parent_batch() -> Batch:
    n = 40
    return Batch(
        batch_id="01HPARENT0000000000000000",
        created_ms=TS,
        customers=[f"cust-{i % 9}" for i in range(n)],
        meters=["api_calls"] * n,
        quantities=[i * 10**8 for i in range(n)],
        timestamps_ms=[TS + i for i in range(n)],
        ids=[f"explicit-{i}" if i % 4 == 0 else None for i in range(n)],
        dimensions=[{"k": str(i)} if i % 3 == 0 else None for i in range(n)],
        sources=["per-event" if i % 5 == 0 else None for i in range(n)],
        source="batch-source",
    )


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_split_is_deterministic(partitions: int) -> None:
    parent = parent_batch()
    first = split_for_partitions(parent, PartitionCache(partitions))
    again = split_for_partitions(decode_batch(encode_batch(parent)), PartitionCache(partitions))
    assert [(p, encode_batch(b)) for p, b in first] == [(p, encode_batch(b)) for p, b in again]
    assert [p for p, _ in first] == sorted(p for p, _ in first)


def test_split_preserves_every_event() -> None:
    parent = parent_batch()
    parts = split_for_partitions(parent, PartitionCache(4))
    for part, sub in parts:
        assert sub.batch_id == f"{parent.batch_id}.p{part}"
        assert {partition_for(c, 4) for c in sub.customers} == {part}
        assert sub.source is None  # pushed down into per-event sources
    by_id = {ev.id: ev for _, sub in parts for ev in decode_batch(encode_batch(sub)).events()}
    assert by_id == {ev.id: ev for ev in parent.events()}
    # Implied ids were materialised from the parent, so they do not change with the split.
    assert f"{parent.batch_id}-1" in by_id
    assert sum(len(sub) for _, sub in parts) == len(parent)
    assert sum(q for _, sub in parts for q in sub.quantities) == sum(parent.quantities)


def _numbers(out: list[EncodedBatch]) -> dict[int, list[int]]:
    by_part: dict[int, list[int]] = {}
    for eb in out:
        batch = decode_batch(eb.payload)
        assert batch.producer == "P1" and eb.partition is not None
        by_part.setdefault(eb.partition, []).append(batch.seq or 0)
    return by_part


def test_batches_are_numbered_per_partition_without_gaps() -> None:
    seq = Sequencer("P1")
    customers = [f"c{i}" for i in range(40)]
    first = build([item(c) for c in customers], 4, max_events=3, sequencer=seq)
    second = build([item(c) for c in customers], 4, max_events=3, sequencer=seq)
    got = _numbers(first + second)
    assert set(got) == {partition_for(c, 4) for c in customers}
    for numbers in got.values():
        assert numbers == list(range(len(numbers)))  # 0, 1, 2, ... across builds


def test_halving_takes_numbers_only_for_final_batches() -> None:
    seq = Sequencer("P1")
    items = [item("c", dims={"blob": "x" * 200}, id=f"e{i}") for i in range(64)]
    out = build(items, 1, max_bytes=3_000, sequencer=seq)
    assert _numbers(out) == {0: list(range(len(out)))}


def test_a_failed_build_gives_its_numbers_back() -> None:
    seq = Sequencer("P1")
    build([item("a"), item("b")], 4, sequencer=seq)
    before = seq.mark()
    bad: list[Item] = [item("a"), ("b", "api_calls", 1, TS, {"k": object()}, None, None)]  # type: ignore[list-item]
    with pytest.raises(TypeError):
        build(bad, 4, sequencer=seq)
    assert seq.mark() == before


def test_unpartitioned_batches_carry_no_numbers() -> None:
    out = build([item("a")], None, sequencer=Sequencer("P1"))
    assert decode_batch(out[0].payload).producer is None
