"""stripe-mock for the Stripe export tests, and a recording proxy in front of it.

**stripe-mock** (``github.com/stripe/stripe-mock``, Stripe's own mock built from its OpenAPI
spec) validates every request's path, method and parameters the way the real API does and
answers with fixture objects. It is built by ``tools/stripe-mock/install.sh`` (``go
install`` at the pinned :data:`STRIPE_MOCK_VERSION` into ``.cache/bin``; ``make test`` runs
it) and started here on a free loopback port.

stripe-mock is *stateless*: it does not remember what it was sent, so it cannot say what
"Stripe received". :class:`RecordingProxy` sits in front of it on loopback and records
each request (path, form body, ``Idempotency-Key`` header, a meter event's
``identifier``) together with the status the client got. It also does the two things of
real Stripe that exactly-once rests on and that stripe-mock cannot do:

- **idempotent replay** (https://docs.stripe.com/api/idempotent_requests): a POST whose
  ``Idempotency-Key`` was seen with the same body gets the first response again with
  ``Idempotent-Replayed: true`` and is *not* forwarded; the same key with a different body
  gets Stripe's 400 ``idempotency_error``;
- **fault injection**: ``proxy.fail_next(n, status=503)`` answers the next n requests
  itself with a Stripe-shaped error (or ``drop=True``: closes the connection unanswered,
  ``delay_s``: answers late, for timeouts), so tests reach the retry paths for real.

``proxy.accepted()`` is then "what Stripe holds": one record per request stripe-mock
accepted (2xx, not a replay), so a test counts deliveries per key.

Usage in a test module::

    @pytest.fixture(scope="module")
    def stripe_server() -> Iterator[StripeMock]:
        with stripe_mock_or_skip() as server:
            yield server

    def test_x(stripe_server):
        with RecordingProxy(stripe_server.url) as proxy:
            ...  # point the client at proxy.url

CLI (to poke at it by hand)::

    python -m meterline.testing.stripe_mock
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import parse_qsl, urlsplit

from meterline.testing.loopback_http import LOOPBACK, LoopbackServer, respond

__all__ = [
    "STRIPE_MOCK_VERSION",
    "RecordedRequest",
    "RecordingProxy",
    "StripeMock",
    "StripeMockUnavailable",
    "find_stripe_mock",
    "stripe_mock_or_skip",
]

# Must match STRIPE_MOCK_VERSION in tools/stripe-mock/install.sh (a test checks it).
STRIPE_MOCK_VERSION = "v0.203.0"

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = _REPO_ROOT / "tools" / "stripe-mock" / "install.sh"
_HOST = LOOPBACK
_LISTENING = re.compile(r"Listening for HTTP at address: (\S+)")
# Any test key will do for stripe-mock; it only checks that one looks like a secret key.
TEST_API_KEY = "sk_test_meterline"


class StripeMockUnavailable(RuntimeError):
    """stripe-mock is not built and cannot be built here; the message says why."""


def find_stripe_mock(install: bool = True, timeout_s: float = 600) -> str:
    """The stripe-mock binary: ``$METERLINE_STRIPE_MOCK``, ``.cache/bin``, ``PATH``, or
    built by the install script. Raises :class:`StripeMockUnavailable` with the reason."""
    env = os.environ.get("METERLINE_STRIPE_MOCK")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise StripeMockUnavailable(f"METERLINE_STRIPE_MOCK={env} is not an executable file")
    cache = os.environ.get("METERLINE_CACHE", str(_REPO_ROOT / ".cache"))
    cached = Path(cache) / "bin" / "stripe-mock"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    on_path = shutil.which("stripe-mock")
    if on_path:
        return on_path
    if not install:
        raise StripeMockUnavailable("stripe-mock is not built: run `make stripe-mock`")
    try:
        done = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StripeMockUnavailable(f"{INSTALL_SCRIPT} did not finish: {exc}") from exc
    lines = done.stdout.strip().splitlines()
    if lines and os.access(lines[-1], os.X_OK):
        return lines[-1]
    raise StripeMockUnavailable(
        f"stripe-mock could not be built: {done.stderr.strip()[-500:] or 'no output'}")


class StripeMock:
    """One stripe-mock process on a free loopback port (HTTP only)."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_stripe_mock()
        self._proc: subprocess.Popen[str] | None = None
        self._output: deque[str] = deque(maxlen=200)
        self.address = ""

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout_s: float = 60) -> StripeMock:
        # Both listeners on port 0 of loopback: stripe-mock otherwise also opens HTTPS on
        # the fixed port 12112 of every interface, and two test runs would collide there.
        self._proc = subprocess.Popen(
            [self.binary, "-http-addr", f"{_HOST}:0", "-https-addr", f"{_HOST}:0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found = threading.Event()
        assert self._proc.stdout is not None
        threading.Thread(target=self._drain, args=(self._proc.stdout, found), daemon=True,
                         name="stripe-mock-output").start()
        # The address is printed once the listener is bound; the process dying ends the
        # wait as well (the drain thread sets the event at EOF), so the timeout is only a
        # backstop for a process that hangs without output.
        found.wait(timeout_s)
        if not self.address:
            self.stop()
            raise RuntimeError(f"stripe-mock did not start: {self.output_tail()}")
        self._wait_answering(timeout_s)
        return self

    def _drain(self, stream: IO[str], found: threading.Event) -> None:
        for line in stream:
            self._output.append(line.rstrip())
            match = _LISTENING.search(line)
            if match and not self.address:
                self.address = match.group(1)
                found.set()
        found.set()

    def _wait_answering(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                conn = http.client.HTTPConnection(self.address, timeout=5)
                conn.request("GET", "/v1/customers", headers=_auth_header(TEST_API_KEY))
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            if self._proc is None or self._proc.poll() is not None or time.monotonic() > deadline:
                out = self.output_tail()
                self.stop()
                raise RuntimeError(f"stripe-mock does not answer: {out}")
            time.sleep(0.05)

    def output_tail(self) -> str:
        return "\n".join(self._output)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> StripeMock:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def stripe_mock_or_skip() -> Iterator[StripeMock]:
    """A running stripe-mock, or ``pytest.skip`` with the reason when it cannot be built.

    Under CI (``CI`` set) a missing stripe-mock is a failure, not a skip: CI must build it.
    """
    import pytest

    try:
        binary = find_stripe_mock()
    except StripeMockUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"stripe-mock unavailable: {exc}")
    with StripeMock(binary) as server:
        yield server


def _auth_header(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str  # without the query string
    query: str
    form: dict[str, str]  # the form body, last value per field (Stripe sends each once)
    idempotency_key: str
    status: int  # what the client got
    replayed: bool = False  # answered from the proxy's idempotency store, not forwarded
    injected: bool = False  # answered (or dropped) by an injected fault
    response: bytes = b""
    started_s: float = 0.0  # time.monotonic() when the request arrived / was answered
    ended_s: float = 0.0

    @property
    def identifier(self) -> str:
        """A meter event's ``identifier`` ('' for other requests)."""
        return self.form.get("identifier", "")

    @property
    def accepted(self) -> bool:
        """Stripe holds what this request created: forwarded and answered 2xx."""
        return 200 <= self.status < 300 and not self.replayed and not self.injected


@dataclass(slots=True)
class _Fault:
    count: int
    status: int
    body: bytes
    path_prefix: str
    drop: bool
    delay_s: float
    forward: bool  # forward to stripe-mock first (Stripe got it), then answer with the fault


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    records: list[RecordedRequest] = field(default_factory=list)
    faults: list[_Fault] = field(default_factory=list)
    # Idempotency-Key -> (path + body, status, headers, response body) of the first answer
    idempotency: dict[str, tuple[bytes, int, list[tuple[str, str]], bytes]] = field(
        default_factory=dict)


def stripe_error_body(message: str, type_: str = "api_error", code: str = "") -> bytes:
    """A body shaped like Stripe's errors (https://docs.stripe.com/api/errors)."""
    error: dict[str, str] = {"message": message, "type": type_}
    if code:
        error["code"] = code
    return json.dumps({"error": error}).encode()


class RecordingProxy(LoopbackServer):
    """An HTTP/1.1 reverse proxy on 127.0.0.1:0 in front of ``upstream`` (stripe-mock)."""

    thread_name = "stripe-recording-proxy"

    def __init__(self, upstream: str, *, replay_idempotent: bool = True) -> None:
        parts = urlsplit(upstream)
        self._upstream = parts.netloc
        self.replay_idempotent = replay_idempotent
        self._state = _State()
        super().__init__()

    # -- what was received -----------------------------------------------------------
    def records(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.records)

    def accepted(self, path: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.records() if r.accepted and (path is None or r.path == path)]

    def accepted_count_by_key(self) -> dict[str, int]:
        """Idempotency key -> number of times stripe-mock accepted a request with it."""
        counts: dict[str, int] = {}
        for r in self.accepted():
            counts[r.idempotency_key] = counts.get(r.idempotency_key, 0) + 1
        return counts

    # -- faults ----------------------------------------------------------------------
    def fail_next(self, count: int, status: int = 503, *, message: str = "injected fault",
                  type_: str = "api_error", code: str = "", path_prefix: str = "/v1/",
                  drop: bool = False, delay_s: float = 0.0, forward: bool = False,
                  body: bytes | None = None) -> None:
        """Answer the next ``count`` requests under ``path_prefix`` with ``status`` and a
        Stripe-shaped error (or ``body``); ``drop``: close the connection without an
        answer; ``delay_s``: wait that long first; ``forward``: let stripe-mock take the
        request first (Stripe *did* get it, the answer is lost: the timeout-after-commit
        case)."""
        fault = _Fault(count, status, body if body is not None else stripe_error_body(
            message, type_, code), path_prefix, drop, delay_s, forward)
        with self._state.lock:
            self._state.faults.append(fault)

    def _take_fault(self, path: str) -> _Fault | None:
        with self._state.lock:
            for fault in self._state.faults:
                if fault.count > 0 and path.startswith(fault.path_prefix):
                    fault.count -= 1
                    return fault
        return None

    # -- server ----------------------------------------------------------------------
    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes
                 ) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in ("host", "connection", "content-length")}
        # One upstream connection per client connection (the handler instance): the
        # threads never share one, and keep-alive carries over.
        conn: http.client.HTTPConnection | None = getattr(handler, "upstream_conn", None)
        for attempt in range(2):
            if conn is None:
                conn = http.client.HTTPConnection(self._upstream, timeout=30)
                handler.upstream_conn = conn  # type: ignore[attr-defined]
            try:
                conn.request(handler.command, handler.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, [(k, v) for k, v in resp.getheaders()
                                     if k.lower() in ("content-type", "request-id",
                                                      "stripe-version")], data
            except (http.client.HTTPException, OSError):
                conn.close()
                conn = None
                handler.upstream_conn = None  # type: ignore[attr-defined]
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        parts = urlsplit(handler.path)
        form = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        key = handler.headers.get("Idempotency-Key", "")
        started = time.monotonic()

        def record(status: int, response: bytes, **flags: bool) -> None:
            rec = RecordedRequest(handler.command, parts.path, parts.query, form, key, status,
                                  response=response, started_s=started,
                                  ended_s=time.monotonic(), **flags)
            with self._state.lock:
                self._state.records.append(rec)

        fingerprint = parts.path.encode() + b"\n" + body
        fault = self._take_fault(parts.path)
        if fault is not None:
            if fault.delay_s:
                time.sleep(fault.delay_s)
            if fault.forward:
                status, headers, data = self._forward(handler, body)
                self._remember(handler, key, fingerprint, status, headers, data)
                record(status, data)
                if not fault.drop and fault.status == status:
                    # a pure delay: the client gets stripe-mock's own answer, late
                    self._respond(handler, status, headers, data)
                    return
            else:
                record(fault.status, b"", injected=True)
            if fault.drop:
                handler.close_connection = True
                with contextlib.suppress(OSError):
                    handler.connection.shutdown(2)
                return
            self._respond(handler, fault.status, [("Content-Type", "application/json")],
                          fault.body)
            return

        if key and handler.command == "POST" and self.replay_idempotent:
            with self._state.lock:
                seen = self._state.idempotency.get(key)
            if seen is not None:
                if seen[0] != fingerprint:
                    data = stripe_error_body(
                        "Keys for idempotent requests can only be used with the same "
                        "parameters they were first used with.", "idempotency_error")
                    record(400, data, replayed=True)
                    self._respond(handler, 400, [("Content-Type", "application/json")], data)
                    return
                record(seen[1], seen[3], replayed=True)
                self._respond(handler, seen[1], [*seen[2], ("Idempotent-Replayed", "true")],
                              seen[3])
                return

        try:
            status, headers, data = self._forward(handler, body)
        except (http.client.HTTPException, OSError) as exc:
            data = stripe_error_body(f"recording proxy: stripe-mock unreachable: {exc}")
            record(502, data, injected=True)
            self._respond(handler, 502, [("Content-Type", "application/json")], data)
            return
        self._remember(handler, key, fingerprint, status, headers, data)
        record(status, data)
        self._respond(handler, status, headers, data)

    def _remember(self, handler: BaseHTTPRequestHandler, key: str, fingerprint: bytes,
                  status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        # Stripe keeps the result of an idempotent request unless it was a 5xx/429 that
        # may be retried (https://docs.stripe.com/api/idempotent_requests).
        if key and handler.command == "POST" and status < 500 and status != 429:
            with self._state.lock:
                self._state.idempotency.setdefault(key, (fingerprint, status, headers, data))

    _respond = staticmethod(respond)


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    with StripeMock() as server, RecordingProxy(server.url) as proxy:
        print(f"stripe-mock {server.url}, recording proxy {proxy.url} (Ctrl-C stops)",
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
