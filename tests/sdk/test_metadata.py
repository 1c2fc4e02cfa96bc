"""Partition count drift: the emitter keeps routing with the count it started with, and
says loudly (log, counter, on_error) when the topic's count changes under it."""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meterline.core.envelope import decode_batch
from meterline.core.errors import ConfigError
from meterline.core.partitioning import partition_for
from meterline.sdk import Emitter, EmitterConfig, MemoryTransport
from meterline.sdk.metadata import PartitionCountChangedError, PartitionWatch


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingTransport(MemoryTransport):
    """Counts metadata requests; optionally raises on them."""

    def __init__(self, partitions: int | None) -> None:
        super().__init__(partitions)
        self.asked = 0
        self.raise_on_ask = False

    def partition_count(self, topic: str, timeout_s: float) -> int | None:
        self.asked += 1
        if self.raise_on_ask:
            raise OSError("metadata request failed")
        return self.partitions


def test_watch_learns_then_refreshes_on_its_schedule() -> None:
    clock, transport = FakeClock(), CountingTransport(partitions=None)
    watch = PartitionWatch("usage", refresh_s=60.0, retry_s=1.0, clock=clock)
    assert watch.check(transport) is None and watch.routing is None
    clock.now = 0.5
    watch.check(transport)
    assert transport.asked == 1  # not due yet
    transport.partitions = 4
    clock.now = 1.0
    assert watch.check(transport) is None
    assert watch.routing is not None and watch.routing.partitions == 4
    clock.now = 60.9
    watch.check(transport)
    assert transport.asked == 2  # next ask only after refresh_s
    clock.now = 61.0
    watch.check(transport)
    assert transport.asked == 3


def test_watch_reports_each_change_once_and_never_reroutes() -> None:
    clock, transport = FakeClock(), CountingTransport(partitions=4)
    watch = PartitionWatch("usage", refresh_s=60.0, retry_s=1.0, clock=clock)
    watch.check(transport)
    routing = watch.routing
    transport.partitions = 6
    clock.now += 60
    err = watch.check(transport)
    assert isinstance(err, PartitionCountChangedError)
    assert (err.topic, err.routing, err.previous, err.observed) == ("usage", 4, 4, 6)
    assert "Changing the partition count" in str(err) and "docs/sdk.md" in str(err)
    for _ in range(3):  # still 6: already reported
        clock.now += 60
        assert watch.check(transport) is None
    transport.partitions = None  # broker away: unknown is not a change
    clock.now += 60
    assert watch.check(transport) is None
    transport.partitions = 8
    clock.now += 60
    err = watch.check(transport)
    assert err is not None and (err.routing, err.previous, err.observed) == (4, 6, 8)
    assert watch.routing is routing and routing.partitions == 4


def test_watch_does_not_hammer_a_raising_transport() -> None:
    clock, transport = FakeClock(), CountingTransport(partitions=4)
    watch = PartitionWatch("usage", refresh_s=60.0, retry_s=1.0, clock=clock)
    watch.check(transport)
    transport.raise_on_ask = True
    clock.now += 60
    with pytest.raises(OSError):
        watch.check(transport)
    watch.check(transport)  # the next ask is a full interval away
    assert transport.asked == 2


@pytest.fixture
def emitter_on() -> Iterator[list[Emitter]]:
    made: list[Emitter] = []
    yield made
    for em in made:
        em.close(timeout=0.5)


def test_emitter_detects_a_partition_count_change_and_keeps_routing(
    tmp_path: Path, emitter_on: list[Emitter], caplog: pytest.LogCaptureFixture
) -> None:
    reported: list[BaseException] = []
    transport = CountingTransport(partitions=4)
    config = EmitterConfig(
        bootstrap_servers=None,
        spool_dir=tmp_path / "spool",
        linger_ms=5,
        metadata_refresh_s=0.05,
        on_error=reported.append,
    )
    em = Emitter(config, transport=transport)
    emitter_on.append(em)
    customers = [f"cust-{i}" for i in range(40)]
    moved = [c for c in customers if partition_for(c, 4) != partition_for(c, 6)]
    assert moved  # otherwise routing with 6 could not be told apart from routing with 4
    for c in customers:
        em.emit(c, "api_calls")
    assert em.flush(5)

    transport.partitions = 6  # an operator added partitions in place
    deadline = time.monotonic() + 5
    while em.stats().partition_count_changes == 0:
        assert time.monotonic() < deadline, "change not detected"
        time.sleep(0.01)
    for c in customers:
        em.emit(c, "api_calls", 2)
    assert em.flush(5)
    time.sleep(0.3)  # several more refreshes: reported once, not on every refresh

    stats = em.stats()
    assert stats.partition_count_changes == 1
    assert stats.errors == 0 and stats.lost == 0
    assert stats.delivered == stats.emitted == 2 * len(customers)
    parts: dict[str, set[int]] = collections.defaultdict(set)
    for part, payload in transport.records:
        for customer in decode_batch(payload).customers:
            parts[customer].add(part)
    assert dict(parts) == {c: {partition_for(c, 4)} for c in customers}
    (err,) = [e for e in reported if isinstance(e, PartitionCountChangedError)]
    assert (err.routing, err.observed) == (4, 6)
    (line,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == "meterline.sdk" and r.levelno == logging.ERROR
    ]
    assert "changed from 4 to 6" in line
    assert "keeps routing customers over the 4 partitions" in line
    assert 'docs/sdk.md, "Changing the partition count"' in line


def test_metadata_errors_are_counted_not_fatal(
    tmp_path: Path, emitter_on: list[Emitter]
) -> None:
    transport = CountingTransport(partitions=4)
    em = Emitter(
        EmitterConfig(bootstrap_servers=None, spool_dir=tmp_path / "s", linger_ms=5,
                      metadata_refresh_s=0.02),
        transport=transport,
    )
    emitter_on.append(em)
    em.emit("c", "api_calls")
    assert em.flush(5)
    transport.raise_on_ask = True
    deadline = time.monotonic() + 5
    while em.stats().errors_by_cause["metadata"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    em.emit("c", "api_calls")
    assert em.flush(5)
    assert em.stats().delivered == 2


@pytest.mark.parametrize("bad", [0, -1, 0.0, math.nan, math.inf, True, "60", None])
def test_metadata_refresh_s_is_validated(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ConfigError) as exc:
        EmitterConfig(spool_dir=tmp_path, metadata_refresh_s=bad).validate()
    assert any(e.startswith("metadata_refresh_s:") for e in exc.value.errors)


def test_metadata_refresh_s_default_and_fractions(tmp_path: Path) -> None:
    assert EmitterConfig().metadata_refresh_s == 60.0
    EmitterConfig(spool_dir=tmp_path, metadata_refresh_s=0.5).validate()
    EmitterConfig(spool_dir=tmp_path, metadata_refresh_s=5).validate()
