"""The learned baseline of one series and how each window teaches it.

State (all of it; about 1.5 KB as JSON, see ``to_plain``):

- ``level``: the recent deseasonalised value per window (half-life six hours; a running
  mean in the first week), ``season``: 168 float32 hour-of-week factors (mean 1), and
  ``seen``: how many normal windows taught each slot (saturating at 255).
- ``scale``: the mean absolute log deviation (a robust MAD); ``tail``: its 99th
  percentile in MADs; ``bias``: the recent mean deviation (persisting bias is not noise).
- ``snap``, ``snap_prev``: the level at the last two UTC midnights (drift reference);
  ``prior``: the level before the last accepted change (to recognise a return to it).
- ``idle``, ``burst_log``, ``burst_scale``: the idle share and the typical burst of a
  bursty series. ``alert`` and ``run_*``: the current run of abnormal windows.

Learning is robust: values are clipped (Huber) before they are learned, a window inside a
run of abnormal windows teaches nothing but (gently) its slot, and a run that lasts
``adapt_windows`` windows is accepted by moving the level (silence never is).
"""

from __future__ import annotations

import functools
import math
from array import array
from typing import Any

from meterline.core.anomaly._codec import pack, unpack
from meterline.core.anomaly.errors import AnomalyError
from meterline.core.anomaly.settings import MeterParams
from meterline.core.windows import DAY_MS, HOUR_MS

__all__ = ["Baseline", "slot_of"]

SLOTS = 168  # hours in a week
MONDAY_SHIFT_H = 3 * 24  # epoch hour 0 was a Thursday; slot 0 is Monday 00:00 UTC
# Band half-width in MADs of |r|. For Gaussian noise the MAD is 0.8 sigma, so 6 MADs is
# ~4.8 sigma, one window in ~600,000; heavy tails are the tail tracker's job (TAIL_K).
Z_THRESHOLD = 6.0
TAIL_K = 1.9  # band >= TAIL_K * tail MADs: no change for Gaussian noise, 8.4 for t(5)
RECOVER_FRACTION = 0.5  # back to normal below half the band
PSEUDO_FRACTION = 0.05  # c = 0.05 * level + ...
PSEUDO_ABS_FRACTION = 0.5  # ... half of min_abs_deviation; a window below that is idle
# Drift fires when the level climbed past the band (log(min_ratio)) plus this margin from
# where it stood at the last two midnights. The level is smoothed, so no margin is needed.
DRIFT_MARGIN = 0.0
LEVEL_HALF_LIFE_MS = 6 * HOUR_MS  # the level follows growth within hours
SCALE_HALF_LIFE_MS = DAY_MS  # noise width: a day's worth of windows
SEASON_HALF_LIFE_MS = 3 * 7 * DAY_MS  # a slot's factor: three weeks of that hour
IDLE_HALF_LIFE_MS = 7 * DAY_MS  # the share of idle windows, over about a week
SCALE_INIT = 0.5  # wide until the series has shown how noisy it is
SCALE_FLOOR = 0.02  # a perfectly constant series still has a finite score
SCALE_CAP = 3.0  # one outlier moves the scale at most this many scales' worth
HUBER = 2.5  # values beyond this many scales are clipped before they are learned
# tail: the 99th percentile of |r| in MADs (Gaussian noise: 3.2, Student-t(5): ~4.4).
TAIL_INIT, TAIL_MIN = 3.2, 2.0
TAIL_UP = 1.0 + 0.15 * 0.99  # steps in the ratio 99:1 rest where 1 % of |r| exceed it;
TAIL_DOWN = 1.0 - 0.15 * 0.01  # 0.15 sets how fast (a 2x change takes ~5 exceedances)
# bias: EWMA of r over about six windows. For white noise its spread is ~0.4 sigma, a
# third of BIAS_LIMIT MADs (1.6 sigma), so noise almost never trips it; a ramp does.
BIAS_ALPHA = 0.3
BIAS_LIMIT = 2.0
YOUNG = 3  # a slot seen in fewer weeks than this is smoothed with its neighbours
BURST_ALPHA = 0.05  # weight of one burst in the typical-burst statistics
INTERMITTENT = 0.5  # idle share from which a series is judged on its bursts
BURSTY_WATCH = 0.25  # idle share from which the burst statistics are kept up to date
SEASON_MAX = 1000.0  # factors are float32; a slot holding all of a week is 168
LEVEL_TINY = 1e-12
RETURN_DAYS = 2  # how long a return to the level before an accepted change is recognised
LEARN_SLOT, LEARN_BASE, LEARN_ALL = 0, 1, 2  # what a window may teach (see _learn)

