"""AnomalyEngine: many series, one state to save, identical output after a restore."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from meterline.core.anomaly import (
    AnomalyEngine,
    AnomalyError,
    AnomalySettings,
    EpisodeEvent,
    MeterAnomalySettings,
    SeriesKey,
)
from meterline.core.errors import ConfigError

HOUR_MS = 3_600_000
Series = tuple[list[int], list[float]]


def fleet(usage: Callable[..., Series], n: int, days: int) -> dict[SeriesKey, Series]:
    """``n`` customers of different sizes; a few spikes and an outage sprinkled in."""
    rng = random.Random(11)
    out = {}
    for i in range(n):
        starts, values = usage(days, level=10 ** rng.uniform(1.5, 4.5), seed=i)
        for _ in range(2):
            j = rng.randrange(8 * 24, len(values))
            values[j] *= rng.choice((0.0, 8.0, 20.0))
        out[SeriesKey(f"cust-{i}", "api_calls")] = (starts, values)
    return out


def replay(engine: AnomalyEngine, data: dict[SeriesKey, Series], first: int, last: int
           ) -> list[EpisodeEvent]:
    """Windows [first, last) of every series, in time order and interleaved."""
    events: list[EpisodeEvent] = []
    for t in range(first, last):
        for key, (starts, values) in data.items():
            events += engine.observe(key, starts[t], values[t])
    return events


def test_restore_mid_stream_gives_identical_output(usage: Callable[..., Series]) -> None:
    data = fleet(usage, 12, 21)
    n = 21 * 24
    straight = AnomalyEngine()
    before = replay(straight, data, 0, 300)
    saved = json.dumps(straight.export_state())  # what a checkpoint writes
    after = replay(straight, data, 300, n)
    assert [e for e in before + after if e.kind == "open"]  # the test is about something
    restored = AnomalyEngine.from_state(json.loads(saved), AnomalySettings())
    assert replay(restored, data, 300, n) == after
    assert restored.export_state() == straight.export_state()


def test_event_keys_are_unique_and_replays_repeat_them(usage: Callable[..., Series]) -> None:
    data = fleet(usage, 8, 21)
    first = replay(AnomalyEngine(), data, 0, 21 * 24)
    keys = [e.key for e in first]
    assert len(keys) == len(set(keys))
    assert [e.key for e in replay(AnomalyEngine(), data, 0, 21 * 24)] == keys


def test_plain_tuples_find_the_same_series_and_disabled_meters_keep_nothing() -> None:
    settings = AnomalySettings(meters={"debug": MeterAnomalySettings(enabled=False)})
    engine = AnomalyEngine(settings, known_meters={"api_calls", "debug"})
    engine.observe(("acme", "api_calls"), 0, 5.0)
    engine.observe(SeriesKey("acme", "api_calls"), HOUR_MS, 5.0)
    engine.observe(("acme", "api_calls", ()), 2 * HOUR_MS, 5.0)
    assert len(engine) == 1 and ("acme", "api_calls") in engine
    assert engine.detector(("acme", "api_calls")).windows_seen == 3  # type: ignore[union-attr]
    assert engine.observe(("acme", "debug"), 0, 5.0) == []
    assert len(engine) == 1 and engine.detector(("acme", "debug")) is None
    assert engine.forget(("acme", "api_calls")) and len(engine) == 0


def test_settings_are_validated_up_front() -> None:
    with pytest.raises(ConfigError, match="no meter 'tokens'"):
        AnomalyEngine(AnomalySettings(meters={"tokens": MeterAnomalySettings()}),
                      known_meters={"api_calls"})


def test_restore_refuses_state_of_another_interval(usage: Callable[..., Series]) -> None:
    engine = AnomalyEngine()
    engine.observe(("a", "m"), 0, 1.0)
    state = engine.export_state()
    with pytest.raises(AnomalyError, match="saved under"):
        AnomalyEngine.from_state(state, AnomalySettings.for_interval(300_000))
    with pytest.raises(AnomalyError, match="unsupported engine state"):
        AnomalyEngine.from_state({"v": 99})
    state["series"][0][1]["detector"]["season"] = "not base64!"
    with pytest.raises(AnomalyError, match="bad saved"):
        AnomalyEngine.from_state(state)


def test_advance_notices_silent_series(usage: Callable[..., Series]) -> None:
    data = fleet(usage, 3, 14)
    engine = AnomalyEngine()
    replay(engine, data, 0, 10 * 24 + 10)  # up to Thursday 09:00 of week 2
    quiet_from = list(data.values())[0][0][10 * 24 + 10]
    events = []
    for hour in range(4):  # nobody sends anything for four busy hours
        events += engine.advance(quiet_from + hour * HOUR_MS)
    assert {e.kind for e in events} == {"open"}
    assert len({e.series for e in events}) == 3  # every customer went silent


def test_state_per_series_is_small(usage: Callable[..., Series]) -> None:
    data = fleet(usage, 10, 21)
    engine = AnomalyEngine()
    replay(engine, data, 0, 21 * 24)
    sizes = [len(json.dumps(plain, separators=(",", ":")))
             for _, plain in engine.export_state()["series"]]
    assert max(sizes) <= 2048, sizes
