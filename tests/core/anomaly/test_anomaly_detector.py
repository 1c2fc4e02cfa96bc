"""SeriesDetector on realistic shapes: what alerts, what does not, and when."""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest

from meterline.core.anomaly import (
    SEVERITIES,
    Anomaly,
    AnomalyError,
    AnomalySettings,
    EpisodeEvent,
    SeriesDetector,
    SeriesKey,
)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
KEY = SeriesKey("acme", "api_calls", (("region", "eu"),))
Series = tuple[list[int], list[float]]


def run(detector: SeriesDetector, starts: list[int], values: list[float]
        ) -> tuple[list[Anomaly], list[EpisodeEvent]]:
    anomalies: list[Anomaly] = []
    events: list[EpisodeEvent] = []
    for ts, value in zip(starts, values, strict=True):
        step = detector.update(ts, value)
        anomalies += step.anomalies
        events += step.events
    return anomalies, events


def with_value(series: Series, ts: int, value: float) -> Series:
    starts, values = series
    values = list(values)
    values[starts.index(ts)] = value
    return starts, values


def test_daily_and_weekly_seasonality_does_not_alert(usage: Callable[..., Series]) -> None:
    # 10x between day and night, weekends at a fifth, 10 % noise, four weeks.
    anomalies, events = run(SeriesDetector(series=KEY), *usage(28, noise=0.1))
    assert anomalies == [] and events == []


def test_growth_does_not_alert(usage: Callable[..., Series]) -> None:
    # +5 % a day: the customer quadruples over four weeks.
    anomalies, _ = run(SeriesDetector(series=KEY), *usage(28, growth_per_day=0.05))
    assert anomalies == []


def test_no_alert_during_warm_up(usage: Callable[..., Series], at: Callable[..., int]
                                 ) -> None:
    starts, values = usage(14)
    for day in range(7):  # a 1000x spike every warm-up day, each at another hour
        values[starts.index(at(day, 2 + 3 * day))] = 1e6
    detector = SeriesDetector(series=KEY)
    anomalies, _ = run(detector, starts[:168], values[:168])
    assert anomalies == [] and detector.windows_seen == 168
    # After the warm-up the same spike alerts at once.
    values[starts.index(at(8, 11))] = 1e6
    anomalies, _ = run(detector, starts[168:], values[168:])
    assert [a.window_start_ms for a in anomalies] == [at(8, 11)]


