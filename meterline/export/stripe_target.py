"""The Stripe target: rated lines to Stripe with the official ``stripe`` SDK.

What goes where (decided here, documented in docs/export.md):

- A **usage line of a meter mapped to a Stripe meter** (``meters``: ``"<meter>:<aggregation>"``
  -> the Stripe meter's ``event_name``) goes as one **billing meter event**
  (``POST /v1/billing/meter_events``): Stripe prices it with the subscription's metered
  price. ``identifier`` is the item's idempotency key, the ``Idempotency-Key`` header too.
- **Everything else is an invoice item** (``POST /v1/invoiceitems``) priced by Meterline:
  base fees, trial usage (at its amount, 0), usage of meters not mapped to a Stripe meter,
  and *every correction*. A correction is its own invoice item (the amount difference,
  negative for a credit) whose metadata names the item it ``corrects``; what was sent is
  never touched. Corrections are not meter events because a meter event cannot be
  negative, and Stripe's aggregate for a billed period cannot be amended after the fact.

Stripe's rules, checked before anything is sent (a refusal is a ``failed`` result with the
reason, nothing is sent):

- meter event ``identifier`` is at most 100 characters
  (https://docs.stripe.com/api/billing/meter-event/create): a longer key is sent as
  ``ml1h:<sha256 of the key>`` (69 characters), deterministically, so a retry sends the
  same one; the full key is in the ledger, and in an invoice item's metadata;
- a meter event's value is a whole number ("The numerical usage value in the payload only
  accepts whole number values",
  https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api): a
  fractional quantity (e.g. a time-weighted sum) is ``failed``: map that meter to invoice
  items instead (leave it out of ``meters``);
- a meter event's ``timestamp`` is within the past 35 days and at most 5 minutes ahead
  (same page). The timestamp is the line's last second (``segment_end_ms - 1``, floored),
  so Stripe files the usage into the period it belongs to. **Older than 35 days is a
  permanent ``failed``**, not a silent fallback to an invoice item: an earlier attempt may
  have reached Stripe as a meter event (its answer lost), and billing the same usage again
  as an invoice item would charge it twice. Finance resolves such lines by hand (the
  reason says so). **More than 5 minutes ahead is ``retry``**: the line becomes sendable.
- invoice item ``amount`` is an integer in the currency's minor unit, computed exactly from
  the Decimal (``amount.scaleb(exponent)``, which must be whole); three-decimal currencies
  must end in 0 (https://docs.stripe.com/currencies#three-decimal).

Customers: ``customers`` maps a Meterline customer to its Stripe customer id (a TOML file,
:meth:`StripeConfig.from_toml`); a Meterline customer id that *is* a Stripe id (``cus_...``)
maps to itself. An unmapped customer is ``failed`` with the reason.

Outcomes: 2xx -> ``sent`` (an ``Idempotent-Replayed`` answer too: Stripe already holds the
item); 429, 5xx, 409 (another request with the same key is in flight: the next try gets the
replay), timeouts and connection errors -> ``retry``; 400 ``idempotency_error`` (the key was
used before with *different* parameters: Stripe holds another item under it) and every
other 4xx -> ``failed`` with Stripe's message. The SDK's own retries are off
(``max_network_retries=0``): the export ledger owns retries and backoff. Stripe keeps
idempotency keys for 24 hours (https://docs.stripe.com/api/idempotent_requests: "keys are
eligible to be removed ... after they're at least 24 hours old"; a meter event
``identifier`` is unique "within a rolling period of at least 24 hours"), so a resend later
than that is no longer recognised and could bill twice. The target declares
:data:`IDEMPOTENCY_WINDOW_MS` (24 h less an hour for the request's own time and clock
drift) and the ledger holds back any item first attempted longer ago: ``failed`` with
"idempotency window passed: check stripe for <key> ...", re-queued only by ``meterline
export --replay-past-window`` after someone has looked in Stripe.

Concurrency: ``send`` runs up to ``concurrency`` requests at once, but meter events of one
(customer, meter) one at a time: Stripe allows "one concurrent call per customer per meter".

``received``: invoice items can be listed and carry the key in ``metadata[meterline_key]``;
meter events cannot be listed at all (meter event summaries are per-customer aggregates,
not events). So ``received`` answers the keys held as invoice items, and ``None`` (cannot
tell) when any asked key went as a meter event.

Secrets: the API key is in no result, log record or exception text. Stripe's answers are
passed through :func:`redact` (which also blanks anything shaped like a Stripe key), and a
filter on the ``stripe`` SDK logger redacts its records (it logs response bodies at DEBUG).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meterline.core.pricing.currencies import MINOR_UNITS
from meterline.core.pricing.exact import fmt
from meterline.export.http_targets import (
    PooledSdkTarget,
    TargetConfigError,
    check_known,
    failed,
    load_table,
    pool_errors,
    redact_secrets,
)
from meterline.export.items import ExportItem, SendResult

try:
    import stripe
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Stripe export target needs the official SDK: pip install 'meterline[invoicing]'"
    ) from exc

__all__ = [
    "IDEMPOTENCY_WINDOW_MS",
    "MAX_IDENTIFIER",
    "StripeConfig",
    "StripeConfigError",
    "StripeTarget",
    "redact",
    "stripe_key",
]

log = logging.getLogger(__name__)

# Stripe's limit for a meter event identifier (docs above); Idempotency-Key allows 255, so
# one bounded value serves both.
MAX_IDENTIFIER = 100
# https://docs.stripe.com/billing/subscriptions/usage-based/recording-usage-api
MAX_PAST_MS = 35 * 86_400_000
MAX_AHEAD_MS = 5 * 60_000
# Stripe keeps an idempotency key (and a meter event identifier) at least 24 h; an hour of
# margin covers the request's own time and drift between our clock and Stripe's.
STRIPE_IDEMPOTENCY_MS = 24 * 3_600_000
IDEMPOTENCY_WINDOW_MS = STRIPE_IDEMPOTENCY_MS - 3_600_000
# Metadata values are limited to 500 characters (https://docs.stripe.com/api/metadata).
_MAX_METADATA_VALUE = 500
_STRIPE_SECRET = re.compile(r"\b(?:sk|rk|pk)_(?:test|live)_[A-Za-z0-9]+")
# ml1:<subscription>:<period start>:<segment start>/<kind>[/<meter>:<agg>]:<correction>
_KEY = re.compile(r"^ml1:.*:\d+:\d+/(?P<kind>[a-z_]+)(?:/(?P<meter>.+))?:(?P<correction>\d+)$")


def stripe_key(key: str) -> str:
    """The key as Stripe gets it: itself when it fits in 100 characters, else a hash."""
    if len(key) <= MAX_IDENTIFIER:
        return key
    return "ml1h:" + hashlib.sha256(key.encode()).hexdigest()


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` without the given secrets or anything shaped like a Stripe API key."""
    return _STRIPE_SECRET.sub("[redacted]", redact_secrets(text, secrets))


