"""``meterline.gc_tuning``: the collector settings of the long-running processes, applied
once startup is done and switched off per process kind. Run in a child process: freezing
the test runner's own heap would change every test after this one."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import gc, sys; from meterline.gc_tuning import tune_gc; "
         "applied = tune_gc(sys.argv[1]); "
         "print(applied, gc.get_threshold()[0], gc.get_freeze_count() > 0)")


def _probe(env_var: str, value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != env_var}
    if value is not None:
        env[env_var] = value
    out = subprocess.run([sys.executable, "-c", PROBE, env_var], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def test_the_worker_settings_apply_and_switch_off() -> None:
    assert _probe("METERLINE_WORKER_GC", None) == "True 10000 True"
    assert _probe("METERLINE_WORKER_GC", "default") == "False 700 False"


def test_the_server_keeps_its_own_switch() -> None:
    # The worker's switch does not turn the server's settings off, and vice versa.
    assert _probe("METERLINE_SERVER_GC", "default") == "False 700 False"
    env = dict(os.environ, METERLINE_WORKER_GC="default")
    env.pop("METERLINE_SERVER_GC", None)
    out = subprocess.run([sys.executable, "-c",
                          "from meterline.server.gc_tuning import tune_for_serving; "
                          "print(tune_for_serving())"], env=env, check=True,
                         capture_output=True, text=True)
    assert out.stdout.strip() == "True"
