"""`meterline demo`: the whole path on one machine, no servers.

synthetic usage -> Emitter (SDK) -> embedded durable local log -> raw-events stage ->
chDB -> exact per-customer, per-meter totals, checked against the generator's ground truth.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from meterline.config import AppConfig
from meterline.core.quantity import format_nanos
from meterline.ingest.local_log import LocalLog, LocalLogTransport
from meterline.ingest.raw_loader import RawEventLoader
from meterline.ingest.sources import LocalLogRecordSource
from meterline.sdk import Emitter, EmitterConfig
from meterline.workload import GroundTruth, generate

T = TypeVar("T")
_MARKER = ".meterline-demo"


@dataclass(frozen=True)
class DemoResult:
    events: int
    pairs_checked: int
    mismatches: int
    seconds: float

    @property
    def exact(self) -> bool:
        return self.mismatches == 0 and self.pairs_checked > 0


def _progress(items: Iterable[T], enabled: bool, **kwargs: Any) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, unit_scale=True, dynamic_ncols=True, **kwargs)


def _fresh_workdir(workdir: Path) -> None:
    # Only ever delete a directory this demo created (it carries a marker file).
    if workdir.exists():
        if not (workdir / _MARKER).exists():
            raise SystemExit(f"{workdir} exists and is not a demo directory; pick --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / _MARKER).write_text("created by meterline demo; safe to delete\n")


def run_demo(
    workdir: Path,
    *,
    events: int,
    customers: int,
    seed: int = 7,
    progress: bool = True,
    config: AppConfig | None = None,
) -> DemoResult:
    from meterline.sinks.raw_events import UsageSummaryQuery
    from meterline.sinks.schema import migrate
    from meterline.sinks.storage import StorageConfig, open_storage

    config = config or AppConfig()
    registry = config.registry()
    t0 = time.monotonic()
    _fresh_workdir(workdir)
    print(f"Meterline demo: {events:,} usage events from {customers:,} customers, "
          f"{len(registry)} meters ({', '.join(registry.names)})")

    # 1. The application side: the SDK batches events into the embedded local log.
    log = LocalLog(workdir / "log.db", partitions=4)
    truth = GroundTruth()
    emitter = Emitter(
        EmitterConfig(topic="local", spool_dir=workdir / "spool", bootstrap_servers=None),
        registry=registry,
        transport=LocalLogTransport(log),
    )
    stream = generate(events, customers, end_ms=time.time_ns() // 1_000_000, seed=seed,
                      truth=truth)
    emit = emitter.emit
    for ev in _progress(stream, progress, total=events, desc="emit  (SDK)"):
        emit(ev.customer, ev.meter, ev.quantity, timestamp_ms=ev.timestamp_ms,
             dimensions=ev.dimensions)
    if not emitter.close(timeout=120):
        raise SystemExit("the SDK could not deliver every event to the local log")
    stats = emitter.stats()

    # 2. The pipeline side: batches from the log into ClickHouse (embedded chDB).
    storage = open_storage(StorageConfig(data_dir=str(workdir / "chdb")))
    try:
        migrate(storage, storage.database, config.retention_policy())
        source = LocalLogRecordSource(log, consumer="raw-events")
        loader = RawEventLoader(storage, source, max_records=64)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=stats.delivered, unit_scale=True, dynamic_ncols=True,
                       desc="load  (chDB)")
        while source.lag():
            step = loader.run_once(timeout_s=0)
            if bar is not None:
                bar.update(step.events)
        if bar is not None:
            bar.close()
        summary = UsageSummaryQuery(database=storage.database).run(storage)
    finally:
        storage.close()
        log.close()

    # 3. What a person wants to see: totals per meter, top customers, and the proof.
    got = {(r.customer, r.meter): (r.quantity_nano, r.events) for r in summary}
    mismatches = sum(
        1 for key, nanos in truth.sums.items() if got.get(key) != (nanos, truth.counts[key])
    ) + len(set(got) - set(truth.sums))
    seconds = time.monotonic() - t0
    _print_report(summary, registry, truth, mismatches, seconds, loader.totals.dead_letters)
    return DemoResult(truth.events, len(truth.sums), mismatches, seconds)


def _print_report(summary: list[Any], registry: Any, truth: GroundTruth, mismatches: int,
                  seconds: float, dead_letters: int) -> None:
    per_meter: dict[str, list[int]] = {}
    per_customer: dict[str, int] = {}
    for r in summary:
        acc = per_meter.setdefault(r.meter, [0, 0, 0])
        acc[0] += r.events
        acc[1] += r.quantity_nano
        acc[2] += 1
        if r.meter == "api_calls":
            per_customer[r.customer] = per_customer.get(r.customer, 0) + r.events
    print()
    print(f"{'meter':<18}{'unit':<10}{'events':>12}{'customers':>11}{'raw sum (exact)':>24}")
    print("-" * 75)
    for name in sorted(per_meter):
        events, nanos, custs = per_meter[name]
        meter = registry.get(name)
        print(f"{name:<18}{meter.unit if meter else '':<10}{events:>12,}{custs:>11,}"
              f"{format_nanos(nanos):>24}")
    if per_customer:
        print("\nTop customers by api_calls:")
        for customer, calls in sorted(per_customer.items(), key=lambda kv: -kv[1])[:5]:
            print(f"  {customer:<14}{calls:>10,} requests")
    print()
    pairs = len(truth.sums)
    if mismatches == 0:
        print(f"Exact: ClickHouse totals equal the ground truth for all {pairs:,} "
              f"(customer, meter) pairs, {truth.events:,} events, 0 lost, 0 double counted.")
    else:
        print(f"MISMATCH: {mismatches} of {pairs} (customer, meter) totals differ from the "
              "ground truth.")
    print(f"Dead letters: {dead_letters}.  Done in {seconds:.1f}s "
          f"({truth.events / seconds:,.0f} events/s end to end).")


def print_usage(config: AppConfig, customer: str, meter: str | None) -> None:
    from meterline.sinks.raw_events import UsageSummaryQuery
    from meterline.sinks.storage import open_storage

    storage = open_storage(config.storage_config())
    try:
        rows = UsageSummaryQuery(customer=customer, database=storage.database).run(storage)
    finally:
        storage.close()
    rows = [r for r in rows if meter is None or r.meter == meter]
    if not rows:
        print(f"no usage recorded for {customer}")
        return
    print(f"{'meter':<18}{'events':>10}{'total (exact)':>22}")
    for r in rows:
        print(f"{r.meter:<18}{r.events:>10,}{format_nanos(r.quantity_nano):>22}")
