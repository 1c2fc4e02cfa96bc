"""The emitter against the in-memory broker: validation, partitioning, outages, spool
replay, durable mode, sync mode, asyncio and metrics. No Kafka needed."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from meterline.core.envelope import Batch, decode_batch
from meterline.core.errors import ConfigError, InvalidEventError
from meterline.core.meters import MeterRegistry
from meterline.core.partitioning import partition_for
from meterline.core.quantity import to_nanos
from meterline.sdk import Emitter, EmitterConfig, MemoryTransport, SpoolLockedError
from meterline.sdk import delivery as delivery_module
from meterline.sdk.transport import OnDone

REPO = Path(__file__).resolve().parents[2]
TS = 1_700_000_000_000


class RecordingTransport(MemoryTransport):
    """MemoryTransport that also remembers every send attempt, delivered or not."""

    def __init__(self, partitions: int | None = 4) -> None:
        super().__init__(partitions)
        self.attempts: list[tuple[int, bytes]] = []

    def send(self, topic: str, partition: int, payload: bytes, on_done: OnDone) -> None:
        super().send(topic, partition, payload, on_done)  # raises Backpressure when full
        self.attempts.append((partition, payload))


def spooled_event_count(spool: Path) -> int:
    """Events on disk, waiting or batched. One statement, so one consistent snapshot even
    while the emitter moves events into batches."""
    with sqlite3.connect(spool / "spool.db") as db:
        (n,) = db.execute(
            "SELECT (SELECT count(*) FROM events)"
            " + (SELECT coalesce(sum(count), 0) FROM batches)"
        ).fetchone()
    return int(n)


def delivered(transport: MemoryTransport) -> list[tuple[int, Batch]]:
    return [(part, decode_batch(payload)) for part, payload in transport.records]


def delivered_events(transport: MemoryTransport) -> list[Any]:
    return [ev for _, batch in delivered(transport) for ev in batch.events()]


@pytest.fixture
def make_emitter(tmp_path: Path) -> Iterator[Callable[..., Emitter]]:
    made: list[Emitter] = []

    def make(
        transport: MemoryTransport | None = None,
        *,
        spool: Path | None = None,
        registry: MeterRegistry | None = None,
        **overrides: Any,
    ) -> Emitter:
        config = EmitterConfig(
            bootstrap_servers=None,
            spool_dir=spool or tmp_path / "spool",
            linger_ms=5,
        )
        em = Emitter(
            config,
            registry=registry,
            transport=transport if transport is not None else RecordingTransport(),
            **overrides,
        )
        made.append(em)
        return em

    yield make
    for em in made:
        em.close(timeout=0.5)


REGISTRY = MeterRegistry.from_mapping(
    {
        "meters": {
            "api_calls": {"aggregation": "count", "dimensions": ["endpoint", "region"]},
            "credits": {"aggregation": "sum", "allow_negative": True},
            "active_users": {
                "aggregation": "unique_count",
                "value_property": "user_id",
                "dimensions": ["user_id", "plan"],
            },
        }
    }
)


# -- validation --------------------------------------------------------------------------
INVALID_CALLS: list[tuple[tuple[Any, ...], dict[str, Any], str]] = [
    (("", "api_calls"), {}, "customer"),
    ((None, "api_calls"), {}, "customer"),
    ((42, "api_calls"), {}, "customer"),
    (("c" * 257, "api_calls"), {}, "customer"),
    (("bad\ud800", "api_calls"), {}, "customer"),
    (("bad\ud800", "api_calls", Decimal(1)), {}, "customer"),
    (("cust", "ApiCalls"), {}, "meter"),
    (("cust", ""), {}, "meter"),
    (("cust", None), {}, "meter"),
    (("cust", ["api_calls"]), {}, "meter"),  # unhashable: must not raise TypeError
    (("cust", ["api_calls"], "1"), {}, "meter"),
    (("cust", "api_calls\n"), {}, "meter"),
    (("cust", "a" * 65), {}, "meter"),
    (("cust", "api_calls", 1 / 3), {}, "quantity"),
    (("cust", "api_calls", float("nan")), {}, "quantity"),
    (("cust", "api_calls", float("inf")), {}, "quantity"),
    (("cust", "api_calls", True), {}, "quantity"),
    (("cust", "api_calls", "abc"), {}, "quantity"),
    (("cust", "api_calls", None), {}, "quantity"),
    (("cust", "api_calls", "0.0000000001"), {}, "quantity"),
    (("cust", "api_calls", 10**29), {}, "quantity"),  # beyond Decimal(38, 9)
    (("cust", "api_calls", "1e40"), {}, "quantity"),
    (("cust", "api_calls"), {"timestamp_ms": 1_700_000_000}, "timestamp_ms"),
    (("cust", "api_calls"), {"timestamp_ms": float(TS)}, "timestamp_ms"),
    (("cust", "api_calls"), {"timestamp_ms": str(TS)}, "timestamp_ms"),
    (("cust", "api_calls"), {"timestamp_ms": True}, "timestamp_ms"),
    (("cust", "api_calls"), {"dimensions": "a=b"}, "dimensions"),
    (("cust", "api_calls"), {"dimensions": 5}, "dimensions"),
    (("cust", "api_calls"), {"dimensions": {"": "v"}}, "dimensions"),
    (("cust", "api_calls"), {"dimensions": {f"k{i}": "v" for i in range(17)}}, "dimensions"),
    (("cust", "api_calls"), {"dimensions": {"region": 1}}, "dimensions.region"),
    (("cust", "api_calls"), {"dimensions": {"region": "\ud800"}}, "dimensions.region"),
    (("cust", "api_calls"), {"id": ""}, "id"),
    (("cust", "api_calls"), {"id": 7}, "id"),
    (("cust", "api_calls"), {"id": "i" * 129}, "id"),
    (("cust", "api_calls"), {"id": "\udc00"}, "id"),
    (("cust", "api_calls"), {"source": ""}, "source"),
    (("cust", "api_calls"), {"source": 3}, "source"),
    (("cust", "api_calls"), {"source": "s" * 257}, "source"),
]


@pytest.mark.parametrize(("args", "kwargs", "field"), INVALID_CALLS)
def test_invalid_emit_names_the_field(
    make_emitter: Callable[..., Emitter], args: tuple[Any, ...], kwargs: dict[str, Any], field: str
) -> None:
    em = make_emitter()
    em.emit("warm", "api_calls")  # the meter is known: the fast path is live
    with pytest.raises(InvalidEventError) as exc:
        em.emit(*args, **kwargs)
    assert exc.value.field == field
    stats = em.stats()
    assert stats.rejected == 1
    assert stats.emitted == 1


REGISTRY_CALLS: list[tuple[tuple[Any, ...], dict[str, Any], str, str]] = [
    (("cust", "unknown_meter"), {}, "meter", "not defined"),
    (("cust", "api_calls", -1), {}, "quantity", "negative"),
    (("cust", "api_calls", "-0.5"), {}, "quantity", "negative"),
    (("cust", "api_calls"), {"dimensions": {"plan": "pro"}}, "dimensions", "'plan' not allowed"),
    (("cust", "credits"), {"dimensions": {"x": "y"}}, "dimensions", "allowed: none"),
    (("cust", "active_users"), {}, "dimensions.user_id", "unique_count"),
    (("cust", "active_users"), {"dimensions": {"plan": "pro"}}, "dimensions.user_id", "required"),
]


@pytest.mark.parametrize(("args", "kwargs", "field", "text"), REGISTRY_CALLS)
def test_registry_rules(
    make_emitter: Callable[..., Emitter],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    field: str,
    text: str,
) -> None:
    em = make_emitter(registry=REGISTRY)
    with pytest.raises(InvalidEventError) as exc:
        em.emit(*args, **kwargs)
    assert exc.value.field == field
    assert text in str(exc.value)
    assert em.stats().rejected == 1
    # Asking again (meter now "known" or not) is rejected again and counted again.
    with pytest.raises(InvalidEventError):
        em.emit(*args, **kwargs)
    assert em.stats().rejected == 2
    assert em.stats().emitted == 0


def test_registry_allows_valid_events(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport()
    em = make_emitter(transport, registry=REGISTRY)
    em.emit("c", "api_calls", 1, dimensions={"endpoint": "/v1", "region": "eu"})
    em.emit("c", "credits", -5)
    em.emit("c", "active_users", dimensions={"user_id": "u1", "plan": "pro"})
    em.emit("c", "active_users", dimensions={"user_id": "u2"})
    assert em.flush(5)
    assert em.stats().rejected == 0
    events = delivered_events(transport)
    assert sorted(ev.quantity for ev in events) == [-5 * 10**9, 10**9, 10**9, 10**9]


def test_rejected_event_does_not_poison_the_batch(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport()
    em = make_emitter(transport)
    em.emit("good-1", "api_calls")
    for bad in ("x\ud800", "\udfff"):
        with pytest.raises(InvalidEventError):
            em.emit(bad, "api_calls")
    with pytest.raises(InvalidEventError):
        em.emit("good-2", "api_calls", source="")
    em.emit("good-2", "api_calls", 2)
    assert em.flush(5)
    assert sorted(ev.customer for ev in delivered_events(transport)) == ["good-1", "good-2"]
    assert em.stats().delivered == em.stats().emitted == 2


def test_emitter_config_rejects_a_source_that_poisons_every_batch(tmp_path: Path) -> None:
    for bad in ("", "s" * 257, "\ud800"):
        with pytest.raises(ConfigError) as exc:
            EmitterConfig(spool_dir=tmp_path, source=bad).validate()
        assert exc.value.errors[0].startswith("source:")


# -- delivery ----------------------------------------------------------------------------
def test_customer_events_land_on_one_partition(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport(partitions=6)
    em = make_emitter(transport, batch_max_events=37)
    customers = [f"cust-{i}" for i in range(60)]
    for round_ in range(5):
        for i, customer in enumerate(customers):
            em.emit(customer, "api_calls", i + round_, dimensions={"r": str(round_)})
        time.sleep(0.01)  # spread over several background cycles
    assert em.flush(5)
    seen: dict[str, set[int]] = collections.defaultdict(set)
    for part, batch in delivered(transport):
        assert len(batch) <= 37
        for customer in batch.customers:
            seen[customer].add(part)
    assert set(seen) == set(customers)
    for customer, parts in seen.items():
        assert parts == {partition_for(customer, 6)}
    assert len({p for parts in seen.values() for p in parts}) > 1


def test_order_within_a_customer_is_kept(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport(partitions=3)
    em = make_emitter(transport)
    for i in range(500):
        em.emit(f"c{i % 5}", "api_calls", 1, id=f"e{i:04d}")
    assert em.flush(5)
    per_customer: dict[str, list[str]] = collections.defaultdict(list)
    for ev in delivered_events(transport):
        per_customer[ev.customer].append(ev.id)
    for ids in per_customer.values():
        assert ids == sorted(ids)


def test_sum_delivered_equals_sum_emitted_exactly(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport()
    em = make_emitter(transport)
    values: list[Any] = [0.1, 0.2, 0.3, Decimal("1.000000001"), "2.5", 7, 10**12, -0.000000001]
    expected = 0
    for i in range(3000):
        value = values[i % len(values)]
        em.emit(f"c{i % 13}", "tokens", value)
        expected += to_nanos(value)
    assert em.flush(5)
    events = delivered_events(transport)
    assert len(events) == 3000
    assert sum(ev.quantity for ev in events) == expected
    assert sum(ev.quantity for ev in events if ev.quantity == 10**21) == 375 * 10**21
    assert em.stats().delivered == em.stats().emitted == 3000


def test_event_fields_arrive_intact(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport()
    em = make_emitter(transport, source="svc-a")
    em.emit(
        "c1", "api_calls", 3, timestamp_ms=TS, dimensions={"region": "eu"}, id="k-1", source="svc-b"
    )
    em.emit("c1", "api_calls", "0.25", timestamp_ms=TS + 1)
    assert em.flush(5)
    ((part, batch),) = delivered(transport)
    assert part == partition_for("c1", 4)
    events = list(batch.events())
    assert [(e.id, e.quantity, e.timestamp_ms, e.dimensions, e.source) for e in events] == [
        ("k-1", 3 * 10**9, TS, {"region": "eu"}, "svc-b"),
        (f"{batch.batch_id}-1", 250_000_000, TS + 1, {}, "svc-a"),
    ]


def test_default_timestamp_is_now(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport()
    em = make_emitter(transport)
    before = time.time_ns() // 1_000_000
    em.emit("c", "api_calls")  # fast path
    em.emit("c", "api_calls", "1")  # full path
    after = time.time_ns() // 1_000_000
    assert em.flush(5)
    for ev in delivered_events(transport):
        assert before - 1 <= ev.timestamp_ms <= after + 1


def test_many_threads(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport()
    em = make_emitter(transport)

    def work(t: int) -> None:
        for i in range(2000):
            em.emit(f"t{t}-c{i % 10}", "api_calls", 1, id=f"{t}-{i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert em.flush(10)
    ids = [ev.id for ev in delivered_events(transport)]
    assert len(ids) == len(set(ids)) == 16_000


# -- outage, backpressure, spool replay --------------------------------------------------
def test_outage_spools_and_replays_with_same_batch_ids(
    make_emitter: Callable[..., Emitter],
) -> None:
    transport = RecordingTransport()
    transport.fail = True
    em = make_emitter(transport, batch_max_events=100)
    for i in range(1000):
        em.emit(f"c{i % 17}", "api_calls", i, id=f"e{i}")
    assert not em.flush(0.5)
    stats = em.stats()
    assert stats.delivered == 0 and transport.records == []
    assert stats.spooled == 1000 and stats.pending_in_spool == 1000
    failed_attempts = list(transport.attempts)
    assert failed_attempts  # the first batches were tried directly and failed

    transport.fail = False
    assert em.flush(10)
    stats = em.stats()
    assert stats.delivered == stats.emitted == 1000
    assert stats.pending_in_spool == 0 and stats.replayed == 1000

    events = delivered_events(transport)
    assert sorted(ev.id for ev in events) == sorted(f"e{i}" for i in range(1000))
    assert sum(ev.quantity for ev in events) == sum(range(1000)) * 10**9
    # A resend is the very same record: same batch id, same bytes.
    payload_of: dict[str, bytes] = {}
    for _, payload in transport.attempts:
        batch_id = decode_batch(payload).batch_id
        assert payload_of.setdefault(batch_id, payload) == payload
    delivered_ids = {batch.batch_id for _, batch in delivered(transport)}
    assert {decode_batch(p).batch_id for _, p in failed_attempts} <= delivered_ids
    assert delivered_ids == set(payload_of)
    assert len(delivered_ids) == len(transport.records)  # each batch delivered once


def test_backpressure_spools(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport()
    transport.full = True
    em = make_emitter(transport)
    for i in range(300):
        em.emit(f"c{i % 7}", "api_calls", 1)
    assert not em.flush(0.3)
    stats = em.stats()
    assert stats.spooled == 300 and stats.pending_in_spool == 300 and stats.delivered == 0
    transport.full = False
    assert em.flush(10)
    assert len(delivered_events(transport)) == 300
    assert em.stats().delivered == 300


def test_close_with_transport_down_hands_over_to_next_emitter(
    make_emitter: Callable[..., Emitter], tmp_path: Path
) -> None:
    spool = tmp_path / "handover"
    down = RecordingTransport()
    down.fail = True
    em = make_emitter(down, spool=spool)
    for i in range(500):
        em.emit(f"c{i % 9}", "api_calls", Decimal(i) / 10, id=f"e{i}")
    assert em.close(timeout=0.3) is False
    assert down.records == []
    assert spooled_event_count(spool) == 500

    up = RecordingTransport()
    em2 = make_emitter(up, spool=spool)
    # Not pending_in_spool == 500 here: em2's thread may already have replayed some.
    assert em2.flush(10)
    events = delivered_events(up)
    assert sorted(ev.id for ev in events) == sorted(f"e{i}" for i in range(500))
    assert sum(ev.quantity for ev in events) == sum(range(500)) * 10**8
    assert em2.stats().replayed == 500


def test_close_with_events_still_in_memory_spools_them(
    make_emitter: Callable[..., Emitter], tmp_path: Path
) -> None:
    spool = tmp_path / "leftovers"
    transport = RecordingTransport()
    em = make_emitter(transport, spool=spool)
    em._delivery._send_buffered = lambda: None  # never drains memory
    for i in range(50):
        em.emit("c", "api_calls", 1, id=f"e{i}")
    assert em.close(timeout=0.2) is False
    assert transport.records == []
    up = RecordingTransport()
    em2 = make_emitter(up, spool=spool)
    assert em2.flush(10)
    got = [ev.id for ev in delivered_events(transport)] + [ev.id for ev in delivered_events(up)]
    assert sorted(got) == sorted(f"e{i}" for i in range(50))


def test_unknown_partition_count_spools_then_splits_deterministically(
    make_emitter: Callable[..., Emitter], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_module, "_METADATA_RETRY_S", 0.05)
    transport = RecordingTransport(partitions=None)
    em = make_emitter(transport)
    for i in range(200):
        em.emit(f"c{i % 11}", "api_calls", 1)
    assert not em.flush(0.3)
    assert em.stats().pending_in_spool == 200
    transport.partitions = 4
    assert em.flush(10)
    batches = delivered(transport)
    ids = []
    for part, batch in batches:
        assert ".p" in batch.batch_id and batch.batch_id.endswith(f".p{part}")
        assert {partition_for(c, 4) for c in batch.customers} == {part}
        ids += batch.event_ids()
    parent = {i.rsplit("-", 1)[0] for i in ids}
    assert all(bid.split(".p")[0] in parent for bid in (b.batch_id for _, b in batches))
    assert len(ids) == len(set(ids)) == 200


# -- durable mode ------------------------------------------------------------------------
def test_durable_mode_persists_before_emit_returns(
    make_emitter: Callable[..., Emitter], tmp_path: Path
) -> None:
    spool = tmp_path / "durable"
    transport = RecordingTransport()
    transport.fail = True  # nothing leaves the spool
    em = make_emitter(transport, spool=spool, durability="durable")
    for i in range(20):
        em.emit("c", "api_calls", i, id=f"e{i}")
        assert spooled_event_count(spool) == i + 1  # on disk before emit() returned
    assert em.stats().emitted == 20
    em.close(timeout=0.2)

    up = RecordingTransport()
    em2 = make_emitter(up, spool=spool, durability="durable")
    assert em2.flush(10)
    assert sorted(ev.id for ev in delivered_events(up)) == sorted(f"e{i}" for i in range(20))


CHILD = """
import os, sys
from meterline.sdk import Emitter, EmitterConfig, MemoryTransport
transport = MemoryTransport()
transport.fail = True
em = Emitter(EmitterConfig(bootstrap_servers=None, spool_dir=sys.argv[1], linger_ms=5,
                           durability="durable"), transport=transport)
