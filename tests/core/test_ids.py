"""ULIDs: 26 Crockford base32 chars, time-ordered, monotonic within a millisecond."""

from __future__ import annotations

import re
import threading
import time

import pytest

from meterline.core import ids
from meterline.core.ids import id_timestamp_ms, new_id

ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


@pytest.fixture(autouse=True)
def _isolated_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # new_id keeps process-wide monotonic state; tests that pass their own now_ms must not
    # leak a future "last ms" into other tests.
    monkeypatch.setattr(ids, "_last_ms", -1)
    monkeypatch.setattr(ids, "_last_rand", 0)


def test_shape() -> None:
    for _ in range(100):
        ulid = new_id()
        assert len(ulid) == 26
        assert ULID_RE.match(ulid), ulid


def test_timestamp_round_trip_now() -> None:
    before = time.time_ns() // 1_000_000
    ulid = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= id_timestamp_ms(ulid) <= after


@pytest.mark.parametrize("ms", [0, 1, 1_700_000_000_000, 2**48 - 1])
def test_timestamp_round_trip_given(ms: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "_last_ms", -1)
    assert id_timestamp_ms(new_id(ms)) == ms


def test_monotonic_within_one_ms() -> None:
    ms = 1_700_000_000_000
    made = [new_id(ms) for _ in range(10_000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert {id_timestamp_ms(u) for u in made} == {ms}
    # Same ms, so the time part is shared and only the random part increments.
    assert len({u[:10] for u in made}) == 1


def test_monotonic_when_clock_steps_back() -> None:
    first = new_id(1_700_000_000_500)
    second = new_id(1_700_000_000_000)  # an NTP step back must not reorder ids
    assert second > first
    assert id_timestamp_ms(second) == 1_700_000_000_500


def test_later_ms_sorts_later_and_draws_new_randomness() -> None:
    a = new_id(1_700_000_000_000)
    b = new_id(1_700_000_000_001)
    assert a < b
    assert id_timestamp_ms(b) - id_timestamp_ms(a) == 1


def test_unique_and_ordered_across_threads() -> None:
    out: list[list[str]] = [[] for _ in range(8)]

    def work(i: int) -> None:
        out[i].extend(new_id() for _ in range(2_000))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [u for chunk in out for u in chunk]
    assert len(set(flat)) == len(flat)
    for chunk in out:  # each thread sees its own ids in creation order
        assert chunk == sorted(chunk)
