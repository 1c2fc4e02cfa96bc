"""Batch and event dedupe: exact horizon, bounded memory, caller-driven clock."""

from __future__ import annotations

import pytest

from meterline.core.dedupe import (
    DEFAULT_DEDUPE_HORIZON_MS,
    BatchDeduper,
    Deduper,
    EventDeduper,
    InMemoryDeduper,
)

T = 1_700_000_000_000
H = 1_000


def test_default_horizon_is_a_day() -> None:
    assert DEFAULT_DEDUPE_HORIZON_MS == 24 * 3600 * 1000
    assert BatchDeduper().horizon_ms == DEFAULT_DEDUPE_HORIZON_MS
    assert EventDeduper().horizon_ms == DEFAULT_DEDUPE_HORIZON_MS


def test_both_drivers_satisfy_the_protocol() -> None:
    drivers: list[Deduper] = [BatchDeduper(H), EventDeduper(H)]
    for d in drivers:
        assert d.seen_or_add("x", T) is False
        assert d.seen_or_add("x", T) is True


def test_horizon_boundary_is_exact() -> None:
    d = InMemoryDeduper(H)
    assert not d.seen_or_add("b1", T)
    assert d.seen_or_add("b1", T + H - 1)  # still remembered on the last ms
    assert "b1" in d
    assert not d.seen_or_add("b1", T + H)  # forgotten at t + horizon: new again


def test_repeat_does_not_extend_the_horizon() -> None:
    d = InMemoryDeduper(H)
    d.seen_or_add("b1", T)
    assert d.seen_or_add("b1", T + H - 1)
    assert d.expire(T + H) == 1  # measured from first sight, not from the repeat
    assert len(d) == 0


def test_clock_stepping_back_is_clamped() -> None:
    d = InMemoryDeduper(H)
    d.seen_or_add("a", T + 500)
    d.seen_or_add("b", T)  # earlier now_ms: treated as T + 500, keeping insertion order
    assert d.expire(T + 500 + H - 1) == 0
    assert d.expire(T) == 0  # going back cannot expire more, nor resurrect anything
    assert d.expire(T + 500 + H) == 2


def test_memory_is_bounded_by_the_horizon() -> None:
    d = InMemoryDeduper(H)
    for i in range(100_000):  # 100 ids per ms of clock, 1,000 ms horizon
        assert not d.seen_or_add(f"id-{i}", T + i // 100)
        assert len(d) <= 100 * H
    assert len(d) == 100 * H
    d.expire(T + 10 * H)
    assert len(d) == 0


def test_expire_returns_forgotten_count() -> None:
    d = InMemoryDeduper(H)
    for i in range(5):
        d.seen_or_add(str(i), T + i)
    assert d.expire(T + H + 2) == 3
    assert sorted(k for k in "01234" if k in d) == ["3", "4"]


@pytest.mark.parametrize("horizon", [0, -1, 1.5, None])
def test_bad_horizon_rejected(horizon: object) -> None:
    with pytest.raises(ValueError, match="horizon_ms"):
        InMemoryDeduper(horizon)  # type: ignore[arg-type]