class StripeConfigError(TargetConfigError):
    target = "Stripe"


@dataclass(frozen=True)
class StripeConfig:
    api_key: str = field(repr=False)  # from the environment (STRIPE_API_KEY), never a file
    customers: Mapping[str, str] = field(default_factory=dict)
    meters: Mapping[str, str] = field(default_factory=dict)  # "meter:aggregation" -> event
    api_base: str = "https://api.stripe.com"
    timeout_s: float = 30.0
    concurrency: int = 8

    def validate(self) -> list[str]:
        """Every problem at once; the key itself is never quoted."""
        errors: list[str] = []
        if not isinstance(self.api_key, str) or not self.api_key.startswith(("sk_", "rk_")):
            errors.append("api_key: a Stripe secret or restricted key (sk_... / rk_...) "
                          "is required (set STRIPE_API_KEY)")
        for name, cus in self.customers.items():
            if not isinstance(cus, str) or not cus.startswith("cus_"):
                errors.append(f"customers.{name}: {cus!r} is not a Stripe customer id (cus_...)")
        for meter, event in self.meters.items():
            if not isinstance(meter, str) or meter.count(":") != 1 or meter.startswith(":"):
                errors.append(f"meters: {meter!r} must be '<meter>:<aggregation>', e.g. "
                              "'api_calls:count' (one Stripe meter per Meterline aggregate)")
            if not isinstance(event, str) or not 0 < len(event) <= 100:
                errors.append(f"meters.{meter}: event_name {event!r} must be 1-100 characters")
        if not self.api_base.startswith(("http://", "https://")):
            errors.append(f"api_base: {self.api_base!r} is not an http(s) URL")
        return errors + pool_errors(self.timeout_s, self.concurrency, 64)

    def check(self) -> StripeConfig:
        errors = self.validate()
        if errors:
            raise StripeConfigError(errors)
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], api_key: str) -> StripeConfig:
        """From the ``[stripe]`` table of a TOML file::

            [stripe]
            concurrency = 8
            [stripe.customers]
            acme = "cus_NffrFeUfNV2Hib"
            [stripe.meters]
            "api_calls:count" = "api_calls"
        """
        kwargs = check_known(data, {"customers", "meters", "api_base", "timeout_s",
                                    "concurrency"}, StripeConfigError)
        return cls(api_key=api_key, **kwargs).check()

    @classmethod
    def from_toml(cls, path: str | Path, api_key: str) -> StripeConfig:
        return cls.from_mapping(load_table(path, "stripe"), api_key)


