"""Billing periods: calendar months, anniversaries with the month-end clamp rule."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from meterline.core.billing import Cycle, Period, add_months, iso, parse_instant, period_at
from meterline.core.billing.periods import periods_starting_in


def test_month_end_anniversary_clamps_from_the_anchor_not_the_previous_period() -> None:
    anchor = parse_instant("2026-01-31T10:00:00Z")
    starts = [iso(add_months(anchor, n)) for n in range(5)]
    # Jan 31 -> Feb 28 -> Mar 31 (not Mar 28) -> Apr 30 -> May 31.
    assert starts == ["2026-01-31T10:00:00Z", "2026-02-28T10:00:00Z", "2026-03-31T10:00:00Z",
                      "2026-04-30T10:00:00Z", "2026-05-31T10:00:00Z"]
    leap = parse_instant("2028-01-31")
    assert iso(add_months(leap, 1)) == "2028-02-29T00:00:00Z"


def test_calendar_period_of_a_mid_month_start_is_the_whole_month() -> None:
    anchor = parse_instant("2026-11-16T09:00:00Z")
    p = period_at(Cycle.CALENDAR, anchor, anchor)
    assert (iso(p.start_ms), iso(p.end_ms)) == ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")
    assert p.length_ms == 30 * 86_400_000


def test_periods_starting_in_a_month() -> None:
    anchor = parse_instant("2026-01-31")
    got = periods_starting_in(Cycle.ANNIVERSARY, anchor, parse_instant("2026-02-01"),
                              parse_instant("2026-04-01"))
    assert [iso(p.start_ms) for p in got] == ["2026-02-28T00:00:00Z", "2026-03-31T00:00:00Z"]


def test_instants_must_name_their_offset() -> None:
    import pytest

    with pytest.raises(ValueError, match="no UTC offset"):
        parse_instant("2026-01-01T10:00:00")
    assert parse_instant("2026-01-01T12:00:00+02:00") == parse_instant("2026-01-01T10:00:00Z")


def _truth_add_months(d: datetime, n: int) -> datetime:
    # Independent of the code: walk to the target month's first day, then step back from
    # the next month's first day to find its last day.
    y, m = d.year + (d.month - 1 + n) // 12, (d.month - 1 + n) % 12 + 1
    nxt = date(y + (m == 12), m % 12 + 1, 1)
    last = (nxt - timedelta(days=1)).day
    return d.replace(year=y, month=m, day=min(d.day, last))


instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1)).map(
    lambda d: d.replace(microsecond=0, tzinfo=UTC))


@given(instants, st.integers(0, 40))
def test_anniversary_rule_matches_independent_calendar_walk(anchor: datetime, n: int) -> None:
    ms = int(anchor.timestamp()) * 1000
    assert add_months(ms, n) == int(_truth_add_months(anchor, n).timestamp()) * 1000


@given(instants, instants, st.sampled_from(list(Cycle)), st.sampled_from([1, 12]))
def test_periods_tile_time(anchor: datetime, t: datetime, cycle: Cycle, interval: int) -> None:
    a_ms, t_ms = int(anchor.timestamp()) * 1000, int(t.timestamp()) * 1000
    p = period_at(cycle, a_ms, t_ms, interval)
    assert p.start_ms <= t_ms < p.end_ms
    # Neighbours share their boundaries: no gap, no overlap.
    assert period_at(cycle, a_ms, p.end_ms, interval).start_ms == p.end_ms
    assert period_at(cycle, a_ms, p.start_ms - 1, interval).end_ms == p.start_ms
    assert isinstance(p, Period)
