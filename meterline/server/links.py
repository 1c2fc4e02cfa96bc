"""Signed, expiring links to one customer's usage page.

A browser cannot send ``Authorization: Bearer``, and an API key in a URL would give
whoever sees the URL (history, a shared screen, a proxy log) the tenant's whole read
scope for ever. So a read-scoped key asks ``POST /api/v1/usage-links`` for a link that
shows *one* customer's page until it expires:

    /usage/<customer>?k=<key id>&exp=<UTC ms>&sig=<hex HMAC-SHA256>

``sig`` covers the key id, the key's tenant, the customer and the expiry, under a server
secret kept in the key store (``KeyStore.secret``). The link names its key, so revoking
the key revokes every link it made; a link cannot be widened to another customer or a
later expiry without the secret. The page answers ``Referrer-Policy: no-referrer`` so the
signature does not leak through links on it.
"""

from __future__ import annotations

import hashlib
import hmac

SECRET_NAME = "usage-links"
MAX_TTL_MS = 31 * 86_400_000  # a link outlives no billing period by much
DEFAULT_TTL_MS = 7 * 86_400_000


def _message(key_id: str, tenant: str, customer: str, expires_ms: int) -> bytes:
    # Length-prefixed fields: no two different tuples sign the same bytes.
    parts = (key_id, tenant, customer, str(expires_ms))
    return "".join(f"{len(p)}:{p}" for p in parts).encode("utf-8", "surrogatepass")


def sign(secret: bytes, key_id: str, tenant: str, customer: str, expires_ms: int) -> str:
    return hmac.new(secret, _message(key_id, tenant, customer, expires_ms),
                    hashlib.sha256).hexdigest()


def verify(secret: bytes, key_id: str, tenant: str, customer: str, expires_ms: int,
           signature: str, now_ms: int) -> bool:
    """True when ``signature`` is the one ``sign`` made and the link has not expired."""
    if now_ms >= expires_ms:
        return False
    want = sign(secret, key_id, tenant, customer, expires_ms)
    return hmac.compare_digest(want, signature)
