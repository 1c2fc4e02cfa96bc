"""The commands the README shows, run as a user runs them (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _meterline(*args: str, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meterline.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_demo_small_run_is_exact(tmp_path: Path) -> None:
    out = _meterline("demo", "--events", "30000", "--customers", "40", "--no-progress",
                     "--workdir", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Exact: ClickHouse totals equal the ground truth" in out.stdout
    assert "30,000 events" in out.stdout
    assert "Exact: rollups equal the ground truth for all" in out.stdout, out.stdout
    assert "30,000 events: 30,000 accepted, 0 duplicate, 0 too late, 0 rejected" in out.stdout
    assert "api_calls per hour on its busiest day" in out.stdout

    # The demo's chDB directory can then be queried and migrated through the CLI.
    env = {"METERLINE_DATA_DIR": str(tmp_path / "demo" / "chdb")}
    usage = _meterline("usage", "cust-00000", env=env)
    assert usage.returncode == 0, usage.stderr
    assert "api_calls" in usage.stdout
    migrated = _meterline("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr


def test_demo_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "file").write_text("keep me")
    out = _meterline("demo", "--events", "10", "--no-progress", "--workdir",
                     str(tmp_path / "precious"))
    assert out.returncode != 0
    assert (tmp_path / "precious" / "file").exists()


def test_bad_config_reports_every_error(tmp_path: Path) -> None:
    cfg = tmp_path / "meterline.toml"
    cfg.write_text('[kafka]\nbootstrap = "x"\n[storage]\ndata_dir = 5\n[nope]\n'
                   "[retention]\nraw_events_days = 0\n")
    out = _meterline("--config", str(cfg), "migrate")
    assert out.returncode == 2
    for fragment in ("unknown section [nope]", "unknown key 'bootstrap'", "data_dir must be",
                     "raw_events_days"):
        assert fragment in out.stderr, out.stderr


def test_rollup_local_runs_to_idle_and_resumes(tmp_path: Path) -> None:
    from meterline.ingest.local_log import LocalLog, LocalLogTransport
    from meterline.sdk import Emitter, EmitterConfig

    log_path = tmp_path / "log.db"
    log = LocalLog(log_path, partitions=2)
    config = EmitterConfig(topic="local", bootstrap_servers=None, spool_dir=tmp_path / "spool")
    with Emitter(config, transport=LocalLogTransport(log)) as emitter:
        for i in range(500):
            emitter.emit(f"c{i % 7}", "llm_tokens", 3, dimensions={"model": "small"})
        emitter.emit("c1", "no_such_meter", 1)
        assert emitter.flush(10)
    log.append(0, [b"not an envelope"])
    log.close()

    env = {"METERLINE_DATA_DIR": str(tmp_path / "chdb")}
    out = _meterline("rollup-local", "--log", str(log_path), "--until-idle", "0.3", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "accepted            500" in out.stdout, out.stdout
    assert "rejected              2" in out.stdout
    assert "event.unknown_meter" in out.stdout and "envelope.malformed_json" in out.stdout
    assert (tmp_path / "log.rollup-checkpoints.db").exists()

    again = _meterline("rollup-local", "--log", str(log_path), "--until-idle", "0.3", env=env)
    assert again.returncode == 0, again.stderr
    assert "records 0 " in again.stdout, "a second run resumes after the committed offsets"

    missing = _meterline("rollup-local", "--log", str(tmp_path / "nope.db"), env=env)
    assert missing.returncode == 2 and "no local log" in missing.stderr


def test_load_rollups_moves_worker_outputs_into_clickhouse(kafka_broker: Any,
                                                          tmp_path: Path) -> None:
    """`meterline load-rollups`: what a worker wrote to the output topics lands in the
    tables; a second run finds nothing new (offsets were committed after the insert)."""
    import time

    from meterline.aggregators.outputs_io import KafkaOutputWriter, output_topics
    from meterline.core.outputs import DeadLetterRecord, Flush, RollupRecord

    topic = kafka_broker.create_topic(f"cli-{time.monotonic_ns()}", 1)
    for name in output_topics(topic).values():
        kafka_broker.create_topic(name, 1)
    now = time.time_ns() // 1_000_000
    hour = now - now % 3_600_000
    writer = KafkaOutputWriter(kafka_broker.bootstrap, topic)
    writer.write(Flush(
        rollups=[RollupRecord("hourly", "c1", "api_calls", (("endpoint", "/x"), ("region", "")),
                              hour, hour + 3_600_000, "count", 3 * 10**9, 3, 3, topic, 0)],
        dead_letters=[DeadLetterRecord(topic, 0, 7, -1, "", "", "envelope.malformed_json",
                                       "junk", now)]))
    writer.close()
    env = {"METERLINE_KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "METERLINE_TOPIC": topic,
           "METERLINE_DATA_DIR": str(tmp_path / "chdb")}
    first = _meterline("load-rollups", "--until-idle", "8", env=env)
    assert first.returncode == 0, first.stderr
    assert "loaded 2 output rows from 2 records" in first.stdout, first.stdout
    again = _meterline("load-rollups", "--until-idle", "8", env=env)
    assert "loaded 0 output rows" in again.stdout, again.stdout

    # The raw-events stage reads the usage topic itself.
    from confluent_kafka import Producer

    from meterline.core.envelope import Batch, encode_batch

    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    producer.produce(topic, encode_batch(Batch("b1", now, ["c1", "c2"], ["api_calls"] * 2,
                                               [10**9] * 2, [now] * 2)))
    assert producer.flush(10) == 0
    raw = _meterline("load-raw", "--until-idle", "8", env=env)
    assert raw.returncode == 0, raw.stderr
    assert "loaded 2 events from 1 records" in raw.stdout, raw.stdout


def test_billing_commands_end_to_end(tmp_path: Path) -> None:
    """Plans, subscriptions, rate, explain, invoice, simulate, reconcile and history
    through the real entry point, on usage rolled up by `meterline rollup-local`."""
    import time

    from meterline.core.billing.periods import add_months, iso, month_start
    from meterline.ingest.local_log import LocalLog, LocalLogTransport
    from meterline.sdk import Emitter, EmitterConfig

    env = {"METERLINE_DATA_DIR": str(tmp_path / "chdb"), "METERLINE_ACTOR": "ops@example"}
    now = time.time_ns() // 1_000_000
    month = month_start(now)
    period = time.strftime("%Y-%m", time.gmtime(month / 1000))
    (tmp_path / "basic.toml").write_text(
        'id = "basic"\ncurrency = "USD"\nbase_fee = "10.00"\n'
        '[[charges]]\nmeter = "api_calls"\naggregation = "count"\n'
        'price = { model = "graduated", tiers = [ { up_to = 100, unit_amount = "0" }, '
        '{ unit_amount = "0.05" } ] }\n')
    (tmp_path / "cheaper.toml").write_text(
        (tmp_path / "basic.toml").read_text().replace('"10.00"', '"4.00"'))
    assert _meterline("migrate", env=env).returncode == 0
    out = _meterline("publish-plan", str(tmp_path / "basic.toml"), "--reason", "launch",
                     env=env)
    assert out.returncode == 0 and "published plan basic version 1" in out.stdout, out.stderr
    out = _meterline("subscribe", "s1", "c1", "basic", "--start", iso(month), "--reason",
                     "signup", env=env)
    assert out.returncode == 0, out.stderr
    # Refused with every reason, nothing written.
    bad = _meterline("subscribe", "s1", "c2", "gold", "--start", iso(month + 1800_000),
                     "--reason", "x", env=env)
    assert bad.returncode == 2
    for fragment in ("already exists", "not on a whole UTC hour", "plan 'gold' does not exist"):
        assert fragment in bad.stderr, bad.stderr
    history = _meterline("history", "s1", env=env)
    assert "#2" in history.stdout and "by ops@example: signup" in history.stdout

    # 250 api calls in the month -> rollups through the embedded runner.
    log = LocalLog(tmp_path / "log.db", partitions=1)
    config = EmitterConfig(topic="local", bootstrap_servers=None, spool_dir=tmp_path / "spool")
    with Emitter(config, transport=LocalLogTransport(log)) as emitter:
        for i in range(250):
            emitter.emit("c1", "api_calls", 1, timestamp_ms=month + i * 60_000,
                         dimensions={"region": "eu"})
        assert emitter.flush(10)
    log.close()
    assert _meterline("rollup-local", "--log", str(tmp_path / "log.db"), "--until-idle", "0.3",
                      env=env).returncode == 0

    rated = _meterline("rate", "--period", period, env=env)
    assert rated.returncode == 0, rated.stderr
    # 10.00 base fee + (250 - 100 free) x 0.05 = 17.50
    assert "total 17.50 USD" in rated.stdout, rated.stdout
    again = _meterline("rate", "--period", period, env=env)
    assert "2 written, 0 withdrawn" in again.stdout, again.stdout
    explain = _meterline("explain", "s1", "--period", period, env=env)
    assert explain.returncode == 0
    assert "Customer c1, subscription s1: usage of api_calls (number of events)" in explain.stdout
    assert "tier 2 (above 100): 150 unit(s) x 0.05 = 7.5 USD" in explain.stdout, explain.stdout
    invoice = _meterline("invoice", "s1", "--period", period, env=env)
    assert invoice.stdout.rstrip().endswith("17.50 USD"), invoice.stdout
    sim = _meterline("simulate", "--period", period, "--plan", str(tmp_path / "cheaper.toml"),
                     env=env)
    assert sim.returncode == 0, sim.stderr
    assert "17.50" in sim.stdout and "11.50" in sim.stdout and "-6.00" in sim.stdout
    # Raw events were never loaded (rollup-local writes rollups only): reconcile says so.
    rec = _meterline("reconcile", "--period", period, env=env)
    assert rec.returncode == 1 and "DRIFT c1 s1 api_calls" in rec.stdout, rec.stdout
    assert "raw 0, rollups 250, rated 250" in rec.stdout
    assert add_months(month, 1) > month
