from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from meterline.config import DEFAULT_METERS
from meterline.core.dedupe import BatchDeduper, EventDeduper
from meterline.core.envelope import Batch
from meterline.core.lateness import PartitionWatermark
from meterline.core.meters import MeterRegistry
from meterline.core.outputs import (
    WHOLE_RECORD,
    DeadLetterRecord,
    Flush,
    LateRecord,
    RollupRecord,
    group_key,
)
from meterline.core.rollup import Dedupers, RollupState
from meterline.core.windows import DAY_MS, HOUR_MS
from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.rollups import (
    DeadLetterCountsQuery,
    FlushCounts,
    LateEventsQuery,
    LateTotals,
    RollupTotalsQuery,
    RollupUsageQuery,
    RollupUsageRow,
    write_flush,
)

GROUP = (("region", "eu"),)
H = 1_789_999_200_000  # an hour start in 2026: pure tests need plausible times too


def _hour(now_ms: int, offset: int = 0) -> int:
    return now_ms - now_ms % HOUR_MS + offset * HOUR_MS


def _rollup(start_ms: int, **overrides: Any) -> RollupRecord:
    fields: dict[str, Any] = {
        "window": "hourly", "customer": "acme", "meter": "llm_tokens", "group": GROUP,
        "window_start_ms": start_ms, "window_end_ms": start_ms + HOUR_MS,
        "aggregation": "sum", "value_nanos": 1_500_000_000, "events": 3, "version": 3,
        "source": "usage", "partition": 0,
    }
    fields.update(overrides)
    if fields["window"] == "daily" and "window_end_ms" not in overrides:
        fields["window_end_ms"] = fields["window_start_ms"] + DAY_MS
    return RollupRecord(**fields)


def _dead(position: int = 0, **overrides: Any) -> DeadLetterRecord:
    fields: dict[str, Any] = {
        "source": "usage", "partition": 0, "offset": 10, "position": position,
        "batch_id": "b1", "event_id": f"b1-{position}", "reason": "event.unknown_meter",
        "payload": '{"meter":"nope","note":"ünïcode"}', "received_at_ms": 1_790_000_000_000,
    }
    fields.update(overrides)
    return DeadLetterRecord(**fields)


def _late(start_ms: int, event_id: str = "e1", **overrides: Any) -> LateRecord:
    fields: dict[str, Any] = {
        "source": "usage", "partition": 0, "offset": 11, "position": 0, "event_id": event_id,
        "customer": "acme", "meter": "llm_tokens", "group": GROUP,
        "quantity_nanos": 250_000_000, "timestamp_ms": start_ms + 5,
        "window_start_ms": start_ms, "received_at_ms": start_ms + 3 * HOUR_MS,
    }
    fields.update(overrides)
    return LateRecord(**fields)


class RecordingStorage:
    """Records inserts; stands in for storage where no SQL needs to run."""

    database = "meterline"

    def __init__(self) -> None:
        self.inserts: list[tuple[str, dict[str, Any], dict[str, str]]] = []

    def insert_columns(self, table: str, columns: Any, types: Any, settings: Any = None) -> None:
        self.inserts.append((table, dict(columns), dict(types)))

    def execute(self, sql: str, params: Any = None) -> None:
        raise AssertionError("no statements expected")

    def query_rows(self, sql: str, params: Any = None) -> list[Any]:
        raise AssertionError("no queries expected")

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- write_flush, pure


