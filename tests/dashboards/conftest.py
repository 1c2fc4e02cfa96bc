"""Usage seeded through the real write path, for running the dashboards' SQL.

synthetic events -> SDK Emitter -> embedded local log -> embedded rollup stage
(RollupWorker + StorageWriter -> sinks.rollups.write_flush) -> chDB, plus events that come
too late (late_events) and events and records the rollup stage rejects (dead_letters).
Anomaly episodes (``Seeded.anomalies``) go in through sinks.anomalies.write_events, as the
anomaly stage writes them. The tests compute what every panel and annotation must show
from ``Seeded.counted`` and ``Seeded.anomalies`` themselves.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meterline.config import DEFAULT_METERS
from meterline.core.meters import MeterRegistry
from meterline.workload import SyntheticEvent, generate

HOUR_MS = 3_600_000
SPAN_MS = 72 * HOUR_MS
LATE_BY_MS = 10 * HOUR_MS  # 10 h behind the newest event: far past the 2 h lateness
UNKNOWN_METER = "no_such_meter"


@dataclass(frozen=True)
class Seeded:
    storage: Any
    database: str
    registry: MeterRegistry
    data_end_ms: int  # the newest counted event is a little before this
    counted: list[SyntheticEvent]  # every event that must be in the rollups
    late: list[SyntheticEvent]  # too late: in late_events only
    rejected_events: int  # unknown meter: dead letters of the rollup stage
    rejected_records: int  # undecodable records: dead letters of the rollup stage
    counters: Any
    anomalies: tuple[Any, ...] = ()  # EpisodeEvents written to the anomalies table


def _anomalies(data_end_ms: int) -> list[Any]:
    """Episodes around the dashboards' 30 h range (which ends ~10 min after data_end_ms):
    before it, across its start, inside it, open across all of it, after it; an update
    that escalates; an early warning (not an episode); one customer with dimensions."""
    from meterline.core.anomaly.model import Anomaly, EpisodeEvent, SeriesKey

    t0 = data_end_ms - data_end_ms % HOUR_MS
    out: list[Any] = []

    def episode(customer: str, meter: str, since_h: int, steps: list[tuple[str, str]],
                group: tuple[tuple[str, str], ...] = (), direction: str = "up",
                resolve_after_h: int | None = None) -> None:
        series = SeriesKey(customer, meter, group)
        since = t0 + since_h * HOUR_MS
        for seq, (kind, severity) in enumerate(steps):
            window = since + seq * HOUR_MS
            a = Anomaly(series, window, "seasonal_robust", direction,
                        1234.5 + seq if direction == "up" else 3.25, 100.0, 60.0, 140.0,
                        8.5 if direction == "up" else -6.0, severity, since)
            until = since + resolve_after_h * HOUR_MS if kind == "resolve" and \
                resolve_after_h is not None else None
            out.append(EpisodeEvent(kind, series, since, seq, window, a, seq + 1, until))

    episode("cust-00001", "api_calls", -40, [("open", "major"), ("resolve", "major")],
            group=(("endpoint", "/v1/search"), ("region", "eu-west")), resolve_after_h=4)
    episode("cust-00001", "llm_tokens", -35, [("open", "minor"), ("update", "major"),
                                              ("resolve", "major")], resolve_after_h=15)
    episode("cust-00002", "api_calls", -10, [("open", "major"), ("update", "critical")])
    episode("cust-00003", "storage_gb", -50, [("open", "minor")], direction="down")
    episode("cust-00002", "compute_seconds", -5, [("open", "minor"), ("resolve", "minor")],
            resolve_after_h=2)
    episode("cust-00004", "api_calls", 3, [("open", "critical")])  # after the range
    early = out[0]
    out.append(EpisodeEvent("early", early.series, t0 - 2 * HOUR_MS, -1, t0 - 2 * HOUR_MS,
                            early.anomaly, 0))
    return out


def _seed(storage: Any, database: str, workdir: Path, now_ms: int) -> Seeded:
    from meterline.aggregators.embedded import run_embedded_rollups
    from meterline.ingest.local_log import LocalLog, LocalLogTransport
    from meterline.sdk import Emitter, EmitterConfig

    registry = MeterRegistry.load(DEFAULT_METERS)
    data_end_ms = now_ms - 60_000
    counted = list(generate(3_000, 12, end_ms=data_end_ms, span_ms=SPAN_MS, seed=20251201))
    newest = max(e.timestamp_ms for e in counted)
    top = sorted({e.customer for e in counted})[:3]  # the busiest customers (Zipf weights)
    late = [SyntheticEvent(customer, "api_calls", 1, newest - LATE_BY_MS - i * 60_000,
                           {"endpoint": "/v1/search", "region": "eu-west"})
            for i, customer in enumerate(top * 2)]
    late.append(SyntheticEvent(top[0], "llm_tokens", 777, newest - LATE_BY_MS,
                               {"model": "small"}))

    log = LocalLog(workdir / "log.db", partitions=4)
    try:
        # Known meters through a validating emitter, in time order as apps send them.
        with Emitter(EmitterConfig(topic="local", spool_dir=workdir / "spool",
                                   bootstrap_servers=None),
                     registry=registry, transport=LocalLogTransport(log)) as emitter:
            for e in counted:
                emitter.emit(e.customer, e.meter, e.quantity, timestamp_ms=e.timestamp_ms,
                             dimensions=e.dimensions)
            assert emitter.flush(60)
            for e in late:
                emitter.emit(e.customer, e.meter, e.quantity, timestamp_ms=e.timestamp_ms,
                             dimensions=e.dimensions)
        # An app with an outdated meter list, and a record no SDK wrote.
        with Emitter(EmitterConfig(topic="local", spool_dir=workdir / "spool-2",
                                   bootstrap_servers=None),
                     transport=LocalLogTransport(log)) as emitter:
            for i in range(4):
                emitter.emit(top[1], UNKNOWN_METER, 1, timestamp_ms=newest - i)
        log.append(0, [b"\x00 not an envelope"])
        counters = run_embedded_rollups(log, storage, registry,
                                        checkpoint_path=workdir / "rollup-checkpoints.db",
                                        until_idle_s=0, database=database)
    finally:
        log.close()
    assert counters.accepted == len(counted), counters
    assert counters.late == len(late), counters
    from meterline.sinks.anomalies import write_events

    anomalies = _anomalies(data_end_ms)
    write_events(storage, anomalies, database=database)
    write_events(storage, anomalies[4:7], database=database)  # a replayed write: same keys
    return Seeded(storage, database, registry, data_end_ms, counted, late, 4, 1, counters,
                  tuple(anomalies))


@pytest.fixture(scope="session")
def seeded_usage(chdb_engine: Any, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[Seeded]:
    """A migrated database of its own on the session's chDB engine, seeded once."""
    import time

    from meterline.sinks.chdb_backend import ChdbStorage
    from meterline.sinks.schema import migrate

    database = f"dash_{uuid.uuid4().hex[:12]}"
    storage = ChdbStorage(chdb_engine.data_dir, database)
    try:
        migrate(storage)
        yield _seed(storage, database, tmp_path_factory.mktemp("dashboards-seed"),
                    time.time_ns() // 1_000_000)
    finally:
        storage.execute(f"DROP DATABASE IF EXISTS {database} SYNC")
        storage.close()