for i in range(300):
    em.emit(f"c{i % 7}", "api_calls", i, id=f"e{i}")
os._exit(0)  # no close(), no atexit: as abrupt as kill -9 for the spool
"""


@pytest.mark.parametrize("next_durability", ["durable", "buffered"])
def test_durable_mode_survives_abrupt_exit(
    make_emitter: Callable[..., Emitter], tmp_path: Path, next_durability: str
) -> None:
    # The next emitter on the spool delivers what the dead one accepted, whatever its own
    # durability mode (events not yet cut into batches included).
    spool = tmp_path / "crash"
    subprocess.run([sys.executable, "-c", CHILD, str(spool)], cwd=REPO, check=True, timeout=60)
    assert spooled_event_count(spool) == 300
    up = RecordingTransport()
    em = make_emitter(up, spool=spool, durability=next_durability)  # the dead child's lock is gone
    assert em.flush(10)
    events = delivered_events(up)
    assert sorted(ev.id for ev in events) == sorted(f"e{i}" for i in range(300))
    assert sum(ev.quantity for ev in events) == sum(range(300)) * 10**9


def test_spool_lock_prevents_two_emitters(
    make_emitter: Callable[..., Emitter], tmp_path: Path
) -> None:
    spool = tmp_path / "locked"
    em = make_emitter(spool=spool)
    with pytest.raises(SpoolLockedError):
        make_emitter(spool=spool)
    em.close(timeout=1)
    make_emitter(spool=spool).emit("c", "api_calls")


def test_failed_construction_releases_the_spool(tmp_path: Path) -> None:
    spool = tmp_path / "failed"
    with pytest.raises(InvalidEventError):
        Emitter(EmitterConfig(bootstrap_servers=None, spool_dir=spool))  # no transport
    em = Emitter(
        EmitterConfig(bootstrap_servers=None, spool_dir=spool), transport=MemoryTransport()
    )
    em.close(timeout=1)


# -- modes and integrations --------------------------------------------------------------
def test_sync_mode_delivers_before_emit_returns(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport()
    em = make_emitter(transport, sync=True)
    for i in range(5):
        em.emit("c", "api_calls", 1, id=f"e{i}")
        assert len(delivered_events(transport)) == i + 1
        assert em.stats().delivered == i + 1


def test_aflush_inside_asyncio_run(make_emitter: Callable[..., Emitter]) -> None:
    transport = RecordingTransport()
    em = make_emitter(transport)

    async def main() -> bool:
        for i in range(100):
            em.emit("c", "api_calls", i)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        ok = await em.aflush(5)
        task.cancel()
        assert ticks >= 1  # the event loop kept running while flushing
        return ok

    assert asyncio.run(main())
    assert len(delivered_events(transport)) == 100


def test_register_metrics(make_emitter: Callable[..., Emitter]) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from meterline.sdk import register_metrics

    registry = prometheus_client.CollectorRegistry()
    em = make_emitter()
    collector = register_metrics(em, name="t", registry=registry)
    assert collector is not None
    for _ in range(7):
        em.emit("c", "api_calls")
    with pytest.raises(InvalidEventError):
        em.emit("", "api_calls")
    assert em.flush(5)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"emitter": "t", **labels})

    assert sample("meterline_sdk_events_total", state="emitted") == 7
    assert sample("meterline_sdk_events_total", state="delivered") == 7
    assert sample("meterline_sdk_events_total", state="rejected") == 1
    assert sample("meterline_sdk_events_total", state="spooled") == 0
    assert sample("meterline_sdk_pending_events", where="memory") == 0
    assert sample("meterline_sdk_pending_events", where="spool") == 0
    assert sample("meterline_sdk_events_total", state="lost") == 0
    assert sample("meterline_sdk_events_total", state="undelivered_at_close") == 0
    assert sample("meterline_sdk_partition_count_changes_total") == 0
    # Every cause is exported from the first scrape on, at 0, so alerts have a series.
    from meterline.sdk.failures import CAUSES

    for cause in CAUSES:
        assert sample("meterline_sdk_errors_total", cause=cause) == 0
    # Nothing leaked into the process-wide default registry.
    assert (
        prometheus_client.REGISTRY.get_sample_value(
            "meterline_sdk_events_total", {"emitter": "t", "state": "emitted"}
        )
        is None
    )
    registry.unregister(collector)


def test_context_manager_flushes(tmp_path: Path) -> None:
    transport = MemoryTransport()
    config = EmitterConfig(bootstrap_servers=None, spool_dir=tmp_path / "cm", linger_ms=5)
    with Emitter(config, transport=transport) as em:
        for _ in range(10):
            em.emit("c", "api_calls")
    assert len(delivered_events(transport)) == 10
    assert em.close() is True  # idempotent
