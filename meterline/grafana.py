"""Grafana dashboards as data: load them, and turn a ClickHouse panel's ``rawSql`` into the
SQL that Grafana and the ClickHouse plugin (grafana-clickhouse-datasource) actually send.

Three steps, in Grafana's order, each as the plugin does it:

1. ``$__conditionalAll(condition, $var)`` (the plugin's frontend, applyConditionalAll): the
   condition when ``$var`` has a selection, ``1=1`` when it is All (``$__all``) or empty.
   Arguments split at top-level commas; the variable is looked up by its ``$name``.
2. Template variables (Grafana's templateSrv): ``$var``, ``${var}``, ``${var:format}``,
   ``[[var]]``. Without a format the plugin's own formatter applies: a multi-value selection
   becomes ``'a','b'``, a single value is inserted as is. All without a custom all-value
   means every option's value. Formats: ``sqlstring`` (``'it''s'``), ``singlequote``,
   ``doublequote``, ``raw``, ``csv``. Global ``$__from``/``$__to`` (ms) and ``$__interval``
   / ``$__interval_ms`` / ``$__range_s`` too.
3. Backend macros (grafana/sqlds parsing, the plugin's pkg/macros): ``$__timeFilter(c)`` ->
   ``c >= toDateTime(from_s) AND c <= toDateTime(to_s)``, ``$__timeFilter_ms(c)``,
   ``$__fromTime``/``$__toTime`` -> ``toDateTime(s)``, ``$__fromTime_ms``/``$__toTime_ms`` ->
   ``fromUnixTimestamp64Milli(ms)``, ``$__dateFilter(c)``, ``$__dateTimeFilter(d, t)`` (alias
   ``$__dt``), ``$__timeInterval(c)`` -> ``toStartOfInterval(toDateTime(c), INTERVAL n
   second)`` and ``$__timeInterval_ms(c)``, ``$__interval_s`` -> n; ``n`` = the panel
   interval in whole seconds, at least 1. Arguments are found by bracket depth and trimmed
   (as grafana-plugin-sdk-go's sqlutil does today; older versions split at every comma, so
   the dashboards pass plain names, see tests/dashboards).

Anything that still looks like a variable or macro afterwards is an error: a typo in a
dashboard must fail its test, not reach ClickHouse as text. Pure: stdlib only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "ALL",
    "CLICKHOUSE_PLUGIN",
    "DASHBOARDS_DIR",
    "MacroError",
    "QueryContext",
    "Target",
    "Variable",
    "annotation_targets",
    "expand",
    "load_dashboard",
    "targets",
]

ALL = "$__all"
CLICKHOUSE_PLUGIN = "grafana-clickhouse-datasource"
# The repository's dashboards/ (a source checkout or an editable install).
DASHBOARDS_DIR = Path(__file__).resolve().parents[1] / "dashboards"


class MacroError(ValueError):
    """A panel's SQL uses a macro or variable wrongly (or one this expander does not know)."""


@dataclass(frozen=True)
class Variable:
    """A template variable's current selection and, for All, the values All stands for."""

    current: str | Sequence[str]
    options: Sequence[str] = ()  # what All expands to (Grafana: every option's value)
    all_value: str | None = None  # a custom all value ("allValue"), inserted as is

    def selected(self) -> str | list[str]:
        """The value after All is resolved: a string, or a list for a multi-value."""
        values = [self.current] if isinstance(self.current, str) else list(self.current)
        if ALL in values:
            if self.all_value is not None:
                return self.all_value
            return list(self.options)
        return self.current if isinstance(self.current, str) else values

    def as_text(self) -> str:
        """``current.value.toString()`` in the plugin: a list joins with ','."""
        return self.current if isinstance(self.current, str) else ",".join(self.current)


