"""A local stand-in for Chargebee's usages API, strict about what the real client sends.

No Chargebee mock exists, so the Chargebee target's tests run the official ``chargebee``
client against this peer. It checks each request against Chargebee's documented API v2
(https://apidocs.chargebee.com/docs/api/usages?prod_cat_ver=2, "Create a usage"):

- the site: the client builds ``https://{site}.chargebee.com/api/v2/...``; the peer answers
  only for its own site (``Host``) and the ``/api/v2`` prefix;
- HTTP Basic auth with the API key as the user name and an empty password
  (https://support.chargebee.com/support/solutions/articles/56337-chargebee-api-s-documentation);
- ``POST /api/v2/subscriptions/{subscription-id}/usages``, form-encoded: ``item_price_id``
  (required, at most 100 characters, an item price of that subscription), ``quantity``
  (required, a decimal *string*, at most 40), ``usage_date`` (required, UTC seconds, an
  integer), ``id`` (optional, at most 100, unique), ``note`` (optional, at most 500),
  ``dedupe_option`` (optional, ``skip`` | ``update_existing``); any other field is refused
  (stricter than Chargebee, to catch a client that sends what it should not);
- "for a given subscription_id and item_price_id, there can be only one usage record for a
  specific usage_date" (same page): a second one is refused;
- ``GET /api/v2/subscriptions/{id}/usages?id=...`` (retrieve) and ``GET /api/v2/usages``
  with ``subscription_id[is]``, ``id[in]``, ``limit``, ``offset`` (list, paginated with
  ``next_offset``).

Answers are Chargebee-shaped: ``{"usage": {...}}``, and errors carry ``message``, ``type``,
``api_error_code``, ``param`` and ``http_status_code``
(https://apidocs.chargebee.com/docs/api/error-handling?prod_cat_ver=2). A usage ``id``
that exists is refused with 400 ``duplicate_entry`` (``param`` ``id``): the peer
deduplicates by id. That exact code for a usage id is our reading of Chargebee's error
list, not a documented example; the target also reads the usage back before calling it
held, so a different code would only turn a replay into a ``failed`` to look at.

Faults on demand: ``peer.fail_next(3, 503)`` answers the next 3 requests with a 503;
``peer.fail_next(1, 400, param="quantity")`` refuses a field; ``commit=True`` stores the
usage *and then* answers with the fault (the answer lost after Chargebee took it).

Reaching it, two ways:

- ``ChargebeeConfig(api_base=peer.url)`` (``CHARGEBEE_API_BASE`` for ``meterline export``
  in a subprocess, as the kill -9 test does): the client sends straight to the peer, which
  serves its own address as its site;
- the client's default URL, ``{site}.chargebee.com``, to check the site it builds: the
  client sends https unless ``Chargebee.verify_ca_certs`` is False, so these tests set it
  False and ``protocol="http"`` (monkeypatched, restored after) and ``HTTP_PROXY`` to the
  peer's URL: httpx then sends the request, absolute URL and ``Host`` header as the client
  built them, to the peer, which serves it as that site.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from meterline.testing.loopback_http import LoopbackServer, respond

__all__ = ["ChargebeePeer", "PeerRequest"]

_USAGE_FIELDS = {"id", "item_price_id", "quantity", "usage_date", "note", "dedupe_option"}
_MAX = {"id": 100, "item_price_id": 100, "quantity": 40, "note": 500}
_DECIMAL = re.compile(r"^-?\d+(\.\d+)?$")
_USAGES = re.compile(r"^/api/v2/subscriptions/(?P<sub>[^/]+)/usages$")


@dataclass(frozen=True, slots=True)
class PeerRequest:
    method: str
    host: str
    path: str
    form: dict[str, str]  # form body (POST) or query (GET)
    idempotency_key: str
    authorized: bool
    status: int
    injected: bool = False


@dataclass(slots=True)
class _Fault:
    count: int
    status: int
    api_error_code: str
    message: str
    param: str
    commit: bool


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    usages: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> usage
    requests: list[PeerRequest] = field(default_factory=list)
    faults: list[_Fault] = field(default_factory=list)
    subscriptions: dict[str, set[str]] = field(default_factory=dict)  # id -> item prices
    seq: int = 0


class ChargebeePeer(LoopbackServer):
    """Chargebee's usages API for one site, on 127.0.0.1:0 (see the module doc)."""

    thread_name = "chargebee-peer"

    def __init__(self, site: str, api_key: str) -> None:
        self.site = site
        self._auth = "Basic " + base64.b64encode(f"{api_key}:".encode()).decode()
        self._store = _Store()
        super().__init__()

    @property
    def host(self) -> str:
        return f"{self.site}.chargebee.com"

    # -- set-up and inspection -------------------------------------------------------
    def add_subscription(self, subscription_id: str, item_prices: set[str]) -> None:
        with self._store.lock:
            self._store.subscriptions[subscription_id] = set(item_prices)

    def usages(self) -> dict[str, dict[str, Any]]:
        with self._store.lock:
            return {k: dict(v) for k, v in self._store.usages.items()}

    def requests(self) -> list[PeerRequest]:
        with self._store.lock:
            return list(self._store.requests)

    def fail_next(self, count: int, status: int = 503, *, api_error_code: str = "",
                  message: str = "", param: str = "", commit: bool = False) -> None:
        code = api_error_code or {400: "param_wrong_value", 401: "api_authentication_failed",
                                  404: "resource_not_found", 429: "api_request_limit_exceeded",
                                  503: "site_not_ready"}.get(status, "internal_error")
        text = message or (f"{param} : invalid value" if param else f"injected {status}")
        with self._store.lock:
            self._store.faults.append(_Fault(count, status, code, text, param, commit))

    def _take_fault(self) -> _Fault | None:
        with self._store.lock:
            for fault in self._store.faults:
                if fault.count > 0:
                    fault.count -= 1
                    return fault
        return None

    # -- server ----------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        # Through HTTP_PROXY the request line carries the absolute URL; directly, a path.
        parts = urlsplit(handler.path)
        host = parts.netloc or handler.headers.get("Host", "")
        path = unquote(parts.path)
        if handler.command == "POST":
            form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        else:
            form = dict(parse_qsl(parts.query, keep_blank_values=True))
        authorized = handler.headers.get("Authorization", "") == self._auth
        status, payload, injected = self._answer(handler.command, host, path, form,
                                                 handler.headers, authorized)
        with self._store.lock:
            self._store.requests.append(PeerRequest(
                handler.command, host, path, form,
                handler.headers.get("chargebee-idempotency-key", ""), authorized, status,
                injected))
        respond(handler, status, [("Content-Type", "application/json;charset=utf-8")],
                json.dumps(payload).encode())

    def _answer(self, method: str, host: str, path: str, form: dict[str, str],
                headers: Any, authorized: bool) -> tuple[int, dict[str, Any], bool]:
        # Its own address is its site too: what a client sends with CHARGEBEE_API_BASE
        # pointing here (no site in the URL); any other host is another site.
        if host.split(":")[0] != self.host and host != self.address:
            return _error(404, "site_not_found", f"Sorry, we couldn't find the site {host}")
        if not authorized:
            return _error(401, "api_authentication_failed",
                          "Sorry, authentication failed. Invalid api key")
        fault = self._take_fault()
        if fault is not None and not fault.commit:
            return (*_error(fault.status, fault.api_error_code, fault.message,
                            fault.param)[:2], True)
        usages = _USAGES.match(path)
        if method == "POST" and usages:
            ctype = headers.get("Content-Type", "")
            if not ctype.startswith("application/x-www-form-urlencoded"):
                return _error(400, "invalid_request", f"unsupported Content-Type {ctype!r}")
            status, payload, _ = self._create(usages["sub"], form)
            if fault is not None:  # committed, then the answer is replaced by the fault
                return (*_error(fault.status, fault.api_error_code, fault.message,
                                fault.param)[:2], True)
            return status, payload, False
        if method == "GET" and usages:
            return self._retrieve(usages["sub"], form)
        if method == "GET" and path == "/api/v2/usages":
            return self._list(form)
        return _error(404, "resource_not_found", f"Sorry, {method} {path} is not an API path")

    def _create(self, sub: str, form: dict[str, str]) -> tuple[int, dict[str, Any], bool]:
        unknown = sorted(set(form) - _USAGE_FIELDS)
        if unknown:
            return _error(400, "param_not_allowed", f"{unknown[0]} : unknown parameter",
                          unknown[0])
        for name in ("item_price_id", "quantity", "usage_date"):
            if not form.get(name):
                return _error(400, "param_required", f"{name} : cannot be blank", name)
        for name, limit in _MAX.items():
            if len(form.get(name, "")) > limit:
                return _error(400, "param_wrong_value",
                              f"{name} : length must be at most {limit}", name)
        if not _DECIMAL.match(form["quantity"]):
            return _error(400, "param_wrong_value", "quantity : invalid decimal", "quantity")
        if not re.fullmatch(r"\d{1,11}", form["usage_date"]):
            return _error(400, "param_wrong_value", "usage_date : invalid timestamp",
                          "usage_date")
        if form.get("dedupe_option", "skip") not in ("skip", "update_existing"):
            return _error(400, "param_wrong_value", "dedupe_option : invalid value",
                          "dedupe_option")
        with self._store.lock:
            prices = self._store.subscriptions.get(sub)
            if prices is None:
                return _error(404, "resource_not_found",
                              f"Sorry, we couldn't find the subscription {sub}")
            if form["item_price_id"] not in prices:
                return _error(400, "param_wrong_value",
                              f"item_price_id : {form['item_price_id']} is not part of the "
                              "subscription", "item_price_id")
            usage_id = form.get("id") or f"usage_{self._store.seq + 1}"
            if usage_id in self._store.usages:
                return _error(400, "duplicate_entry",
                              f"id : The value {usage_id} is already present.", "id")
            for other in self._store.usages.values():
                if (other["subscription_id"], other["item_price_id"], other["usage_date"]) == (
                        sub, form["item_price_id"], int(form["usage_date"])):
                    return _error(400, "duplicate_entry",
                                  "usage_date : a usage for this item price and date is "
                                  "already present", "usage_date")
            self._store.seq += 1
            now = int(time.time())
            usage = {
                "id": usage_id, "usage_date": int(form["usage_date"]),
                "subscription_id": sub, "item_price_id": form["item_price_id"],
                "quantity": form["quantity"], "source": "api",
                "note": form.get("note", ""), "resource_version": self._store.seq,
                "updated_at": now, "created_at": now, "object": "usage",
            }
            self._store.usages[usage_id] = usage
        return 200, {"usage": usage}, False

    def _retrieve(self, sub: str, form: dict[str, str]) -> tuple[int, dict[str, Any], bool]:
        with self._store.lock:
            usage = self._store.usages.get(form.get("id", ""))
        if usage is None or usage["subscription_id"] != sub:
            return _error(404, "resource_not_found",
                          f"Sorry, we couldn't find the usage {form.get('id', '')}")
        return 200, {"usage": usage}, False

    def _list(self, form: dict[str, str]) -> tuple[int, dict[str, Any], bool]:
        wanted: set[str] | None = None
        if "id[in]" in form:
            raw = form["id[in]"]
            try:  # the Python client sends str(list): "['a', 'b']"; JSON works too
                values = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                return _error(400, "param_wrong_value", "id[in] : invalid list", "id[in]")
            if not isinstance(values, list):
                return _error(400, "param_wrong_value", "id[in] : invalid list", "id[in]")
            wanted = {str(v) for v in values}
        limit = int(form.get("limit", "10") or 10)
        if not 1 <= limit <= 100:
            return _error(400, "param_wrong_value", "limit : must be 1..100", "limit")
        offset = int(form.get("offset", "0") or 0)
        with self._store.lock:
            rows = [u for u in self._store.usages.values()
                    if ("subscription_id[is]" not in form
                        or u["subscription_id"] == form["subscription_id[is]"])
                    and (wanted is None or u["id"] in wanted)]
        page = rows[offset:offset + limit]
        payload: dict[str, Any] = {"list": [{"usage": dict(u)} for u in page]}
        if offset + limit < len(rows):
            payload["next_offset"] = str(offset + limit)
        return 200, payload, False


def _error(status: int, code: str, message: str, param: str = ""
           ) -> tuple[int, dict[str, Any], bool]:
    kind = {400: "invalid_request", 404: "invalid_request"}.get(status)
    body: dict[str, Any] = {"message": message, "api_error_code": code,
                            "error_code": code, "error_msg": message,
                            "http_status_code": status}
    if kind:
        body["type"] = kind
    if param:
        body["param"] = param
        body["error_param"] = param
    return status, body, False