@dataclass(frozen=True, slots=True)
class _Call:
    """One request the target decided to make for an item."""

    item: ExportItem
    kind: Literal["meter_event", "invoice_item"]
    params: dict[str, Any]
    idempotency_key: str
    group: str  # calls of one group go one at a time (Stripe: per customer per meter)


class StripeTarget(PooledSdkTarget):
    """:class:`~meterline.export.items.ExportTarget` for Stripe (see the module doc)."""

    name = "stripe"
    sdk_logger = "stripe"
    idempotency_window_ms = IDEMPOTENCY_WINDOW_MS  # the engine reads it (engine.py)

    def __init__(self, config: StripeConfig, *, clock_ms: Callable[[], int] | None = None,
                 http_client: Any = None) -> None:
        self.config = config.check()
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._client = stripe.StripeClient(
            config.api_key,
            base_addresses={"api": config.api_base},
            max_network_retries=0,  # the export ledger owns retries and backoff
            http_client=http_client or stripe.RequestsClient(timeout=config.timeout_s),
        )
        self._open_pool(config.concurrency, [config.api_key])

    def __repr__(self) -> str:
        return f"StripeTarget(api_base={self.config.api_base!r})"

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    @staticmethod
    def remote_key(key: str) -> str:
        """The idempotency key Stripe got for a ledger key (to look it up by hand)."""
        return stripe_key(key)

    # -- planning (pure) -------------------------------------------------------------
    def event_name(self, item: ExportItem) -> str | None:
        """The Stripe meter an item goes to as a meter event, or None (an invoice item)."""
        if item.kind != "usage" or item.correction != 0:
            return None
        return self.config.meters.get(f"{item.meter}:{item.aggregation}")

    def stripe_customer(self, customer: str) -> str | None:
        mapped = self.config.customers.get(customer)
        if mapped:
            return mapped
        return customer if customer.startswith("cus_") else None

    def plan(self, item: ExportItem, now_ms: int) -> _Call | SendResult:
        """The request for ``item``, or the result when Stripe's rules refuse it."""
        cus = self.stripe_customer(item.customer)
        if cus is None:
            return failed(item, f"no Stripe customer for Meterline customer "
                                 f"{item.customer!r}: add it to [stripe.customers]")
        key = stripe_key(item.key)
        event = self.event_name(item)
        if event is not None:
            return self._meter_event(item, cus, event, key, now_ms)
        return self._invoice_item(item, cus, key)

    def _meter_event(self, item: ExportItem, cus: str, event: str, key: str,
                     now_ms: int) -> _Call | SendResult:
        if item.quantity != item.quantity.to_integral_value():
            return failed(item, f"quantity {fmt(item.quantity)} is not a whole number: Stripe "
                                 "meter events take whole numbers only; send this meter as "
                                 "invoice items (remove it from [stripe.meters])")
        if item.quantity < 0:
            return failed(item, f"quantity {fmt(item.quantity)} is negative: a meter event "
                                 "cannot be")
        at_ms = item.segment_end_ms - 1
        if at_ms < now_ms - MAX_PAST_MS:
            return failed(item, f"usage at {_iso(at_ms)} is more than 35 days before now "
                                 f"({_iso(now_ms)}): Stripe refuses meter events that old. Not "
                                 "re-sent as an invoice item (an earlier attempt may have "
                                 "reached Stripe): bill it by hand after checking the meter's "
                                 "event summaries")
        if at_ms > now_ms + MAX_AHEAD_MS:
            return SendResult(item.key, "retry", None,
                              f"usage at {_iso(at_ms)} is more than 5 minutes ahead of now "
                              f"({_iso(now_ms)}): Stripe refuses it until then")
        params = {
            "event_name": event,
            "payload": {"stripe_customer_id": cus, "value": fmt(item.quantity)},
            "identifier": key,
            "timestamp": at_ms // 1000,
        }
        return _Call(item, "meter_event", params, key, group=f"{cus}\x00{event}")

    def _invoice_item(self, item: ExportItem, cus: str, key: str) -> _Call | SendResult:
        exponent = MINOR_UNITS.get(item.currency.upper())
        if exponent is None:
            return failed(item, f"unknown currency {item.currency!r}")
        minor = item.amount.scaleb(exponent)
        if minor != minor.to_integral_value():
            return failed(item, f"amount {item.amount} {item.currency} is not a whole number "
                                 f"of minor units (10^-{exponent})")
        amount = int(minor)
        if exponent == 3 and amount % 10:
            return failed(item, f"amount {item.amount} {item.currency}: Stripe requires "
                                 "three-decimal currency amounts to end in 0")
        metadata = {
            "meterline_key": item.key if len(item.key) <= _MAX_METADATA_VALUE else key,
            "meterline_subscription": item.subscription_id[:_MAX_METADATA_VALUE],
            "meterline_line_id": item.line_id[:_MAX_METADATA_VALUE],
            "meterline_period": f"{item.period_start_ms}/{item.period_end_ms}",
            "meterline_quantity": fmt(item.quantity),
        }
        if item.correction:
            metadata["meterline_correction"] = str(item.correction)
            metadata["meterline_corrects"] = (item.corrects if len(item.corrects)
                                              <= _MAX_METADATA_VALUE else stripe_key(item.corrects))
        params = {
            "customer": cus,
            "amount": amount,
            "currency": item.currency.lower(),
            "description": _description(item)[:500],
            "period": {"start": item.segment_start_ms // 1000,
                       "end": max(item.segment_start_ms, item.segment_end_ms - 1) // 1000},
            "metadata": metadata,
        }
        return _Call(item, "invoice_item", params, key, group=f"ii\x00{key}")

    # -- sending ---------------------------------------------------------------------
    def send(self, items: Sequence[ExportItem]) -> list[SendResult]:
        now_ms = self._clock_ms()
        results: list[SendResult] = []
        groups: dict[str, list[_Call]] = {}
        for item in items:
            planned = self.plan(item, now_ms)
            if isinstance(planned, SendResult):
                results.append(planned)
            else:
                groups.setdefault(planned.group, []).append(planned)
        futures: list[Future[list[SendResult]]] = [
            self._pool.submit(self._send_group, calls) for calls in groups.values()]
        for fut in futures:
            results.extend(fut.result())
        for r in results:
            if r.outcome != "sent":
                log.warning("stripe %s %s: %s", r.outcome, r.key, r.response)
        return results

    def _send_group(self, calls: list[_Call]) -> list[SendResult]:
        return [self._send_one(call) for call in calls]

    def _send_one(self, call: _Call) -> SendResult:
        options: Any = {"idempotency_key": call.idempotency_key}
        # The SDK's TypedDicts describe the same form fields; ours are built per item.
        params: Any = call.params
        try:
            if call.kind == "meter_event":
                obj: Any = self._client.v1.billing.meter_events.create(
                    params=params, options=options)
                remote = str(getattr(obj, "identifier", "") or call.idempotency_key)
            else:
                obj = self._client.v1.invoice_items.create(params=params, options=options)
                remote = str(getattr(obj, "id", ""))
        except stripe.StripeError as exc:
            return self._classify(call.item.key, exc)
        response = getattr(obj, "last_response", None)
        status = getattr(response, "code", 200)
        headers = getattr(response, "headers", None) or {}
        replayed = str(headers.get("Idempotent-Replayed", "")).lower() == "true"
        text = f"{call.kind} {remote}" + (" (idempotent replay)" if replayed else "")
        return SendResult(call.item.key, "sent", status, self._clean(text), remote)

    def _classify(self, key: str, exc: stripe.StripeError) -> SendResult:
        status = exc.http_status
        message = self._clean(exc.user_message or type(exc).__name__)
        if isinstance(exc, stripe.APIConnectionError):
            return SendResult(key, "retry", None, self._clean(
                f"connection error or timeout: {message.splitlines()[0]}"))
        if isinstance(exc, stripe.RateLimitError) or status == 429:
            return SendResult(key, "retry", status, f"rate limited: {message}")
        if isinstance(exc, stripe.IdempotencyError):
            return SendResult(key, "failed", status,
                              f"idempotency key was used with different parameters (Stripe "
                              f"holds another item under it): {message}")
        if status == 409:
            return SendResult(key, "retry", status,
                              f"conflict (a request with this key is in flight): {message}")
        if status is None or status >= 500:
            return SendResult(key, "retry", status, f"Stripe error: {message}")
        return SendResult(key, "failed", status, message)

    # -- reconcile -------------------------------------------------------------------
    def key_goes_as_meter_event(self, key: str) -> bool:
        match = _KEY.match(key)
        return bool(match and match["kind"] == "usage" and match["correction"] == "0"
                    and match["meter"] in self.config.meters)

    def received(self, keys: Sequence[str]) -> set[str] | None:
        wanted = set(keys)
        if any(self.key_goes_as_meter_event(k) for k in wanted):
            return None  # Stripe cannot list meter events (module doc)
        by_metadata = {(k if len(k) <= _MAX_METADATA_VALUE else stripe_key(k)): k
                       for k in wanted}
        found: set[str] = set()
        try:
            pages = self._client.v1.invoice_items.list(params={"limit": 100})
            for obj in pages.auto_paging_iter():
                # A StripeObject, not a dict: it has no .get().
                metadata = obj.metadata.to_dict() if obj.metadata else {}
                held = metadata.get("meterline_key")
                if held in by_metadata:
                    found.add(by_metadata[held])
        except stripe.StripeError as exc:
            raise RuntimeError(f"listing Stripe invoice items failed: "
                               f"{self._clean(exc.user_message or type(exc).__name__)}") from None
        return found


def _description(item: ExportItem) -> str:
    what = ("base fee" if item.kind == "base_fee"
            else f"{'trial usage' if item.kind == 'trial_usage' else 'usage'} "
                 f"{item.meter}:{item.aggregation} x {fmt(item.quantity)}")
    text = f"{what} ({item.plan_id} v{item.plan_version})"
    if item.correction:
        text = f"correction {item.correction} of {item.line_id}: {text}"
    return text


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms // 1000))
