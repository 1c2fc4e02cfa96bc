"""The detector on real, public, labelled series: what the package registries here carry.

No registry reachable from this project ships a labelled *usage* data set (the Numenta
Anomaly Benchmark and Yahoo S5 are not packaged; loaders such as aeon's
``load_anomaly_detection`` or Merlion's ``ts_datasets`` download them at run time, which
this workplace cannot do). The aeon wheel on PyPI does ship one real labelled univariate
series inside the package: KDD-TSAD #135, ``UCR_Anomaly_InternalBleeding16`` (the
heart rate of a patient with internal bleeding, SIGKDD 2021 anomaly competition; 7,501
points, one labelled anomaly of 12 points). It is read straight from the wheel (a zip),
so aeon and its dependencies are never installed:

    .venv/bin/pip download aeon==1.6.0 --no-deps -d /tmp/aeon
    .venv/bin/python benchmarks/anomaly_real.py --aeon-wheel /tmp/aeon/aeon-1.6.0-py3-none-any.whl

Each point is fed as one window (the series has no wall-clock time; 1-minute, 5-minute
and hourly spacing are all tried), the first 1,200 points (the data set's normal training
part) as warm-up, at the default settings and at two lower band floors (``min_ratio``).
Reported per run: windows flagged, of them inside the labelled anomaly, outside it, and
whether the anomaly was found. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meterline.anomaly import AnomalySettings, detect_series  # noqa: E402

MEMBER = "aeon/datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_TEST.csv"
TRAIN_POINTS = 1200  # the data set's normal training part, used as warm-up
START_MS = 1_767_571_200_000  # Monday 2026-01-05 00:00 UTC (any Monday does)


def load(wheel: Path) -> tuple[list[float], set[int]]:
    """(values, indices labelled anomalous) of KDD-TSAD #135 from an aeon wheel."""
    with zipfile.ZipFile(wheel) as z:
        text = z.read(MEMBER).decode("utf-8")
    rows = list(csv.reader(text.splitlines()))
    if rows[0] != ["timestamp", "value", "is_anomaly"]:
        raise ValueError(f"unexpected header {rows[0]!r} in {MEMBER}")
    values = [float(r[1]) for r in rows[1:]]
    labels = {i for i, r in enumerate(rows[1:]) if r[2] == "1"}
    return values, labels


def score(values: list[float], labels: set[int], interval_ms: int,
          min_ratio: float) -> dict[str, Any]:
    settings = AnomalySettings.for_interval(interval_ms, min_abs_deviation=1.0,
                                            warmup_windows=TRAIN_POINTS, min_ratio=min_ratio)
    timestamps = [START_MS + i * interval_ms for i in range(len(values))]
    anomalies = detect_series(timestamps, values, interval_ms=settings.interval_ms,
                              min_abs_deviation=settings.min_abs_deviation,
                              warmup_windows=settings.warmup_windows,
                              resolve_windows=settings.resolve_windows,
                              adapt_windows=settings.adapt_windows, min_ratio=min_ratio)
    flagged = {(a.window_start_ms - START_MS) // interval_ms for a in anomalies}
    return {"interval_ms": interval_ms, "min_ratio": min_ratio, "points": len(values),
            "labelled": len(labels), "flagged": len(flagged),
            "flagged_in_label": len(flagged & labels),
            "flagged_outside": len(flagged - labels), "found": bool(flagged & labels)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aeon-wheel", type=Path, required=True,
                        help="aeon-*.whl from `pip download aeon --no-deps`")
    args = parser.parse_args(argv)
    values, labels = load(args.aeon_wheel)
    for interval_ms in (60_000, 300_000, 3_600_000):
        for min_ratio in (3.5, 1.2, 1.05):
            print(json.dumps(score(values, labels, interval_ms, min_ratio)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