def test_write_flush_routes_records_to_their_tables() -> None:
    storage = RecordingStorage()
    flush = Flush(
        rollups=[_rollup(H), _rollup(H, window="daily"), _rollup(H + HOUR_MS, value_nanos=10**30)],
        dead_letters=[_dead()],
        late=[_late(H)],
    )
    counts = write_flush(storage, flush, database="billing", clock_ms=lambda: H + 77)
    assert counts == FlushCounts(hourly=2, daily=1, dead_letters=1, late=1)
    assert counts.total == 5
    tables = [table for table, _, _ in storage.inserts]
    assert tables == ["billing.hourly_rollups", "billing.daily_rollups", "billing.late_events",
                      "billing.dead_letters"]
    _, hourly, types = storage.inserts[0]
    assert hourly["value_nano"] == [1_500_000_000, 10**30]  # exact ints, beyond Int64 too
    assert types["value_nano"] == "Int128"
    assert hourly["group_key"] == ["region=eu", "region=eu"]
    assert hourly["dimensions"] == [{"region": "eu"}, {"region": "eu"}]
    assert hourly["updated_at_ms"] == [H + 77, H + 77]
    assert hourly["source_partition"] == [0, 0]
    _, late, late_types = storage.inserts[2]
    assert late["quantity_nano"] == [250_000_000]
    assert late_types["quantity_nano"] == "Int128"
    _, dead, _ = storage.inserts[3]
    assert dead["stage"] == ["rollup"]
    assert dead["payload"] == ['{"meter":"nope","note":"ünïcode"}'.encode()]


def test_write_flush_of_nothing_sends_nothing() -> None:
    storage = RecordingStorage()
    assert write_flush(storage, Flush()) == FlushCounts()
    assert storage.inserts == []


def test_write_flush_refuses_each_bad_row_and_writes_the_rest() -> None:
    """Old code: one bad row failed the whole flush (SinkConfigError), so the output loader
    and the embedded runner retried it forever. Now each row that storage cannot hold is
    a ``load`` dead letter with its reason and the good rows of the flush still land."""
    storage = RecordingStorage()
    good_hour, good_late = _rollup(H, customer="good"), _late(H, "ok")
    flush = Flush(
        rollups=[
            _rollup(H, value_nanos=1.5),
            good_hour,
            _rollup(H, window="weekly"),
            _rollup(H, window="daily", events=-1, version=True),
            _rollup(H + HOUR_MS, value_nanos=10**38),  # a window total beyond Decimal(38, 9)
        ],
        dead_letters=[_dead(position=2**31), _dead(3)],
        late=[_late(H, quantity_nanos=0.25), good_late],
    )
    counts = write_flush(storage, flush, clock_ms=lambda: H)
    assert (counts.hourly, counts.daily, counts.late, counts.dead_letters) == (1, 0, 1, 1)
    assert counts.refused == 5
    assert counts.refused_by_reason == {"load.out_of_range": 4, "load.bad_window": 1}
    by_table = {table.split(".")[1]: columns for table, columns, _ in storage.inserts
                if table.split(".")[1] != "dead_letters"}
    assert by_table["hourly_rollups"]["customer"] == ["good"]
    assert by_table["late_events"]["event_id"] == ["ok"]
    dead = [columns for table, columns, _ in storage.inserts if table.endswith("dead_letters")]
    assert [d["stage"] for d in dead] == [["rollup"], ["load"] * 5]
    assert dead[0]["position"] == [3]  # the unstorable dead letter is logged, not written
    refused = dict(zip(dead[1]["reason"], dead[1]["payload"], strict=True))
    reasons = sorted(refused)
    assert reasons[0].startswith("load.bad_window: window 'weekly'")
    assert any("value_nanos 100000000000000000000000000000000000000 outside" in r
               for r in reasons), reasons
    assert any("value_nanos must be an int, got float" in r for r in reasons), reasons
    assert any("events -1 outside" in r for r in reasons), reasons
    assert any("quantity_nanos must be an int" in r for r in reasons), reasons
    # the content is kept: the window row as JSON, the late event with its quantity
    overflow = next(p for r, p in refused.items() if "100000000000000000000000000000000000000" in r)
    assert b'"value_nanos": "100000000000000000000000000000000000000"' in overflow
    # a refused window keeps one identity across versions and replays: it collapses
    again = RecordingStorage()
    write_flush(again, Flush(rollups=[_rollup(H + HOUR_MS, value_nanos=10**38, version=9)]),
                clock_ms=lambda: H)
    position = again.inserts[-1][1]["position"]
    assert len(position) == 1 and position[0] in dead[1]["position"] and position[0] >= 0


