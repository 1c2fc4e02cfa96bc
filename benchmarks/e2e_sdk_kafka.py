"""End-to-end SDK -> real Kafka throughput, next to a naive baseline in the same run.

    make bench-e2e      # or: .venv/bin/python benchmarks/e2e_sdk_kafka.py --events 2000000

Measures, against one local broker started by this script:
- meterline: Emitter.emit() per event, batched envelopes; clock stops when flush()
  returns, i.e. when Kafka acknowledged every event (acks=all).
- baseline: one confluent-kafka produce() per event (JSON object per record, keyed by
  customer, same acks/idempotence/compression), clock stops after flush().
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import orjson

from meterline.sdk import Emitter, EmitterConfig
from meterline.testing.kafka import KafkaBroker

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def run_meterline(bootstrap: str, topic: str, n: int, spool: Path) -> float:
    config = EmitterConfig(topic=topic, bootstrap_servers=bootstrap, spool_dir=spool)
    with Emitter(config) as emitter:
        emit = emitter.emit
        t0 = time.perf_counter()
        for i in range(n):
            emit(f"cust-{i % 1000}", "api_calls", 1)
        if not emitter.flush(timeout=600):
            raise SystemExit("meterline run did not finish")
        elapsed = time.perf_counter() - t0
        stats = emitter.stats()
    assert stats.delivered == n, stats
    return elapsed


def run_baseline(bootstrap: str, topic: str, n: int) -> float:
    from confluent_kafka import Producer

    producer = Producer({
        "bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
        "compression.type": "lz4", "linger.ms": 5, "queue.buffering.max.messages": 1_000_000,
    })
    dumps = orjson.dumps
    t0 = time.perf_counter()
    for i in range(n):
        customer = f"cust-{i % 1000}"
        value = dumps({"customer": customer, "meter": "api_calls", "quantity": 1,
                       "timestamp_ms": time.time_ns() // 1_000_000})
        while True:
            try:
                producer.produce(topic, value, key=customer)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    remaining = producer.flush(600)
    elapsed = time.perf_counter() - t0
    assert remaining == 0
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--baseline-events", type=int, default=300_000,
                        help="the per-event baseline is slow; rate is what matters")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, KafkaBroker(Path(tmp) / "kafka") as broker:
        broker.create_topic("bench-meterline", partitions=4)
        broker.create_topic("bench-baseline", partitions=4)
        run_meterline(broker.bootstrap, "bench-meterline", 50_000, Path(tmp) / "warm")  # warm-up
        base_s = run_baseline(broker.bootstrap, "bench-baseline", args.baseline_events)
        ours_s = run_meterline(broker.bootstrap, "bench-meterline", args.events,
                               Path(tmp) / "spool")
    base_rate = args.baseline_events / base_s
    our_rate = args.events / ours_s
    print(f"{'run':<34}{'events':>12}{'seconds':>10}{'events/s':>14}")
    print(f"{'baseline: produce() per event':<34}{args.baseline_events:>12,}{base_s:>10.2f}"
          f"{base_rate:>14,.0f}")
    print(f"{'meterline SDK (batched envelopes)':<34}{args.events:>12,}{ours_s:>10.2f}"
          f"{our_rate:>14,.0f}")
    print(f"ratio meterline / baseline: {our_rate / base_rate:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