@dataclass(frozen=True)
class QueryContext:
    """What Grafana knows when it runs a panel: time range, interval and variables."""

    from_ms: int
    to_ms: int
    interval_ms: int = 3_600_000
    variables: Mapping[str, Variable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.from_ms > self.to_ms:
            raise MacroError(f"time range from {self.from_ms} is after to {self.to_ms}")

    @property
    def interval_s(self) -> int:
        return max(self.interval_ms // 1000, 1)


@dataclass(frozen=True)
class Target:
    """One query of one panel."""

    panel_id: int
    panel_title: str
    panel_type: str
    target: Mapping[str, Any]

    @property
    def datasource_type(self) -> str:
        return str((self.target.get("datasource") or {}).get("type", ""))

    @property
    def ref_id(self) -> str:
        return str(self.target.get("refId", ""))


def load_dashboard(name_or_path: str | Path) -> dict[str, Any]:
    """A dashboard's JSON: a path, or a name in the repository's dashboards/ folder."""
    path = Path(name_or_path)
    if not path.suffix:
        path = DASHBOARDS_DIR / f"{path}.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a dashboard is a JSON object")
    return doc


def _panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", ()))  # a collapsed row holds its panels


def targets(dashboard: Mapping[str, Any]) -> Iterator[Target]:
    """Every query target of every panel, rows included."""
    for panel in _panels(dashboard.get("panels", ())):
        for target in panel.get("targets", ()):
            yield Target(int(panel.get("id", 0)), str(panel.get("title", "")),
                         str(panel.get("type", "")), target)


def annotation_targets(dashboard: Mapping[str, Any]) -> Iterator[Target]:
    """The query of every annotation that has one (``annotations.list[].target``), as a
    :class:`Target` of panel type ``annotation`` titled with the annotation's name: its SQL
    is expanded and run exactly as a panel's is (Grafana sends it through the same
    datasource query path, with the dashboard's time range and variables)."""
    for annotation in (dashboard.get("annotations") or {}).get("list", ()):
        target = annotation.get("target")
        if target:
            yield Target(0, str(annotation.get("name", "")), "annotation", target)


# --------------------------------------------------------------------------- argument parsing


def _macro_args(text: str, open_index: int) -> tuple[list[str], int]:
    """Arguments of the bracketed list opening at ``text[open_index]`` (split at depth-1
    commas, untrimmed) and the index just past its closing bracket."""
    depth, start, args = 0, open_index + 1, []
    for i in range(open_index, len(text)):
        char = text[i]
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                args.append(text[start:i])
                return args, i + 1
        elif char == "," and depth == 1:
            args.append(text[start:i])
            start = i + 1
    raise MacroError(f"unclosed bracket in macro arguments: {text[open_index:open_index + 60]!r}")


# --------------------------------------------------------------------------- 1. conditionalAll

_CONDITIONAL_ALL = "$__conditionalAll("


def apply_conditional_all(sql: str, variables: Mapping[str, Variable]) -> str:
    """The plugin's applyConditionalAll: innermost-last, one occurrence at a time."""
    index = sql.rfind(_CONDITIONAL_ALL)
    while index != -1:
        args, end = _macro_args(sql, index + len(_CONDITIONAL_ALL) - 1)
        if len(args) != 2:
            raise MacroError(f"$__conditionalAll takes (condition, $variable), got {args!r}")
        condition, name = args[0], args[1].strip()
        if not name.startswith("$") or name[1:] not in variables:
            raise MacroError(f"$__conditionalAll names no known variable: {name!r}")
        value = variables[name[1:]].as_text()
        phrase = "1=1" if value in ("", ALL) else condition
        sql = sql[:index] + phrase + sql[end:]
        index = sql.rfind(_CONDITIONAL_ALL)
    return sql


# --------------------------------------------------------------------------- 2. variables

_VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?::([^}]+))?\}")


def _sql_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _format(value: str | list[str], fmt: str | None) -> str:
    values = value if isinstance(value, list) else None
    if fmt is None:  # the ClickHouse plugin's formatter
        return "'" + "','".join(values) + "'" if values is not None else str(value)
    items = values if values is not None else [str(value)]
    if fmt == "sqlstring":
        return ",".join(_sql_quote(v) for v in items)
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in items)
    if fmt == "doublequote":
        return ",".join('"' + v.replace('"', '\\"') + '"' for v in items)
    if fmt in ("raw", "csv"):
        return ",".join(items)
    raise MacroError(f"variable format {fmt!r} is not supported here")