def test_write_flush_refuses_an_unknown_dead_letter_stage() -> None:
    with pytest.raises(SinkConfigError, match="stage"):
        write_flush(RecordingStorage(), Flush(dead_letters=[_dead()]), stage="rating")


# --------------------------------------------------------------------------- query objects


def test_rollup_usage_query_sql_is_exact() -> None:
    sql, params = RollupUsageQuery("acme", "api_calls", 1_000, 2_000, "day",
                                   database="billing").to_sql()
    assert sql == (
        "SELECT window_start_ms, dimensions, value_exact, events,\n"
        "    late_events, late_pending\n"
        "FROM billing.daily_usage\n"
        "WHERE customer = {customer:String}\n"
        "  AND meter = {meter:String}\n"
        "  AND window_start_ms >= {start_ms:Int64}\n"
        "  AND window_start_ms < {end_ms:Int64}\n"
        "ORDER BY window_start_ms, group_key"
    )
    assert params == {"customer": "acme", "meter": "api_calls", "start_ms": 1_000,
                      "end_ms": 2_000}
    assert "FROM meterline.hourly_usage\n" in RollupUsageQuery("a", "m", 0, 1).to_sql()[0]


def test_rollup_usage_query_validation_collects_errors() -> None:
    query = RollupUsageQuery("a", "m", 5, 5, "week", database="x-y")
    with pytest.raises(SinkConfigError) as info:
        query.to_sql()
    assert len(info.value.errors) == 3
    with pytest.raises(SinkConfigError, match="start_ms must be int"):
        RollupUsageQuery("a", "m", 1.5, 5).to_sql()


def test_rollup_usage_query_values_never_reach_the_sql_text() -> None:
    sql, params = RollupUsageQuery("x' OR 1=1 --", "m", 0, 1).to_sql()
    assert "OR 1=1" not in sql
    assert params["customer"] == "x' OR 1=1 --"


def test_rollup_totals_query_sql() -> None:
    sql, params = RollupTotalsQuery().to_sql()
    assert sql == (
        "SELECT customer, meter, window_start_ms, sum(value_exact) AS value\n"
        "FROM meterline.hourly_usage\n"
        "GROUP BY customer, meter, window_start_ms\n"
        "ORDER BY customer, meter, window_start_ms"
    )
    assert params == {}
    sql, params = RollupTotalsQuery("day", customer="acme", meter="m").to_sql()
    assert "FROM meterline.daily_usage\nWHERE customer = {customer:String}\n" \
           "  AND meter = {meter:String}\nGROUP BY" in sql
    assert params == {"customer": "acme", "meter": "m"}


def test_late_and_dead_letter_queries_dedupe() -> None:
    sql, params = LateEventsQuery(meter="m", start_ms=0, end_ms=10).to_sql()
    assert sql == (
        "SELECT customer, meter, count() AS events,\n"
            "    sum(toDecimal256(quantity, 9)) AS quantity\n"
        "FROM (\n"
        "    SELECT customer, meter, first.1 AS quantity, first.2 AS window_start_ms\n"
        "    FROM (\n"
        "        SELECT customer, meter, event_id,\n"
        "            argMin((quantity, window_start_ms),\n"
        "                   (source_partition, source_offset, position)) AS first\n"
        "        FROM meterline.late_events\n"
        "        GROUP BY customer, meter, event_id\n"
        "    )\n"
        ")\n"
        "WHERE meter = {meter:String}\n"
        "  AND window_start_ms >= {start_ms:Int64}\n"
        "  AND window_start_ms < {end_ms:Int64}\n"
        "GROUP BY customer, meter\n"
        "ORDER BY customer, meter"
    )
    assert params == {"meter": "m", "start_ms": 0, "end_ms": 10}
    sql, params = DeadLetterCountsQuery(stage="raw", database="b").to_sql()
    assert "FROM b.dead_letters FINAL\nWHERE stage = {stage:String}\n" in sql
    assert params == {"stage": "raw"}
    with pytest.raises(SinkConfigError):
        LateEventsQuery(start_ms=10, end_ms=0).to_sql()


