"""The anomaly part of `make demo`: inject abuse into synthetic usage, run the anomaly
stage's feed over it as rollup rows, print what was caught (explained) and what was missed.

    from meterline.anomaly_demo import inject_and_report
    for line in inject_and_report():
        print(line)

``rollup_rows`` turns hourly totals into rows the way the rollup stage writes them:
several growing versions per window while it fills, a late update after the window ended
(within the allowed lateness), and replayed older versions as after a worker crash, in
records of one source partition each. Tests use it too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from meterline.core.anomaly.feed import FeedSettings, RollupFeed
from meterline.core.anomaly.model import EpisodeEvent, SeriesKey
from meterline.core.anomaly.settings import AnomalySettings
from meterline.core.outputs import RollupRecord
from meterline.core.windows import HOUR_MS

__all__ = ["Incident", "inject_and_report", "rollup_rows", "synthetic_usage"]

START_MS = 1_704_067_200_000  # Monday 2024-01-01 00:00 UTC
NANOS = 10**9


@dataclass(frozen=True)
class Incident:
    what: str  # "abuse spike", "slow abuse ramp", "went silent"
    series: SeriesKey
    first_hour: int  # index into the series
    hours: int


def synthetic_usage(customers: int = 30, days: int = 21, seed: int = 7,
                    ) -> dict[SeriesKey, list[int]]:
    """Hourly api_calls per customer: business-hours or evening-peak shapes, levels from
    50 to 20,000 an hour, multiplicative noise, whole counts."""
    rng = random.Random(seed)
    out: dict[SeriesKey, list[int]] = {}
    for c in range(customers):
        level = math.exp(rng.uniform(math.log(50), math.log(20_000)))
        b2b = rng.random() < 0.6
        noise = rng.uniform(0.05, 0.15)
        values = []
        for h in range(days * 24):
            hour, weekday = h % 24, (h // 24) % 7
            if b2b:
                shape = (1.0 if 9 <= hour < 18 else 0.15) * (1.0 if weekday < 5 else 0.3)
            else:
                shape = 0.3 + 0.7 * math.exp(-((hour - 20) % 24 - 0) ** 2 / 18)
            values.append(max(0, round(level * shape * math.exp(rng.gauss(0, noise)))))
        out[SeriesKey(f"cust-{c:03d}", "api_calls")] = values
    return out


def _inject(usage: dict[SeriesKey, list[int]], rng: random.Random) -> list[Incident]:
    keys = sorted(usage)
    days = len(usage[keys[0]]) // 24
    picks = rng.sample(keys, 5)
    incidents = []
    for key in picks[:3]:  # a leaked key: 8-30x the usual rate for 1-3 hours on a weekday
        day = rng.randrange(days - 7, days - 1)
        first = day * 24 + rng.randrange(10, 16)
        hours = rng.randint(1, 3)
        factor = rng.uniform(8, 30)
        for h in range(first, first + hours):
            usage[key][h] = round(max(usage[key][h], 20) * factor)
        incidents.append(Incident("abuse spike", key, first, hours))
    key = picks[3]  # a slow runaway ramp: x1 -> x8 over 24 hours, then stays
    first = (days - 5) * 24 + 6
    for i, h in enumerate(range(first, len(usage[key]))):
        usage[key][h] = round(usage[key][h] * (1 + 7 * min(1.0, i / 24)))
    incidents.append(Incident("slow abuse ramp", key, first, len(usage[key]) - first))
    key = picks[4]  # an integration broke: silent for 12 hours on a weekday
    first = (days - 3) * 24 + 8
    for h in range(first, first + 12):
        usage[key][h] = 0
    incidents.append(Incident("went silent", key, first, 12))
    return incidents


def rollup_rows(usage: dict[SeriesKey, list[int]], start_ms: int = START_MS, *,
                partitions: int = 2, seed: int = 1, chunk: int = 7,
                late_after_hours: int = 1, replay_every: int = 0,
                ) -> Iterator[list[RollupRecord]]:
    """Records of rollup rows (each a list of one source partition's rows), in the order a
    rollup stage would write them. Every window is written three times with growing
    versions: 60 % of its total during the hour, 95 % at its end and the full total
    ``late_after_hours`` later (a late event inside the allowed lateness). Zero hours get
    no row (rollups only write windows that had events). ``replay_every``: every n-th
    record is followed by a copy of an earlier one (a worker replaying after a crash)."""
    rng = random.Random(seed)
    keys = sorted(usage)
    hours = len(usage[keys[0]])
    by_partition = {k: sum(map(ord, k.customer)) % partitions for k in keys}
    queue: dict[int, list[RollupRecord]] = {p: [] for p in range(partitions)}
    sent: list[list[RollupRecord]] = []

    def row(key: SeriesKey, h: int, units: int, version: int) -> RollupRecord:
        start = start_ms + h * HOUR_MS
        return RollupRecord("hourly", key.customer, key.meter, key.group, start,
                            start + HOUR_MS, "sum", units * NANOS, version, version,
                            "meterline.usage", by_partition[key])

    def emit(p: int, force: bool = False) -> Iterator[list[RollupRecord]]:
        rows = queue[p]
        while len(rows) >= chunk or (force and rows):
            record, queue[p] = rows[:chunk], rows[chunk:]
            rows = queue[p]
            sent.append(record)
            yield record
            if replay_every and len(sent) % replay_every == 0:
                yield rng.choice(sent[-20:])

    for h in range(hours + late_after_hours + 1):
        for stage, (share, lag) in enumerate(((0.6, 0), (0.95, 0), (1.0, late_after_hours))):
            at = h - lag
            if not 0 <= at < hours:
                continue
            for key in keys:
                total = usage[key][at]
                if total:
                    queue[by_partition[key]].append(row(key, at, math.floor(total * share)
                                                        if share < 1 else total, stage + 1))
            for p in range(partitions):
                yield from emit(p)
        for p in range(partitions):
            yield from emit(p, force=True)


def _episodes(events: list[EpisodeEvent]) -> dict[tuple[SeriesKey, int], list[EpisodeEvent]]:
    out: dict[tuple[SeriesKey, int], list[EpisodeEvent]] = {}
    for e in events:
        out.setdefault((e.series, e.since_ms), []).append(e)
    return out


def inject_and_report(*, customers: int = 30, days: int = 21, seed: int = 7,
                      settings: AnomalySettings | None = None) -> list[str]:
    """Synthetic usage with injected abuse spikes, a slow ramp and a customer going
    silent, run through the anomaly stage's feed as rollup rows. Returns printable lines:
    each incident caught (when, how, the explanation) or missed, and any alert that
    matches no incident."""
    rng = random.Random(seed)
    usage = synthetic_usage(customers, days, seed)
    incidents = _inject(usage, rng)
    # Customers in the demo are small enough that 20 calls an hour is noise.
    settings = settings or AnomalySettings(min_abs_deviation=20)
    feed = RollupFeed(settings, FeedSettings())
    events: list[EpisodeEvent] = []
    for record in rollup_rows(usage, seed=seed, late_after_hours=1):
        events += feed.apply(record).events
    def hour_of(ms: int) -> int:
        return (ms - START_MS) // HOUR_MS

    lines = [f"anomalies: {customers} customers x {days} days of hourly api_calls, "
             f"{len(incidents)} incidents injected, {len(events)} events"]
    claimed: set[tuple[SeriesKey, int]] = set()
    episodes = _episodes([e for e in events if e.kind != "early"])
    for inc in incidents:
        last = inc.first_hour + inc.hours
        hits = sorted((k for k in episodes if k[0] == inc.series
                       and inc.first_hour <= hour_of(k[1]) <= last + 3), key=lambda k: k[1])
        early = [e for e in events if e.kind == "early" and e.series == inc.series
                 and inc.first_hour <= hour_of(e.window_start_ms) <= last]
        name = f"{inc.what} on {inc.series.customer}/{inc.series.meter} at day " \
               f"{inc.first_hour // 24} {inc.first_hour % 24:02d}:00 for {inc.hours} h"
        if not hits:
            lines.append(f"  MISSED  {name}")
            continue
        claimed.update(hits)
        opened = episodes[hits[0]][0]
        delay = hour_of(opened.window_start_ms) - inc.first_hour
        warn = (f"; early warning {hour_of(early[0].window_start_ms) - inc.first_hour} h in, "
                "before the window was final") if early else ""
        lines.append(f"  caught  {name}: opened {delay} h after it began{warn}")
        lines.append(f"          {opened.anomaly.explain()}")
    false = sorted(k for k in episodes if k not in claimed)
    for key in false:
        lines.append(f"  false alert  {episodes[key][0].anomaly.explain()}")
    caught = sum(1 for line in lines if line.startswith("  caught"))
    lines.append(f"anomalies: {caught} of {len(incidents)} incidents caught, "
                 f"{len(false)} false alert(s) over {customers * days} series-days")
    return lines


if __name__ == "__main__":
    for line in inject_and_report():
        print(line)

