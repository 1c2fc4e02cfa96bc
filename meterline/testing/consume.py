"""Read a whole topic back as decoded batches (tests and benchmarks)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from meterline.core.envelope import Batch, decode_batch


def consume_batches(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list[Batch]], bool],
    timeout_s: float = 120.0,
    idle_s: float = 0.0,
) -> list[Batch]:
    """Consume ``topic`` from the beginning until ``until(batches)`` holds, then keep reading
    for ``idle_s`` more seconds (to catch duplicates arriving late). Bounded by timeout_s."""
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"verify-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.max.bytes": 64 * 1024 * 1024,
        }
    )
    consumer.subscribe([topic])
    batches: list[Batch] = []
    deadline = time.monotonic() + timeout_s
    done_at: float | None = None
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=500, timeout=0.5):
                if msg.error():
                    continue
                batches.append(decode_batch(msg.value()))
            if done_at is None and until(batches):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at >= idle_s:
                return batches
    finally:
        consumer.close()
    return batches


def event_count(batches: list[Batch]) -> int:
    return sum(len(b) for b in batches)
