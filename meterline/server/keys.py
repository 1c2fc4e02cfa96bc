"""API keys: hashed at rest, each scoped to one tenant and to ingest / read / admin.

A key looks like ``ml_<key id>_<secret>``: 12 hex characters of id (a lookup handle that
is safe to show, e.g. in ``meterline keys list``) and 32 random bytes of secret
(``secrets.token_urlsafe``, 256 bits). The store keeps only SHA-256 of the whole key. A
plain hash is enough (no bcrypt/argon2): the secret has full entropy, so there is
nothing to guess, and a fast hash keeps authentication off the request's critical path.
The presented key's hash is compared with ``hmac.compare_digest`` (constant time).

Scopes: ``ingest`` may send events, ``read`` may read usage and quotas, ``admin`` may do
both (key management itself is the CLI's, on the machine that holds the store).

Where: one SQLite file (default ``<data dir>/../meterline-keys.db``, beside the chDB
directory rather than in it, since chDB owns that directory). SQLite because the keys
must survive restarts, change while the server runs (``meterline keys create/revoke``
from another process) and be written atomically, which it gives for free (WAL); the
table is tiny. The server caches verified keys and drops the cache whenever the file
changed (``PRAGMA data_version``, a few microseconds per request), so a revocation takes
effect on the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from meterline.core.errors import ConfigError
from meterline.server.tenancy import check_tenant

SCOPES = ("ingest", "read", "admin")
_PREFIX = "ml_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    scopes TEXT NOT NULL,
    sha256 BLOB NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: the key's id, tenant and scopes."""

    key_id: str
    tenant: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    tenant: str
    scopes: tuple[str, ...]
    name: str
    created_ms: int
    revoked_ms: int | None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _split(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    if not key.startswith(_PREFIX):
        return None
    key_id, sep, secret = key[len(_PREFIX):].partition("_")
    if not sep or len(key_id) != 12 or not secret:
        return None
    return key_id


def check_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ConfigError([f"scopes must be some of {', '.join(SCOPES)}, got "
                           f"{', '.join(scopes) or 'none'}"], "api key")
    return tuple(dict.fromkeys(scopes))


class KeyStore:
    """The key table. Thread-safe; ``authenticate`` is the hot path (cached)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._cache: dict[str, Principal | None] = {}
        self._version = -1

    def create(self, tenant: str, scopes: list[str] | tuple[str, ...], name: str = "",
               now_ms: int | None = None) -> tuple[str, KeyInfo]:
        """A new key: returns the key (shown once, never stored) and its record."""
        try:
            check_tenant(tenant)
        except ValueError as exc:
            raise ConfigError([str(exc)], "api key") from None
        scopes = check_scopes(scopes)
        key_id = secrets.token_hex(6)
        key = f"{_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        created = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with self._lock:
            self._db.execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                             (key_id, tenant, ",".join(scopes), _digest(key), name, created))
        return key, KeyInfo(key_id, tenant, scopes, name, created, None)

    def revoke(self, key_id: str, now_ms: int | None = None) -> bool:
        revoked = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with self._lock:
            cur = self._db.execute(
                "UPDATE api_keys SET revoked_ms = ? WHERE key_id = ? AND revoked_ms IS NULL",
                (revoked, key_id))
            self._cache.clear()  # data_version only moves for *other* connections' writes
        return cur.rowcount == 1

    def list(self) -> list[KeyInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, tenant, scopes, name, created_ms, revoked_ms FROM api_keys "
                "ORDER BY created_ms, key_id").fetchall()
        return [KeyInfo(r[0], r[1], tuple(r[2].split(",")), r[3], r[4], r[5]) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM api_keys "
                                        "WHERE revoked_ms IS NULL").fetchone()[0])

    def authenticate(self, key: str) -> Principal | None:
        """The key's principal, or None for an unknown, malformed or revoked key."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:  # another connection changed the table
                self._cache.clear()
                self._version = version
            if key in self._cache:
                return self._cache[key]
            principal = self._lookup(key)
            if len(self._cache) > 10_000:  # bounded: garbage keys cannot grow it forever
                self._cache.clear()
            self._cache[key] = principal
            return principal

    def _lookup(self, key: str) -> Principal | None:
        key_id = _split(key)
        if key_id is None:
            return None
        row = self._db.execute(
            "SELECT tenant, scopes, sha256, revoked_ms FROM api_keys WHERE key_id = ?",
            (key_id,)).fetchone()
        if row is None or row[3] is not None:
            return None
        if not hmac.compare_digest(bytes(row[2]), _digest(key)):
            return None
        return Principal(key_id, row[0], frozenset(row[1].split(",")))

    def principal(self, key_id: str) -> Principal | None:
        """The principal of an active key by its id (a signed usage link names the key
        that made it, so revoking the key revokes its links)."""
        with self._lock:
            row = self._db.execute("SELECT tenant, scopes, revoked_ms FROM api_keys "
                                   "WHERE key_id = ?", (key_id,)).fetchone()
        if row is None or row[2] is not None:
            return None
        return Principal(key_id, row[0], frozenset(row[1].split(",")))

    def secret(self, name: str) -> bytes:
        """A 256-bit server secret (e.g. for signing usage links), made on first use and
        kept in this file so every server process on it and every restart share it."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO secrets VALUES (?, ?)",
                             (name, secrets.token_bytes(32)))
            row = self._db.execute("SELECT value FROM secrets WHERE name = ?",
                                   (name,)).fetchone()
        return bytes(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
