from __future__ import annotations

import pytest

from meterline.sinks import exceptions
from meterline.sinks.exceptions import (
    BackendUnavailableError,
    QueryError,
    SinkConfigError,
    SinkError,
    StorageOpenError,
)


def test_public_names_are_locked() -> None:
    assert sorted(exceptions.__all__) == [
        "BackendUnavailableError",
        "QueryError",
        "SinkConfigError",
        "SinkError",
        "StorageOpenError",
    ]


@pytest.mark.parametrize(
    "error",
    [
        SinkConfigError("x", ["a"]),
        BackendUnavailableError("pip install 'meterline[server]'"),
        StorageOpenError("busy"),
        QueryError("bad", "SELECT 1"),
    ],
)
def test_every_error_derives_from_sink_error(error: Exception) -> None:
    assert isinstance(error, SinkError)


def test_config_error_lists_every_problem() -> None:
    error = SinkConfigError("retention policy", ["a is bad", "b is bad"])
    assert error.errors == ["a is bad", "b is bad"]
    assert str(error) == "invalid retention policy: a is bad; b is bad"
    assert isinstance(error, ValueError)


def test_query_error_truncates_long_sql() -> None:
    error = QueryError("boom", "SELECT " + "x" * 1000)
    assert error.sql.endswith("x" * 10)
    assert len(str(error)) < 400
