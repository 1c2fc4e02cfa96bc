from __future__ import annotations

import sys
from typing import Any

import pytest

from meterline.sinks.exceptions import SinkConfigError, SinkError
from meterline.sinks.storage import (
    StorageConfig,
    check_insert_columns,
    open_storage,
    split_qualified,
)


def test_chdb_config_is_valid() -> None:
    StorageConfig(data_dir="/var/lib/meterline").validate()


def test_server_config_takes_the_database_from_the_url() -> None:
    config = StorageConfig(url="http://user:pass@host:8123/billing")
    config.validate()
    assert config.resolved_database == "billing"
    assert StorageConfig(url="http://host:8123").resolved_database == "meterline"


def test_validate_collects_every_error() -> None:
    config = StorageConfig(url="ftp://:99999/bad-db", data_dir="/x", database="also bad")
    with pytest.raises(SinkConfigError) as info:
        config.validate()
    joined = "\n".join(info.value.errors)
    assert len(info.value.errors) == 6, joined
    for fragment in ("not both", "'also bad'", "scheme", "no host", "port", "'bad-db'"):
        assert fragment in joined


def test_validate_needs_a_target() -> None:
    with pytest.raises(SinkConfigError, match="set url"):
        StorageConfig().validate()


def test_database_in_url_and_config_must_agree() -> None:
    with pytest.raises(SinkConfigError, match="conflicts"):
        StorageConfig(url="http://h:8123/a", database="b").validate()
    StorageConfig(url="http://h:8123/a", database="a").validate()


def test_repr_hides_the_password() -> None:
    text = repr(StorageConfig(url="http://user:s3cret@host:8123/db"))
    assert "s3cret" not in text
    assert "user:***@host:8123" in text


def test_split_qualified() -> None:
    assert split_qualified("db.table") == ("db", "table")
    for bad in ("table", "db.", ".t", "a.b.c", "db.t-x", "db.t; DROP"):
        with pytest.raises(SinkConfigError):
            split_qualified(bad)


def test_check_insert_columns() -> None:
    assert check_insert_columns({"a": [1, 2], "b": ["x", "y"]}, {"a": "Int64", "b": "String"}) == 2
    with pytest.raises(SinkError, match="different lengths"):
        check_insert_columns({"a": [1], "b": []}, {"a": "Int64", "b": "String"})


def test_open_storage_validates_first() -> None:
    with pytest.raises(SinkConfigError):
        open_storage(StorageConfig(data_dir="/x", database="bad name"))


def test_open_storage_without_url_is_chdb(chdb_engine: Any) -> None:
    from meterline.sinks.chdb_backend import ChdbStorage

    storage = open_storage(StorageConfig(data_dir=chdb_engine.data_dir, database="other"))
    try:
        assert isinstance(storage, ChdbStorage)
        assert storage.database == "other"
        assert storage.query_rows("SELECT 1") == [(1,)]
    finally:
        storage.close()


def test_open_storage_with_url_is_the_server_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    clickhouse_connect = pytest.importorskip("clickhouse_connect")
    from meterline.sinks.server_backend import ServerStorage

    class Client:
        def close(self) -> None:
            pass

    monkeypatch.setattr(clickhouse_connect, "get_client", lambda **kwargs: Client())
    storage = open_storage(StorageConfig(url="http://h:8123/billing"))
    assert isinstance(storage, ServerStorage)
    assert storage.database == "billing"


def test_importing_the_seam_does_not_import_heavy_backends() -> None:
    # meterline.sinks.storage / schema / raw_events / rollups must stay importable without the
    # [server] extra; only the backend modules import chdb / clickhouse_connect.
    import subprocess

    code = (
        "import sys\n"
        "import meterline.sinks.storage, meterline.sinks.schema, meterline.sinks.raw_events\n"
        "import meterline.sinks.rollups\n"
        "bad = [m for m in ('chdb', 'clickhouse_connect', 'pyarrow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