def test_parse_converts_decimals_exactly_and_refuses_floats() -> None:
    query = RollupUsageQuery("a", "m", 0, 1)
    rows = query.parse([(0, {"k": "v"}, Decimal("99999999999999999999.000000001"), 2, 1, 0)])
    assert rows == [RollupUsageRow(0, {"k": "v"}, 99999999999999999999 * 10**9 + 1, 2, 1)]
    with pytest.raises(SinkError):
        query.parse([(0, {}, 0.1, 1, 0, 0)])
    with pytest.raises(SinkError):
        RollupTotalsQuery().parse([("a", "m", 0, 0.1)])


# --------------------------------------------------------------------------- against chDB


def _usage(storage: Any, start_ms: int, granularity: str = "hour", meter: str = "llm_tokens",
           customer: str = "acme") -> list[RollupUsageRow]:
    return RollupUsageQuery(customer, meter, start_ms - DAY_MS, start_ms + DAY_MS,
                            granularity,
                            database=storage.database).run(storage)


def test_written_rollups_read_back_exactly(migrated_storage: Any, now_ms: int) -> None:
    h0, h1 = _hour(now_ms, -1), _hour(now_ms)
    day = now_ms - now_ms % DAY_MS
    big = 10**38 - 1  # the largest Decimal(38, 9) value, far beyond Int64
    flush = Flush(rollups=[
        _rollup(h0, value_nanos=big, events=2, version=2),
        _rollup(h1, group=(("region", "us&eu=%"),), value_nanos=7, events=1, version=1),
        _rollup(h1, value_nanos=100_000_000, events=1, version=1),
        _rollup(day, window="daily", value_nanos=42, events=4, version=4),
    ])
    assert write_flush(migrated_storage, flush) == FlushCounts(hourly=3, daily=1)
    assert _usage(migrated_storage, h0) == [
        RollupUsageRow(h0, {"region": "eu"}, big, 2),
        RollupUsageRow(h1, {"region": "eu"}, 100_000_000, 1),
        RollupUsageRow(h1, {"region": "us&eu=%"}, 7, 1),
    ]
    assert _usage(migrated_storage, day, "day") == [RollupUsageRow(day, {"region": "eu"}, 42, 4)]
    db = migrated_storage.database
    keys = migrated_storage.query_rows(
        f"SELECT DISTINCT group_key FROM {db}.hourly_rollups ORDER BY 1")
    assert keys == [("region=eu",), ("region=us%26eu%3D%25",)]
    totals = RollupTotalsQuery("hour", database=db).run(migrated_storage)
    assert totals == {("acme", "llm_tokens", h0): big, ("acme", "llm_tokens", h1): 100_000_007}


def test_writing_the_same_flush_twice_shows_each_row_once(
    migrated_storage: Any, now_ms: int
) -> None:
    h0 = _hour(now_ms, -1)
    flush = Flush(
        rollups=[_rollup(h0), _rollup(h0 - h0 % DAY_MS, window="daily")],
        dead_letters=[_dead(WHOLE_RECORD, event_id="", batch_id=""), _dead(0), _dead(1)],
        late=[_late(h0, "e1"), _late(h0, "e2", meter="api_calls")],
    )
    for clock in (1, 2):  # a retry after a crash writes it again, at another time
        write_flush(migrated_storage, flush, clock_ms=lambda c=clock: c)
    db = migrated_storage.database
    # The late llm_tokens event is restated into its hour and day, once (1.5 + 0.25).
    assert _usage(migrated_storage, h0) == [RollupUsageRow(h0, {"region": "eu"},
                                                           1_750_000_000, 4, 1)]
    assert _usage(migrated_storage, h0, "day")[0].events == 4
    late = LateEventsQuery(database=db).run(migrated_storage)
    assert late == {("acme", "api_calls"): LateTotals(1, 250_000_000),
                    ("acme", "llm_tokens"): LateTotals(1, 250_000_000)}
    assert DeadLetterCountsQuery(database=db).run(migrated_storage) == {
        "event.unknown_meter": 3}
    assert DeadLetterCountsQuery(stage="raw", database=db).run(migrated_storage) == {}
    # still one row each after merges physically collapse them
    for table in ("hourly_rollups", "daily_rollups", "late_events", "dead_letters"):
        migrated_storage.execute(f"OPTIMIZE TABLE {db}.{table} FINAL")
    counts = [migrated_storage.query_rows(f"SELECT count() FROM {db}.{t}")[0][0]
              for t in ("hourly_rollups", "daily_rollups", "late_events", "dead_letters")]
    assert counts == [1, 1, 2, 3]
    payload = migrated_storage.query_rows(
        f"SELECT payload FROM {db}.dead_letters FINAL WHERE position = 0")
    assert payload == [('{"meter":"nope","note":"ünïcode"}',)]


