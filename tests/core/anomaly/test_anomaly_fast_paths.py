"""The stage's fast paths give exactly what one detector per series fed window by window
gives: the same episode events, bit for bit, and the same saved state.

The reference is the obviously-correct loop: one ``SeriesDetector`` per series, ``update``
(the general path ``detect_series`` uses) on every window in time order, a missing window
fed as 0. The system under test is ``RollupFeed``: several versions per window, rows
shuffled, silent series without rows (``advance`` fills them), several source partitions,
series keys sorted by the feed itself. Spikes, drops to zero and bursty series make
episodes open, update and resolve.
"""

from __future__ import annotations

import math
import random

import orjson

from meterline.core.anomaly.feed import FeedSettings, RollupFeed
from meterline.core.anomaly.model import SeriesKey
from meterline.core.anomaly.series import SeriesDetector
from meterline.core.anomaly.settings import AnomalySettings
from meterline.core.outputs import RollupRecord

HOUR_MS = 3_600_000
START_MS = 1_704_067_200_000  # a Monday
DAYS = 16
NANOS = 10**9


def _series(i: int, rng: random.Random) -> list[int]:
    """Whole units per hour: business, flat or bursty, with a spike and an outage."""
    kind = i % 3
    level = 10 ** rng.uniform(1.0, 3.5)
    out = []
    for h in range(DAYS * 24):
        if kind == 2:  # bursty: mostly idle
            x = level * 3 if rng.random() < 0.15 else 0.0
        else:
            shape = (1.0 if 9 <= h % 24 < 18 else 0.1) if kind == 0 else 1.0
            x = level * shape * math.exp(rng.gauss(0.0, 0.15))
        out.append(round(x))
    spike = rng.randrange(9 * 24, DAYS * 24 - 30)
    out[spike] *= 8
    outage = rng.randrange(9 * 24, DAYS * 24 - 30)
    for h in range(outage, outage + rng.randrange(3, 12)):
        out[h] = 0
    return out


def test_feed_events_and_state_equal_one_detector_per_series_fed_in_order() -> None:
    rng = random.Random(2024)
    keys = [SeriesKey(f"c{i:03d}", "api_calls" if i % 4 else "storage",
                      (("region", "eu"),) if i % 5 == 0 else ()) for i in range(60)]
    values = {key: _series(i, rng) for i, key in enumerate(keys)}
    partition = {key: i % 3 for i, key in enumerate(keys)}
    settings = AnomalySettings()

    feed = RollupFeed(settings, FeedSettings(early_warning=False))
    got: dict[SeriesKey, list[bytes]] = {key: [] for key in keys}
    first_row: dict[SeriesKey, int] = {}  # a series exists from its first row on
    for h in range(DAYS * 24):
        start = START_MS + h * HOUR_MS
        rows = []
        for key in keys:
            total = values[key][h]
            if total == 0 and rng.random() < 0.8:
                continue  # silent: no row at all, the feed's advance must notice
            first_row.setdefault(key, h)
            for version in (1, 2, 3):  # the window fills; the last version is the total
                rows.append(RollupRecord("hourly", key.customer, key.meter, key.group,
                                         start, start + HOUR_MS, "count",
                                         total * version // 3 * NANOS, version, version,
                                         "rollups", partition[key]))
        rng.shuffle(rows)
        for event in feed.apply(rows).events:
            got[event.series].append(orjson.dumps(event.to_dict()))

    closed = {p: feed._sources[("rollups", p)].closed_before_ms for p in range(3)}
    want: dict[SeriesKey, list[bytes]] = {key: [] for key in keys}
    for key in keys:
        detector = SeriesDetector(settings, key)
        for h in range(DAYS * 24):
            start = START_MS + h * HOUR_MS
            if start >= closed[partition[key]]:
                break
            if h < first_row[key]:
                continue
            for event in detector.update(start, values[key][h]).events:
                want[key].append(orjson.dumps(event.to_dict()))
        engine = feed.engine("rollups", partition[key])
        assert engine is not None
        found = engine.existing(key)
        assert found is not None
        assert orjson.dumps(found.to_plain()) == orjson.dumps(detector.to_plain()), key

    assert sum(len(v) for v in want.values()) > 40  # episodes did happen
    assert got == want
