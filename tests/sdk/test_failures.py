"""FailureLog: every failure counted, logged at ERROR without flooding, passed to on_error."""

from __future__ import annotations

import logging

import pytest

from meterline.sdk.failures import CAUSES, LOG_INTERVAL_S, FailureLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def sdk_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "meterline.sdk" and r.levelno == logging.ERROR
    ]


def test_persistent_failure_is_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = FailureLog(None, clock=clock)
    for _ in range(1_000):
        log.record("spool", OSError("disk full"), "events stay in memory")
        clock.now += 0.01  # 10 s in all: inside one interval
    assert len(sdk_errors(caplog)) == 1
    clock.now += LOG_INTERVAL_S
    log.record("spool", OSError("disk full"), "events stay in memory")
    lines = sdk_errors(caplog)
    assert len(lines) == 2
    assert "spool failure: OSError: disk full. events stay in memory" in lines[1]
    assert "(999 more since the last report)" in lines[1]
    assert log.counts()["spool"] == 1_001


def test_causes_are_rate_limited_independently(caplog: pytest.LogCaptureFixture) -> None:
    log = FailureLog(None, clock=FakeClock())
    log.record("spool", OSError("disk full"), "kept")
    log.record("build", ValueError("bad"), "kept")
    log.record("spool", OSError("disk full"), "kept")
    assert [line.split(":")[1].strip() for line in sdk_errors(caplog)] == [
        "spool failure",
        "build failure",
    ]
    counts = log.counts()
    assert set(counts) == set(CAUSES)
    assert counts["spool"] == 2 and counts["build"] == 1 and sum(counts.values()) == 3


def test_every_failure_reaches_the_hook_even_when_not_logged() -> None:
    seen: list[BaseException] = []
    log = FailureLog(seen.append, clock=FakeClock())
    errors = [OSError(f"e{i}") for i in range(5)]
    for exc in errors:
        log.record("delivery", exc, "spooled")
    assert seen == errors


def test_a_raising_hook_is_counted_logged_and_not_called_about_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[BaseException] = []

    def hook(exc: BaseException) -> None:
        calls.append(exc)
        raise RuntimeError("hook bug")

    log = FailureLog(hook, clock=FakeClock())
    log.record("send", OSError("no route"), "spooled")  # must not raise
    log.notify(ValueError("partition count changed"))  # must not raise either
    assert [type(c) for c in calls] == [OSError, ValueError]
    assert log.counts()["on_error"] == 2 and log.counts()["send"] == 1
    assert any("on_error failure: RuntimeError: hook bug" in m for m in sdk_errors(caplog))