def test_the_highest_version_wins_whatever_the_write_order(
    migrated_storage: Any, now_ms: int
) -> None:
    h0 = _hour(now_ms, -1)
    newer = _rollup(h0, value_nanos=900, events=9, version=9)
    older = _rollup(h0, value_nanos=100, events=1, version=1)
    write_flush(migrated_storage, Flush(rollups=[newer]))
    write_flush(migrated_storage, Flush(rollups=[older]))  # a stale replay arrives last
    assert _usage(migrated_storage, h0) == [RollupUsageRow(h0, {"region": "eu"}, 900, 9)]


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("sum", 3_000 + 500),
        ("count", 3_000 + 500),
        ("unique_count", 3_000 + 500),  # exact only if users do not span partitions
        ("min", 500),
        ("max", 3_000),
        ("latest", 500),  # deterministic: the row of the greatest (source, partition)
    ],
)
def test_views_combine_source_partitions_per_aggregation(
    migrated_storage: Any, now_ms: int, aggregation: str, expected: int
) -> None:
    h0 = _hour(now_ms, -1)
    rows = [
        _rollup(h0, aggregation=aggregation, value_nanos=3_000, events=3, version=3,
                partition=0),
        _rollup(h0, aggregation=aggregation, value_nanos=500, events=2, version=2,
                partition=1),
    ]
    write_flush(migrated_storage, Flush(rollups=rows))
    write_flush(migrated_storage, Flush(rollups=rows[::-1]))
    assert _usage(migrated_storage, h0) == [RollupUsageRow(h0, {"region": "eu"}, expected, 5)]
    db = migrated_storage.database
    parts = migrated_storage.query_rows(f"SELECT source_partitions FROM {db}.hourly_usage")
    assert parts == [(2,)]


def test_write_flush_on_an_empty_database_with_nothing_to_write(chdb_storage: Any) -> None:
    # no tables exist: an empty flush must not touch storage
    assert write_flush(chdb_storage, Flush()) == FlushCounts()


