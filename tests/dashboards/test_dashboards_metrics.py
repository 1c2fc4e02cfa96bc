"""The metrics the pipeline dashboard and the alert rules read: insert and flush latency,
consumer lag (local log and a real Kafka), loader throughput, where /metrics is served."""

from __future__ import annotations

import argparse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from meterline.aggregators.checkpoints import MemoryCheckpointStore
from meterline.aggregators.log_probe import KafkaLogProbe
from meterline.aggregators.metrics import (
    FLUSH_BUCKETS_S,
    FLUSH_SECONDS,
    serve_metrics,
    worker_lag,
)
from meterline.aggregators.runner import RollupWorker
from meterline.aggregators.runner import TopicPartition as RunnerTP
from meterline.config import AppConfig
from meterline.core.outputs import Flush
from meterline.ingest.metrics import (
    CLICKHOUSE_INSERT_SECONDS,
    INSERT_BUCKETS_S,
    KafkaGroupLag,
    LagCollector,
    LoaderCollector,
    LoaderTotals,
    LocalLogLag,
    MetricsEndpoint,
    PartitionLag,
    TimedStorage,
    metrics_endpoint,
)

pytestmark = pytest.mark.timeout(120)


def _count(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"{metric}_count", labels) or 0.0


class Sink:
    def write(self, flush: Flush) -> None:
        pass


