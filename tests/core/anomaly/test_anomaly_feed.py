"""RollupFeed: rollup rows (versions, late updates, replays) -> exactly the episodes the
final hourly totals give, deterministic across checkpoints and restores.

The truth is computed from the generator's final totals with one plain SeriesDetector per
series, fed every hour from the series' first non-zero hour (missing hours are zeros, as
documented); it knows nothing about versions, rows, partitions or when windows close. Only
windows that the rollup contract makes final are compared: those that ended at least the
allowed lateness plus the watermark delay before the newest window seen (docs/rollups.md).
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from meterline.anomaly_demo import rollup_rows, synthetic_usage
from meterline.core.anomaly import AnomalySettings, ConfigError, SeriesDetector, SeriesKey
from meterline.core.anomaly.feed import FeedSettings, RollupFeed
from meterline.core.anomaly.model import EpisodeEvent
from meterline.core.outputs import RollupRecord

HOUR_MS = 3_600_000
START_MS = 1_704_067_200_000
SETTINGS = AnomalySettings(min_abs_deviation=20)


def _usage(seed: int = 3, customers: int = 12, days: int = 16) -> dict[SeriesKey, list[int]]:
    usage = synthetic_usage(customers, days, seed)
    keys = sorted(usage)
    rng = random.Random(seed)
    for key in keys[:3]:  # spikes
        h = rng.randrange(9 * 24, days * 24 - 30)
        usage[key][h] *= 15
        usage[key][h] += 500
    silent = keys[3]
    for h in range(12 * 24 + 9, 12 * 24 + 21):  # silent through a working day
        usage[silent][h] = 0
    late = keys[4]  # a customer that starts on day 3
    for h in range(3 * 24):
        usage[late][h] = 0
    return usage


def _truth(usage: dict[SeriesKey, list[int]], final_before_ms: int) -> list[EpisodeEvent]:
    events: list[EpisodeEvent] = []
    for key in sorted(usage):
        values = usage[key]
        first = next((h for h, v in enumerate(values) if v), None)
        if first is None:
            continue
        detector = SeriesDetector(SETTINGS, key)
        for h in range(first, len(values)):
            start = START_MS + h * HOUR_MS
            if start >= final_before_ms:
                break
            events += detector.observe(start, values[h])
    return events


def _run(records: list[list[RollupRecord]], feed: FeedSettings) -> tuple[RollupFeed,
                                                                           list[EpisodeEvent]]:
    engine = RollupFeed(SETTINGS, feed)
    out: list[EpisodeEvent] = []
    for record in records:
        out += engine.apply(record).events
    return engine, out


def _final_before(records: list[list[RollupRecord]], feed: FeedSettings) -> int:
    newest = max(r.window_start_ms for rec in records for r in rec)
    limit = newest - feed.allowed_lateness_ms - feed.watermark_delay_ms
    return limit - limit % HOUR_MS


def _key(e: EpisodeEvent) -> tuple[Any, ...]:
    return (e.key, e.kind, e.window_start_ms, e.anomaly.to_dict(), e.windows, e.until_ms)


@pytest.mark.parametrize("replay_every", [0, 5])
def test_episodes_equal_those_of_the_final_totals(replay_every: int) -> None:
    usage = _usage()
    feed = FeedSettings(early_warning=False)
    records = list(rollup_rows(usage, START_MS, partitions=3, late_after_hours=2,
                               replay_every=replay_every))
    engine, got = _run(records, feed)
    cut = _final_before(records, feed)
    want = [e for e in _truth(usage, cut)]
    assert want, "the data must contain anomalies"
    kinds = {e.kind for e in want}
    assert {"open", "resolve"} <= kinds
    assert any(e.anomaly.direction == "down" for e in want)  # the silence
    in_range = [e for e in got if e.window_start_ms < cut]
    assert sorted(map(_key, in_range)) == sorted(map(_key, want))
    # every window the contract calls final was fed; nothing later was
    assert all(e.window_start_ms < cut + HOUR_MS for e in got)


def test_a_checkpoint_at_any_record_continues_exactly() -> None:
    usage = _usage(seed=5, customers=8, days=15)
    feed = FeedSettings(early_warning=True)
    records = list(rollup_rows(usage, START_MS, partitions=2, replay_every=7))
    _, whole = _run(records, feed)
    assert any(e.kind == "early" for e in whole) and any(e.kind == "open" for e in whole)
    for cut in range(0, len(records), max(1, len(records) // 12)):
        first = RollupFeed(SETTINGS, feed)
        out: list[EpisodeEvent] = []
        for record in records[:cut]:
            out += first.apply(record).events
        saved = json.loads(json.dumps(first.export_state()))
        second = RollupFeed.from_state(saved, SETTINGS, feed)
        for record in records[cut:]:
            out += second.apply(record).events
        assert out == whole, f"cut at record {cut}"


def test_early_warning_comes_before_the_window_is_final_and_changes_no_episode() -> None:
    usage = _usage(seed=4, customers=6, days=15)
    key = sorted(usage)[5]
    spike_h = 14 * 24 + 11  # Monday of week 3, 11:00
    usage[key][spike_h] = usage[key][spike_h] * 40 + 2000
    records = list(rollup_rows(usage, START_MS, partitions=1, late_after_hours=2))
    _, plain = _run(records, FeedSettings(early_warning=False))
    engine = RollupFeed(SETTINGS, FeedSettings(early_warning=True))
    seen: list[tuple[int, EpisodeEvent]] = []
    for i, record in enumerate(records):
        seen += [(i, e) for e in engine.apply(record).events]
    spike_ms = START_MS + spike_h * HOUR_MS
    early = [(i, e) for i, e in seen if e.kind == "early" and e.series == key]
    opened = [(i, e) for i, e in seen if e.kind == "open" and e.series == key
              and e.window_start_ms == spike_ms]
    assert [e.window_start_ms for _, e in early] == [spike_ms]  # once, for that window
    assert early[0][1].key.endswith(f"|{spike_ms}|early")
    assert early[0][1].anomaly.observed < usage[key][spike_h]  # a value so far
    assert opened and early[0][0] < opened[0][0]  # earlier in the stream
    # without the early warnings the episodes are the same
    assert [e for _, e in seen if e.kind != "early"] == plain


def test_lower_versions_and_rows_for_final_windows_change_nothing() -> None:
    def row(start: int, units: int, version: int) -> RollupRecord:
        return RollupRecord("hourly", "c", "m", (), start, start + HOUR_MS, "sum",
                            units * 10**9, version, version, "t", 0)

    feed = RollupFeed(SETTINGS, FeedSettings(allowed_lateness_ms=0, watermark_delay_ms=0,
                                             early_warning=False))
    feed.apply([row(START_MS, 100, 3), row(START_MS, 50, 2)])  # replayed older version
    result = feed.apply([row(START_MS + 2 * HOUR_MS, 10, 1)])  # closes hours 0 and 1
    assert result.windows_closed == 2
    detector = feed.engine("t", 0).existing(SeriesKey("c", "m"))  # type: ignore[union-attr]
    assert detector is not None and detector.last_ms == START_MS + HOUR_MS
    late = feed.apply([row(START_MS, 999, 4), RollupRecord(
        "daily", "c", "m", (), START_MS, START_MS + 24 * HOUR_MS, "sum", 1, 1, 1, "t", 0)])
    assert (late.stale, late.ignored, late.rows) == (1, 1, 0)


def test_a_slow_source_partition_does_not_make_others_silent() -> None:
    def row(p: int, customer: str, start: int) -> RollupRecord:
        return RollupRecord("hourly", customer, "m", (), start, start + HOUR_MS, "sum",
                            100 * 10**9, 1, 1, "t", p)

    feed = RollupFeed(SETTINGS, FeedSettings(early_warning=False))
    for h in range(200):
        feed.apply([row(0, "fast", START_MS + h * HOUR_MS)])
    feed.apply([row(1, "slow", START_MS)])
    slow = feed.engine("t", 1)
    assert slow is not None and len(slow) == 0  # nothing of partition 1 is final yet


def test_bad_settings_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        RollupFeed(AnomalySettings(interval_ms=300_000, sensitivity=-1),
                   FeedSettings(allowed_lateness_ms=-5, early_warning="yes"))  # type: ignore[arg-type]
    assert len(info.value.errors) == 4


def test_state_with_totals_beyond_64_bits_survives_the_checkpoint_encoder() -> None:
    """Window totals reach 10^38 nano-units; the checkpoints are encoded with orjson,
    which refuses integers beyond 64 bits (seen as a crash of `serve`'s rollup stage).
    The stdlib json used above would hide it, so this one goes through orjson."""
    import orjson

    usage = {key: [v * 10**20 for v in values]
             for key, values in _usage(seed=7, customers=6, days=15).items()}
    feed = FeedSettings(early_warning=True)
    records = list(rollup_rows(usage, START_MS, partitions=2, replay_every=5))
    assert max(r.value_nanos for rec in records for r in rec) >= 1 << 63
    _, whole = _run(records, feed)
    for cut in range(1, len(records), max(1, len(records) // 6)):
        first = RollupFeed(SETTINGS, feed)
        out: list[EpisodeEvent] = []
        for record in records[:cut]:
            out += first.apply(record).events
        saved = orjson.loads(orjson.dumps(first.export_state()))
        second = RollupFeed.from_state(saved, SETTINGS, feed)
        for record in records[cut:]:
            out += second.apply(record).events
        assert out == whole, f"cut at record {cut}"
