"""DDL building blocks: columns, TTL rules, tables and views as data, rendered to SQL.

``meterline.sinks.schema`` defines Meterline's tables with these and migrates them;
feature modules (billing, anomalies) define theirs with the same pieces, so every
statement is rendered by the code below and the same text runs on chDB and on a server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.retention import DATETIME_MAX_S, RetentionPolicy
from meterline.sinks.storage import is_identifier

ColumnKind = Literal["DEFAULT", "MATERIALIZED", "ALIAS", "EPHEMERAL"]

# 9 decimal places: quantities travel as int nano-units (10**9 per unit) everywhere else.
QUANTITY_SCALE = 9
QUANTITY_TYPE = f"Decimal(38, {QUANTITY_SCALE})"


def sql_string(value: str) -> str:
    """A ClickHouse single-quoted string literal (for COMMENTs and other DDL text)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_identifier(name: str, what: str) -> None:
    if not is_identifier(name):
        raise SinkConfigError(what, [f"{name!r} is not a plain identifier [A-Za-z_][A-Za-z0-9_]*"])


# --------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    kind: ColumnKind | None = None
    expression: str | None = None
    comment: str = ""

    @property
    def insertable(self) -> bool:
        return self.kind in (None, "DEFAULT", "EPHEMERAL")

    def ddl(self) -> str:
        parts = [self.name, self.type]
        if self.kind is not None:
            parts.append(self.kind)
            if self.expression is not None:
                parts.append(self.expression)
        if self.comment:
            parts.append("COMMENT " + sql_string(self.comment))
        return " ".join(parts)


@dataclass(frozen=True)
class TtlRule:
    """Rows expire ``RetentionPolicy.<retention_field>`` days after ``age_expression``.

    With ``meter_column`` set, per-meter overrides of that field become extra rules.
    """

    age_expression: str
    retention_field: str
    meter_column: str | None = None

    def expression(self, retention: RetentionPolicy) -> str:
        default = self._rule(retention.days_for(self.retention_field))
        overrides = retention.overrides(self.retention_field)
        if not overrides:
            return default
        if self.meter_column is None:
            raise SinkError(f"{self.retention_field} cannot be overridden per meter")
        col = self.meter_column
        names = ", ".join(sql_string(meter) for meter, _ in overrides)
        # Every row must match exactly one rule: a row matched by the default rule too
        # would expire at the earlier of the two dates.
        rules = [f"{default} DELETE WHERE {col} NOT IN ({names})"]
        rules += [f"{self._rule(days)} DELETE WHERE {col} = {sql_string(meter)}"
                  for meter, days in overrides]
        return ",\n    ".join(rules)

    def _rule(self, days: int) -> str:
        # Not just ``age + toIntervalDay(days)``: DateTime is UInt32 seconds, and a sum
        # past 2106-02-07 wraps around to 1970, which expires the row the moment it is
        # inserted. Capping the age first keeps the sum at or below DateTime's last second.
        return (f"least({self.age_expression}, toDateTime({DATETIME_MAX_S}) - "
                f"toIntervalDay({days})) + toIntervalDay({days})")


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    engine: str
    order_by: tuple[str, ...]
    partition_by: str | None = None
    ttl: TtlRule | None = None
    comment: str = ""
    # Columns added after the table first shipped, last in ``columns`` and ``order_by``:
    # :func:`migrate` adds them to an existing table with one ALTER that also extends the
    # sorting key (ClickHouse allows only freshly added columns there; the primary key
    # stays). They have no DEFAULT: ClickHouse refuses a sorting-key column with one.
    added_columns: tuple[str, ...] = ()
    primary_key: tuple[str, ...] | None = None

    def qualified(self, database: str) -> str:
        check_identifier(database, "database name")
        return f"{database}.{self.name}"

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise SinkError(f"table {self.name} has no column {name!r}")

    def insert_types(self, names: Iterable[str]) -> dict[str, str]:
        """ClickHouse types for an insert of ``names`` (what ``Storage.insert_columns`` needs)."""
        types: dict[str, str] = {}
        for name in names:
            col = self.column(name)
            if not col.insertable:
                raise SinkError(f"{self.name}.{name} is {col.kind} and cannot be inserted")
            types[name] = col.type
        return types

    def create_sql(self, database: str, retention: RetentionPolicy) -> str:
        lines = [f"CREATE TABLE IF NOT EXISTS {self.qualified(database)}", "("]
        lines.append(",\n".join(f"    {col.ddl()}" for col in self.columns))
        lines.append(")")
        lines.append(f"ENGINE = {self.engine}")
        if self.partition_by:
            lines.append(f"PARTITION BY {self.partition_by}")
        if self.primary_key is not None:
            lines.append(f"PRIMARY KEY ({', '.join(self.primary_key)})")
        lines.append(f"ORDER BY ({', '.join(self.order_by)})")
        if self.ttl is not None:
            lines.append(f"TTL {self.ttl.expression(retention)}")
        if self.comment:
            lines.append("COMMENT " + sql_string(self.comment))
        return "\n".join(lines)

    def add_columns_sql(self, database: str) -> str:
        """The ALTER that brings a table created before ``added_columns`` up to date."""
        if not self.added_columns:
            raise SinkError(f"table {self.name} has no added columns")
        adds = [f"ADD COLUMN {self.column(name).ddl()}" for name in self.added_columns]
        return (f"ALTER TABLE {self.qualified(database)}\n    " + ",\n    ".join(adds)
                + f",\n    MODIFY ORDER BY ({', '.join(self.order_by)})")

    @property
    def rebuild_name(self) -> str:
        return f"{self.name}__rebuild"

    def stored_columns(self) -> tuple[str, ...]:
        """Columns held on disk (a copy must carry them; EPHEMERAL/MATERIALIZED are not)."""
        return tuple(c.name for c in self.columns if c.kind in (None, "DEFAULT"))

    def rebuild_sql(self, database: str, retention: RetentionPolicy) -> list[str]:
        """Statements that give an existing table this definition's sorting key, keeping
        its rows, for a key ClickHouse cannot extend in place (``MODIFY ORDER BY`` takes
        only freshly added columns).

        Copy into ``<name>__rebuild`` created with the new key, swap the two atomically
        (``EXCHANGE TABLES``, Atomic databases), then :meth:`finish_rebuild_sql`. Safe to
        repeat from any point a crash leaves: before the swap the old table is untouched
        and the half-filled copy is dropped and made again; after it, the table has the
        new key and only the finish step is planned. Rows written to the old table while
        the copy ran are carried over by the finish step's second copy (the same rows
        under the same key collapse)."""
        tmp = replace(self, name=self.rebuild_name)
        cols = ", ".join(self.stored_columns())
        return [f"DROP TABLE IF EXISTS {tmp.qualified(database)}",
                tmp.create_sql(database, retention),
                f"INSERT INTO {tmp.qualified(database)} ({cols})\n"
                f"SELECT {cols} FROM {self.qualified(database)}",
                f"EXCHANGE TABLES {self.qualified(database)} AND {tmp.qualified(database)}",
                *self.finish_rebuild_sql(database)]

    def finish_rebuild_sql(self, database: str) -> list[str]:
        """After the swap: copy what reached the old table meanwhile, then drop it."""
        old = replace(self, name=self.rebuild_name)
        cols = ", ".join(self.stored_columns())
        return [f"INSERT INTO {self.qualified(database)} ({cols})\n"
                f"SELECT {cols} FROM {old.qualified(database)}",
                f"DROP TABLE IF EXISTS {old.qualified(database)}"]

    def modify_ttl_sql(self, database: str, retention: RetentionPolicy) -> str:
        if self.ttl is None:
            raise SinkError(f"table {self.name} has no TTL")
        return f"ALTER TABLE {self.qualified(database)} MODIFY TTL {self.ttl.expression(retention)}"


