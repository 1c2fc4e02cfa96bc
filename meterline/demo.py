"""`meterline demo`: the whole path on one machine, no servers.

synthetic usage -> Emitter (SDK) -> embedded durable local log -> raw-events stage ->
chDB -> exact per-customer, per-meter totals; then the embedded rollup stage over the same
log -> hourly/daily rollups in chDB -> every (customer, meter, hour) and (customer, meter,
day) total checked against the generator's ground truth; last, the Grafana consumption
dashboard's main panels, their SQL run on the demo's chDB, drawn into a PNG.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from meterline.config import AppConfig
from meterline.core.quantity import format_nanos
from meterline.core.windows import DAY_MS, HOUR_MS
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
    windows_checked: int = 0  # (customer, meter, hour) and (customer, meter, day) totals
    window_mismatches: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    overview_png: Path | None = None
    billing_exact: bool | None = None  # rated quantities = truth and zero reconcile drift

    @property
    def exact(self) -> bool:
        return (self.mismatches == 0 and self.pairs_checked > 0
                and self.window_mismatches == 0 and self.windows_checked > 0
                and self.billing_exact is not False)


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


def _bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit_scale=True, dynamic_ncols=True, desc=desc)


def run_demo(
    workdir: Path,
    *,
    events: int,
    customers: int,
    seed: int = 7,
    progress: bool = True,
    config: AppConfig | None = None,
) -> DemoResult:
    from meterline.aggregators.embedded import run_embedded_rollups
    from meterline.sinks.raw_events import UsageSummaryQuery
    from meterline.sinks.rollups import RollupTotalsQuery
    from meterline.sinks.schema import migrate
    from meterline.sinks.storage import StorageConfig, open_storage

    config = config or AppConfig()
    registry = config.registry()
    t0 = time.monotonic()
    stage_seconds: dict[str, float] = {}
    _fresh_workdir(workdir)
    print(f"Meterline demo: {events:,} usage events from {customers:,} customers, "
          f"{len(registry)} meters ({', '.join(registry.names)})")

    # 1. The application side: the SDK batches events into the embedded local log.
    log = LocalLog(workdir / "log.db", partitions=4)
    truth = GroundTruth(registry=registry)
    emitter = Emitter(
        EmitterConfig(topic="local", spool_dir=workdir / "spool", bootstrap_servers=None),
        registry=registry,
        transport=LocalLogTransport(log),
    )
    end_ms = time.time_ns() // 1_000_000
    span_ms = 48 * HOUR_MS  # generate()'s default span
    stream = generate(events, customers, end_ms=end_ms, span_ms=span_ms, seed=seed,
                      truth=truth)
    emit = emitter.emit
    for ev in _progress(stream, progress, total=events, desc="emit   (SDK)"):
        emit(ev.customer, ev.meter, ev.quantity, timestamp_ms=ev.timestamp_ms,
             dimensions=ev.dimensions)
    if not emitter.close(timeout=120):
        raise SystemExit("the SDK could not deliver every event to the local log")
    stats = emitter.stats()
    stage_seconds["emit"] = time.monotonic() - t0

    # 2. The pipeline side: batches from the log into ClickHouse (embedded chDB).
    storage = open_storage(StorageConfig(data_dir=str(workdir / "chdb")))
    try:
        t = time.monotonic()
        migrate(storage, storage.database, config.retention_policy())
        source = LocalLogRecordSource(log, consumer="raw-events")
        loader = RawEventLoader(storage, source, registry, max_records=64,
                                retention=config.retention_policy())
        bar = _bar(progress, stats.delivered, "load   (chDB)")
        while source.lag():
            step = loader.run_once(timeout_s=0)
            if bar is not None:
                bar.update(step.events)
        if bar is not None:
            bar.close()
        summary = UsageSummaryQuery(database=storage.database).run(storage)
        stage_seconds["raw"] = time.monotonic() - t

        # 3. The rollup stage over the same log: hourly and daily windows, exactly once.
        t = time.monotonic()
        bar = _bar(progress, stats.delivered, "rollup (chDB)")
        counters = run_embedded_rollups(
            log, storage, registry, checkpoint_path=workdir / "rollup-checkpoints.db",
            until_idle_s=0, database=storage.database,
            on_step=None if bar is None else (lambda s: bar.update(s.events)))
        if bar is not None:
            bar.close()
        stage_seconds["rollup"] = time.monotonic() - t
        t = time.monotonic()
        # With the registry, late unique_count windows are re-aggregated from raw events
        # rather than left pending (sinks/rollup_queries.py).
        hourly = RollupTotalsQuery("hour", database=storage.database,
                                   registry=registry).run(storage)
        daily = RollupTotalsQuery("day", database=storage.database,
                                  registry=registry).run(storage)
        stage_seconds["verify"] = time.monotonic() - t
        t = time.monotonic()
        png = _overview_png(storage, workdir / "consumption-overview.png")
        stage_seconds["png"] = time.monotonic() - t
        t = time.monotonic()
        billing = _billing(storage, truth, customers, end_ms - span_ms, end_ms, config)
        stage_seconds["billing"] = time.monotonic() - t
        t = time.monotonic()
    finally:
        storage.close()
        log.close()

    # 4. What a person wants to see: totals per meter, top customers, and the proof.
    got = {(r.customer, r.meter): (r.quantity_nano, r.events) for r in summary}
    mismatches = sum(
        1 for key, nanos in truth.sums.items() if got.get(key) != (nanos, truth.counts[key])
    ) + len(set(got) - set(truth.sums))
    want_hourly, want_daily = truth.window_totals("hour"), truth.window_totals("day")
    window_diffs = _diff("hour", hourly, want_hourly) + _diff("day", daily, want_daily)
    checked = len(set(hourly) | set(want_hourly)) + len(set(daily) | set(want_daily))
    stage_seconds["verify"] += time.monotonic() - t
    seconds = time.monotonic() - t0
    _print_report(summary, registry, truth, mismatches, seconds, loader.totals.dead_letters)
    _print_rollups(registry, counters, hourly, daily, window_diffs, checked, stage_seconds)
    if png is not None:
        print(f"\nConsumption overview (the Grafana dashboard's SQL on this chDB): {png}")
    if billing is not None:
        billing.report()
    t = time.monotonic()
    _print_anomalies()
    stage_seconds["anomalies"] = time.monotonic() - t
    print(f"Done in {seconds:.1f}s ({truth.events / seconds:,.0f} events/s end to end; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in stage_seconds.items()) + ").")
    if billing is not None and billing.export_summary:  # invoicing export (issue 10)
        print(billing.export_summary)
    return DemoResult(truth.events, len(truth.sums), mismatches, seconds, checked,
                      len(window_diffs), stage_seconds, png,
                      None if billing is None else billing.result.exact)


def _print_anomalies() -> None:
    """The anomaly stage's detectors on three weeks of synthetic hourly usage with abuse
    injected (meterline/anomaly_demo.py): what was caught, explained, and what was missed.
    Separate data from the run above, whose few hours are too short for a baseline."""
    from meterline.anomaly_demo import inject_and_report

    print("\nAnomaly detection (`meterline anomalies` runs the same detectors on the rollups):")
    for line in inject_and_report():
        print(f"  {line}")


def _billing(storage: Any, truth: GroundTruth, n_customers: int, start_ms: int, end_ms: int,
             config: AppConfig) -> Any:
    """Plans, subscriptions and rating on the demo's usage (meterline/rating/demo.py); its
    report is printed after the pipeline's."""
    from meterline.rating.demo import run_billing
    from meterline.workload import customers

    r = config.rollups
    settle_ms = HOUR_MS + r.watermark_delay_ms + r.allowed_lateness_ms
    return run_billing(storage, truth, customers(n_customers), start_ms, end_ms, settle_ms)


