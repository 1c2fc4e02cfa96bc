"""Synthetic usage series with labelled incidents, and the two baselines, for
``benchmarks/anomaly_quality.py``.

Each series is an hourly usage total (counts: Poisson around a noisy mean) of one of four
shapes, starting on Monday 2024-01-01 00:00 UTC:

- ``business`` (45 %): busy 9-18 local time on weekdays, a quiet night floor, weekends low
  and flat; local time is UTC-8..UTC+9.
- ``consumer`` (25 %): evening peak, early-morning trough, weekends 0-40 % busier.
- ``flat`` (15 %): machine traffic around the clock, a mild daily wave.
- ``bursty`` (15 %): mostly zeros; 3-30 % of hours carry a burst (batch jobs, sync runs).

Mean level log-uniform 5..50,000 per hour; growth -20 %..+80 % over the run (log-linear);
multiplicative noise exp(sigma * t5), sigma 0.03..0.2 (Student-t with 5 degrees of freedom,
unit variance: heavy tails, a 2x hour now and then), clipped at 3x either way (a larger
excursion would be an unlabelled incident). After the first week each series may get, at
least 48 h apart:

- ``shift`` (30 %): a permanent step x1.5..x3 (a team onboarded). NOT an anomaly.
- ``spike`` (60 %): x5..x20 the mean for 1-3 hours (noise still applies, so some land <5x).
  On bursty series it is labelled ``spike_bursty``: 5x a mean that is mostly zeros is often
  smaller than an ordinary burst, so these are reported apart.
- ``ramp`` (25 %, not bursty): the mean climbs linearly to x4..x8 over 12-36 h, holds 3-8 h.
- ``drop`` (30 %, not bursty): zero for 3-24 h (an outage, a broken integration).

An incident whose largest change of the mean is below ``min_abs_deviation`` is ``tiny``:
by design nothing alerts on it, and it is counted apart, not as a miss.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

HOUR_MS = 3_600_000
START_MS = 1_704_067_200_000  # Monday 2024-01-01 00:00 UTC
WARMUP = 7 * 24  # windows: the injections start after it, every detector warms up on it
KINDS = ("spike", "spike_bursty", "ramp", "drop")
NOISE_CLIP = math.log(3.0)


@dataclass
class Injection:
    kind: str  # spike | spike_bursty | ramp | drop | shift (shift: not an anomaly)
    start: int  # window index
    end: int  # last window index, inclusive
    factor: float
    tiny: bool = False


@dataclass
class Series:
    index: int
    shape: str
    values: list[float]
    injections: list[Injection] = field(default_factory=list)
    noise_sigma: float = 0.0  # of the multiplicative Student-t(5) noise
    growth: float = 0.0  # trend over the whole run (0.5: +50 %), growth steps aside


def _profiles(rng: random.Random, shape: str) -> tuple[list[float], list[float], float]:
    """(weekday 24 h, weekend 24 h shape, weekend factor) in *local* hours."""
    if shape == "business":
        floor = rng.uniform(0.05, 0.3)
        day = [floor + (1 - floor) * _bump(h, 8.5, 18.0, 1.5) for h in range(24)]
        end = [floor + rng.uniform(0.0, 0.3) * _bump(h, 10, 17, 2) for h in range(24)]
        return day, end, rng.uniform(0.3, 0.8)
    if shape == "consumer":
        trough = rng.uniform(0.15, 0.35)
        day = [trough + (1 - trough) * (0.4 * _bump(h, 7, 18, 2) + _bump(h, 18.5, 23, 1.5))
               for h in range(24)]
        end = [trough + (1 - trough) * (0.7 * _bump(h, 9, 18, 2) + _bump(h, 18, 23.5, 1.5))
               for h in range(24)]
        return day, end, rng.uniform(1.0, 1.4)
    if shape == "flat":
        amp = rng.uniform(0.0, 0.3)
        day = [1 + amp * math.sin(2 * math.pi * (h - 8) / 24) for h in range(24)]
        return day, day, rng.uniform(0.85, 1.0)
    # bursty: the chance of a burst, half of them during working hours
    if rng.random() < 0.5:
        day = [0.2 + _bump(h, 8, 19, 1) for h in range(24)]
        return day, [0.2] * 24, 0.5
    return [1.0] * 24, [1.0] * 24, 1.0


def _bump(h: float, start: float, end: float, edge: float) -> float:
    """1 inside [start, end], falling off smoothly over ``edge`` hours on both sides."""
    if start <= h <= end:
        return 1.0
    d = start - h if h < start else h - end
    return math.exp(-((d / edge) ** 2))


def _poisson(rng: random.Random, mean: float) -> float:
    if mean <= 0.0:
        return 0.0
    if mean > 60.0:
        return float(max(0, round(rng.gauss(mean, math.sqrt(mean)))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return float(k)
        k += 1


def _t5(rng: random.Random) -> float:
    """Student-t, 5 degrees of freedom, scaled to unit variance."""
    chi = sum(rng.gauss(0, 1) ** 2 for _ in range(5)) / 5
    return rng.gauss(0, 1) / math.sqrt(chi) / math.sqrt(5 / 3)


def _place(rng: random.Random, taken: list[tuple[int, int]], length: int,
           n: int) -> int | None:
    for _ in range(30):
        start = rng.randint(WARMUP + 24, n - 24 - length)
        if all(start + length + 48 <= a or b + 48 <= start for a, b in taken):
            taken.append((start, start + length - 1))
            return start
    return None


def make_series(index: int, days: int, seed: int, min_abs: float) -> Series:
    rng = random.Random(f"anomaly-workload:{seed}:{index}")
    n = days * 24
    roll = rng.random()
    shape = ("business" if roll < 0.45 else "consumer" if roll < 0.70
             else "flat" if roll < 0.85 else "bursty")
    base = math.exp(rng.uniform(math.log(5), math.log(50_000)))
    utc_offset = rng.randint(-8, 9)
    sigma = rng.uniform(0.03, 0.2)
    growth = rng.uniform(-0.2, 0.8) / n
    weekday, weekend, weekend_factor = _profiles(rng, shape)
    shape_of = []  # one week of UTC hours, Monday 00:00 first
    for t in range(7 * 24):
        local = t + utc_offset
        weekend_day = (local // 24) % 7 >= 5
        shape_of.append((weekend if weekend_day else weekday)[local % 24]
                        * (weekend_factor if weekend_day else 1.0))
    norm = sum(shape_of) / len(shape_of)
    shape_of = [v / norm for v in shape_of]
    series = Series(index, shape, [], noise_sigma=sigma, growth=growth * n)
    multiplier = [1.0] * n  # incidents (spike, ramp, drop)
    grown = [1.0] * n  # growth steps
    taken: list[tuple[int, int]] = []
    plan = [("shift", 0.3), ("spike", 0.6)]
    if shape != "bursty":
        plan += [("ramp", 0.25), ("drop", 0.3)]
    rng.shuffle(plan)
    for kind, chance in plan:
        if rng.random() >= chance:
            continue
        if kind == "shift":
            start = _place(rng, taken, 48, n)
            if start is not None:
                factor = math.exp(rng.uniform(math.log(1.5), math.log(3.0)))
                series.injections.append(Injection("shift", start, start + 47, factor))
                for t in range(start, n):
                    grown[t] *= factor
        elif kind == "spike":
            length = rng.randint(1, 3)
            start = _place(rng, taken, length, n)
            if start is not None:
                factor = math.exp(rng.uniform(math.log(5), math.log(20)))
                label = "spike_bursty" if shape == "bursty" else "spike"
                series.injections.append(Injection(label, start, start + length - 1, factor))
                for t in range(start, start + length):
                    multiplier[t] *= factor
        elif kind == "ramp":
            rise, hold = rng.randint(12, 36), rng.randint(3, 8)
            start = _place(rng, taken, rise + hold, n)
            if start is not None:
                factor = rng.uniform(4, 8)
                series.injections.append(Injection("ramp", start, start + rise + hold - 1,
                                                   factor))
                for j in range(rise + hold):
                    multiplier[start + j] *= 1 + (factor - 1) * min(1.0, (j + 1) / rise)
        else:
            length = rng.randint(3, 24)
            start = _place(rng, taken, length, n)
            if start is not None:
                series.injections.append(Injection("drop", start, start + length - 1, 0.0))
                for t in range(start, start + length):
                    multiplier[t] = 0.0
    burst_p = rng.uniform(0.03, 0.3)
    clean = []
    for t in range(n):
        mean = base * shape_of[t % 168] * math.exp(growth * t) * grown[t]
        clean.append(mean)
        m = mean * multiplier[t]
        if shape == "bursty":
            # shape_of is the burst chance profile; bursts carry the mean on average
            chance = min(1.0, burst_p * shape_of[t % 168])
            burst = rng.random() < chance
            noisy = (mean / burst_p / shape_of[t % 168]) * math.exp(rng.gauss(0, 0.6) - 0.18)
            value = _poisson(rng, noisy) if burst else 0.0
            if multiplier[t] != 1.0:  # an injected spike: x factor the mean, on top
                value += _poisson(rng, mean * (multiplier[t] - 1))
        else:
            # Heavy tails, clipped at 3x: a bigger excursion is an incident, and incidents
            # are injected and labelled (otherwise an unlabelled 50x hour scores as a
            # false alert for every detector).
            noise = max(-NOISE_CLIP, min(NOISE_CLIP, sigma * _t5(rng)))
            value = _poisson(rng, m * math.exp(noise))
        series.values.append(value)
    for inj in series.injections:
        if inj.kind == "shift":
            continue
        change = max(abs(clean[t] * (multiplier[t] - 1)) for t in range(inj.start, inj.end + 1))
        inj.tiny = change < min_abs
    return series


class StaticThreshold:
    """What an operator sets up by hand: alert above 2x the busiest hour of the first week,
    or on a zero from a series that was never zero in that week."""

    name = "static_threshold"

    def __init__(self, warmup: int, min_abs: float) -> None:
        self.warmup, self.min_abs = warmup, min_abs
        self.n, self.high, self.low_seen = 0, 0.0, math.inf

    def flag(self, x: float) -> bool:
        self.n += 1
        if self.n <= self.warmup:
            self.high = max(self.high, x)
            self.low_seen = min(self.low_seen, x)
            return False
        if x > 2 * self.high and x - self.high >= self.min_abs:
            return True
        return x == 0.0 and self.low_seen > 0.0 and self.low_seen >= self.min_abs


class EwmaZScore:
    """The textbook streaming detector: EWMA mean and variance (half-life ~1.4 days), alert
    when |z| > 4 and the deviation is at least min_abs; learns from every value."""

    name = "ewma_zscore"

    def __init__(self, warmup: int, min_abs: float, alpha: float = 0.02, z: float = 4.0):
        self.warmup, self.min_abs, self.alpha, self.z = warmup, min_abs, alpha, z
        self.n, self.mean, self.var = 0, 0.0, 0.0

    def flag(self, x: float) -> bool:
        self.n += 1
        if self.n == 1:
            self.mean = x
            return False
        d = x - self.mean
        out = (self.n > self.warmup and abs(d) >= self.min_abs
               and d * d > self.z * self.z * self.var)
        self.mean += self.alpha * d
        self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
        return out