class FakeStorage:
    database = "meterline"

    def __init__(self) -> None:
        self.inserts: list[tuple[str, int]] = []

    def insert_columns(self, table: str, columns: Any, types: Any, settings: Any = None) -> None:
        self.inserts.append((table, len(next(iter(columns.values()), ()))))

    def query_rows(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        return [(sql,)]


def test_timed_storage_times_non_empty_inserts_per_table() -> None:
    inner = FakeStorage()
    storage = TimedStorage(inner)
    before = _count("meterline_clickhouse_insert_seconds", table="test_table")
    storage.insert_columns("db.test_table", {"a": [1, 2]}, {"a": "Int64"})
    storage.insert_columns("db.test_table", {"a": []}, {"a": "Int64"})
    assert inner.inserts == [("db.test_table", 2), ("db.test_table", 0)]
    assert _count("meterline_clickhouse_insert_seconds", table="test_table") == before + 1
    assert storage.database == "meterline" and storage.query_rows("x") == [("x",)]


def test_buckets_span_the_latencies_involved() -> None:
    # chDB inserts ~5 ms .. 5 s, flushes ~10 ms .. 5 s (Kafka acks up to 60 s): both ends
    # of each span fall inside the buckets, a bucket at most x2.5 apart.
    for buckets, low, high in ((INSERT_BUCKETS_S, 0.005, 5.0), (FLUSH_BUCKETS_S, 0.01, 5.0)):
        assert buckets[0] <= low / 2 and buckets[-1] >= high * 2
        assert all(b / a <= 2.5 for a, b in zip(buckets, buckets[1:], strict=False))


def test_storage_writer_times_flushes_and_inserts(migrated_storage: Any) -> None:
    from meterline.aggregators.outputs_io import StorageWriter
    from meterline.core.outputs import Flush, RollupRecord

    start = 1_795_000_000_000 // 3_600_000 * 3_600_000
    flush = Flush(rollups=[RollupRecord("hourly", "acme", "api_calls", (), start,
                                        start + 3_600_000, "count", 10**9, 1, 1, "usage", 0)])
    flushes = _count("meterline_rollup_flush_seconds", writer="clickhouse")
    inserts = _count("meterline_clickhouse_insert_seconds", table="hourly_rollups")
    StorageWriter(migrated_storage).write(flush)
    StorageWriter(migrated_storage, observe_flushes=False).write(flush)  # a loader's write
    assert _count("meterline_rollup_flush_seconds", writer="clickhouse") == flushes + 1
    assert _count("meterline_clickhouse_insert_seconds", table="hourly_rollups") == inserts + 2
    assert FLUSH_SECONDS is not None and CLICKHOUSE_INSERT_SECONDS is not None


def test_local_log_lag_is_end_minus_committed(tmp_path: Path) -> None:
    from meterline.ingest.local_log import LocalLog

    log = LocalLog(tmp_path / "log.db", partitions=3)
    try:
        log.append(0, [b"a", b"b", b"c"])
        log.append(1, [b"d"])
        log.commit("g", {0: 1})
        lag = LocalLogLag(log, "g", stage="raw")
        assert lag.lag() == [PartitionLag("local", 0, 2), PartitionLag("local", 1, 1),
                             PartitionLag("local", 2, 0)]
        owned = LocalLogLag(log, "g", stage="rollup", partitions=lambda: [("local", 1)])
        assert owned.lag() == [PartitionLag("local", 1, 1)]
        registry = CollectorRegistry()
        registry.register(LagCollector([lag, owned]))
        text = generate_latest(registry).decode()
        assert ('meterline_consumer_lag_records{group="g",partition="0",stage="raw",'
                'topic="local"} 2.0') in text
        assert 'stage="rollup",topic="local"} 1.0' in text
    finally:
        log.close()


def test_a_failing_lag_source_is_left_out() -> None:
    class Broken:
        stage, group = "raw", "g"

        def lag(self) -> list[PartitionLag]:
            raise TimeoutError("broker away")

    registry = CollectorRegistry()
    registry.register(LagCollector([Broken()]))
    assert "meterline_consumer_lag_records{" not in generate_latest(registry).decode()


def test_loader_collector() -> None:
    registry = CollectorRegistry()
    registry.register(LoaderCollector("raw", lambda: LoaderTotals(3, 120, {"envelope.x": 2})))
    text = generate_latest(registry).decode()
    assert 'meterline_loader_records_total{loader="raw"} 3.0' in text
    assert 'meterline_loader_rows_total{loader="raw"} 120.0' in text
    assert 'meterline_loader_dead_letters_total{loader="raw",reason="envelope.x"} 2.0' in text


def test_metrics_endpoint_defaults_to_loopback() -> None:
    assert metrics_endpoint({}) is None
    assert metrics_endpoint({"METERLINE_METRICS_PORT": "9400"}) == \
        MetricsEndpoint("127.0.0.1", 9400)
    assert metrics_endpoint({"METERLINE_METRICS_PORT": "9400",
                             "METERLINE_METRICS_ADDR": "0.0.0.0"}) == \
        MetricsEndpoint("0.0.0.0", 9400)
    for bad in ("x", "70000"):
        with pytest.raises(ValueError, match="METERLINE_METRICS_PORT"):
            metrics_endpoint({"METERLINE_METRICS_PORT": bad})


def test_cli_metrics_options_set_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from meterline.cli import _apply_metrics_options

    monkeypatch.delenv("METERLINE_METRICS_PORT", raising=False)
    monkeypatch.delenv("METERLINE_METRICS_ADDR", raising=False)
    _apply_metrics_options(argparse.Namespace(metrics_port=9401, metrics_addr=None))
    assert metrics_endpoint() == MetricsEndpoint("127.0.0.1", 9401)
    _apply_metrics_options(argparse.Namespace(metrics_port=None, metrics_addr="0.0.0.0"))
    assert metrics_endpoint() == MetricsEndpoint("0.0.0.0", 9401)


def test_worker_metrics_are_served_on_loopback(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from meterline.aggregators.embedded import EmbeddedRollups
    from meterline.ingest.local_log import LocalLog

    monkeypatch.delenv("METERLINE_METRICS_ADDR", raising=False)
    log = LocalLog(tmp_path / "log.db", partitions=2)
    try:
        log.append(1, [b"x", b"y"])
        runner = EmbeddedRollups(log, Sink(), MemoryCheckpointStore(), AppConfig().registry())
        runner.start()
        server, _ = serve_metrics(runner.worker, 0, registry=CollectorRegistry())
        try:
            assert server.server_address[0] == "127.0.0.1"
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as resp:
                text = resp.read().decode()
        finally:
            server.shutdown()
            server.server_close()
    finally:
        log.close()
    assert 'meterline_rollup_events_total{outcome="accepted"}' in text
    assert ('meterline_consumer_lag_records{group="rollups",partition="1",stage="rollup",'
            'topic="local"} 2.0') in text
    assert "meterline_rollup_flush_seconds_bucket" in text
    assert "meterline_clickhouse_insert_seconds_bucket" in text
    assert "customer" not in text


@pytest.mark.integration
def test_kafka_group_lag_is_high_watermark_minus_committed(kafka_broker: Any,
                                                            kafka_topic: Any) -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition

    topic = kafka_topic(partitions=2)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for partition, n in ((0, 5), (1, 3)):
        for i in range(n):
            producer.produce(topic, f"r{i}".encode(), partition=partition)
    assert producer.flush(30) == 0
    group = f"lag-{topic}"
    committer = Consumer({"bootstrap.servers": kafka_broker.bootstrap, "group.id": group,
                          "enable.auto.commit": False})
    try:
        committer.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    finally:
        committer.close()

    lag = KafkaGroupLag(kafka_broker.bootstrap, group, [topic], stage="raw", max_age_s=0)
    owned = KafkaGroupLag(kafka_broker.bootstrap, group, [], stage="rollup",
                          partitions=lambda: [(topic, 1)])
    # The Faust worker's RollupWorker reports the lag of the partitions it owns.
    probe = KafkaLogProbe(kafka_broker.bootstrap)
    worker = RollupWorker(AppConfig().registry(), Sink(), MemoryCheckpointStore(),
                          group=group, probe=probe)
    worker.assign([RunnerTP(topic, 0)])
    from_worker = worker_lag(worker)
    try:
        # Partition 0: 5 records, 2 committed. Partition 1: never committed, all 3 count.
        assert lag.lag() == [PartitionLag(topic, 0, 3), PartitionLag(topic, 1, 3)]
        assert owned.lag() == [PartitionLag(topic, 1, 3)]
        assert from_worker is not None and from_worker.stage == "rollup"
        assert from_worker.lag() == [PartitionLag(topic, 0, 3)]
        producer.produce(topic, b"more", partition=0)
        assert producer.flush(30) == 0
        assert lag.lag()[0] == PartitionLag(topic, 0, 4)
        registry = CollectorRegistry()
        registry.register(LagCollector([lag]))
        text = generate_latest(registry).decode()
        assert f'group="{group}",partition="1",stage="raw",topic="{topic}"}} 3.0' in text
    finally:
        lag.close()
        owned.close()
        probe.close()
        if isinstance(from_worker, KafkaGroupLag):
            from_worker.close()


@pytest.mark.integration
def test_load_raw_serves_its_metrics(kafka_broker: Any, kafka_topic: Any,
                                     tmp_path: Path) -> None:
    """`meterline load-raw --metrics-port` serves throughput and lag on loopback."""
    import os
    import subprocess
    import sys
    import time

    from confluent_kafka import Producer

    from meterline.testing.kafka import free_ports

    topic = kafka_topic(partitions=2)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for i in range(3):
        producer.produce(topic, b"not an envelope", partition=i % 2)
    assert producer.flush(30) == 0
    config = tmp_path / "meterline.toml"
    config.write_text(f'[kafka]\nbootstrap_servers = "{kafka_broker.bootstrap}"\n'
                      f'topic = "{topic}"\ngroup_id = "raw-{topic}"\n'
                      f'[storage]\ndata_dir = "{tmp_path / "chdb"}"\n')
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterline.cli", "--config", str(config), "load-raw",
         "--until-idle", "15", "--metrics-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    text = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=5) as resp:
                    text = resp.read().decode()
            except OSError:
                text = ""
            if 'meterline_loader_records_total{loader="raw"} 3.0' in text and all(
                    f'partition="{p}",stage="raw",topic="{topic}"}} 0.0' in text
                    for p in (0, 1)):  # lag answers are cached for 5 s
                break
            time.sleep(0.3)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert 'meterline_loader_records_total{loader="raw"} 3.0' in text, out
    assert 'meterline_loader_dead_letters_total{loader="raw",reason="envelope.' in text
    assert f'group="raw-{topic}",partition="0",stage="raw",topic="{topic}"}} 0.0' in text
    assert 'meterline_clickhouse_insert_seconds_count{table="dead_letters"} 1.0' in text


def test_rollup_local_serves_its_metrics(tmp_path: Path) -> None:
    """`meterline rollup-local --metrics-port` serves the worker's families and the local
    log's consumer lag, like `meterline worker` does for Kafka."""
    import os
    import subprocess
    import sys
    import time

    from meterline.ingest.local_log import LocalLog, LocalLogTransport
    from meterline.sdk import Emitter, EmitterConfig
    from meterline.testing.kafka import free_ports

    log_path = tmp_path / "log.db"
    log = LocalLog(log_path, partitions=2)
    config = EmitterConfig(topic="local", bootstrap_servers=None, spool_dir=tmp_path / "spool")
    with Emitter(config, transport=LocalLogTransport(log)) as emitter:
        for i in range(300):
            emitter.emit(f"c{i % 7}", "api_calls", 1)
        emitter.emit("c1", "no_such_meter", 1)
        assert emitter.flush(10)
    log.close()
    port = free_ports(1)[0]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")},
           "METERLINE_DATA_DIR": str(tmp_path / "chdb")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterline.cli", "rollup-local", "--log", str(log_path),
         "--until-idle", "20", "--metrics-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    seen, wanted = "", ('meterline_rollup_events_total{outcome="accepted"} 300.0',
                        'meterline_rollup_rejected_events_total{reason="event.unknown_meter"} 1.0',
                        'meterline_consumer_lag_records{group="rollups",partition="0",'
                        'stage="rollup",topic="local"} 0.0',
                        "meterline_rollup_checkpoint_age_seconds")
    try:
        # Bounded by the process: it stops by itself 20 s after the log is read.
        while proc.poll() is None and not all(w in seen for w in wanted):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=5) as resp:
                    seen = resp.read().decode()  # the last answer, not a refused one
            except OSError:
                pass
            time.sleep(0.3)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    for w in wanted:
        assert w in seen, (w, out, seen[-3000:])