def _overview_png(storage: Any, path: Path) -> Path | None:
    """dashboards/consumption.json's main panels as a PNG; None (and why) when the
    dashboard or matplotlib is not there (a pip-installed Meterline has no dashboards/)."""
    from meterline.grafana import DASHBOARDS_DIR

    if not (DASHBOARDS_DIR / "consumption.json").is_file():
        print(f"(no consumption overview: {DASHBOARDS_DIR} is not there)")
        return None
    try:
        from meterline.overview import render_overview

        return render_overview(storage, path, database=storage.database).path
    except ImportError as exc:
        print(f"(no consumption overview: {exc}; pip install 'meterline[server]')")
        return None


def _diff(granularity: str, got: dict[tuple[str, str, int], int],
          want: dict[tuple[str, str, int], int]) -> list[str]:
    return [f"{granularity} {c} {m} {_utc(start)}: rollup {_num(got.get((c, m, start)))}, "
            f"truth {_num(want.get((c, m, start)))}"
            for c, m, start in sorted(set(got) | set(want))
            if got.get((c, m, start)) != want.get((c, m, start))]


def _utc(ms: int, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime(fmt)


def _num(nanos: int | None) -> str:
    """Exact decimal with thousands separators: 1234567.5 -> 1,234,567.5."""
    if nanos is None:
        return "-"
    text = format_nanos(nanos)
    whole, dot, frac = text.partition(".")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}{int(whole.lstrip('-')):,}{dot}{frac}"


