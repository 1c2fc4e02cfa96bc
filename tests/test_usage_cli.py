"""`meterline usage` reads the rollups (issue 11): the cases the issue found wrong when it
read raw_events - a count meter sent with quantity 5, an unknown meter, a negative
quantity, late events - now show what billing and the dashboards see.

The expected numbers are written down by hand from what is sent (the issue's rules in
words: a count meter counts events; the rollups refuse unknown meters and negative
quantities; late usage within the restatement horizon is restated into its window; a
unique_count counts distinct values), not computed by the code under test.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from meterline import cli
from meterline.config import AppConfig
from meterline.core.envelope import Batch, encode_batch
from meterline.ingest.local_log import LocalLog
from meterline.usage_cli import UsageArgumentError, parse_time_ms, usage_range

UNIT = 10**9
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ms // 1000))


@pytest.fixture(scope="module")
def loaded(chdb_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, int]]:
    """The issue's cases through the real raw and rollup stages into chDB, once for the
    module (the tests only read). Yields the storage and ``d``, the UTC day the usage
    belongs to (three days ago)."""
    from meterline.aggregators.embedded import run_embedded_rollups
    from meterline.ingest.raw_loader import RawEventLoader
    from meterline.ingest.sources import LocalLogRecordSource
    from meterline.sinks.chdb_backend import ChdbStorage
    from meterline.sinks.schema import migrate

    tmp_path = tmp_path_factory.mktemp("usage-cli")
    migrated_storage = ChdbStorage(chdb_engine.data_dir, f"test_{uuid.uuid4().hex[:12]}")
    migrate(migrated_storage)

    now = time.time_ns() // 1_000_000
    d = now - now % DAY_MS - 3 * DAY_MS
    registry = AppConfig().registry()

    def batch(batch_id: str, rows: list[tuple[str, int, int, dict[str, str] | None]]) -> bytes:
        return encode_batch(Batch(batch_id, now, ["acme"] * len(rows), [r[0] for r in rows],
                                  [r[1] for r in rows], [r[2] for r in rows],
                                  dimensions=[r[3] for r in rows]))

    log = LocalLog(tmp_path / "log.db", partitions=1)
    try:
        log.append(0, [
            batch("b1", [
                ("api_calls", 5 * UNIT, d + HOUR_MS, None),            # count meter, qty 5
                ("no_such_meter", 7 * UNIT, d + HOUR_MS, None),        # unknown meter
                ("llm_tokens", -3 * UNIT, d + HOUR_MS, None),          # negative quantity
                ("llm_tokens", 10 * UNIT + UNIT // 2, d + HOUR_MS, {"model": "m1"}),
                ("active_users", UNIT, d + HOUR_MS, {"user_id": "u1"}),
                ("active_users", UNIT, d + 2 * HOUR_MS, {"user_id": "u2"}),
            ]),
            # a day later: the watermark passes day d and its allowed lateness
            batch("b2", [("llm_tokens", UNIT, d + DAY_MS + 5 * HOUR_MS, {"model": "m1"})]),
            # too late for their windows: restated into them by the usage views
            batch("b3", [
                ("api_calls", UNIT, d + HOUR_MS + 60_000, None),
                ("llm_tokens", 4 * UNIT, d + HOUR_MS + 60_000, {"model": "m1"}),
                ("active_users", UNIT, d + HOUR_MS + 60_000, {"user_id": "u3"}),
                ("active_users", UNIT, d + HOUR_MS + 90_000, {"user_id": "u1"}),  # seen
            ]),
        ])
        source = LocalLogRecordSource(log, consumer="raw-events")
        loader = RawEventLoader(migrated_storage, source, registry)
        while source.lag():
            loader.run_once(timeout_s=0)
        counters = run_embedded_rollups(log, migrated_storage, registry,
                                        checkpoint_path=tmp_path / "checkpoints.db",
                                        until_idle_s=0, database=migrated_storage.database)
    finally:
        log.close()
    assert counters.late == 4, counters  # the scenario is what it says it is
    assert counters.rejected == 2, counters
    yield migrated_storage, d
    migrated_storage.execute(f"DROP DATABASE IF EXISTS {migrated_storage.database} SYNC")
    migrated_storage.close()


def _run(storage: Any, monkeypatch: Any, capsys: Any, *args: str) -> tuple[int, str]:
    import meterline.sinks.storage as storage_mod

    class Borrowed:  # `usage` closes what it opened; the fixture owns this storage
        def __getattr__(self, name: str) -> Any:
            return getattr(storage, name)

        def close(self) -> None:
            pass

    monkeypatch.setattr(storage_mod, "open_storage", lambda _cfg: Borrowed())
    code = cli.main(["usage", *args])
    return code, capsys.readouterr().out


def test_usage_shows_the_rollups_numbers(loaded: tuple[Any, int], monkeypatch: Any,
                                         capsys: Any) -> None:
    storage, d = loaded
    code, out = _run(storage, monkeypatch, capsys, "acme", "--from", _day(d),
                     "--to", _day(d + 2 * DAY_MS), "--json")
    assert code == 0
    doc = orjson.loads(out)
    totals = {(t["meter"], tuple(sorted(t["dimensions"].items()))): (t["events"], t["value"])
              for t in doc["totals"]}
    assert totals == {
        # qty 5 counts once; + 1 late (group: the meter's dimensions, absent = '')
        ("api_calls", (("endpoint", ""), ("region", ""))): (2, "2"),
        ("llm_tokens", (("model", "m1"),)): (3, "15.5"),  # 10.5 + 4 late + 1 next day
        # distinct users per day window: day d {u1, u2, u3} (late u3 and u1 again restated
        # by re-aggregation from raw events); not addable across days, one day here
        ("active_users", ()): (4, "3"),
    }
    meters = {u["meter"]: u for u in doc["usage"]}
    assert "no_such_meter" not in out
    assert [(p["window_start_ms"], p["value"], p["events"])
            for p in meters["llm_tokens"]["data"]] == [(d, "14.5", 2), (d + DAY_MS, "1", 1)]
    assert meters["active_users"]["data"][0]["value"] == "3"


def test_usage_by_hour_restates_late_unique_count(loaded: tuple[Any, int], monkeypatch: Any,
                                                  capsys: Any) -> None:
    """Hour d+1h of active_users: u1 on time, u3 late (and u1 again, late): 2 distinct.
    Without the meter registry the query leaves the late ones out (1): the server's reader
    passes it, so the CLI and the API agree with billing."""
    storage, d = loaded
    code, out = _run(storage, monkeypatch, capsys, "acme", "--meter", "active_users",
                     "--granularity", "hour", "--from", _day(d), "--to", _day(d + DAY_MS),
                     "--json")
    assert code == 0
    [usage] = orjson.loads(out)["usage"]
    assert [(p["window_start_ms"] - d, p["value"], p["events"]) for p in usage["data"]] == [
        (HOUR_MS, "2", 3), (2 * HOUR_MS, "1", 1)]
    # What the reader returned before it passed the registry (the old server code):
    from meterline.sinks.rollups import RollupUsageQuery

    [before, _] = RollupUsageQuery("acme", "active_users", d, d + DAY_MS,
                                   database=storage.database).run(storage)
    assert (before.value_nanos, before.late_pending) == (UNIT, 2)


def test_usage_table_and_errors(loaded: tuple[Any, int], monkeypatch: Any,
                                capsys: Any) -> None:
    storage, d = loaded
    code, out = _run(storage, monkeypatch, capsys, "acme", "--from", _day(d),
                     "--to", _day(d + DAY_MS))
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows["api_calls"] == ["count", "-", "2", "2", "request"]
    assert rows["llm_tokens"] == ["sum", "model=m1", "2", "14.5", "token"]
    assert rows["active_users"] == ["unique_count", "-", "4", "3", "user"]
    assert "no_such_meter" not in out

    code, out = _run(storage, monkeypatch, capsys, "nobody", "--from", _day(d),
                     "--to", _day(d + DAY_MS))
    assert code == 0 and "no usage recorded for nobody" in out

    # a unique_count month cannot be folded from days: said, not approximated
    code, out = _run(storage, monkeypatch, capsys, "acme", "--meter", "active_users",
                     "--granularity", "month")
    assert code == 0 and "cannot be combined exactly" in out


def test_usage_arguments_fail_with_one_line(capsys: Any) -> None:
    assert cli.main(["usage", "acme", "--meter", "nope"]) == 2
    assert "no meter 'nope'; known: " in capsys.readouterr().err
    assert cli.main(["usage", "acme", "--from", "yesterday"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --from: ") and len(err.strip().splitlines()) == 1
    assert cli.main(["usage", "acme", "--from", "2026-02-01", "--to", "2026-01-01"]) == 2
    assert "must be before --to" in capsys.readouterr().err


def test_time_arguments_and_default_range() -> None:
    assert parse_time_ms("2026-11-01", "from") == 1_793_491_200_000
    assert parse_time_ms("2026-11-01T01:00:00+01:00", "from") == 1_793_491_200_000
    assert parse_time_ms("1793491200000", "from") == 1_793_491_200_000
    with pytest.raises(UsageArgumentError):
        parse_time_ms("11/01/2026", "to")
    now = 1_793_491_200_000 + 5 * HOUR_MS + 7
    # the default ends with the current window and is as long as the API's default
    assert usage_range("day", None, None, now) == (1_793_491_200_000 - 30 * DAY_MS,
                                                   1_793_491_200_000 + DAY_MS)
    assert usage_range("hour", None, None, now) == (1_793_491_200_000 + 6 * HOUR_MS - DAY_MS,
                                                    1_793_491_200_000 + 6 * HOUR_MS)
    with pytest.raises(UsageArgumentError, match="longer than 93 days"):
        usage_range("hour", "2026-01-01", "2026-06-01", now)