def test_rollups_of_the_real_core_match_ground_truth_across_replayed_flushes(
    migrated_storage: Any, now_ms: int
) -> None:
    """Core rollup state -> flushes -> ClickHouse, with stale flushes re-written at the end:
    the views give the exact per-(customer, meter, window) totals of the events."""
    registry = MeterRegistry.load(DEFAULT_METERS)
    rng = random.Random(7)
    start = _hour(now_ms, -3)
    state, watermark = RollupState(), PartitionWatermark()
    dedupers = Dedupers(BatchDeduper(), EventDeduper())
    truth: dict[tuple[str, str, int], int] = defaultdict(int)
    daily_truth: dict[tuple[str, str, int], int] = defaultdict(int)
    flushes: list[Flush] = []
    ts = start
    for chunk in range(3):
        dirty: set[Any] = set()
        for b in range(20):
            n = 50
            customers = [f"c{rng.randrange(5)}" for _ in range(n)]
            meters = [rng.choice(["llm_tokens", "api_calls"]) for _ in range(n)]
            quantities = [rng.randrange(1, 10**12) if m == "llm_tokens" else 1 for m in meters]
            stamps = [ts + i * 1_000 for i in range(n)]
            dims: list[dict[str, str] | None] = [
                {"model": rng.choice(["a", "b"])} if m == "llm_tokens"
                else {"region": rng.choice(["eu", "us"])} for m in meters
            ]
            ts += n * 1_000 + 120_000
            batch = Batch(f"b{chunk}-{b}", stamps[-1], customers, meters, quantities, stamps,
                          dimensions=dims)
            out = state.apply_batch(batch, registry, dedupers, watermark, stamps[-1])
            assert out.accepted == n
            dirty |= out.dirty
            for c, m, q, t in zip(customers, meters, quantities, stamps, strict=True):
                value = q if m == "llm_tokens" else 10**9  # a count of 1 is 10**9 nanos
                truth[(c, m, t - t % HOUR_MS)] += value
                daily_truth[(c, m, t - t % DAY_MS)] += value
        flushes.append(Flush(rollups=[
            RollupRecord(window=r.window, customer=r.customer, meter=r.meter, group=r.group,
                         window_start_ms=r.window_start_ms, window_end_ms=r.window_end_ms,
                         aggregation=r.aggregation, value_nanos=r.value_nanos,
                         events=r.events, version=r.version, source="usage", partition=0)
            for r in state.snapshot(dirty)
        ]))
    assert ts > start + 2 * HOUR_MS, "the data spans several hourly windows"
    for flush in (*flushes, flushes[0], flushes[1]):
        write_flush(migrated_storage, flush)
    db = migrated_storage.database
    assert RollupTotalsQuery("hour", database=db).run(migrated_storage) == dict(truth)
    assert RollupTotalsQuery("day", database=db).run(migrated_storage) == dict(daily_truth)
    one = RollupTotalsQuery("hour", customer="c1", meter="llm_tokens", database=db)
    assert one.run(migrated_storage) == {k: v for k, v in truth.items()
                                         if k[:2] == ("c1", "llm_tokens")}
    # group-level rows carry their dimension map and group_key
    rows = migrated_storage.query_rows(
        f"SELECT DISTINCT meter, group_key, dimensions FROM {db}.hourly_usage ORDER BY 1, 2")
    assert rows == [
        ("api_calls", group_key((("endpoint", ""), ("region", "eu"))),
         {"endpoint": "", "region": "eu"}),
        ("api_calls", group_key((("endpoint", ""), ("region", "us"))),
         {"endpoint": "", "region": "us"}),
        ("llm_tokens", "model=a", {"model": "a"}),
        ("llm_tokens", "model=b", {"model": "b"}),
    ]


def test_rollup_record_round_trip_through_dicts_still_writes(
    migrated_storage: Any, now_ms: int
) -> None:
    # what a Kafka hop (to_dict/from_dict) hands the loader must write identically
    h0 = _hour(now_ms, -1)
    record = _rollup(h0, value_nanos=10**37)
    again = RollupRecord.from_dict(record.to_dict())
    assert again == record
    write_flush(migrated_storage, Flush(rollups=[record, replace(again, version=4)]))
    assert _usage(migrated_storage, h0)[0].value_nanos == 10**37


