"""meterline.grafana expands panels the way Grafana and grafana-clickhouse-datasource do.

The expectations follow the plugin's own behaviour: applyConditionalAll and its formatter
(src/data/CHDatasource.ts), the backend macros (pkg/macros/macros.go) and grafana/sqlds'
argument parsing.
"""

from __future__ import annotations

from typing import Any

import pytest

from meterline.grafana import (
    ALL,
    MacroError,
    QueryContext,
    Variable,
    apply_conditional_all,
    apply_macros,
    apply_variables,
    expand,
)

FROM_MS = 1_700_000_000_123  # 2023-11-14 22:13:20.123 UTC
TO_MS = 1_700_003_600_999


def ctx(interval_ms: int = 60_000, **variables: Variable) -> QueryContext:
    return QueryContext(FROM_MS, TO_MS, interval_ms, variables)


# --------------------------------------------------------------------------- conditionalAll

SQL = "SELECT * FROM t WHERE $__conditionalAll(location IN ($loc), $loc)"


@pytest.mark.parametrize(("current", "expected"), [
    ("Berlin", "SELECT * FROM t WHERE location IN ($loc)"),
    (["Berlin", "Paris"], "SELECT * FROM t WHERE location IN ($loc)"),
    (ALL, "SELECT * FROM t WHERE 1=1"),
    ([ALL], "SELECT * FROM t WHERE 1=1"),
    ("", "SELECT * FROM t WHERE 1=1"),
])
def test_conditional_all(current: Any, expected: str) -> None:
    assert apply_conditional_all(SQL, {"loc": Variable(current)}) == expected


def test_conditional_all_every_occurrence_and_nested_brackets() -> None:
    sql = ("WHERE $__conditionalAll(a IN (f(1, 2), $a), $a) AND "
           "$__conditionalAll(b = g(x, (y)), $b)")
    out = apply_conditional_all(sql, {"a": Variable(ALL), "b": Variable("v")})
    assert out == "WHERE 1=1 AND b = g(x, (y))"


def test_conditional_all_needs_a_known_variable() -> None:
    with pytest.raises(MacroError):
        apply_conditional_all("$__conditionalAll(x = 1, $nope)", {})
    with pytest.raises(MacroError):
        apply_conditional_all("$__conditionalAll(x = 1)", {"x": Variable("1")})


# --------------------------------------------------------------------------- template variables


def test_the_plugins_formatter_quotes_multi_values_only() -> None:
    c = ctx(single=Variable("acme"), multi=Variable(["a", "b"]))
    assert apply_variables("x = '$single' AND y IN ($multi)", c) == "x = 'acme' AND y IN ('a','b')"
    assert apply_variables("${single} [[single]] ${multi:csv}", c) == "acme acme a,b"


def test_all_means_every_option() -> None:
    c = ctx(m=Variable([ALL], ["api_calls", "llm_tokens"]), s=Variable(ALL, ["x"]),
            custom=Variable(ALL, ["x"], all_value=".*"))
    assert apply_variables("IN ($m)", c) == "IN ('api_calls','llm_tokens')"
    assert apply_variables("IN (${m:sqlstring})", c) == "IN ('api_calls','llm_tokens')"
    assert apply_variables("$custom", c) == ".*"


def test_sqlstring_escapes_quotes() -> None:
    c = ctx(v=Variable("o'brien"), m=Variable(["it's", "b"]))
    assert apply_variables("${v:sqlstring}|${m:sqlstring}", c) == "'o''brien'|'it''s','b'"
    assert apply_variables("${v:singlequote}", c) == "'o\\'brien'"
    assert apply_variables("${v:raw}", c) == "o'brien"


def test_globals_and_macros_are_told_apart() -> None:
    c = ctx()
    out = apply_variables("$__from $__to ${__interval} $__interval_ms $__fromTime "
                          "$__interval_s $__timeFilter(t)", c)
    assert out == (f"{FROM_MS} {TO_MS} 60s 60000 $__fromTime $__interval_s "
                   "$__timeFilter(t)")


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(MacroError):
        apply_variables("${v:percentencode}", ctx(v=Variable("x")))