# How a meter's per-customer values combine into the per-meter daily line.
_COMBINED = {"count": "events", "sum": "total", "max": "sum of peaks",
             "min": "sum of lows", "unique_count": "distinct users", "latest": "sum"}


def _print_rollups(registry: Any, counters: Any, hourly: dict[tuple[str, str, int], int],
                   daily: dict[tuple[str, str, int], int], diffs: list[str], checked: int,
                   stage_seconds: dict[str, float]) -> None:
    events = counters.accepted + counters.duplicate + counters.late + counters.rejected
    print(f"\nRollups (embedded runner over the same log, {stage_seconds['rollup']:.1f}s): "
          f"{events:,} events: {counters.accepted:,} accepted, {counters.duplicate:,} "
          f"duplicate, {counters.late:,} too late, {counters.rejected:,} rejected"
          + (f" {counters.by_reason}" if counters.by_reason else ""))
    days = sorted({start for _, _, start in daily})
    per_meter: dict[str, dict[int, int]] = {}
    for (_customer, meter, start), value in daily.items():
        row = per_meter.setdefault(meter, {})
        row[start] = row.get(start, 0) + value
    print("\nDaily totals per meter (UTC days, all customers):")
    header = f"  {'meter':<17}{'':<23}" + "".join(f"{_utc(d, '%Y-%m-%d'):>18}" for d in days)
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name in sorted(per_meter):
        meter = registry.get(name)
        kind = meter.aggregation.value if meter else "?"
        label = f"{_COMBINED.get(kind, kind)} ({meter.unit if meter else ''})"
        print(f"  {name:<17}{label:<23}"
              + "".join(f"{_num(per_meter[name].get(d)):>18}" for d in days))

    # The top customer's busiest day of api_calls, hour by hour.
    calls = {(c, start): v for (c, m, start), v in daily.items() if m == "api_calls"}
    if calls:
        per_customer: dict[str, int] = {}
        for (c, _), v in calls.items():
            per_customer[c] = per_customer.get(c, 0) + v
        top = max(per_customer, key=lambda c: (per_customer[c], c))
        day = max((start for c, start in calls if c == top), key=lambda d: calls[(top, d)])
        print(f"\n{top} api_calls per hour on its busiest day, {_utc(day, '%Y-%m-%d')} UTC "
              f"({_num(calls[(top, day)])} requests):")
        cells = [f"{h:02d}h {_num(hourly.get((top, 'api_calls', day + h * HOUR_MS))):>7}"
                 for h in range(DAY_MS // HOUR_MS)]
        for i in range(0, len(cells), 6):
            print("  " + "   ".join(cells[i:i + 6]))
    print()
    hours = sum(1 for _ in hourly)
    if not diffs:
        print(f"Exact: rollups equal the ground truth for all {checked:,} windows "
              f"({hours:,} customer-meter-hours, {len(daily):,} customer-meter-days).")
    else:
        print(f"MISMATCH: {len(diffs)} of {checked:,} rollup windows differ from the ground "
              "truth:")
        for line in diffs[:10]:
            print(f"  {line}")


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
    print(f"Dead letters: {dead_letters}.")