def apply_variables(sql: str, ctx: QueryContext) -> str:
    """Grafana's templateSrv.replace with the plugin's formatter. Names that are neither
    variables nor Grafana globals are left alone (backend macros like ``$__timeFilter``)."""
    globals_ = {
        "__from": str(ctx.from_ms),
        "__to": str(ctx.to_ms),
        "__interval": f"{ctx.interval_s}s",
        "__interval_ms": str(ctx.interval_ms),
        "__range_s": str((ctx.to_ms - ctx.from_ms) // 1000),
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(4)
        fmt = match.group(3) or match.group(5)
        if name in ctx.variables:
            return _format(ctx.variables[name].selected(), fmt)
        if name in globals_:
            return globals_[name]
        return match.group(0)

    return _VARIABLE.sub(replace, sql)


# --------------------------------------------------------------------------- 3. backend macros


def _to_datetime(ms: int) -> str:
    return f"toDateTime({ms // 1000})"  # Go's t.Unix(): whole seconds, rounded down


def _to_datetime64(ms: int) -> str:
    return f"fromUnixTimestamp64Milli({ms})"


def _to_date(ms: int) -> str:
    return f"toDate('{datetime.fromtimestamp(ms / 1000, UTC):%Y-%m-%d}')"


def _one(name: str, args: list[str]) -> str:
    if len(args) != 1:
        raise MacroError(f"$__{name} expects 1 argument, received {len(args)}")
    return args[0]


def _macro(name: str, args: list[str] | None, ctx: QueryContext) -> str:
    f, t = ctx.from_ms, ctx.to_ms
    a = args or []
    if name == "fromTime":
        return _to_datetime(f)
    if name == "toTime":
        return _to_datetime(t)
    if name == "fromTime_ms":
        return _to_datetime64(f)
    if name == "toTime_ms":
        return _to_datetime64(t)
    if name == "timeFilter":
        col = _one(name, a)
        return f"{col} >= {_to_datetime(f)} AND {col} <= {_to_datetime(t)}"
    if name == "timeFilter_ms":
        col = _one(name, a)
        return f"{col} >= {_to_datetime64(f)} AND {col} <= {_to_datetime64(t)}"
    if name == "dateFilter":
        col = _one(name, a)
        return f"{col} >= {_to_date(f)} AND {col} <= {_to_date(t)}"
    if name in ("dateTimeFilter", "dt"):
        if len(a) != 2:
            raise MacroError(f"$__{name} expects 2 arguments, received {len(a)}")
        d, c = a
        return (f"({d} >= {_to_date(f)} AND {d} <= {_to_date(t)}) AND "
                f"({c} >= {_to_datetime(f)} AND {c} <= {_to_datetime(t)})")
    if name == "timeInterval":
        return (f"toStartOfInterval(toDateTime({_one(name, a)}), "
                f"INTERVAL {ctx.interval_s} second)")
    if name == "timeInterval_ms":
        return (f"toStartOfInterval(toDateTime64({_one(name, a)}, 3), "
                f"INTERVAL {max(ctx.interval_ms, 1)} millisecond)")
    if name == "interval_s":
        return str(ctx.interval_s)
    raise MacroError(f"unknown macro $__{name}")


_MACRO = re.compile(r"\$__(\w+)\b")


def apply_macros(sql: str, ctx: QueryContext) -> str:
    """Backend macros; a macro in another's arguments is expanded by the next pass (the
    plugin expands one macro name at a time over the whole text)."""
    for _ in range(8):
        expanded = _apply_macros_once(sql, ctx)
        if expanded == sql:
            break
        sql = expanded
    return sql


def _apply_macros_once(sql: str, ctx: QueryContext) -> str:
    out, pos = [], 0
    for match in _MACRO.finditer(sql):
        if match.start() < pos:
            continue  # inside the arguments of a macro already expanded
        name, end = match.group(1), match.end()
        args = None
        if end < len(sql) and sql[end] == "(":
            raw, end = _macro_args(sql, end)
            args = [a.strip() for a in raw]
        out.append(sql[pos:match.start()])
        out.append(_macro(name, args, ctx))
        pos = end
    out.append(sql[pos:])
    return "".join(out)


_LEFTOVER = re.compile(r"\$\w+|\$\{[^}]*\}|\[\[\w+(?::\w+)?\]\]")


def expand(sql: str, ctx: QueryContext) -> str:
    """``rawSql`` as Grafana + the ClickHouse plugin would send and run it."""
    sql = apply_conditional_all(sql, ctx.variables)
    sql = apply_variables(sql, ctx)
    sql = apply_macros(sql, ctx)
    leftover = _LEFTOVER.search(sql)
    if leftover:
        raise MacroError(f"unexpanded {leftover.group(0)!r} in: {sql}")
    return sql
