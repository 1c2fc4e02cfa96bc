"""AnomalyWorker: the write -> checkpoint -> commit protocol over a rollups log, with
crashes at random points (state lost, whatever was written stays written), write
failures and gaps. The reference is an uninterrupted run over the same log."""

from __future__ import annotations

import random
from collections import defaultdict

import orjson
import pytest

from meterline.aggregators.anomaly_stage import AnomalyWorker, MemoryEventWriter
from meterline.aggregators.checkpoints import MemoryCheckpointStore
from meterline.aggregators.runner import LogGapError, TopicPartition
from meterline.anomaly_demo import rollup_rows, synthetic_usage
from meterline.core.anomaly import AnomalySettings
from meterline.core.anomaly.feed import FeedSettings
from meterline.ingest.sources import SourceRecord

TOPIC = "usage.rollups"
SETTINGS = AnomalySettings(min_abs_deviation=20)
FEED = FeedSettings()


def _log(partitions: int = 2, seed: int = 11) -> dict[int, list[SourceRecord]]:
    usage = synthetic_usage(10, 15, seed)
    keys = sorted(usage)
    for i, key in enumerate(keys[:4]):
        h = 10 * 24 + 11 + 17 * i
        usage[key][h] = usage[key][h] * 25 + 1000
    out: dict[int, list[SourceRecord]] = defaultdict(list)
    for record in rollup_rows(usage, partitions=4, replay_every=9):
        p = record[0].partition % partitions  # two source partitions share a log partition
        payload = orjson.dumps({"rollups": [r.to_dict() for r in record]})
        out[p].append(SourceRecord(TOPIC, p, len(out[p]), payload))
    return out


def _worker(writer: MemoryEventWriter, store: MemoryCheckpointStore) -> AnomalyWorker:
    return AnomalyWorker(SETTINGS, FEED, writer, store, group="g", checkpoint_interval_s=1e9,
                         flush_interval_s=1e9)


def _reference(log: dict[int, list[SourceRecord]]) -> dict[str, dict]:
    writer = MemoryEventWriter()
    worker = _worker(writer, MemoryCheckpointStore())
    worker.assign([TopicPartition(TOPIC, p) for p in log])
    for p in sorted(log):
        for rec in log[p]:
            assert worker.process(rec) is None
    worker.flush(checkpoint=True)
    keys = [e.key for e in writer.events]
    assert len(keys) == len(set(keys))
    return {e.key: e.to_dict() for e in writer.events}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_crashes_at_random_points_neither_lose_nor_change_an_event(seed: int) -> None:
    log = _log()
    want = _reference(log)
    assert any(v["kind"] == "open" for v in want.values())
    rng = random.Random(seed)
    writer, store = MemoryEventWriter(), MemoryCheckpointStore()
    tps = [TopicPartition(TOPIC, p) for p in log]
    crashes = 0
    while True:
        worker = _worker(writer, store)
        positions = worker.assign(tps)
        cursors = {tp.partition: positions[tp] or 0 for tp in tps}
        done = True
        while any(cursors[p] < len(log[p]) for p in log):
            p = rng.choice([p for p in log if cursors[p] < len(log[p])])
            assert worker.process(log[p][cursors[p]]) is None
            cursors[p] += 1
            roll = rng.random()
            if roll < 0.05:
                worker.flush(checkpoint=rng.random() < 0.5)
            elif roll < 0.07 and crashes < 12:
                crashes += 1
                done = False
                break  # kill -9: the worker's memory is gone, written events stay
        if done:
            worker.flush(checkpoint=True)
            break
    assert crashes >= 5
    got: dict[str, dict] = {}
    for e in writer.events:
        assert got.setdefault(e.key, e.to_dict()) == e.to_dict(), e.key  # copies identical
    assert got == want


def test_a_failed_write_keeps_the_events_and_takes_no_checkpoint() -> None:
    log = _log(partitions=1)
    writer, store = MemoryEventWriter(), MemoryCheckpointStore()
    worker = _worker(writer, store)
    tp = TopicPartition(TOPIC, 0)
    worker.assign([tp])
    for rec in log[0]:
        worker.process(rec)
    pending = worker.processors[tp].pending
    assert pending
    writer.fail = True
    with pytest.raises(RuntimeError):
        worker.flush(checkpoint=True)
    assert store.saves == 0 and worker.processors[tp].pending == pending
    writer.fail = False
    assert worker.flush(checkpoint=True) == {tp: len(log[0])}
    assert len(writer.events) == pending and store.saves == 1


class _Probe:
    def __init__(self, start: int, present: list[int]) -> None:
        self.start, self.present = start, present

    def log_start(self, tp: TopicPartition) -> int:
        return self.start

    def first_offset(self, tp: TopicPartition, from_offset: int) -> int | None:
        return next((o for o in self.present if o >= from_offset), None)

    def committed(self, group: str, tp: TopicPartition) -> int | None:
        return None


def test_gaps_seek_back_move_past_empty_offsets_or_stop() -> None:
    log = _log(partitions=1)[0]
    tp = TopicPartition(TOPIC, 0)

    def started(probe: _Probe) -> AnomalyWorker:
        worker = AnomalyWorker(SETTINGS, FEED, MemoryEventWriter(), MemoryCheckpointStore(),
                               group="g", probe=probe)
        worker.assign([tp])
        worker.process(log[0])
        return worker

    worker = started(_Probe(0, list(range(len(log)))))
    gap = worker.process(log[3])
    assert gap is not None and worker.resolve_gap(gap) == 1  # the log holds 1, 2: seek back
    assert worker.processors[tp].next_offset == 1
    worker = started(_Probe(0, [0, 3]))  # offsets 1, 2 hold no record (txn markers)
    gap = worker.process(log[3])
    assert gap is not None
    assert worker.resolve_gap(gap) is None and worker.process(log[3]) is None
    assert worker.processors[tp].next_offset == 4
    worker.flush(checkpoint=True)
    worker.probe = _Probe(10, list(range(10, len(log))))  # retention deleted 4..9
    gap = worker.process(log[10])
    assert gap is not None
    with pytest.raises(LogGapError, match="are gone"):
        worker.resolve_gap(gap)


def test_an_unreadable_record_is_counted_and_skipped() -> None:
    writer = MemoryEventWriter()
    worker = _worker(writer, MemoryCheckpointStore())
    tp = TopicPartition(TOPIC, 0)
    worker.assign([tp])
    assert worker.process(SourceRecord(TOPIC, 0, 0, b"not json")) is None
    assert worker.process(SourceRecord(TOPIC, 0, 1, b'{"rollups": [{"window": 1}]}')) is None
    assert worker.totals().unreadable_records == 2
    assert worker.processors[tp].next_offset == 2