# --------------------------------------------------------------------------- backend macros


def test_time_macros_are_whole_seconds_rounded_down() -> None:
    c = ctx()
    assert apply_macros("$__fromTime|$__toTime", c) == \
        "toDateTime(1700000000)|toDateTime(1700003600)"
    assert apply_macros("$__fromTime_ms|$__toTime_ms", c) == \
        f"fromUnixTimestamp64Milli({FROM_MS})|fromUnixTimestamp64Milli({TO_MS})"
    assert apply_macros("WHERE $__timeFilter(ts)", c) == \
        "WHERE ts >= toDateTime(1700000000) AND ts <= toDateTime(1700003600)"
    assert apply_macros("$__timeFilter_ms(ts)", c) == (
        f"ts >= fromUnixTimestamp64Milli({FROM_MS}) AND "
        f"ts <= fromUnixTimestamp64Milli({TO_MS})")
    assert apply_macros("$__dateFilter(d)", c) == \
        "d >= toDate('2023-11-14') AND d <= toDate('2023-11-14')"
    assert apply_macros("$__dt(d, t)", c) == (
        "(d >= toDate('2023-11-14') AND d <= toDate('2023-11-14')) AND "
        "(t >= toDateTime(1700000000) AND t <= toDateTime(1700003600))")


def test_interval_macros() -> None:
    assert apply_macros("$__timeInterval(ts) / $__interval_s", ctx(90_000)) == \
        "toStartOfInterval(toDateTime(ts), INTERVAL 90 second) / 90"
    assert apply_macros("$__timeInterval_ms(ts)", ctx(250)) == \
        "toStartOfInterval(toDateTime64(ts, 3), INTERVAL 250 millisecond)"
    assert apply_macros("$__interval_s", ctx(250)) == "1"  # at least a second


def test_arguments_split_at_the_top_level_and_are_trimmed() -> None:
    out = apply_macros("$__timeFilter( toDateTime(intDiv(ms, 1000), 'UTC') )", ctx())
    assert out.startswith("toDateTime(intDiv(ms, 1000), 'UTC') >= toDateTime(")
    with pytest.raises(MacroError, match="expects 1 argument"):
        apply_macros("$__timeFilter(a, b)", ctx())
    with pytest.raises(MacroError, match="unclosed"):
        apply_macros("$__timeFilter(a", ctx())
    with pytest.raises(MacroError, match="unknown macro"):
        apply_macros("$__timeFilterr(a)", ctx())


def test_expand_refuses_leftovers() -> None:
    with pytest.raises(MacroError, match=r"\$typo"):
        expand("SELECT $typo", ctx())
    with pytest.raises(MacroError, match=r"\$\{nope\}"):
        expand("SELECT ${nope}", ctx())


def test_range_must_be_ordered() -> None:
    with pytest.raises(MacroError):
        QueryContext(2, 1)


def test_expanded_macros_run_on_clickhouse(chdb_storage: Any) -> None:
    c = ctx(3_600_000, m=Variable([ALL], ["a", "b"]))
    sql = expand("SELECT toUnixTimestamp($__fromTime), toUnixTimestamp($__toTime), "
                 "$__interval_s, toUnixTimestamp($__timeInterval($__fromTime)), "
                 "toUnixTimestamp64Milli($__toTime_ms), "
                 "$__conditionalAll('a' IN (${m:sqlstring}), $m), 'a' IN ($m)", c)
    ((start, end, interval, bucket, end_ms, everything, member),) = \
        chdb_storage.query_rows(sql)
    assert (start, end, interval) == (1_700_000_000, 1_700_003_600, 3600)
    assert bucket == 1_700_000_000 - 1_700_000_000 % 3600
    assert end_ms == TO_MS
    assert everything == 1 and member == 1
