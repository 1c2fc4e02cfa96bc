"""The seasonal robust detector: expected = level x hour-of-week factor, scored in log space.

Per series, one pass, fixed-size state (``baseline.Baseline``). docs/anomalies.md explains
the model at length; in short:

1. ``expected = level * season[slot]``, ``slot`` the UTC hour of the week. One factor per
   hour of the week keeps weekday and weekend shapes apart (a B2B series is flat on Sundays
   and busy on Tuesday mornings). A slot seen in fewer than three weeks is smoothed with
   the same hour the day before and after (median of three).
2. ``r = log((observed + c) / (expected + c))``, ``c = 0.05 * level + 0.5 *
   min_abs_deviation``: a 5x spike is a 5x spike at 10 or at 10M calls an hour, and zero at
   4 am (expected ~c) is calm while zero at 11 am is not.
3. ``width = max(Z_THRESHOLD * scale, TAIL_K * tail * scale, log(min_ratio)) /
   sensitivity``. A window is abnormal beyond it and at least ``min_abs_deviation`` from
   expected; back to normal only inside ``RECOVER_FRACTION`` of it (hysteresis).
4. Drift: the level and the window both climbed past the band from the level at one of
   the last two midnights: a ramp the six-hour level would otherwise follow.
5. Bursty series (idle at least half of the time) are judged on their bursts: a burst is
   abnormal far above the typical burst; idle windows are normal, so they never "drop".
6. A jump back to a level held recently (before an accepted change, or at the last two
   midnights) ends the change instead of alerting: a fixed runaway, a stopped ramp.

Plain float arithmetic in a fixed order: the same inputs give bit-identical states and
outputs, and ``to_plain``/``load_plain`` round-trip exactly.
"""

from __future__ import annotations

import math
from typing import Any

from meterline.core.anomaly.baseline import (
    BURSTY_WATCH,
    INTERMITTENT,
    LEARN_ALL,
    LEARN_BASE,
    LEARN_SLOT,
    MONDAY_SHIFT_H,
    PSEUDO_FRACTION,
    RECOVER_FRACTION,
    SLOTS,
    Baseline,
    slot_of,
)
from meterline.core.windows import DAY_MS, HOUR_MS

__all__ = ["HOLD", "NAME", "SeasonalDetector", "Verdict"]

NAME = "seasonal_robust"
SEVERITY_STEPS = (1.5, 2.5)  # |r| / width at which an anomaly is major, critical
_WEEK_MS = 7 * DAY_MS
_MONDAY_MS = 4 * DAY_MS  # 1970-01-05, the first Monday: weekly chores run at its multiples


class _Hold:
    """Not normal enough to count as recovered, not abnormal enough to report."""

    def __repr__(self) -> str:
        return "HOLD"


HOLD: Any = _Hold()
# (direction, observed, expected, lower, upper, score, severity rank 0..2, log-ratio r)
Verdict = tuple[str, float, float, float, float, float, int, float]


