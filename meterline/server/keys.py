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
table is tiny.

The server caches verified keys (and refusals) in memory. When to drop that cache, so a
revocation from another process takes effect promptly, without touching SQLite on every
request: SQLite releases the GIL for each statement, so even a few-microsecond
``PRAGMA data_version`` per request made every request wait for the GIL behind the other
runnable threads (measured: ~110 us of a ~430 us request under cProfile; docs/server.md).
Two signals instead:
- a generation file beside the database (``<keys file>.generation``, 8 bytes, mapped into
  memory): every write through this class (``meterline keys create/revoke``, any
  process) commits, then stores a fresh random value there; a request compares it with
  the value it last saw, a memory read with no system call and no GIL release. A
  revocation by the CLI so takes effect on the next request, as before.
- for writers that bypass this class (an operator's ``sqlite3`` shell on the file),
  ``PRAGMA data_version`` at most every ``RECHECK_S`` (0.1 s): a request that starts
  0.1 s or more after such a commit sees it (tests/server/test_keys_freshness.py).
  ``METERLINE_KEYS_RECHECK_S`` overrides it; 0 checks on every request, as before (the
  benchmark's baseline, benchmarks/server_ingest.py).
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import os
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
# The longest a change written to the key file by something other than KeyStore goes
# unseen by a running server (the module docstring says why it is not zero).
RECHECK_S = 0.1
_MISS = object()

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

    def __init__(self, path: str | Path, recheck_s: float | None = None) -> None:
        self.path = Path(path)
        self.recheck_s = _recheck_s() if recheck_s is None else recheck_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._cache: dict[str, Principal | None] = {}
        self._version = -1
        self._recheck_at = 0.0  # monotonic time of the next PRAGMA data_version
        self._generation = _Generation(self.path.with_name(self.path.name + ".generation"))
        self._seen_generation = self._generation.read()

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
            # After the commit: every process drops its cache. Not needed for a new random
            # key, but "every write moves the generation" is the simpler rule to trust.
            self._generation.bump()
        return key, KeyInfo(key_id, tenant, scopes, name, created, None)

    def revoke(self, key_id: str, now_ms: int | None = None) -> bool:
        revoked = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        with self._lock:
            cur = self._db.execute(
                "UPDATE api_keys SET revoked_ms = ? WHERE key_id = ? AND revoked_ms IS NULL",
                (revoked, key_id))
            self._cache.clear()  # data_version only moves for *other* connections' writes
            self._generation.bump()
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
        now = time.monotonic()
        if now < self._recheck_at and self._generation.read() == self._seen_generation:
            # The hot path: no lock, no SQLite. A dict read is atomic under the GIL, and a
            # revocation racing with it is no different from one a moment later.
            hit = self._cache.get(key, _MISS)
            if hit is not _MISS:
                return hit  # type: ignore[return-value]
        with self._lock:
            generation = self._generation.read()
            if generation != self._seen_generation:  # a KeyStore somewhere wrote
                self._cache.clear()
                self._seen_generation = generation
            if now >= self._recheck_at:
                # ``now`` was taken before this statement reads its snapshot, so a commit
                # RECHECK_S before a request's start is always seen.
                version = self._db.execute("PRAGMA data_version").fetchone()[0]
                if version != self._version:  # another connection changed the file
                    self._cache.clear()
                    self._version = version
                self._recheck_at = now + self.recheck_s
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
            self._generation.close()


def _recheck_s() -> float:
    text = os.environ.get("METERLINE_KEYS_RECHECK_S", "").strip()
    if not text:
        return RECHECK_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        raise ConfigError([f"METERLINE_KEYS_RECHECK_S must be seconds in 0..60, got "
                           f"{text!r}"], "api keys")
    return value


class _Generation:
    """8 bytes in a small file, shared by every process that maps it: a value that
    changes after each committed write to the key table (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)  # zero-filled; never shrinks a file another made
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)  # the mapping keeps the file

    def read(self) -> bytes:
        # A torn read (a writer halfway through) only looks like one more change: an extra
        # cache drop, never a missed one, since every writer stores a new random value.
        return self._map[:8]

    def bump(self) -> None:
        # Random rather than +1: two processes bumping at once cannot store the same
        # value a reader already saw, which a lost increment could.
        self._map[:8] = secrets.token_bytes(8)

    def close(self) -> None:
        self._map.close()
