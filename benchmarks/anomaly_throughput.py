"""Detector throughput and memory over many series: the issue's "series updates/s per
process over 1 M series, bytes per series".

    .venv/bin/python benchmarks/anomaly_throughput.py --series 1000000
    .venv/bin/python benchmarks/anomaly_throughput.py --series 200000 --baseline-ref HEAD --rounds 3
    .venv/bin/python benchmarks/anomaly_throughput.py --quick   # small (the smoke test)

What is timed is ``AnomalyEngine.observe`` (the series lookup, ``SeriesDetector``, the
seasonal detector and the episode tracker), one complete hourly window of every series,
series in a fixed order, for ``--hours`` hours: what the anomaly stage's feed calls once a
window is final. No rows, no Kafka, no checkpoint: the stage's own overhead is what
``anomaly_stage.py`` measures.

Steady state without weeks of warm-up for a million series: ``--templates`` series are
warmed up for ``--warm-days`` days (long enough for every hour-of-week slot to be grown
up), their state is saved (``to_plain``), and every benchmarked series starts from one of
them (``load_plain``), then continues with that template's own data (hourly shape x level
x noise, deterministic from ``--seed``). About 1 % of the timed windows carry a 6x spike,
so the abnormal path and episodes are exercised too.

Memory: bytes per series is the growth of the process' resident set while the detectors
are created and loaded (the series keys are built before, and reported apart), so it is
what the engine holds per series. ``state_json_bytes`` is ``to_plain`` as compact JSON.

``--baseline-ref REV`` runs the same benchmark on the ``meterline`` package of a git
revision (``git archive``, into a temporary folder; the working tree is not touched) and
this tree, alternating, each in a fresh process, and reports the ratios: the machine is
shared, so only figures from the same run are compared.

``updates_per_s`` is wall time; ``updates_per_cpu_s`` divides by the process' CPU time
over the same loop. That leaves out the time spent waiting for a core on a busy machine,
but it is not the rate on an idle core either: on the shared 2-core machine it moved by
tens of % between runs (other processes share the caches). Both are printed with
the load average, so a figure from a busy machine says so; where they agree, the process
had a core to itself.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOUR_MS = 3_600_000
START_MS = 1_704_067_200_000  # Monday 2024-01-01 00:00 UTC
SPIKE_EVERY = 97  # about 1 % of timed windows are spikes (6x)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Template:
    """One synthetic series: a level, a daily shape (business or flat) and noise."""

    def __init__(self, rng: random.Random) -> None:
        self.level = 10 ** rng.uniform(1.0, 4.5)
        business = rng.random() < 0.6
        self.shape = [(1.0 if 9 <= h < 18 else 0.15) if business
                      else 1.0 + 0.3 * math.sin(2 * math.pi * h / 24) for h in range(24)]
        self.noise = [math.exp(rng.gauss(0.0, 0.1)) for _ in range(101)]

    def value(self, hour: int, spike: bool = False) -> float:
        x = self.level * self.shape[hour % 24] * self.noise[hour % 101]
        weekday = (hour // 24) % 7
        if weekday >= 5:
            x *= 0.3
        return float(round(x * (6.0 if spike else 1.0)))


def run(series: int, hours: int, templates: int, warm_days: int, seed: int) -> dict[str, Any]:
    sys.path.insert(0, os.environ.get("METERLINE_TREE", str(ROOT)))
    import orjson

    from meterline.core.anomaly.engine import AnomalyEngine
    from meterline.core.anomaly.model import SeriesKey
    from meterline.core.anomaly.series import SeriesDetector
    from meterline.core.anomaly.settings import AnomalySettings

    rng = random.Random(seed)
    shapes = [Template(rng) for _ in range(templates)]
    settings = AnomalySettings()
    warm_hours = warm_days * 24 + 10  # timed hours mid-day, off the weekly chore at 00:00
    t0 = time.perf_counter()
    saved = []
    for tpl in shapes:
        d = SeriesDetector(settings, ("warm", "api_calls"))
        for h in range(warm_hours):
            d.observe(START_MS + h * HOUR_MS, tpl.value(h))
        saved.append(d.to_plain())
    warm_s = time.perf_counter() - t0
    state_json = sum(len(orjson.dumps(p)) for p in saved) / len(saved)

    gc.collect()
    rss0 = _rss_bytes()
    keys = [SeriesKey(f"c{i:07d}", "api_calls") for i in range(series)]
    rss_keys = _rss_bytes()
    engine = AnomalyEngine(settings)
    t0 = time.perf_counter()
    for i, key in enumerate(keys):
        detector = engine.detector(key)
        assert detector is not None
        detector.load_plain(saved[i % templates])
    load_s = time.perf_counter() - t0
    gc.collect()
    rss_engine = _rss_bytes()

    observe = engine.observe
    events = 0
    updates = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for h in range(warm_hours, warm_hours + hours):
        ts = START_MS + h * HOUR_MS
        # Values per template for this hour, then a spike on every SPIKE_EVERY-th series
        # (shifted each hour so different series spike).
        normal = [tpl.value(h) for tpl in shapes]
        spiked = [tpl.value(h, True) for tpl in shapes]
        for i, key in enumerate(keys):
            j = i % templates
            value = spiked[j] if (i + h) % SPIKE_EVERY == 0 else normal[j]
            events += len(observe(key, ts, value))
        updates += series
    update_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    return {
        "tree": str(Path(sys.modules[AnomalyEngine.__module__].__file__ or "").parents[3]),
        "series": series,
        "hours": hours, "templates": templates, "warm_days": warm_days,
        "updates": updates, "update_s": round(update_s, 3),
        "updates_per_s": round(updates / update_s) if update_s else None,
        "updates_per_cpu_s": round(updates / cpu_s) if cpu_s else None,
        "events": events,
        "bytes_per_series": round((rss_engine - rss_keys) / series),
        "key_bytes_per_series": round((rss_keys - rss0) / series),
        "state_json_bytes": round(state_json),
        "load_s": round(load_s, 2), "warm_s": round(warm_s, 2),
        "rss_mb": round(_rss_bytes() / 2**20),
        "loadavg": os.getloadavg()[0],
    }


def _extract(ref: str, into: Path) -> Path:
    data = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "meterline"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def _child(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, METERLINE_TREE=str(tree), PYTHONPATH=str(tree))
    cmd = [sys.executable, __file__, "--series", str(args.series), "--hours",
           str(args.hours), "--templates", str(args.templates), "--warm-days",
           str(args.warm_days), "--seed", str(args.seed)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True,
                         cwd=tempfile.gettempdir()).stdout
    result: dict[str, Any] = json.loads(out.splitlines()[0])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=1_000_000)
    parser.add_argument("--hours", type=int, default=2)
    parser.add_argument("--templates", type=int, default=500)
    parser.add_argument("--warm-days", type=int, default=28)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--baseline-ref", default=None,
                        help="also run a git revision's meterline, alternating, and compare")
    parser.add_argument("--rounds", type=int, default=2, help="with --baseline-ref")
    parser.add_argument("--quick", action="store_true", help="2,000 series, 50 templates")
    args = parser.parse_args(argv)
    if args.quick:
        args.series, args.templates, args.hours = 2000, 50, 2
    if args.baseline_ref is None:
        print(json.dumps(run(args.series, args.hours, args.templates, args.warm_days,
                             args.seed)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = _extract(args.baseline_ref, Path(tmp))
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "this": []}
        for _ in range(args.rounds):
            for name, tree in (("baseline", old_tree), ("this", ROOT)):
                r = _child(tree, args)
                print(json.dumps({"run": name, **r}), flush=True)
                runs[name].append(r)
    old, new = runs["baseline"], runs["this"]
    if {r["events"] for r in old + new} != {old[0]["events"]}:
        print(f"events differ: {[r['events'] for r in old]} vs {[r['events'] for r in new]}",
              file=sys.stderr)
        return 1

    # The fastest round of each: a slower round is other processes, not the code. Memory
    # does not depend on the machine's load: the first round's.
    summary: dict[str, Any] = {"series": args.series, "baseline_ref": args.baseline_ref,
                               "rounds": args.rounds}
    for field, ratio in (("updates_per_s", "speedup"), ("updates_per_cpu_s", "cpu_speedup")):
        pair = [max(r[field] for r in old), max(r[field] for r in new)]
        summary[field] = pair
        summary[ratio] = round(pair[1] / pair[0], 2)
    summary["bytes_per_series"] = [old[0]["bytes_per_series"], new[0]["bytes_per_series"]]
    summary["memory_ratio"] = round(new[0]["bytes_per_series"] / old[0]["bytes_per_series"],
                                    2)
    summary["loadavg"] = os.getloadavg()[0]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
