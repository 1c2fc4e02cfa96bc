"""The upper-bound peer of benchmarks/e2e_rollups.py: a raw confluent-kafka consume loop that
only decodes Meterline envelopes (``decode_batch``), nothing else.

Run by ``rollups_peers.run_raw`` as a subprocess (its own process, like the worker): reads
the same usage topic the worker read, from the beginning, in a fresh group, with
librdkafka's default fetch settings, ``consume(1000, ...)`` batches and no commits.
Per record it keeps only the event count and the sum of quantities (one C-level ``sum``)
so the harness can check that every event was decoded. A run without new records for
``idle_timeout_s`` ends with an error instead of waiting forever.

``"client": "aiokafka"`` runs the same loop on aiokafka (the Kafka client under Faust,
so under ``meterline worker``): ``getmany(max_records=1000)`` in an asyncio loop, default
fetch settings. Same checks, same JSON.

Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


class Tally:
    """What both loops keep per record: decoded or refused, events, sum of quantities."""

    def __init__(self) -> None:
        from meterline.core.envelope import decode_batch
        from meterline.core.errors import EnvelopeError

        self._decode, self._refusal = decode_batch, EnvelopeError
        self.records = self.events = self.quantity = self.refused = 0

    def add(self, payload: bytes) -> None:
        try:
            b = self._decode(payload)
        except self._refusal:
            self.refused += 1
            return
        self.records += 1
        self.events += len(b.customers)
        self.quantity += sum(b.quantities)

    def report(self) -> dict[str, int]:
        return {"records": self.records, "events_decoded": self.events,
                "quantity_nanos": self.quantity, "refused": self.refused}


def main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    if cfg.get("client") == "aiokafka":
        import asyncio

        print(json.dumps(asyncio.run(_aiokafka(cfg))), flush=True)
        return 0
    from confluent_kafka import Consumer

    expected = int(cfg["records"])
    idle_s = float(cfg.get("idle_timeout_s", 60))
    perf = time.perf_counter
    assigned_at: list[float] = []

    def on_assign(_consumer: Any, partitions: Any) -> None:
        assigned_at.append(perf())

    consumer = Consumer({"bootstrap.servers": cfg["bootstrap"], "group.id": cfg["group"],
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([cfg["topic"]], on_assign=on_assign)
    tally, errors = Tally(), 0
    first = last = None
    progress_at = perf()
    try:
        while tally.records + tally.refused < expected:
            batch = consumer.consume(1000, 0.5)
            now = perf()
            if not batch:
                if now - progress_at > idle_s:
                    break  # reported: the harness sees records < expected
                continue
            progress_at = now
            if first is None:
                first = now
            for msg in batch:
                if msg.error() is not None:
                    errors += 1
                    continue
                tally.add(msg.value())
            last = perf()
    finally:
        consumer.close()
    start = assigned_at[-1] if assigned_at else first
    print(json.dumps({
        **tally.report(), "errors": errors,
        "seconds": None if start is None or last is None else round(last - start, 3),
        "seconds_first_to_last": None if first is None or last is None
        else round(last - first, 3),
    }), flush=True)
    return 0


async def _aiokafka(cfg: dict[str, Any]) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer

    expected = int(cfg["records"])
    idle_s = float(cfg.get("idle_timeout_s", 60))
    perf = time.perf_counter
    consumer = AIOKafkaConsumer(cfg["topic"], bootstrap_servers=cfg["bootstrap"],
                                group_id=cfg["group"], auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    start = perf()  # start() returns once the group is joined and partitions assigned
    tally = Tally()
    first = last = None
    progress_at = perf()
    try:
        while tally.records + tally.refused < expected:
            fetched = await consumer.getmany(timeout_ms=500, max_records=1000)
            now = perf()
            if not fetched:
                if now - progress_at > idle_s:
                    break
                continue
            progress_at = now
            if first is None:
                first = now
            for msgs in fetched.values():
                for msg in msgs:
                    tally.add(msg.value or b"")
            last = perf()
    finally:
        await consumer.stop()
    return {"client": "aiokafka", **tally.report(), "errors": 0,
            "seconds": None if last is None else round(last - start, 3),
            "seconds_first_to_last": None if first is None or last is None
            else round(last - first, 3)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
