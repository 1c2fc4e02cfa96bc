"""The Chargebee target: usage lines as Chargebee usage records, with the official client.

Chargebee bills metered item prices from usage records
(https://apidocs.chargebee.com/docs/api/usages?prod_cat_ver=2): ``POST
/api/v2/subscriptions/{subscription-id}/usages`` with ``item_price_id``, ``quantity`` (a
decimal string, at most 40 characters), ``usage_date`` (UTC seconds), ``id`` and ``note``.
Chargebee prices the quantity itself with the item price, so only **usage lines of meters
mapped to an item price** go (``item_prices``: ``"<meter>:<aggregation>"`` ->
``item_price_id``). Base fees are billed by Chargebee from the subscription's own plan
item price and trial usage by Chargebee's trial, so those lines, and usage of an unmapped
meter, are a ``failed`` result with the reason, never a silent skip.

Identity and deduplication:

- the usage ``id`` is ``ml-`` + the first 48 hex digits of the key's SHA-256: Chargebee
  allows 100 characters and documents no character set for ids, so a hash keeps any key
  valid; it is deterministic, so a retry sends the same id and Chargebee's uniqueness of
  ids refuses a second record. The full key is in the ``note`` (at most 500 characters).
  The same value goes as the ``chargebee-idempotency-key`` header;
- a refusal ``duplicate_entry`` on ``id`` means Chargebee already holds a record with this
  id: the target reads it back and answers ``sent`` when it is this item (same item price,
  quantity, date), ``failed`` when it is not;
- Chargebee keeps "only one usage record for a specific usage_date" per subscription and
  item price, so the date is the line's last second minus the correction number:
  ``(segment_end_ms - 1) // 1000 - correction``. A correction is its own record with its
  own id and a note naming the key it corrects; a negative correction cannot be a usage
  record (Chargebee corrects by deleting a record, which would mutate what was sent), so it
  is ``failed`` with the reason: finance issues a credit note.

Subscriptions: ``subscriptions`` maps a Meterline subscription id to Chargebee's; an
unmapped one is taken to be the same id (the usual set-up when Meterline's subscriptions
are imported from Chargebee).

Outcomes: 2xx -> ``sent``; 429, 5xx, timeouts, connection errors -> ``retry``; other 4xx
-> ``failed`` with Chargebee's message. The client's own retries stay off (its default):
the export ledger retries.

Endpoint: ``api_base`` (``CHARGEBEE_API_BASE`` for the CLI) replaces
``https://{site}.chargebee.com``: a private gateway over https, or the local test peer
over ``http://`` on a loopback address only (the key is sent in every request). The
client's own code would send https regardless (see :func:`_plain_http`), so an http base
lifts that for as long as the target is open. Speed: the client builds an httpx client
and a TLS context for every request (about 0.1 s of CPU here), so the target manages
roughly ten requests per second per core; Chargebee's own API rate limits are lower still.

Secrets: the API key is the Basic-auth user name; it is in no result, log record or
exception text (:func:`redact`, and a filter on the client's ``chargebee.http_request``
logger, which logs payloads and responses at DEBUG).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    import chargebee
    import httpx
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Chargebee export target needs the official client: "
                      "pip install 'meterline[invoicing]'") from exc

__all__ = ["ChargebeeConfig", "ChargebeeConfigError", "ChargebeeTarget", "usage_id"]

log = logging.getLogger(__name__)

_MAX_QUANTITY = 40  # characters (Chargebee's limit for quantity)
_MAX_NOTE = 500
_STATUS_IN_TEXT = re.compile(r"http_status_code:\s*(\d{3})")
# ml1:<subscription>:<period start>:<segment start>/<kind>[/<meter>:<agg>]:<correction>
_KEY = re.compile(r"^ml1:(?P<sub>.*):\d+:\d+/[a-z_]+(?:/.+)?:\d+$")
_CLIENT_LOGGER = "chargebee.http_request"


def usage_id(key: str) -> str:
    """The Chargebee usage id of an item key: deterministic, 51 characters, [a-z0-9-]."""
    return "ml-" + hashlib.sha256(key.encode()).hexdigest()[:48]


def redact(text: str, secrets: Sequence[str]) -> str:
    return redact_secrets(text, secrets)


class ChargebeeConfigError(TargetConfigError):
    target = "Chargebee"


@dataclass(frozen=True)
class ChargebeeConfig:
    site: str  # "acme" for acme.chargebee.com ("acme-test" for the test site)
    api_key: str = field(repr=False)  # from the environment (CHARGEBEE_API_KEY)
    item_prices: Mapping[str, str] = field(default_factory=dict)  # "meter:agg" -> price id
    subscriptions: Mapping[str, str] = field(default_factory=dict)  # Meterline -> Chargebee
    timeout_s: float = 30.0
    concurrency: int = 4
    # "http" only for the local test peer (docs in meterline/testing/chargebee_peer.py).
    protocol: str = "https"
    # Where requests go instead of https://{site}.chargebee.com (CHARGEBEE_API_BASE): a
    # private gateway (https) or the local test peer (http, loopback only); see the module.
    api_base: str = ""

    def validate(self) -> list[str]:
        errors: list[str] = []
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", self.site or ""):
            errors.append(f"site: {self.site!r} is not a Chargebee site name (e.g. 'acme-test')")
        if not isinstance(self.api_key, str) or not self.api_key.strip():
            errors.append("api_key: a Chargebee API key is required (set CHARGEBEE_API_KEY)")
        for meter, price in self.item_prices.items():
            if not isinstance(meter, str) or meter.count(":") != 1 or meter.startswith(":"):
                errors.append(f"item_prices: {meter!r} must be '<meter>:<aggregation>'")
            if not isinstance(price, str) or not 0 < len(price) <= 100:
                errors.append(f"item_prices.{meter}: item price id {price!r} must be 1-100 "
                              "characters")
        prices = list(self.item_prices.values())
        for price in sorted({p for p in prices if prices.count(p) > 1}):
            # Chargebee keeps one usage per (subscription, item price, usage_date): two
            # aggregates on one price would collide on the line's date.
            errors.append(f"item_prices: {price!r} is mapped from more than one meter")
        for ours, theirs in self.subscriptions.items():
            if not isinstance(theirs, str) or not 0 < len(theirs) <= 50:
                errors.append(f"subscriptions.{ours}: {theirs!r} must be 1-50 characters")
        if self.protocol not in ("https", "http"):
            errors.append(f"protocol: must be https (or http for the test peer), "
                          f"got {self.protocol!r}")
        errors += _api_base_errors(self.api_base)
        return errors + pool_errors(self.timeout_s, self.concurrency, 32)

    def check(self) -> ChargebeeConfig:
        errors = self.validate()
        if errors:
            raise ChargebeeConfigError(errors)
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], api_key: str) -> ChargebeeConfig:
        """From the ``[chargebee]`` table of a TOML file::

            [chargebee]
            site = "acme"
            [chargebee.item_prices]
            "api_calls:count" = "api-calls-usd-monthly"
            [chargebee.subscriptions]
            sub-1 = "AzZlGJT3Ls1CK1Ef"
        """
        kwargs = check_known(data, {"site", "item_prices", "subscriptions", "timeout_s",
                                    "concurrency", "api_base"}, ChargebeeConfigError)
        kwargs.setdefault("site", "")
        return cls(api_key=api_key, **kwargs).check()

    @classmethod
    def from_toml(cls, path: str | Path, api_key: str) -> ChargebeeConfig:
        return cls.from_mapping(load_table(path, "chargebee"), api_key)


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _api_base_errors(api_base: str) -> list[str]:
    if not api_base:
        return []
    parts = urllib.parse.urlsplit(api_base)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        return [f"api_base: {api_base!r} is not an http(s) URL such as "
                "https://chargebee-gw.internal"]
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        # The API key travels in the Authorization header: in clear text only to this host.
        return [f"api_base: http:// is allowed only for a loopback address (the local test "
                f"peer), got host {parts.hostname!r}; use https"]
    return []


# chargebee 3.x picks the request's scheme from the *class* attribute
# ``Chargebee.verify_ca_certs`` (True: always https, pinned to its bundled CA file);
# ``protocol="http"`` sets an instance attribute that the request code never reads. An
# http:// loopback ``api_base`` therefore needs the class attribute off while such a
# target is open. With it off an https request of another client in this process is still
# verified by httpx (against the system CA bundle), just not pinned to Chargebee's file.
_PLAIN_HTTP_LOCK = threading.Lock()
_plain_http_users = 0
_plain_http_saved = True


def _plain_http(on: bool) -> None:
    global _plain_http_users, _plain_http_saved
    with _PLAIN_HTTP_LOCK:
        if on:
            if _plain_http_users == 0:
                _plain_http_saved = chargebee.Chargebee.verify_ca_certs
                chargebee.Chargebee.verify_ca_certs = False
            _plain_http_users += 1
        else:
            _plain_http_users -= 1
            if _plain_http_users == 0:
                chargebee.Chargebee.verify_ca_certs = _plain_http_saved


@dataclass(frozen=True, slots=True)
class _Usage:
    item: ExportItem
    subscription: str  # Chargebee's id
    params: dict[str, Any]


class ChargebeeTarget(PooledSdkTarget):
    """:class:`~meterline.export.items.ExportTarget` for Chargebee (see the module doc)."""

    name = "chargebee"
    sdk_logger = _CLIENT_LOGGER
    # received(): ids asked per list request, and the page size (Chargebee's maximum).
    list_chunk = 100
    page_limit = 100

    def __init__(self, config: ChargebeeConfig) -> None:
        self.config = config.check()
        timeout = max(1, round(config.timeout_s))  # the client takes whole seconds
        self._client = chargebee.Chargebee(
            api_key=config.api_key, site=config.site, protocol=config.protocol,
            connection_time_out=timeout, read_time_out=timeout)
        self._plain_http = False
        if config.api_base:
            # The client builds every URL from env.api_endpoint (set from the site by its
            # constructor) and the scheme from env.protocol: point both at the base.
            env = self._client.env
            env.protocol = urllib.parse.urlsplit(config.api_base).scheme
            env.api_endpoint = f"{config.api_base.rstrip('/')}/api/{env.API_VERSION}"
            if env.protocol == "http":
                _plain_http(True)
                self._plain_http = True
        self._open_pool(config.concurrency, [config.api_key])

    def __repr__(self) -> str:
        return f"ChargebeeTarget(site={self.config.site!r})"

    def close(self) -> None:
        super().close()
        if self._plain_http:
            self._plain_http = False
            _plain_http(False)

    def chargebee_subscription(self, subscription_id: str) -> str:
        return self.config.subscriptions.get(subscription_id, subscription_id)

    def plan(self, item: ExportItem) -> _Usage | SendResult:
        """The usage record for ``item``, or the result when it cannot be one."""
        if item.kind == "base_fee":
            return failed(item, "not exported: Chargebee bills base fees from the "
                                 "subscription's plan item price; only usage goes as usages")
        if item.kind != "usage":
            return failed(item, f"not exported: {item.kind} lines are billed by "
                                 "Chargebee's own trial; only usage goes as usages")
        price = self.config.item_prices.get(f"{item.meter}:{item.aggregation}")
        if price is None:
            return failed(item, f"no Chargebee item price for {item.meter}:"
                                 f"{item.aggregation}: add it to [chargebee.item_prices]")
        if item.quantity < 0:
            return failed(item, f"quantity {fmt(item.quantity)} is negative: a Chargebee "
                                 "usage cannot be; issue a credit note in Chargebee")
        quantity = fmt(item.quantity)
        if len(quantity) > _MAX_QUANTITY:
            return failed(item, f"quantity {quantity} is longer than Chargebee's "
                                 f"{_MAX_QUANTITY} characters")
        note = f"meterline {item.key}"
        if item.correction:
            note += f" corrects {item.corrects}"
        params = {
            "id": usage_id(item.key),
            "item_price_id": price,
            "quantity": quantity,
            "usage_date": (item.segment_end_ms - 1) // 1000 - item.correction,
            "note": note[:_MAX_NOTE],
        }
        return _Usage(item, self.chargebee_subscription(item.subscription_id), params)

    def send(self, items: Sequence[ExportItem]) -> list[SendResult]:
        results: list[SendResult] = []
        calls: list[_Usage] = []
        for item in items:
            planned = self.plan(item)
            if isinstance(planned, SendResult):
                results.append(planned)
            else:
                calls.append(planned)
        results.extend(self._pool.map(self._send_one, calls))
        for r in results:
            if r.outcome != "sent":
                log.warning("chargebee %s %s: %s", r.outcome, r.key, r.response)
        return results

    def _send_one(self, call: _Usage) -> SendResult:
        key = call.item.key
        headers = {chargebee.Chargebee.idempotency_header: call.params["id"]}
        try:
            response = self._client.Usage.create(call.subscription, call.params,
                                                 headers)
        except chargebee.APIError as exc:
            if exc.api_error_code == "duplicate_entry" and exc.param == "id":
                return self._check_duplicate(call)
            return self._classify_api_error(key, exc)
        except httpx.TimeoutException as exc:
            return SendResult(key, "retry", None, self._clean(f"timeout: {type(exc).__name__}"))
        except httpx.TransportError as exc:
            return SendResult(key, "retry", None,
                              self._clean(f"connection error: {type(exc).__name__}: {exc}"))
        except Exception as exc:
            # The client raises a bare Exception for an answer that is not Chargebee JSON
            # (a proxy's 502 page, ...); anything else is a programming error.
            if type(exc) is not Exception:
                raise
            match = _STATUS_IN_TEXT.search(str(exc))
            status = int(match.group(1)) if match else None
            text = self._clean(str(exc).splitlines()[0])
            if status is not None and 400 <= status < 500 and status != 429:
                return SendResult(key, "failed", status, text)
            return SendResult(key, "retry", status, text)
        usage = response.usage
        return SendResult(key, "sent", 200, self._clean(f"usage {usage.id}"), str(usage.id))

    def _check_duplicate(self, call: _Usage) -> SendResult:
        """Chargebee holds a usage with this id: is it this item?"""
        key = call.item.key
        try:
            held = self._client.Usage.retrieve(call.subscription, {"id": call.params["id"]}
                                               ).usage
        except (chargebee.APIError, httpx.HTTPError) as exc:
            return SendResult(key, "retry", None, self._clean(
                f"usage {call.params['id']} exists but could not be read back: {exc}"))
        same = (held.item_price_id == call.params["item_price_id"]
                and held.quantity == call.params["quantity"]
                and held.usage_date == call.params["usage_date"])
        if same:
            return SendResult(key, "sent", 200,
                              f"usage {held.id} already held (duplicate id)", str(held.id))
        return SendResult(key, "failed", 400, self._clean(
            f"usage id {held.id} is held with different content (item price "
            f"{held.item_price_id}, quantity {held.quantity}, date {held.usage_date})"))

    def _classify_api_error(self, key: str, exc: chargebee.APIError) -> SendResult:
        status = exc.http_status_code
        text = self._clean(f"{exc.api_error_code}: {exc}")
        if status == 429 or status is None or status >= 500:
            return SendResult(key, "retry", status, text)
        return SendResult(key, "failed", status, text)

    def received(self, keys: Sequence[str]) -> set[str] | None:
        """The keys whose usage record Chargebee holds (listed by id per subscription)."""
        by_sub: dict[str, dict[str, str]] = {}
        for key in keys:
            match = _KEY.match(key)
            if match is None:
                continue  # not a line key: Chargebee cannot hold it
            sub = self.chargebee_subscription(match["sub"])
            by_sub.setdefault(sub, {})[usage_id(key)] = key
        found: set[str] = set()
        for sub, ids in by_sub.items():
            wanted = sorted(ids)
            for start in range(0, len(wanted), self.list_chunk):
                chunk = wanted[start:start + self.list_chunk]
                offset: str | None = None
                while True:
                    params: dict[str, Any] = {"subscription_id": {"is": sub},
                                              "id": {"in": chunk}, "limit": self.page_limit}
                    if offset:
                        params["offset"] = offset
                    try:
                        page = self._client.Usage.list(params)
                    except (chargebee.APIError, httpx.HTTPError) as exc:
                        raise RuntimeError(self._clean(
                            f"listing Chargebee usages failed: {exc}")) from None
                    for entry in page.list:
                        found.add(ids[entry.usage.id])
                    offset = page.next_offset
                    if not offset:
                        break
        return found