@dataclass(frozen=True)
class View:
    """A reader-facing view over ``source``.

    Either ``columns`` (``SELECT columns FROM source [FINAL]``; ``final`` collapses
    ReplacingMergeTree rows) or a full ``query`` in which ``{source}`` stands for the
    qualified source table, ``{database}`` for the database (to read another view) and
    ``{restatement_horizon_ms}`` for the policy's restatement horizon: a view that
    depends on configuration is re-created by ``migrate`` when its text changes.
    """

    name: str
    source: Table
    columns: tuple[str, ...] = ()
    final: bool = True
    query: str | None = None

    def qualified(self, database: str) -> str:
        check_identifier(database, "database name")
        return f"{database}.{self.name}"

    def create_sql(self, database: str, retention: RetentionPolicy | None = None) -> str:
        head = f"CREATE OR REPLACE VIEW {self.qualified(database)} AS\n"
        if self.query is not None:
            horizon_ms = (retention or RetentionPolicy()).restatement_horizon_ms
            return head + (self.query.replace("{source}", self.source.qualified(database))
                           .replace("{database}", database)
                           .replace("{restatement_horizon_ms}", str(horizon_ms)))
        final = " FINAL" if self.final else ""
        return (
            f"{head}SELECT {', '.join(self.columns)}\n"
            f"FROM {self.source.qualified(database)}{final}"
        )


# --------------------------------------------------------------------------- tables


def month_of(ms_column: str) -> str:
    return f"toYYYYMM(fromUnixTimestamp64Milli({ms_column}, 'UTC'))"


def year_of(ms_column: str) -> str:
    return f"toYear(fromUnixTimestamp64Milli({ms_column}, 'UTC'))"


def seconds_of(ms_column: str) -> str:
    return f"toDateTime(intDiv({ms_column}, 1000))"


def exact_decimal(name: str, what: str) -> tuple[Column, Column]:
    """``<name>_nano Int128 EPHEMERAL`` and ``<name> Decimal(38, 9)`` derived from it exactly."""
    return (
        Column(f"{name}_nano", "Int128", "EPHEMERAL",
               comment=f"insert-only: exact {what} in 10^-9 units"),
        Column(name, QUANTITY_TYPE, "DEFAULT",
               f"reinterpret({name}_nano, 'Decimal128({QUANTITY_SCALE})')"),
    )