def test_a_short_warm_up_still_waits_for_the_hour_of_the_week(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(9)
    values[starts.index(at(2, 11))] = 1e6  # day 3: 48 windows seen, but Wednesday 11:00 not
    values[starts.index(at(7, 11))] = 1e6  # next Monday 11:00 was seen a week before
    anomalies, _ = run(SeriesDetector(AnomalySettings(warmup_windows=48), KEY),
                       starts, values)
    assert [a.window_start_ms for a in anomalies] == [at(7, 11)]


@pytest.mark.parametrize("hour", [3, 11, 20])  # night, busy hour, evening
def test_spike_of_5x_is_detected_in_its_own_window(
        usage: Callable[..., Series], at: Callable[..., int], hour: int) -> None:
    starts, values = usage(21, noise=0.1)
    spike_at = at(16, hour)
    detector = SeriesDetector(series=KEY)
    run(detector, starts[:starts.index(spike_at)], values[:starts.index(spike_at)])
    expected, _, upper = detector.expected(spike_at)
    step = detector.update(spike_at, 5 * expected)
    assert [a.window_start_ms for a in step.anomalies] == [spike_at]
    anomaly = step.anomalies[0]
    assert anomaly.direction == "up" and anomaly.observed > anomaly.upper == upper
    assert [e.kind for e in step.events] == ["open"]


def test_drop_to_zero_is_detected_within_one_window(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(21)
    for hour in range(10, 16):  # an outage from 10:00 to 16:00 on a Wednesday
        values[starts.index(at(16, hour))] = 0.0
    anomalies, events = run(SeriesDetector(series=KEY), starts, values)
    assert anomalies[0].window_start_ms == at(16, 10)
    assert {a.direction for a in anomalies} == {"down"}
    assert [e.kind for e in events] == ["open", "resolve"]
    # Silence is never accepted as the new level: every silent busy hour stays abnormal.
    assert [a.window_start_ms for a in anomalies] == [at(16, h) for h in range(10, 16)]


def test_silence_stays_one_open_episode_until_usage_returns(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(28)
    cut = starts.index(at(15, 10))
    back = starts.index(at(19, 10))  # four days of nothing
    values[cut:back] = [0.0] * (back - cut)
    _, events = run(SeriesDetector(series=KEY), starts, values)
    assert [e.kind for e in events] == ["open", "resolve"]
    assert events[0].since_ms == at(15, 10)
    assert events[1].window_start_ms >= at(19, 10)


def test_level_shift_alerts_one_episode_then_adapts(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(28)
    shift = starts.index(at(15, 9))  # a team is onboarded: 6x from Tuesday 09:00 on
    values[shift:] = [v * 6 for v in values[shift:]]
    detector = SeriesDetector(series=KEY)
    anomalies, events = run(detector, starts, values)
    assert [e.kind for e in events][:1] == ["open"] and events[-1].kind == "resolve"
    assert sum(e.kind == "open" for e in events) == 1
    assert all(a.window_start_ms < at(16, 0) for a in anomalies)  # adapted within hours
    expected, _, _ = detector.expected(at(28, 11))
    assert 4000 < expected < 8000  # 6x the busy-hour level of 1000


def test_growth_steps_below_min_ratio_do_not_alert(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(28)
    shift = starts.index(at(15, 9))
    values[shift:] = [v * 2.5 for v in values[shift:]]
    anomalies, _ = run(SeriesDetector(series=KEY), starts, values)
    assert anomalies == []


def test_a_ramp_the_level_would_follow_is_caught_as_drift(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(28, shape=lambda hour, weekday: 1.0)  # machine traffic
    first = starts.index(at(16, 0))
    for i in range(36):  # a runaway client: 1x -> 8x over 36 hours, then stays
        values[first + i] *= 1 + 7 * (i + 1) / 36
    values[first + 36:] = [v * 8 for v in values[first + 36:]]
    anomalies, events = run(SeriesDetector(series=KEY), starts, values)
    assert anomalies and anomalies[0].direction == "up"
    assert anomalies[0].window_start_ms < at(16, 0) + 36 * HOUR_MS
    assert sum(e.kind == "open" for e in events) == 1


def test_fixed_runaway_falls_back_without_a_second_alert(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(28, shape=lambda hour, weekday: 1.0)
    first, last = starts.index(at(16, 0)), starts.index(at(17, 0))
    values[first:last] = [v * 6 for v in values[first:last]]  # 24 h at 6x, then fixed
    _, events = run(SeriesDetector(series=KEY), starts, values)
    assert [e.kind for e in events].count("open") == 1


def test_min_abs_deviation_keeps_tiny_customers_quiet(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    # Two calls an hour at the busiest; a 10x hour is 20 calls.
    series = usage(21, level=2.0, noise=0.0, shape=lambda hour, weekday: 1.0)
    series = with_value(series, at(16, 11), 20.0)
    assert run(SeriesDetector(AnomalySettings(min_abs_deviation=30), KEY), *series)[0] == []
    anomalies, _ = run(SeriesDetector(AnomalySettings(min_abs_deviation=5), KEY), *series)
    assert [a.window_start_ms for a in anomalies] == [at(16, 11)]


def test_direction_and_sensitivity_per_meter(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    series = with_value(usage(21), at(15, 11), 0.0)
    series = with_value(series, at(16, 11), 10_000.0)
    up, _ = run(SeriesDetector(AnomalySettings(direction="up"), KEY), *series)
    down, _ = run(SeriesDetector(AnomalySettings(direction="down"), KEY), *series)
    assert [a.direction for a in up] == ["up"] and [a.direction for a in down] == ["down"]
    mild = with_value(usage(21), at(16, 11), 2_600.0)  # 2.6x: under the default band
    assert run(SeriesDetector(series=KEY), *mild)[0] == []
    keen, _ = run(SeriesDetector(AnomalySettings(sensitivity=2.0), KEY), *mild)
    assert [a.window_start_ms for a in keen] == [at(16, 11)]


def test_every_anomaly_explains_itself(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    series = with_value(usage(21), at(16, 11), 20_000.0)
    anomalies, events = run(SeriesDetector(series=KEY), *series)
    (anomaly,) = anomalies
    assert anomaly.series == KEY and anomaly.detector == "seasonal_robust"
    assert anomaly.window_start_ms == anomaly.since_ms == at(16, 11)
    assert anomaly.lower < anomaly.expected < anomaly.upper < anomaly.observed
    assert 700 < anomaly.expected < 1400 and anomaly.score > 0
    assert anomaly.severity in SEVERITIES and not anomaly.partial
    assert "acme|api_calls|region=eu" in anomaly.explain()
    assert Anomaly.from_dict(json.loads(json.dumps(anomaly.to_dict()))) == anomaly
    assert events[0].key == f"acme|api_calls|region=eu|{at(16, 11)}|0"
    assert EpisodeEvent.from_dict(json.loads(json.dumps(events[0].to_dict()))) == events[0]


def test_partial_window_is_never_a_drop(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(21)
    detector = SeriesDetector(series=KEY)
    run(detector, starts[:starts.index(at(16, 11))], values[:starts.index(at(16, 11))])
    expected, _, _ = detector.expected(at(16, 11))
    for fraction in (0.01, 0.1, 0.5, 0.9):
        assert detector.update_partial(at(16, 11), expected * fraction * 0.2,
                                       fraction).anomalies == []
    assert detector.observe_partial(at(16, 11), 0.0, 0.5) == []
    assert not detector.episode_open


def test_partial_window_past_the_whole_windows_band_alerts_early(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(21)
    detector = SeriesDetector(series=KEY)
    run(detector, starts[:starts.index(at(16, 11))], values[:starts.index(at(16, 11))])
    expected, _, upper = detector.expected(at(16, 11))
    # A runaway: a quarter of the way into the hour it already used 1.2x the upper band.
    assert detector.observe_partial(at(16, 11), expected * 0.25, 0.25) == []
    events = detector.observe_partial(at(16, 11), upper * 1.2, 0.25)
    assert [e.kind for e in events] == ["open"]
    assert events[0].anomaly.partial and events[0].anomaly.elapsed_fraction == 0.25
    # The complete window continues the same episode: no second open.
    later = detector.update(at(16, 11), upper * 4)
    assert later.anomalies[0].since_ms == at(16, 11)
    assert [e.kind for e in later.events] in ([], ["update"])


def test_state_survives_a_json_round_trip_mid_stream(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(28)
    values = with_value((starts, values), at(16, 11), 30_000.0)[1]
    cut = starts.index(at(16, 12))  # in the middle of an open episode
    original = SeriesDetector(series=KEY)
    run(original, starts[:cut], values[:cut])
    assert original.episode_open
    plain = json.loads(json.dumps(original.to_plain()))
    restored = SeriesDetector(series=KEY)
    restored.load_plain(plain)
    tail = run(original, starts[cut:], values[cut:])
    assert run(restored, starts[cut:], values[cut:]) == tail
    assert restored.to_plain() == original.to_plain()


def test_same_input_same_output(usage: Callable[..., Series]) -> None:
    rng = random.Random(7)
    starts, values = usage(28, noise=0.3)
    values = [v * (8 if rng.random() < 0.01 else 1) for v in values]
    first = run(SeriesDetector(series=KEY), starts, values)
    assert first[0]  # the test is about something
    assert run(SeriesDetector(series=KEY), starts, values) == first


def test_missing_windows_are_zeros_and_advance_notices_silence(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    starts, values = usage(21)
    detector = SeriesDetector(series=KEY)
    cut = starts.index(at(16, 10))
    run(detector, starts[:cut], values[:cut])
    # No row for 10:00-12:00 (nothing happened), then a window at 13:00 arrives.
    step = detector.update(at(16, 13), values[starts.index(at(16, 13))])
    assert [a.window_start_ms for a in step.anomalies][:3] == [
        at(16, 10), at(16, 11), at(16, 12)]
    # With no event at all, advance() is what notices.
    silent = SeriesDetector(series=KEY)
    run(silent, starts[:cut], values[:cut])
    assert [e.kind for e in silent.advance(at(16, 10))] == ["open"]
    assert silent.advance(at(16, 10)) == []  # already fed


def test_bad_input_is_refused_and_stale_windows_ignored(usage: Callable[..., Series]
                                                        ) -> None:
    starts, values = usage(2)
    detector = SeriesDetector(series=KEY)
    run(detector, starts, values)
    for bad in (float("nan"), float("inf"), "12", None, True):
        with pytest.raises(AnomalyError, match="value must be"):
            detector.observe(starts[-1] + HOUR_MS, bad)  # type: ignore[arg-type]
    with pytest.raises(AnomalyError, match="not a multiple of interval_ms"):
        detector.observe(starts[-1] + HOUR_MS + 1, 1.0)
    with pytest.raises(AnomalyError, match="elapsed_fraction"):
        detector.observe_partial(starts[-1] + HOUR_MS, 1.0, 0.0)
    state = detector.to_plain()
    assert detector.observe(starts[-1], 1e9) == []  # a correction of a window already seen
    assert detector.to_plain() == state
    detector.observe(starts[-1] + HOUR_MS, -5)  # a negative total scores as no usage
    assert detector.last_ms == starts[-1] + HOUR_MS


def test_five_minute_windows(usage: Callable[..., Series], at: Callable[..., int]) -> None:
    settings = AnomalySettings.for_interval(5 * 60_000)
    starts, values = usage(14, interval_ms=5 * 60_000)
    spike_at = at(10, 11) + 25 * 60_000
    values[starts.index(spike_at)] *= 8
    anomalies, events = run(SeriesDetector(settings, KEY), starts, values)
    assert [a.window_start_ms for a in anomalies] == [spike_at]
    assert [e.kind for e in events] == ["open", "resolve"]


def test_bursty_series_alerts_only_on_an_outsized_burst(at: Callable[..., int]) -> None:
    rng = random.Random(3)
    starts = [at(0, 0) + i * HOUR_MS for i in range(28 * 24)]
    values = [round(rng.lognormvariate(6.0, 0.5)) if rng.random() < 0.1 else 0.0
              for _ in starts]  # a batch job now and then, ~400 units a run
    assert run(SeriesDetector(series=KEY), starts, values)[0] == []
    values[starts.index(at(20, 3))] = 40_000.0  # 100x a typical burst
    anomalies, _ = run(SeriesDetector(series=KEY), starts, values)
    assert [a.window_start_ms for a in anomalies] == [at(20, 3)]
    assert 200 < anomalies[0].expected < 800  # explained against the typical burst


def test_state_with_an_open_episode_stays_under_two_kilobytes(
        usage: Callable[..., Series], at: Callable[..., int]) -> None:
    detector = SeriesDetector(series=KEY)
    starts, values = usage(16, noise=0.1234567)
    run(detector, starts, values)
    detector.observe(at(16, 0), 123_456.789012)
    assert detector.episode_open
    plain = detector.to_plain()
    size = len(json.dumps(plain, separators=(",", ":")))
    assert size <= 2048, size  # measured ~1.8 KB: ~1.5 KB of baseline, ~0.3 KB of episode
    restored = SeriesDetector(series=KEY)
    restored.load_plain(json.loads(json.dumps(plain)))
    assert restored.to_plain() == plain