class SeasonalDetector(Baseline):
    """Scores one series, one complete window at a time, and learns from it."""

    __slots__ = ()

    def window(self, start_ms: int, x: float) -> Verdict | None:
        """Score the complete window at ``start_ms`` holding ``x`` (>= 0), then learn.

        Returns None when the window is normal, ``HOLD`` when it is not abnormal but not
        back near the expected value either, or the verdict of an abnormal window."""
        slot = (start_ms // HOUR_MS + MONDAY_SHIFT_H) % SLOTS  # slot_of, inlined
        n = self.n
        self.n = n + 1
        active = x > self.pseudo_abs
        a = 1.0 / (n + 1) if n < self.week else self.a_idle
        idle = self.idle = self.idle + a * ((0.0 if active else 1.0) - self.idle)
        if n < self.day:
            self._first_day(slot, x, n)
            if active:
                self._learn_burst(x)
            return None
        if start_ms % DAY_MS == 0:
            if (start_ms - _MONDAY_MS) % _WEEK_MS == 0:
                self._normalise()
            self.snap_prev, self.snap = self.snap, self.level
        seen_count = self.seen[slot]
        f = (self.season[slot] if seen_count >= self.young
             else self._factor(slot, seen_count))
        level = self.level
        e = level * f
        c = PSEUDO_FRACTION * level + self.pseudo_abs
        r = math.log((x + c) / (e + c))
        s = self.scale
        width = self.z * s
        tail_w = self.tail_k * self.tail * s
        if width < tail_w:
            width = tail_w
        if width < self.floor:
            width = self.floor
        ar = r if r >= 0.0 else -r
        judged = n >= self.warmup and seen_count
        verdict: Verdict | None = None
        drifted = False
        if idle >= INTERMITTENT and self.bursts:
            verdict, ok, run_r = self._judge_burst(x, active, judged)
        else:
            run_r = r
            # Drift: both the level and this window climbed past the band from the lower
            # of the levels at the last two midnights. Only climbs: a fall to a fraction
            # is the band's job, and a slow fall is mostly usage settling after a climb.
            ref = self.snap if self.snap < self.snap_prev else self.snap_prev
            if level > ref * self.drift_ratio:
                r_ref = math.log((x + c) / (ref * f + c))
                drifted = r_ref > self.drift_w
            ok = ar <= width * RECOVER_FRACTION and not drifted
            if not judged:
                pass
            elif ar > width and (x - e if r > 0.0 else e - x) >= self.min_abs:
                if self._back_to_known(n, x, f, c, r, width):
                    ok = True
                    drifted = False
                else:
                    verdict = self._verdict(r, x, e, c, width, s)
            elif drifted and n >= self.week + self.day and x - ref * f >= self.min_abs:
                verdict = self._verdict(r_ref, x, ref * f, c, self.drift_w, s)
        if ok:
            if self.alert:
                self.alert = False
                self.run_n = 0
                self.run_log = self.run_abs = self.run_obs = 0.0
        elif verdict is not None:
            self.alert = True
            if not (self.up if verdict[0] == "up" else self.down):
                verdict = HOLD  # abnormal in a direction nobody asked about: not learned
        elif self.alert:
            verdict = HOLD
        # A drifting series still teaches the level (the drift is measured on it), but not
        # the noise width: a ramp must not widen the band it is judged by.
        what = LEARN_BASE if drifted else LEARN_ALL
        if self.alert:
            # Inside a run of abnormal windows learn nothing but (gently) the slot of its
            # first window, so a slot that was learned wrong heals instead of alerting
            # every week.
            first = self.run_n == 0
            self._run(run_r, x)
            if not first:
                return verdict
            what = LEARN_SLOT
        self._learn(slot, seen_count, x, f, e, c, r, ar, n, what)
        if active and idle >= BURSTY_WATCH:
            self._learn_burst(x)
        return verdict

    def _judge_burst(self, x: float, active: bool,
                     judged: Any) -> tuple[Verdict | None, bool, float]:
        """A bursty series: idle windows are normal; a burst is abnormal when it is far
        above the typical burst. Returns (verdict, back to normal, log-ratio)."""
        if not active:
            return None, True, 0.0
        rb = math.log(x) - self.burst_log
        sb = self.burst_scale
        width = max(self.z * sb, self.floor)
        typical = math.exp(self.burst_log)
        verdict = None
        if judged and rb > width and x - typical >= self.min_abs:
            verdict = self._burst_verdict(rb, x, typical, width, sb)
        return verdict, rb <= width * RECOVER_FRACTION, rb

    def partial(self, start_ms: int, value_so_far: float) -> Verdict | None:
        """An early verdict on a window still in progress: abnormal only when the value so
        far already exceeds the upper band of the *whole* window (usage only grows within a
        window, so it cannot come back). Never a drop, and nothing is learned."""
        slot = slot_of(start_ms)
        if not self.up or self.n < max(self.warmup, self.day) or not self.seen[slot]:
            return None
        x = value_so_far
        if self.idle >= INTERMITTENT and self.bursts:
            if x <= self.pseudo_abs:
                return None
            verdict, _, _ = self._judge_burst(x, True, True)
            return verdict
        e, c, width = self._expected(slot)
        r = math.log((x + c) / (e + c))
        if r > width and x - e >= self.min_abs:
            return self._verdict(r, x, e, c, width, self.scale)
        return None

    def expected(self, start_ms: int) -> tuple[float, float, float]:
        """``(expected, lower, upper)`` for the window at ``start_ms`` as of now."""
        slot = slot_of(start_ms)
        if self.idle >= INTERMITTENT and self.bursts:
            typical = math.exp(self.burst_log)
            width = max(self.z * self.burst_scale, self.floor)
            return typical, 0.0, max(typical * math.exp(width), typical + self.min_abs)
        e, c, width = self._expected(slot)
        return e, *self._band(e, c, width)

    def _expected(self, slot: int) -> tuple[float, float, float]:
        f = self._factor(slot, self.seen[slot])
        e = self.level * f
        c = PSEUDO_FRACTION * self.level + self.pseudo_abs
        width = max(self.z * self.scale, self.tail_k * self.tail * self.scale, self.floor)
        return e, c, width

    def _verdict(self, r: float, x: float, e: float, c: float, width: float,
                 s: float) -> Verdict:
        lower, upper = self._band(e, c, width)
        excess = abs(r) / width
        rank = 0 if excess < SEVERITY_STEPS[0] else 1 if excess < SEVERITY_STEPS[1] else 2
        return ("up" if r > 0 else "down", x, e, lower, upper, r / s, rank, r)

    def _burst_verdict(self, rb: float, x: float, typical: float, width: float,
                       sb: float) -> Verdict:
        excess = rb / width
        rank = 0 if excess < SEVERITY_STEPS[0] else 1 if excess < SEVERITY_STEPS[1] else 2
        upper = max(typical * math.exp(width), typical + self.min_abs)
        return ("up", x, typical, 0.0, upper, rb / sb, rank, rb)

    def _band(self, e: float, c: float, width: float) -> tuple[float, float]:
        # Exactly the decision rule: below lower (or above upper) is abnormal.
        upper = max((e + c) * math.exp(width) - c, e + self.min_abs)
        lower = max(0.0, min((e + c) * math.exp(-width) - c, e - self.min_abs))
        return lower, upper
