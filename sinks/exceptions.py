"""Errors raised by ``meterline.sinks``; every one derives from :class:`SinkError`."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BackendUnavailableError",
    "QueryError",
    "SinkConfigError",
    "SinkError",
    "StorageOpenError",
]


class SinkError(Exception):
    """Root of every error raised by the ClickHouse sinks."""


class SinkConfigError(SinkError, ValueError):
    """A sink configuration (storage, retention, rows) failed validation.

    ``errors`` holds every problem found, not only the first, so an operator can fix a
    config file in one pass.
    """

    def __init__(self, what: str, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__(f"invalid {what}: " + "; ".join(self.errors))


class BackendUnavailableError(SinkError, ImportError):
    """An optional dependency of a storage backend (chdb, clickhouse-connect) is missing."""


class StorageOpenError(SinkError):
    """The storage engine could not be opened (data dir in use, unreachable server, ...)."""


class QueryError(SinkError):
    """ClickHouse rejected a statement, or the transport failed while running it.

    ``sql`` is the statement (possibly truncated) so logs show what failed without the data.
    """

    def __init__(self, message: str, sql: str) -> None:
        self.sql = sql
        shown = sql if len(sql) <= 300 else sql[:300] + "..."
        super().__init__(f"{message}\n  while running: {shown}")