# Scalar state saved by to_plain, in this order.
_SCALARS = ("n", "level", "snap", "snap_prev", "prior", "prior_n", "scale", "tail", "bias",
            "idle", "burst_log", "burst_scale", "bursts", "alert", "run_n", "run_log",
            "run_abs", "run_obs")


def slot_of(start_ms: int) -> int:
    """Hour of the week (0 = Monday 00:00 UTC) of a window start."""
    return (start_ms // HOUR_MS + MONDAY_SHIFT_H) % SLOTS


def _alpha(interval_ms: int, half_life_ms: int) -> float:
    return 1.0 - 2.0 ** (-interval_ms / half_life_ms)


@functools.lru_cache(maxsize=1024)
def _constants(params: MeterParams) -> tuple[Any, ...]:
    """What a detector derives from its settings, computed once per settings and shared:
    every series of a meter then points at the same float objects (a float is 24 bytes,
    and a million series each holding its own copies would spend ~300 MB on them). Equal
    settings give equal values, so which series computed them first does not matter."""
    sens = params.sensitivity
    interval = params.interval_ms
    floor = math.log(params.min_ratio) / sens
    drift_w = floor + DRIFT_MARGIN
    # A slot sees HOUR_MS / interval windows a week (1 hourly, 12 at 5 minutes, 1 for
    # anything longer); its half-life counts that slot's windows.
    per_week = max(1.0, HOUR_MS / interval)
    return (
        params.direction in ("up", "both"),
        params.direction in ("down", "both"),
        Z_THRESHOLD / sens,
        TAIL_K / sens,
        floor,
        params.min_abs_deviation,
        PSEUDO_ABS_FRACTION * params.min_abs_deviation + 1e-9,
        params.warmup_windows,
        params.adapt_windows,
        7 * DAY_MS // interval,
        DAY_MS // interval,
        _alpha(interval, LEVEL_HALF_LIFE_MS),
        _alpha(interval, SCALE_HALF_LIFE_MS),
        _alpha(interval, IDLE_HALF_LIFE_MS),
        1.0 - 2.0 ** (-7 * DAY_MS / (SEASON_HALF_LIFE_MS * per_week)),
        int(YOUNG * per_week),
        drift_w,
        math.exp(drift_w),
    )


class Baseline:
    """What one series normally looks like, learned online. Subclasses judge windows."""

    __slots__ = (
        "a_idle", "a_level", "a_scale", "a_season", "adapt", "alert", "bias", "burst_log",
        "burst_scale", "bursts", "day", "down", "drift_ratio", "drift_w", "floor", "idle",
        "level", "min_abs", "n", "prior", "prior_n", "pseudo_abs", "run_abs", "run_log",
        "run_n", "run_obs", "scale", "season", "seen", "snap", "snap_prev", "tail",
        "tail_k", "up", "warmup", "week", "young", "z",
    )

    def __init__(self, params: MeterParams) -> None:
        (self.up, self.down, self.z, self.tail_k, self.floor, self.min_abs, self.pseudo_abs,
         self.warmup, self.adapt, self.week, self.day, self.a_level, self.a_scale,
         self.a_idle, self.a_season, self.young, self.drift_w,
         self.drift_ratio) = _constants(params)
        self.season = array("f", [1.0] * SLOTS)
        # A bytearray, not array("B"): its item assignment skips array's argument parsing,
        # ~3 % of an update's instructions (docs/anomalies.md, section 9). Saved as before.
        self.seen = bytearray(SLOTS)
        self.n = self.bursts = self.run_n = 0
        self.level = self.snap = self.snap_prev = self.idle = self.burst_log = 0.0
        self.bias = self.prior = 0.0
        self.prior_n = 0
        self.scale = self.burst_scale = SCALE_INIT
        self.tail = TAIL_INIT
        self.alert = False
        self.run_log = self.run_abs = self.run_obs = 0.0

    def _learn(self, slot: int, seen_count: int, x: float, f: float, e: float, c: float,
               r: float, ar: float, n: int, what: int) -> None:
        """Learn from a window: everything (LEARN_ALL), the level and slot but not the
        noise width (LEARN_BASE: drifting), or the slot only (LEARN_SLOT: the first window
        of an abnormal run, so a wrongly learned slot heals).

        A slot's first window only sets that slot, as is: its expectation was borrowed
        from another day (Friday's shape for a Saturday), so its deviation says nothing
        about the level or the noise."""
        level = self.level
        if not seen_count:
            if level > LEVEL_TINY and what != LEARN_SLOT:
                self.season[slot] = min(x / level, SEASON_MAX)
                self.seen[slot] = 1
            return
        s = self.scale
        h = HUBER * s
        if h < self.floor:
            h = self.floor
        if ar > h:
            x = (e + c) * math.exp(h if r > 0.0 else -h) - c
            if x < 0.0:
                x = 0.0
        if what != LEARN_SLOT and f > 0.0:
            a = self.a_level
            if n < self.week:
                # First week: a running mean. An EWMA would follow the weekday/weekend
                # swing before the season knows it and teach the slots a wrong shape.
                a = 1.0 / (n + 1)
            if f < 1.0:  # a quiet slot says little about the level
                a *= f
            self.level = level + a * (x / f - level)
        if level > LEVEL_TINY:
            a = 1.0 / (seen_count + 1)
            if a < self.a_season or what == LEARN_SLOT:
                # An abnormal window moves its slot only gently: enough to heal a slot
                # that is wrong (a clock change, say) over weeks, not enough for a spike
                # to teach next week to expect one.
                a = self.a_season
            own = self.season[slot]
            g = own + a * (x / level - own)
            self.season[slot] = g if g < SEASON_MAX else SEASON_MAX
        if seen_count < 255:  # abnormal windows count too: a slot grows up with time
            self.seen[slot] = seen_count + 1
        if what != LEARN_ALL:
            return
        # Noise is what does not persist. While the recent residuals lean one way (a ramp,
        # a level the fast level is still catching up with) they are not learned as noise:
        # they would widen the very band the change is judged by.
        bias = self.bias
        bias += BIAS_ALPHA * (r - bias)
        self.bias = bias
        limit = BIAS_LIMIT * s
        if bias > limit or -bias > limit:
            return
        cap = SCALE_CAP * s
        s += self.a_scale * ((ar if ar < cap else cap) - s)
        self.scale = s if s > SCALE_FLOOR else SCALE_FLOOR
        # Climbs on the ~1 % largest |r| and sinks on the rest: it settles where 1 % of
        # deviations exceed tail * scale, whatever the noise looks like.
        tail = self.tail * (TAIL_UP if ar > self.tail * s else TAIL_DOWN)
        self.tail = tail if tail > TAIL_MIN else TAIL_MIN

    def _learn_burst(self, x: float) -> None:
        """Typical burst: EWMA of log(x) over non-idle windows (a running mean for the
        first 20), with its mean absolute deviation; both Huber-clipped. Kept while the
        series is at least BURSTY_WATCH idle, so it is ready when the series turns bursty."""
        lx = math.log(x)
        k = self.bursts
        self.bursts = k + 1 if k < 1_000_000 else k
        if k == 0:
            self.burst_log = lx
            return
        a = 1.0 / (k + 1)
        if a < BURST_ALPHA:
            a = BURST_ALPHA
        d = lx - self.burst_log
        ad = d if d >= 0.0 else -d
        sb = self.burst_scale
        h = max(HUBER * sb, self.floor)
        if ad > h:
            d = h if d > 0.0 else -h
        self.burst_log += a * d
        cap = SCALE_CAP * sb
        sb += a * ((ad if ad < cap else cap) - sb)
        self.burst_scale = sb if sb > SCALE_FLOOR else SCALE_FLOOR

    def _first_day(self, slot: int, x: float, n: int) -> None:
        """Learn-only first day. Slots hold raw values until the day is over and are then
        divided by the day's mean: a level that is still the mean of the first few hours
        (night, for most series) would teach every later hour a wrong factor."""
        self.level += (x - self.level) / (n + 1)
        self.snap = self.snap_prev = self.level
        k = self.seen[slot]
        raw = self.season[slot] + (x - self.season[slot]) / (k + 1) if k else x
        self.season[slot] = min(raw, 3e38)
        self.seen[slot] = min(k + 1, 255)
        if n + 1 == self.day:
            level = self.level
            for i in range(SLOTS):
                if self.seen[i]:
                    self.season[i] = (min(self.season[i] / level, SEASON_MAX)
                                      if level > LEVEL_TINY else 1.0)

    def _run(self, r: float, x: float) -> None:
        """Track a run of abnormal windows; once it lasts ``adapt`` windows, accept it as
        the new level unless it is silence."""
        self.run_n += 1
        self.run_log += r
        self.run_abs += r if r >= 0.0 else -r
        self.run_obs += x
        if self.run_n < self.adapt:
            return
        mean = self.run_log / self.run_n
        if mean < 0.0 and self.run_obs == 0.0:
            return  # silence is never the new normal
        if self.idle >= INTERMITTENT:
            self.burst_log += mean
        else:
            if not self.prior or self.n - self.prior_n > RETURN_DAYS * self.day:
                self.prior = self.level  # the level before this change, see _back_to_known
            self.prior_n = self.n
            self.level *= math.exp(mean)
            # Accepted: the new level is also the reference drift is measured from.
            self.snap = self.snap_prev = self.level
            # Abnormal on both sides (mean near 0, |r| large): noise wider than learned.
            spread = self.run_abs / self.run_n - abs(mean)
            if spread > self.scale:
                self.scale = spread
        self.run_n = 0
        self.run_log = self.run_abs = self.run_obs = 0.0

    def _back_to_known(self, n: int, x: float, f: float, c: float, r: float,
                       width: float) -> bool:
        """A window that jumps back to a level the series held recently (at one of the last
        two midnights, or before a change accepted in the last RETURN_DAYS) ends the change
        instead of alerting: a runaway that was fixed, a ramp that stopped. The level
        returns to that one. Silence never matches: levels are means of usage."""
        prior = self.prior if n - self.prior_n <= RETURN_DAYS * self.day else 0.0
        best, found = width * RECOVER_FRACTION, 0.0
        for ref in (prior, self.snap, self.snap_prev):
            if ref <= 0.0 or (r > 0.0) != (ref > self.level):
                continue
            back = math.log((x + c) / (ref * f + c))
            if back < 0.0:
                back = -back
            if back <= best:
                best, found = back, ref
        if not found:
            return False
        self.level = self.snap = self.snap_prev = found
        self.prior = 0.0
        return True

    def _factor(self, slot: int, seen_count: int) -> float:
        """The season factor a window is judged by. A slot seen in fewer than YOUNG weeks
        takes the median of five: itself, the hours before and after it, and the same hour
        the day before and after. One odd first week (an outlier, a holiday) must not set
        an hour's expectation, and two of the five may be odd (a weekend next to a weekday,
        a morning next to the night) without moving it."""
        if not seen_count:
            return self._fallback(slot)
        season, seen = self.season, self.seen
        f = season[slot]
        if seen_count >= self.young:
            return f
        near = [f]
        for other in ((slot - 1) % SLOTS, (slot + 1) % SLOTS, (slot - 24) % SLOTS,
                      (slot + 24) % SLOTS):
            near.append(season[other] if seen[other] else f)
        near.sort()
        return near[2]

    def _fallback(self, slot: int) -> float:
        """A slot not seen yet borrows the same hour of the nearest earlier day seen
        (a new series on a Tuesday uses Monday's shape), else 1."""
        for back in range(24, SLOTS, 24):
            other = (slot - back) % SLOTS
            if self.seen[other]:
                return self.season[other]
        return 1.0

    def _normalise(self) -> None:
        """Rescale seen factors to a (10 %-trimmed) mean of 1 and move the difference into
        the levels: expected values do not change, and ``level`` stays the typical mean per
        window whatever one odd slot holds. Weekly: the two only drift apart slowly."""
        season, seen = self.season, self.seen
        kept = sorted(v for v, k in zip(season, seen, strict=True) if k)
        trim = len(kept) // 10
        if trim:
            kept = kept[trim:-trim]
        total = sum(kept)
        if not kept or total <= 0.0:
            return
        mean = total / len(kept)
        self.season = array("f", [v / mean if k else v
                                  for v, k in zip(season, seen, strict=True)])
        self.level *= mean
        self.prior *= mean
        self.snap *= mean
        self.snap_prev *= mean

    # -- state --------------------------------------------------------------------------

    def to_plain(self) -> dict[str, Any]:
        plain: dict[str, Any] = {name: getattr(self, name) for name in _SCALARS}
        plain["season"] = pack(self.season)
        plain["seen"] = pack(array("B", self.seen))
        return plain

    def load_plain(self, plain: dict[str, Any]) -> None:
        try:
            for name in _SCALARS:
                value = plain[name]
                kind = type(getattr(self, name))
                if kind is float and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)  # JSON writes 0.0 as 0 in some encoders
                if type(value) is not kind:
                    raise TypeError(f"{name} must be {kind.__name__}, got {value!r}")
                setattr(self, name, value)
            self.season = unpack("f", plain["season"], SLOTS)
            self.seen = bytearray(unpack("B", plain["seen"], SLOTS))
        except (KeyError, TypeError, ValueError) as exc:
            raise AnomalyError(f"bad saved detector state: {exc}") from None
