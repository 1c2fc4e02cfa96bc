"""What the export stage hands a target, and what a target answers.

An :class:`ExportItem` is one rated line (or one correction of a line) on its way to an
invoicing system. Its ``key`` is the idempotency key every target is given: it is built
from the line's identity in ``rated_usage`` (subscription, period, line id, correction),
never from the run, so a re-run, a retry after kill -9 or a replay sends the same key and
the target (Stripe's ``identifier``/``Idempotency-Key``, the webhook receiver, Chargebee's
deduplication) recognises it. Corrections are their own items with their own key and
``corrects`` = the key of the item they amend: what was sent is never mutated.

A target answers each item with a :class:`SendResult` whose ``outcome`` drives the ledger:

- ``sent``: the target holds the item (2xx, or an idempotent replay of an earlier send);
- ``retry``: nothing is known to be held and trying again may work (5xx, 429, timeout,
  connection refused); the ledger keeps the item pending with a backoff;
- ``failed``: the target refused it for good (4xx other than 409/429): stored with the
  reason, not retried, shown by ``meterline export --status`` and reconcile.

``response`` is a short text for the ledger and logs; targets must never put a secret
(API key, webhook secret, Authorization header) in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, Protocol

__all__ = ["ExportItem", "ExportTarget", "Outcome", "SendResult", "item_key"]

Outcome = Literal["sent", "retry", "failed"]


def item_key(subscription_id: str, period_start_ms: int, line_id: str, correction: int) -> str:
    """The idempotency key of a rated line: stable across runs, unique per line version.

    ``ml1`` versions the format; the parts are the primary key of ``rated_usage`` without
    the customer (a subscription belongs to one customer). Stripe allows 100 characters
    for an ``identifier``; targets with shorter limits hash the key (and say so).
    """
    return f"ml1:{subscription_id}:{period_start_ms}:{line_id}:{correction}"


@dataclass(frozen=True, slots=True)
class ExportItem:
    key: str  # idempotency key, see item_key()
    customer: str
    subscription_id: str
    period_start_ms: int  # the invoice period, UTC ms, [start, end)
    period_end_ms: int
    line_id: str  # "<segment start ms>/<kind>[/<meter>:<aggregation>]"
    correction: int  # 0: the line itself; n > 0: the n-th correction of it
    corrects: str  # key of the item a correction amends; "" for a line
    kind: str  # base_fee | usage | trial_usage
    meter: str  # "" for a base fee
    aggregation: str  # "" for a base fee
    quantity: Decimal  # exact, in the meter's units (a correction: the difference)
    amount: Decimal  # rounded once to the currency's minor unit (a correction: the difference)
    currency: str  # ISO 4217, upper case
    plan_id: str
    plan_version: int
    segment_start_ms: int  # the part of the period the line covers
    segment_end_ms: int


@dataclass(frozen=True, slots=True)
class SendResult:
    key: str
    outcome: Outcome
    status: int | None = None  # HTTP status where there is one
    response: str = ""  # short, secrets redacted
    remote_id: str = ""  # the target's id for the item (Stripe invoice item id, ...)


class ExportTarget(Protocol):
    """One invoicing system. ``send`` is called with a batch of items that are all pending
    in the ledger and returns one result per item, in any order; it must not raise for a
    per-item problem (that is a ``failed`` or ``retry`` result), only for a programming
    error. ``received`` lists the keys the target reports holding, for reconcile's last hop
    (``None`` where the target cannot list them)."""

    name: str

    def send(self, items: Sequence[ExportItem]) -> list[SendResult]: ...

    def received(self, keys: Sequence[str]) -> set[str] | None: ...
