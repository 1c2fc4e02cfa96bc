"""How customers and event ids belong to a tenant.

A deployment can serve several tenants (companies, or environments of one company) from one
pipeline. The rollups, dedupe and storage key everything by customer and event id and know
nothing of tenants, so the server *namespaces* both on the way in and strips the namespace
on the way out:

- stored customer = ``"{tenant}:{customer}"``. Tenant names cannot contain ``:``, so the
  first ``:`` always ends the tenant and the mapping is injective: a key of tenant ``a``
  can only ever name customers stored under ``a:``, whatever customer string it sends.
- stored event id = ``"{tenant}:v{len(p1)}:{p1}{len(p2)}:{p2}..."`` or, when that would exceed the
  128-character id limit, ``"{tenant}:h{sha256}"``. Injective as well (length-prefixed
  parts), so two different idempotency keys never dedupe each other, and deterministic,
  so a resend of the same key always dedupes.

This is the least invasive design that is really enforced: no schema change, no tenant
column to forget in a query; every read filters on the exact stored customer id built
from the key's tenant. Partitioning uses the stored id (a tenant's customer keeps one
partition, as any customer).
"""

from __future__ import annotations

import hashlib
import re

from meterline.core.events import MAX_CUSTOMER_LEN, MAX_ID_LEN

TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
SEPARATOR = ":"


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        raise ValueError(f"tenant must match {TENANT_RE.pattern} (no ':'), got {tenant!r}")
    return tenant


def max_customer_len(tenant: str) -> int:
    return MAX_CUSTOMER_LEN - len(tenant) - len(SEPARATOR)


def scoped_customer(tenant: str, customer: str) -> str:
    return f"{tenant}{SEPARATOR}{customer}"


def external_customer(tenant: str, stored: str) -> str | None:
    """The tenant's own customer id for a stored one, or None if it is not the tenant's."""
    prefix = tenant + SEPARATOR
    return stored[len(prefix):] if stored.startswith(prefix) else None


def scoped_id(tenant: str, *parts: str) -> str:
    """A tenant-scoped, injective, deterministic event id from idempotency-key parts."""
    # Every part length-prefixed: ("a:b", "c") and ("a", "b:c") encode differently.
    body = "v" + "".join(f"{len(p)}{SEPARATOR}{p}" for p in parts)
    scoped = f"{tenant}{SEPARATOR}{body}"
    if len(scoped) <= MAX_ID_LEN:
        return scoped
    digest = hashlib.sha256(body.encode("utf-8", "surrogatepass"))
    return f"{tenant}{SEPARATOR}h{digest.hexdigest()}"
