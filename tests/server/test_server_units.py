"""In-process tests of the server's pure parts: tenancy, formats, validation, keys, writers,
usage folding and quota caching. HTTP end to end is in test_server_http.py."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.config import DEFAULT_METERS
from meterline.core.envelope import decode_batch
from meterline.core.meters import MeterRegistry
from meterline.core.partitioning import partition_for
from meterline.ingest.local_log import LocalLog
from meterline.server.app import Request, ServerApp
from meterline.server.formats.common import rfc3339_ms, seconds_to_ms
from meterline.server.keys import KeyStore
from meterline.server.tenancy import scoped_customer, scoped_id
from meterline.server.usage import (
    ConfigLimits,
    QuotaRule,
    QuotaService,
    RollupGeneration,
    month_start_ms,
    next_month_ms,
)
from meterline.server.writers import LocalLogWriter, Unavailable

REGISTRY = MeterRegistry.load(DEFAULT_METERS)
NOW = 1_764_576_000_000  # 2025-12-01T08:00:00Z


# --------------------------------------------------------------------------- tenancy

parts = st.lists(st.text(min_size=1, max_size=80), min_size=1, max_size=3)


@given(parts, parts)
def test_scoped_ids_are_injective(a: list[str], b: list[str]) -> None:
    # Two different idempotency keys must never dedupe each other (a silent loss).
    if a != b:
        assert scoped_id("t", *a) != scoped_id("t", *b)
    assert scoped_id("t", *a) == scoped_id("t", *a)
    assert len(scoped_id("t", *a)) <= 128


def test_tenants_never_share_ids_or_customers() -> None:
    assert scoped_id("a", "x") != scoped_id("b", "x")
    # "b:x" sent by tenant a stays a's customer: no way to spell another tenant's prefix.
    assert scoped_customer("a", "b:x") == "a:b:x" != scoped_customer("b", "x")


# --------------------------------------------------------------------------- formats


def test_rfc3339_and_seconds() -> None:
    assert rfc3339_ms("2025-12-01T08:00:00Z") == NOW
    assert rfc3339_ms("2025-12-01T09:30:00.123456789+01:30") == NOW + 123
    assert seconds_to_ms(1_764_576_000) == NOW
    assert seconds_to_ms("1764576000.5009") == NOW + 500  # floored below a millisecond
    assert seconds_to_ms(Decimal("1764576000.001")) == NOW + 1
    for bad in ("2025-12-01", "2025-13-01T00:00:00Z", "2025-12-01T08:00:00"):
        with pytest.raises(ValueError):
            rfc3339_ms(bad)


class _MemoryWriter:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.error: BaseException | None = None

    def write(self, items: list[Any]) -> Future[None]:
        future: Future[None] = Future()
        if self.error is not None:
            future.set_exception(self.error)
        else:
            self.items += items
            future.set_result(None)
        return future

    def close(self) -> None:
        pass


def _app(tmp_path: Path, writer: Any) -> tuple[ServerApp, str]:
    keys = KeyStore(tmp_path / "keys.db")
    key, _ = keys.create("acme", ["ingest", "read"])
    return ServerApp(registry=REGISTRY, keys=keys, writer=writer, reader=None, quotas=None,
                     openapi={}, clock_ms=lambda: NOW), key


def _post(app: ServerApp, key: str, path: str, body: Any, ctype: str) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return asyncio.run(app.handle(Request("POST", path.encode(), b"", {
        "authorization": f"Bearer {key}", "content-type": ctype}, raw)))


def test_cloudevent_maps_to_the_sdk_item(tmp_path: Path) -> None:
    writer = _MemoryWriter()
    app, key = _app(tmp_path, writer)
    body = (b'{"specversion":"1.0","id":"e1","source":"app","type":"llm_tokens",'
            b'"subject":"c1","time":"2025-12-01T08:00:00.5Z",'
            b'"data":{"quantity":10000000.123456789,"model":"m","other":1}}')
    r = _post(app, key, "/api/v1/events", body, "application/cloudevents+json")
    assert r.status == 204, r.body
    # The JSON number keeps every digit (a float could not: 10000000.123456789 is not
    # exactly representable), and "other" is not a dimension of llm_tokens: ignored.
    assert writer.items == [("acme:c1", "llm_tokens", 10_000_000_123_456_789, NOW + 500,
                             {"model": "m"}, scoped_id("acme", "app", "e1"), "app")]


def test_count_meter_counts_events_and_lago_maps_subscription(tmp_path: Path) -> None:
    writer = _MemoryWriter()
    app, key = _app(tmp_path, writer)
    r = _post(app, key, "/api/v1/events/batch", {"events": [
        {"transaction_id": "t1", "external_subscription_id": "sub", "code": "api_calls",
         "timestamp": 1_764_576_000, "properties": {"quantity": 5, "endpoint": "/x"}},
        {"transaction_id": "t2", "external_subscription_id": "sub",
         "external_customer_id": "cust", "code": "active_users",
         "timestamp": "2025-12-01T08:00:00Z", "properties": {"user_id": 42}},
    ]}, "application/json")
    assert r.status == 200, r.body
    assert [it[:5] for it in writer.items] == [
        ("acme:sub", "api_calls", 10**9, NOW, {"endpoint": "/x"}),
        ("acme:cust", "active_users", 10**9, NOW, {"user_id": "42"})]
    assert writer.items[0][5] == scoped_id("acme", "sub", "t1")


def test_unavailable_pipeline_is_503_with_retry_after(tmp_path: Path) -> None:
    writer = _MemoryWriter()
    writer.error = Unavailable("Kafka did not acknowledge", retry_after_s=7)
    app, key = _app(tmp_path, writer)
    r = _post(app, key, "/api/v1/events", {"specversion": "1.0", "id": "1", "source": "s",
                                           "type": "api_calls", "subject": "c"},
              "application/cloudevents+json")
    assert r.status == 503 and r.headers["retry-after"] == "7"
    assert orjson.loads(r.body)["type"] == "/problems/unavailable"


# --------------------------------------------------------------------------- writers


def test_local_log_writer_is_durable_and_partitions_like_the_sdk(tmp_path: Path) -> None:
    log = LocalLog(tmp_path / "log.db", partitions=4)
    writer = LocalLogWriter(log, clock_ms=lambda: NOW)
    items = [(f"t:c{i}", "api_calls", 10**9, NOW, None, f"t:v{i}", None) for i in range(50)]
    writer.write(items).result(timeout=30)
    writer.close()
    log.close()
    # Read back through a fresh connection: committed, not just in memory.
    reopened = LocalLog(tmp_path / "log.db")
    seen = {}
    for p in range(4):
        for rec in reopened.read(p, 0, 100):
            for ev in decode_batch(rec.payload).events():
                assert partition_for(ev.customer, 4) == p
                seen[ev.id] = ev.customer
    assert seen == {f"t:v{i}": f"t:c{i}" for i in range(50)}


class _BlockingLog:
    partitions = 2

    def __init__(self, fail: bool = False) -> None:
        self.release = threading.Event()
        self.fail = fail

    def append(self, partition: int, payloads: list[bytes]) -> list[int]:
        self.release.wait(30)
        if self.fail:
            raise sqlite3.OperationalError("database or disk is full")
        return list(range(len(payloads)))


def test_local_log_writer_refuses_past_its_bound_and_reports_failures() -> None:
    log = _BlockingLog(fail=True)
    writer = LocalLogWriter(log, max_pending_events=10, clock_ms=lambda: NOW)
    item = ("t:c", "api_calls", 1, NOW, None, "t:v1", None)
    first = writer.write([item] * 8)
    with pytest.raises(Unavailable):  # 8 pending + 5 > 10: refused at once, not queued
        writer.write([item] * 5)
    log.release.set()
    with pytest.raises(Unavailable, match="disk is full"):
        first.result(timeout=30)
    assert writer.admission.pending == 0
    writer.close()


# --------------------------------------------------------------------------- keys


def test_keys_are_hashed_at_rest_and_revocable(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db")
    key, info = store.create("acme", ["read"])
    other = KeyStore(tmp_path / "keys.db")  # e.g. the CLI in another process
    assert store.authenticate(key) is not None
    assert key.encode() not in (tmp_path / "keys.db").read_bytes()
    assert key.split("_", 2)[2].encode() not in b"".join(
        p.read_bytes() for p in tmp_path.iterdir())
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.authenticate("ml_" + info.key_id) is None
    assert other.revoke(info.key_id)
    assert store.authenticate(key) is None  # seen through PRAGMA data_version
    with pytest.raises(ValueError):
        store.create("Acme:1", ["read"])
    with pytest.raises(ValueError):
        store.create("acme", ["write"])


# --------------------------------------------------------------------------- usage


def test_month_boundaries() -> None:
    assert month_start_ms(NOW) == 1_764_547_200_000  # 2025-12-01T00:00Z
    assert next_month_ms(1_764_547_200_000) == 1_767_225_600_000  # 2026-01-01
    assert next_month_ms(1_767_225_600_000) == 1_769_904_000_000  # 2026-02-01


class _CountingReader:
    def __init__(self) -> None:
        self.calls = 0
        self.value = 0

    def used(self, customer: str, meter: Any, start_ms: int, end_ms: int) -> int:
        self.calls += 1
        return self.value


def test_quota_cache_is_dropped_by_a_rollup_write() -> None:
    reader = _CountingReader()
    generation = RollupGeneration()
    limits = ConfigLimits([QuotaRule("api_calls", 10 * 10**9),
                           QuotaRule("api_calls", 3 * 10**9, "day", "acme", "vip")])
    service = QuotaService(reader, limits, generation, clock_ms=lambda: NOW)  # type: ignore
    meter = REGISTRY.get("api_calls")
    assert meter is not None
    reader.value = 4 * 10**9
    status: Callable[[], Any] = lambda: service.status("acme", "c", "acme:c", meter)  # noqa
    assert status().used_nanos == 4 * 10**9 and status().remaining_nanos == 6 * 10**9
    assert reader.calls == 1  # cached
    reader.value = 5 * 10**9
    assert status().used_nanos == 4 * 10**9  # no rollup write since: still exact
    generation.bump()
    assert status().used_nanos == 5 * 10**9 and reader.calls == 2
    vip = service.status("acme", "vip", "acme:vip", meter)
    assert vip is not None and (vip.limit_nanos, vip.period) == (3 * 10**9, "day")
    assert service.status("bravo", "vip", "bravo:vip", REGISTRY.get("llm_tokens")) is None
