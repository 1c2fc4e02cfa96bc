"""Every ClickHouse panel of dashboards/consumption.json, run on chDB as Grafana runs it.

The SQL is expanded the way Grafana and the ClickHouse plugin do (meterline.grafana), for
several variable selections, and executed on usage seeded through the real write path
(tests/dashboards/conftest.py). Columns are checked for every panel and annotation; rows
are checked against totals computed here from the seeded events, exactly (Decimal), for
every panel, and the anomaly annotation and table against the seeded episodes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest

from meterline.grafana import (
    ALL,
    CLICKHOUSE_PLUGIN,
    QueryContext,
    Target,
    Variable,
    annotation_targets,
    expand,
    load_dashboard,
    targets,
)
from meterline.sinks.rollups import DeadLetterCountsQuery, LateEventsQuery
from meterline.workload import SyntheticEvent

pytestmark = pytest.mark.timeout(300)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WINDOW_MS = {"hourly": HOUR_MS, "daily": DAY_MS}
DASHBOARD = load_dashboard("consumption")
CLICKHOUSE_TARGETS = [t for t in [*targets(DASHBOARD), *annotation_targets(DASHBOARD)]
                      if t.datasource_type == CLICKHOUSE_PLUGIN]

DEC = "Decimal(38, 9)"
METER = ("meter", "LowCardinality(String)")
TIME = ("time", "DateTime('UTC')")
USAGE = [TIME, METER, ("value", DEC)]
EXPECTED_COLUMNS = {
    "Usage per hour": USAGE,
    "Usage per day": USAGE,
    "Top customers": [METER, ("customer", "String"), ("total", DEC), ("events", "UInt64")],
    "Selected range vs the range before": [METER, ("selected_range", DEC),
                                           ("range_before", DEC),
                                           ("change_percent", "Nullable(Float64)")],
    "Usage of $customer per $interval window": USAGE,
    "Breakdown by dimension group: $customer": [METER, ("dimension_group", "String"),
                                                ("total", DEC), ("events", "UInt64")],
    "Late events": [METER, ("late_events", "UInt64"), ("customers", "UInt64"),
                    ("quantity", DEC)],
    "Late events by arrival time": [TIME, METER, ("late_events", "UInt64")],
    "Dead letters by reason": [("stage", "LowCardinality(String)"), ("reason_code", "String"),
                               ("dead_letters", "UInt64")],
    "Dead letters per minute": [TIME, ("stage", "LowCardinality(String)"),
                                ("per_minute", "Float64")],
    # An annotation: Grafana reads time, timeEnd, text and tags by name.
    "Anomalies": [("time", "DateTime64(3, 'UTC')"), ("timeEnd", "DateTime64(3, 'UTC')"),
                  ("text", "String"), ("tags", "Array(String)")],
    "Open anomalies": [("since", "DateTime64(3, 'UTC')"), ("customer", "String"), METER,
                       ("dimension_group", "String"), ("direction", "String"),
                       ("severity", "String"), ("explanation", "String")],
}
SUBSET = ["api_calls", "llm_tokens", "storage_gb"]


# --------------------------------------------------------------------------- ground truth


def _decimal(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(value)


class Truth:
    """What the views must say, from the seeded events alone (no Meterline aggregation)."""

    def __init__(self, events: Sequence[SyntheticEvent], registry: Any) -> None:
        self.registry = registry
        self.kind = {name: registry.get(name).aggregation.value for name in registry.names}
        self.cells: dict[str, dict[tuple[str, str, str, int], Decimal]] = {}
        self.events: dict[str, dict[tuple[str, str, str, int], int]] = {}
        for granularity, size in WINDOW_MS.items():
            values: dict[tuple[str, str, str, int], Any] = {}
            counts: dict[tuple[str, str, str, int], int] = defaultdict(int)
            for e in events:
                spec = registry.get(e.meter)
                group = "&".join(f"{d}={e.dimensions.get(d, '')}" for d in spec.group_by)
                key = (e.customer, e.meter, group, e.timestamp_ms - e.timestamp_ms % size)
                q, kind, old = _decimal(e.quantity), self.kind[e.meter], values.get(key)
                counts[key] += 1
                if kind == "count":
                    values[key] = (old or 0) + 1
                elif kind == "sum":
                    values[key] = (old or 0) + q
                elif kind == "max":
                    values[key] = q if old is None else max(old, q)
                elif kind == "min":
                    values[key] = q if old is None else min(old, q)
                elif kind == "unique_count":
                    values.setdefault(key, set()).add(e.dimensions[spec.value_property])
                else:
                    raise AssertionError(f"no truth for {kind}")
            self.cells[granularity] = {k: Decimal(len(v)) if isinstance(v, set) else
                                       Decimal(v) for k, v in values.items()}
            self.events[granularity] = dict(counts)

    def windows(self, granularity: str, lo_ms: int, hi_ms: int, *,
                meters: Iterable[str] | None = None, customer: str | None = None,
                ) -> Iterable[tuple[tuple[str, str, str, int], Decimal, int]]:
        """Cells of windows overlapping [lo_ms, hi_ms)."""
        size, wanted = WINDOW_MS[granularity], set(meters) if meters is not None else None
        for key, value in self.cells[granularity].items():
            c, m, _, start = key
            if (start < hi_ms and start + size > lo_ms
                    and (wanted is None or m in wanted)
                    and (customer is None or c == customer)):
                yield key, value, self.events[granularity][key]

    def combine(self, meter: str, per_window: dict[int, Decimal]) -> Decimal:
        """A meter's per-window values over several windows, as the dashboard combines them."""
        kind = self.kind[meter]
        if kind == "max":
            return max(per_window.values())
        if kind == "min":
            return min(per_window.values())
        if kind == "latest":
            return per_window[max(per_window)]
        return Decimal(sum(per_window.values()))

    def series(self, granularity: str, lo_ms: int, hi_ms: int, meters: Iterable[str],
               customer: str | None = None) -> dict[tuple[int, str], Decimal]:
        out: dict[tuple[int, str], Decimal] = defaultdict(Decimal)
        for (_, m, _, start), value, _ in self.windows(granularity, lo_ms, hi_ms,
                                                       meters=meters, customer=customer):
            out[(start // 1000, m)] += value
        return dict(out)

    def top(self, granularity: str, lo_ms: int, hi_ms: int, meters: Iterable[str],
            limit: int = 10) -> list[tuple[str, str, Decimal, int]]:
        per: dict[tuple[str, str], dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        events: dict[tuple[str, str], int] = defaultdict(int)
        for (c, m, _, start), value, n in self.windows(granularity, lo_ms, hi_ms,
                                                       meters=meters):
            per[(m, c)][start] += value
            events[(m, c)] += n
        rows = sorted(((m, c, self.combine(m, windows), events[(m, c)])
                       for (m, c), windows in per.items()),
                      key=lambda r: (r[0], -r[2], r[1]))
        out, taken = [], defaultdict(int)
        for row in rows:
            if taken[row[0]] < limit:
                out.append(row)
                taken[row[0]] += 1
        return out

    def breakdown(self, granularity: str, lo_ms: int, hi_ms: int, meters: Iterable[str],
                  customer: str | None) -> dict[tuple[str, str], tuple[Decimal, int]]:
        per: dict[tuple[str, str], dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        events: dict[tuple[str, str], int] = defaultdict(int)
        for (_, m, g, start), value, n in self.windows(granularity, lo_ms, hi_ms,
                                                       meters=meters, customer=customer):
            per[(m, g or "(no dimensions)")][start] += value
            events[(m, g or "(no dimensions)")] += n
        return {key: (self.combine(key[0], w), events[key]) for key, w in per.items()}

    def periods(self, from_ms: int, to_ms: int, meters: Iterable[str],
                ) -> dict[str, tuple[Decimal, Decimal]]:
        before_ms = from_ms - (to_ms - from_ms)
        current: dict[str, dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        previous: dict[str, dict[int, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        for (_, m, _, start), value, _ in self.windows("hourly", before_ms, to_ms,
                                                       meters=meters):
            side = current if start + HOUR_MS > from_ms else previous
            side[m][start] += value
        return {m: (self.combine(m, current[m]) if current[m] else Decimal(0),
                    self.combine(m, previous[m]) if previous[m] else Decimal(0))
                for m in set(current) | set(previous)}


@pytest.fixture(scope="module")
def truth(seeded_usage: Any) -> Truth:
    # Late usage is restated into the usage views (docs/rollups.md): the seed's late events
    # are 10 h behind, well within the 35-day restatement horizon, and of sum/count meters,
    # so each belongs in its window like an on-time event.
    registry = seeded_usage.registry
    assert {registry.get(e.meter).aggregation.value for e in seeded_usage.late} <= {
        "sum", "count"}
    return Truth([*seeded_usage.counted, *seeded_usage.late], registry)


# --------------------------------------------------------------------------- running panels


def _range(seeded: Any) -> tuple[int, int]:
    to_ms = (seeded.data_end_ms + 10 * 60_000) // 1000 * 1000  # covers the dead letters
    return to_ms - 30 * HOUR_MS, to_ms


def _options(seeded: Any, name: str) -> list[str]:
    """A query variable's options, from the variable's own query as Grafana runs it."""
    (var,) = [v for v in DASHBOARD["templating"]["list"] if v["name"] == name]
    lo, hi = _range(seeded)
    ctx = QueryContext(lo, hi, HOUR_MS, {"database": Variable(seeded.database)})
    return [str(r[0]) for r in seeded.storage.query_rows(expand(var["query"], ctx))]


def _context(seeded: Any, *, interval: str = "hourly", customer: str = ALL,
             meters: Sequence[str] = (ALL,), interval_ms: int = HOUR_MS) -> QueryContext:
    lo, hi = _range(seeded)
    return QueryContext(lo, hi, interval_ms, {
        "database": Variable(seeded.database),
        "interval": Variable(interval),
        "customer": Variable(customer, _options(seeded, "customer")),
        "meter": Variable(list(meters), _options(seeded, "meter")),
    })


def _panel(title: str) -> Target:
    (found,) = [t for t in CLICKHOUSE_TARGETS if t.panel_title == title]
    return found


def _run(seeded: Any, title: str, ctx: QueryContext) -> list[tuple[Any, ...]]:
    return seeded.storage.query_rows(expand(str(_panel(title).target["rawSql"]), ctx))


def _epoch_s(value: Any) -> int:
    return int(value.timestamp()) if isinstance(value, datetime) else int(value)


def _series(rows: Sequence[tuple[Any, ...]]) -> dict[tuple[int, str], Decimal]:
    out = {(_epoch_s(t), str(m)): _decimal(v) for t, m, v in rows}
    assert len(out) == len(rows), "one row per (time, meter)"
    return out


CONTEXTS = [
    {"interval": interval, "customer": customer, "meters": meters}
    for interval in ("hourly", "daily")
    for customer in (ALL, "cust-00001")
    for meters in ((ALL,), tuple(SUBSET))
]


def test_the_seed_went_through_the_real_write_path(seeded_usage: Any) -> None:
    c = seeded_usage.counters
    assert c.accepted == len(seeded_usage.counted) and c.late == len(seeded_usage.late)
    assert c.rejected == seeded_usage.rejected_events + seeded_usage.rejected_records


def test_every_panel_has_column_expectations() -> None:
    titles = [t.panel_title for t in CLICKHOUSE_TARGETS]
    assert len(titles) == len(set(titles)), "one query per ClickHouse panel"
    assert set(titles) == set(EXPECTED_COLUMNS)


@pytest.mark.parametrize("selection", CONTEXTS, ids=lambda s: "-".join(
    [s["interval"], "all" if s["customer"] == ALL else s["customer"],
     "all" if s["meters"] == (ALL,) else "subset"]))
def test_every_panel_runs_with_its_columns(seeded_usage: Any, selection: dict[str, Any]) -> None:
    ctx = _context(seeded_usage, **selection)
    for target in CLICKHOUSE_TARGETS:
        sql = expand(str(target.target["rawSql"]), ctx)
        described = seeded_usage.storage.query_rows(f"DESCRIBE TABLE ({sql})")
        columns = [(str(r[0]), str(r[1])) for r in described]
        assert columns == EXPECTED_COLUMNS[target.panel_title], target.panel_title
        rows = seeded_usage.storage.query_rows(sql)
        if target.target["format"] == 0:  # time series: time first, in order
            times = [_epoch_s(r[0]) for r in rows]
            assert times == sorted(times), target.panel_title
        if selection["meters"] != (ALL,) and columns[0] == METER:
            assert {str(r[0]) for r in rows} <= set(SUBSET), target.panel_title


def test_variable_queries_list_customers_and_meters(seeded_usage: Any) -> None:
    customers = {e.customer for e in seeded_usage.counted}
    assert _options(seeded_usage, "customer") == sorted(customers)
    assert _options(seeded_usage, "meter") == sorted({e.meter for e in seeded_usage.counted})


# --------------------------------------------------------------------------- headline panels


@pytest.mark.parametrize("meters", [(ALL,), tuple(SUBSET)], ids=["all-meters", "subset"])
def test_usage_per_hour_and_day_equal_the_ground_truth(seeded_usage: Any, truth: Truth,
                                                       meters: tuple[str, ...]) -> None:
    ctx = _context(seeded_usage, meters=meters)
    wanted = truth.kind.keys() if meters == (ALL,) else meters
    for title, granularity in (("Usage per hour", "hourly"), ("Usage per day", "daily")):
        got = _series(_run(seeded_usage, title, ctx))
        want = truth.series(granularity, ctx.from_ms, ctx.to_ms, wanted)
        assert got == want, title
        assert len({start for start, _ in got}) >= (30 if granularity == "hourly" else 2)
    # The range really cuts the data: the seed spans 72 h, the range 30 h.
    everything = truth.series("hourly", 0, 2**62, wanted)
    assert len(everything) > len(truth.series("hourly", ctx.from_ms, ctx.to_ms, wanted))


@pytest.mark.parametrize("interval", ["hourly", "daily"])
def test_top_customers_equal_the_ground_truth(seeded_usage: Any, truth: Truth,
                                              interval: str) -> None:
    for meters in ((ALL,), tuple(SUBSET)):
        ctx = _context(seeded_usage, interval=interval, meters=meters)
        rows = [(str(m), str(c), _decimal(t), int(n))
                for m, c, t, n in _run(seeded_usage, "Top customers", ctx)]
        wanted = truth.kind.keys() if meters == (ALL,) else meters
        assert rows == truth.top(interval, ctx.from_ms, ctx.to_ms, wanted)
    assert {r[0] for r in rows} == set(SUBSET)
    assert max(sum(1 for r in rows if r[0] == m) for m in SUBSET) == 10, "LIMIT 10 BY meter"


# --------------------------------------------------------------------------- the other panels


def test_selected_range_vs_the_range_before(seeded_usage: Any, truth: Truth) -> None:
    ctx = _context(seeded_usage)
    rows = _run(seeded_usage, "Selected range vs the range before", ctx)
    want = truth.periods(ctx.from_ms, ctx.to_ms, truth.kind.keys())
    assert {str(m) for m, *_ in rows} == set(want)
    for meter, current, previous, change in rows:
        assert (_decimal(current), _decimal(previous)) == want[str(meter)], meter
        expected = round(100 * (float(current) / float(previous) - 1), 1)
        assert change == pytest.approx(expected, abs=0.051), meter


@pytest.mark.parametrize("interval", ["hourly", "daily"])
@pytest.mark.parametrize("customer", [ALL, "cust-00001"])
def test_the_customer_view(seeded_usage: Any, truth: Truth, interval: str,
                           customer: str) -> None:
    ctx = _context(seeded_usage, interval=interval, customer=customer)
    who = None if customer == ALL else customer
    got = _series(_run(seeded_usage, "Usage of $customer per $interval window", ctx))
    assert got == truth.series(interval, ctx.from_ms, ctx.to_ms, truth.kind.keys(), who)
    rows = _run(seeded_usage, "Breakdown by dimension group: $customer", ctx)
    breakdown = {(str(m), str(g)): (_decimal(t), int(n)) for m, g, t, n in rows}
    assert breakdown == truth.breakdown(interval, ctx.from_ms, ctx.to_ms, truth.kind.keys(),
                                        who)
    assert ("active_users", "(no dimensions)") in breakdown


def test_late_events_panels(seeded_usage: Any) -> None:
    ctx = _context(seeded_usage)
    late = seeded_usage.late
    rows = _run(seeded_usage, "Late events", ctx)
    want: dict[str, list[SyntheticEvent]] = defaultdict(list)
    for e in late:
        start_s = (e.timestamp_ms - e.timestamp_ms % HOUR_MS) // 1000
        if ctx.from_ms // 1000 <= start_s <= ctx.to_ms // 1000:
            want[e.meter].append(e)
    assert {str(m): (int(n), int(c), _decimal(q)) for m, n, c, q in rows} == {
        m: (len(es), len({e.customer for e in es}), sum(_decimal(e.quantity) for e in es))
        for m, es in want.items()}
    assert sum(len(es) for es in want.values()) == len(late)
    # The same numbers as the late-events query object of sinks/rollups.py.
    by_object: dict[str, int] = defaultdict(int)
    for (_, meter), totals in LateEventsQuery(database=seeded_usage.database).run(
            seeded_usage.storage).items():
        by_object[meter] += totals.events
    assert {str(m): int(n) for m, n, _, _ in rows} == dict(by_object)
    arrivals = _run(seeded_usage, "Late events by arrival time", ctx)
    assert sum(int(n) for _, _, n in arrivals) == len(late)


def test_dead_letter_panels(seeded_usage: Any) -> None:
    ctx = _context(seeded_usage, interval_ms=60_000)
    rows = _run(seeded_usage, "Dead letters by reason", ctx)
    got = {(str(s), str(code)): int(n) for s, code, n in rows}
    assert got == {("rollup", code): n for code, n in DeadLetterCountsQuery(
        stage="rollup", database=seeded_usage.database).run(seeded_usage.storage).items()}
    assert got[("rollup", "event.unknown_meter")] == seeded_usage.rejected_events
    envelope = {code: n for (_, code), n in got.items() if code.startswith("envelope.")}
    assert sum(envelope.values()) == seeded_usage.rejected_records
    per_minute = _run(seeded_usage, "Dead letters per minute", ctx)
    # $__interval_s is 60 here: per_minute is the bucket's count.
    assert sum(float(v) for _, _, v in per_minute) == sum(got.values())


# --------------------------------------------------------------------------- reading rules


def test_usage_panels_read_only_the_views() -> None:
    """Readers get exact numbers from hourly_usage / daily_usage: no panel reads the
    rollup tables or repeats their FINAL / partition-combining logic. Late events are read
    through late_events_restated (one row per event; the table holds every delivery);
    dead_letters has no view and is read FINAL as sinks/rollups.py reads it."""
    allowed = {"hourly_usage", "daily_usage", "${interval}_usage", "late_events_restated",
               "dead_letters FINAL", "anomaly_events"}
    sources = [v.get("query", "") for v in DASHBOARD["templating"]["list"]]
    sources += [str(t.target["rawSql"]) for t in CLICKHOUSE_TARGETS]
    for sql in sources:
        for found in re.findall(r"\$\{database\}\.(\S+(?: FINAL)?)", sql):
            assert found in allowed, sql
        assert "_rollups" not in sql and "source_partition" not in sql, sql
        assert ".anomalies" not in sql, "anomalies are read through anomaly_events (FINAL)"
        if "FINAL" in sql:
            assert re.search(r"dead_letters FINAL", sql), sql


# --------------------------------------------------------------------------- anomalies


def _ms(value: Any) -> int:
    return round(value.timestamp() * 1000) if isinstance(value, datetime) else int(value)


def _episodes(seeded: Any) -> dict[tuple[str, str, tuple[tuple[str, str], ...], int], list[Any]]:
    """The seeded episode events by episode (early warnings are not episodes)."""
    out: dict[tuple[str, str, tuple[tuple[str, str], ...], int], list[Any]] = defaultdict(list)
    for e in seeded.anomalies:
        if e.kind != "early":
            out[(e.series.customer, e.series.meter, e.series.group, e.since_ms)].append(e)
    return {k: sorted(v, key=lambda e: e.seq) for k, v in out.items()}


def _group_text(group: tuple[tuple[str, str], ...]) -> str:
    return "&".join(f"{k}={v}" for k, v in sorted(group))


def _wanted(seeded: Any, ctx: QueryContext, customer: str, meters: Sequence[str],
            ) -> list[tuple[int, int, str, list[str]]]:
    from_ms, to_ms = ctx.from_ms // 1000 * 1000, ctx.to_ms // 1000 * 1000
    rows = []
    for (c, m, group, since), events in _episodes(seeded).items():
        if customer != ALL and c != customer or ALL not in meters and m not in meters:
            continue
        last = events[-1]
        resolved = last.kind == "resolve"
        end = last.until_ms if resolved else max(since, to_ms)
        if since > to_ms or end < from_ms:
            continue
        dims = f" [{_group_text(group)}]" if group else ""
        text = (f"{'resolved' if resolved else 'open'} · {c}{dims} · "
                f"{last.anomaly.explain()}")
        rows.append((since, end, text,
                     [m, last.anomaly.direction, last.anomaly.severity], c, m, group))
    rows.sort(key=lambda r: (r[0], r[4], r[5], _group_text(r[6])))
    return [r[:4] for r in rows]


@pytest.mark.parametrize("selection", [
    {"customer": ALL, "meters": (ALL,)},
    {"customer": "cust-00001", "meters": (ALL,)},
    {"customer": ALL, "meters": tuple(SUBSET)},
    {"customer": "cust-00002", "meters": ("api_calls",)},
], ids=["all", "customer", "meters", "both"])
def test_anomaly_annotations_equal_the_seeded_episodes(seeded_usage: Any,
                                                       selection: dict[str, Any]) -> None:
    ctx = _context(seeded_usage, **selection)
    rows = [(_ms(t), _ms(end), str(text), [str(x) for x in tags])
            for t, end, text, tags in _run(seeded_usage, "Anomalies", ctx)]
    want = _wanted(seeded_usage, ctx, selection["customer"], selection["meters"])
    assert rows == want
    if selection["customer"] == ALL and selection["meters"] == (ALL,):
        # The seed has an episode before the range, one after it and an early warning:
        # each must be left out; the rest (5 episodes) drawn.
        assert len(want) == 4 < len(_episodes(seeded_usage)) - 1
        texts = " ".join(r[2] for r in rows)
        assert "resolved · cust-00001 · " in texts and "open · cust-00003 · " in texts
        assert "cust-00004" not in texts  # starts after the range
        assert "[endpoint=" not in texts  # that episode ended before the range


def test_anomaly_annotations_follow_the_time_range(seeded_usage: Any) -> None:
    base = _context(seeded_usage)
    t0 = base.to_ms - 30 * HOUR_MS
    wide = QueryContext(t0 - 30 * HOUR_MS, base.to_ms + 10 * HOUR_MS, HOUR_MS,
                        base.variables)
    rows = _run(seeded_usage, "Anomalies", wide)
    assert [(_ms(t), _ms(e)) for t, e, _, _ in rows] == [
        r[:2] for r in _wanted(seeded_usage, wide, ALL, (ALL,))]
    assert len(rows) == len(_episodes(seeded_usage))  # now every episode is in range


def test_open_anomalies_table(seeded_usage: Any) -> None:
    for customer, meters in ((ALL, (ALL,)), ("cust-00002", (ALL,)), (ALL, tuple(SUBSET))):
        ctx = _context(seeded_usage, customer=customer, meters=meters)
        rows = [(_ms(since), str(c), str(m), str(g), str(d), str(s), str(x))
                for since, c, m, g, d, s, x in _run(seeded_usage, "Open anomalies", ctx)]
        want = []
        for (c, m, group, since), events in _episodes(seeded_usage).items():
            last = events[-1]
            if last.kind == "resolve" or (customer != ALL and c != customer) or (
                    ALL not in meters and m not in meters):
                continue
            want.append((since, c, m, _group_text(group), last.anomaly.direction,
                         last.anomaly.severity, last.anomaly.explain()))
        want.sort(key=lambda r: (-r[0], r[1], r[2], r[3]))
        assert rows == want, (customer, meters)
    # Open whatever the range: the episode that starts after it is listed too.
    everything = _run(seeded_usage, "Open anomalies", _context(seeded_usage))
    assert {str(r[1]) for r in everything} == {"cust-00002", "cust-00003", "cust-00004"}
    assert [str(r[5]) for r in everything if str(r[1]) == "cust-00002"] == ["critical"]
