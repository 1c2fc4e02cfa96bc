"""Billing periods in integer UTC milliseconds: calendar months and anniversaries.

A subscription is billed in monthly periods (``interval_months`` = 1, or 12 for yearly),
half-open ``[start_ms, end_ms)`` like every window in Meterline.

- **calendar**: periods start on the 1st of the month at 00:00 UTC. A subscription that
  starts mid-month has a first period that is the rest of that month (its fees are
  prorated against the whole month: see proration.py).
- **anniversary**: periods start at the subscription's start instant, every month. The
  n-th period starts ``n`` months after the *anchor*, with the day clamped to the target
  month's last day: an anchor on Jan 31 gives Jan 31 -> Feb 28 (29 in leap years) ->
  Mar 31 -> Apr 30. Every boundary is computed from the anchor, never from the previous
  boundary, so a short month does not drag later periods to the 28th.

A period's identity is its nominal ``start_ms``; the part a subscription is billed for
is the period clipped to the subscription's life (see segments.py).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import lru_cache

MS_PER_DAY = 86_400_000


class Cycle(StrEnum):
    CALENDAR = "calendar"
    ANNIVERSARY = "anniversary"


@dataclass(frozen=True, slots=True, order=True)
class Period:
    """A nominal billing period ``[start_ms, end_ms)``."""

    start_ms: int
    end_ms: int

    @property
    def length_ms(self) -> int:
        return self.end_ms - self.start_ms

    def contains(self, t_ms: int) -> bool:
        return self.start_ms <= t_ms < self.end_ms

    def label(self) -> str:
        return f"{iso(self.start_ms)} .. {iso(self.end_ms)}"


@lru_cache(maxsize=4096)
def iso(ms: int) -> str:
    """``2026-01-31T00:00:00Z`` (milliseconds shown only when not zero)."""
    dt = datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=(ms % 1000) * 1000)
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if ms % 1000:
        text += f".{ms % 1000:03d}"
    return text + "Z"


def to_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        raise ValueError("datetime must be timezone-aware (UTC)")
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def parse_instant(text: str) -> int:
    """``2026-11-01``, ``2026-11-01T12:00:00Z`` or ``...+00:00`` -> UTC ms. A time
    without an offset is refused: billing boundaries must not depend on a server's zone."""
    raw = text.strip()
    if len(raw) == 10:
        raw += "T00:00:00+00:00"
    elif raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    dt = datetime.fromisoformat(raw)
    if dt.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; write e.g. {text}Z")
    return to_ms(dt.astimezone(UTC))


def add_months(anchor_ms: int, months: int) -> int:
    """``anchor_ms`` moved by ``months`` calendar months, the day clamped to the target
    month's last day, the time of day kept (the anniversary rule in the module doc)."""
    dt = datetime.fromtimestamp(anchor_ms // 1000, UTC)
    sub_second_ms = anchor_ms % 1000
    index = dt.year * 12 + (dt.month - 1) + months
    year, month0 = divmod(index, 12)
    day = min(dt.day, calendar.monthrange(year, month0 + 1)[1])
    moved = dt.replace(year=year, month=month0 + 1, day=day)
    return to_ms(moved) + sub_second_ms


def month_start(t_ms: int) -> int:
    dt = datetime.fromtimestamp(t_ms // 1000, UTC)
    return to_ms(datetime(dt.year, dt.month, 1, tzinfo=UTC))


def _anchor(cycle: Cycle, anchor_ms: int) -> int:
    return month_start(anchor_ms) if cycle is Cycle.CALENDAR else anchor_ms


@lru_cache(maxsize=65536)  # pure; every calendar subscription asks about the same months
def period_at(cycle: Cycle, anchor_ms: int, t_ms: int, interval_months: int = 1) -> Period:
    """The nominal period that contains ``t_ms`` (which may be before the anchor)."""
    base = _anchor(cycle, anchor_ms)
    base_dt = datetime.fromtimestamp(base // 1000, UTC)
    t_dt = datetime.fromtimestamp(t_ms // 1000, UTC)
    months = (t_dt.year - base_dt.year) * 12 + (t_dt.month - base_dt.month)
    n = months // interval_months
    # The month difference is off by at most one period either way (day/time within the
    # month); step to the period whose [start, end) holds t.
    while add_months(base, n * interval_months) > t_ms:
        n -= 1
    while add_months(base, (n + 1) * interval_months) <= t_ms:
        n += 1
    return Period(add_months(base, n * interval_months),
                  add_months(base, (n + 1) * interval_months))


def periods_starting_in(cycle: Cycle, anchor_ms: int, from_ms: int, to_ms_: int,
                        interval_months: int = 1) -> list[Period]:
    """Nominal periods whose start lies in ``[from_ms, to_ms_)``."""
    out: list[Period] = []
    p = period_at(cycle, anchor_ms, from_ms, interval_months)
    if p.start_ms < from_ms:
        p = period_at(cycle, anchor_ms, p.end_ms, interval_months)
    while p.start_ms < to_ms_:
        out.append(p)
        p = period_at(cycle, anchor_ms, p.end_ms, interval_months)
    return out
