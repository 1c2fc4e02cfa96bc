"""The key cache's freshness (server/keys.py): a revocation from another process takes
effect on the next request when written through KeyStore (the CLI), and within
``RECHECK_S`` when written to the SQLite file by anything else; between those, a request
runs no SQL at all (SQLite releases the GIL, which is what made the per-request check
costly)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from meterline.server.keys import RECHECK_S, KeyStore


def _in_other_process(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_revocation_through_keystore_in_another_process_is_seen_at_once(
        tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    store = KeyStore(db)
    key, info = store.create("acme", ["ingest"])
    assert store.authenticate(key) is not None  # cached from here on
    _in_other_process("from meterline.server.keys import KeyStore; "
                      f"assert KeyStore({str(db)!r}).revoke({info.key_id!r})")
    assert store.authenticate(key) is None  # the very next call: the generation moved
    # and a key made by another process works at once (no cached refusal outlives it)
    made = _in_other_process("from meterline.server.keys import KeyStore; "
                             f"print(KeyStore({str(db)!r}).create('acme', ['read'])[0])")
    principal = store.authenticate(made)
    assert principal is not None and principal.scopes == {"read"}


def test_foreign_write_is_seen_within_the_recheck_bound(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    store = KeyStore(db, recheck_s=RECHECK_S)
    key, info = store.create("acme", ["ingest"])
    assert store.authenticate(key) is not None
    # An operator's sqlite3 shell, say: a plain connection in another process, which does
    # not move the generation file.
    _in_other_process(f"import sqlite3; c = sqlite3.connect({str(db)!r}); "
                      f"c.execute('UPDATE api_keys SET revoked_ms = 1 WHERE key_id = ?', "
                      f"({info.key_id!r},)); c.commit()")
    committed = time.monotonic()  # the commit happened before this
    # Poll: any call that starts RECHECK_S or more after the commit must refuse the key,
    # so the first such call either ends the loop or fails it.
    while True:
        started = time.monotonic()
        if store.authenticate(key) is None:
            break
        assert started < committed + RECHECK_S, (
            f"revoked key still accepted {started - committed:.3f} s after the commit")
        time.sleep(RECHECK_S / 20)


def test_cached_requests_run_no_sql(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.db", recheck_s=RECHECK_S)
    key, _ = store.create("acme", ["ingest"])
    assert store.authenticate(key) is not None
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)  # what SQLite is asked, from here on
    started = time.monotonic()
    for _ in range(20_000):
        assert store.authenticate(key) is not None
    elapsed = time.monotonic() - started
    # At most one PRAGMA data_version per RECHECK_S of wall time, never one per request.
    assert all(s == "PRAGMA data_version" for s in statements), statements[:5]
    assert len(statements) <= elapsed / RECHECK_S + 1