def test_column_blocks_land_exactly_as_the_same_rows_as_records(chdb_engine: Any) -> None:
    """The output loader hands write_flush column blocks (RollupBlock) instead of records:
    the same rows, refusals included (a window kind the tables do not have, a total past
    Decimal(38, 9), a window past its retention), land identically either way."""
    import uuid

    import orjson

    from meterline.core.outputs import Flush, RollupBlock, RollupRecord, rollup_columns
    from meterline.core.quantity import MAX_NANOS
    from meterline.sinks.chdb_backend import ChdbStorage
    from meterline.sinks.schema import migrate

    now = time.time_ns() // 1_000_000
    hour, day = now - now % HOUR_MS, now - now % DAY_MS

    def row(window: str, customer: str, start: int, value: int, **kw: Any) -> RollupRecord:
        size = HOUR_MS if window == "hourly" else DAY_MS
        return RollupRecord(window, customer, kw.get("meter", "llm_tokens"),
                            kw.get("group", (("model", "s"),)), start, start + size, "sum",
                            value, 2, 3, "usage", 1)

    rows = [row("hourly", "a", hour, 5), row("daily", "a", day, 5),
            row("weekly", "b", hour, 1), row("hourly", "c", hour, MAX_NANOS + 1),
            row("hourly", "d", hour - 500 * DAY_MS, 9), row("hourly", "e", hour, -3, group=())]
    by_window = [rows[0], rows[3], rows[5]]  # one kind per block, as the worker sends

    def wire(block_rows: list[RollupRecord]) -> Any:  # as the loader reads it off Kafka
        return orjson.loads(orjson.dumps(rollup_columns(block_rows)))

    def arrow(*blocks: list[RollupRecord]) -> list[Any]:  # as the loader decodes them
        from meterline.sinks.rollup_arrow import decode_block, encode_rows

        return [decode_block(encode_rows(b)) for b in blocks]

    shown = []
    for form in ("records", "mixed block", "blocks by window", "arrow", "arrow, clean apart"):
        storage = ChdbStorage(chdb_engine.data_dir, f"test_{uuid.uuid4().hex[:12]}")
        try:
            migrate(storage)
            if form == "records":
                flush = Flush(rollups=list(rows))
            elif form == "mixed block":
                flush = Flush(rollup_blocks=[RollupBlock.from_doc(wire(rows))])
            elif form == "blocks by window":
                flush = Flush(rollups=[r for r in rows if r not in by_window],
                              rollup_blocks=[RollupBlock.from_doc(wire(by_window))])
            elif form == "arrow":  # the hourly block has rows to refuse: the list path
                flush = Flush(arrow_blocks=arrow([rows[0], rows[3], rows[4], rows[5]],
                                                 [rows[1]], [rows[2]]))
            else:  # the clean blocks take the Arrow insert, the others the list path
                flush = Flush(arrow_blocks=arrow([rows[0], rows[5]], [rows[1]], [rows[2]],
                                                 [rows[3]], [rows[4]]))
            arrow_inserts: list[int] = []
            insert_arrow = storage.insert_arrow

            def counted(table: str, data: Any, *args: Any,
                        insert_arrow: Any = insert_arrow, seen: Any = arrow_inserts) -> None:
                seen.append(data.num_rows)
                insert_arrow(table, data, *args)

            storage.insert_arrow = counted  # type: ignore[method-assign]
            counts = write_flush(storage, flush, database=storage.database)
            # Only clean Arrow blocks go in as Arrow tables (hourly rows, then daily).
            assert arrow_inserts == {"arrow": [1], "arrow, clean apart": [2, 1]}.get(form, [])
            db = storage.database
            tables = [storage.query_rows(
                f"SELECT customer, window_start_ms, toString(value), events, version, group_key, "
                f"dimensions FROM {db}.{t} FINAL ORDER BY customer")
                for t in ("hourly_rollups", "daily_rollups")]
            dead = storage.query_rows(f"SELECT reason, payload FROM {db}.dead_letters FINAL "
                                      "ORDER BY reason")
            shown.append((counts.hourly, counts.daily, counts.refused, tables, dead))
        finally:
            storage.execute(f"DROP DATABASE IF EXISTS {storage.database} SYNC")
            storage.close()
    assert shown[0] == shown[1] == shown[2] == shown[3] == shown[4]
    hourly_n, daily_n, refused, _, dead = shown[0]
    assert (hourly_n, daily_n, refused) == (2, 1, 3)
    assert [r.split(":")[0] for r, _ in dead] == ["load.bad_window", "load.out_of_range",
                                                  "load.outside_retention"]
