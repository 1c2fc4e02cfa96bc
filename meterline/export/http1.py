"""A small HTTP/1.1 client for the webhook target: kept-alive connections, one write per
request (or per pipelined group), and optional pipelining of independent requests.

Why not ``http.client``: profiling one line per request against the local receiver showed
the sender's time in (1) two ``sendall`` calls per request (headers, then body: each one
wakes the receiver), (2) ``email.parser`` reading the answer's headers, (3) a
``makefile`` per response. This client writes a request in one ``sendall``, reads into one
buffer and parses the few headers it needs (``Content-Length``, ``Transfer-Encoding:
chunked``, ``Connection: close``).

**Pipelining** (``depth`` > 1): up to ``depth`` requests go out in one write and their
answers are read in order (RFC 9112 section 9.3.2: a server answers pipelined requests in
the order received). Only idempotent requests may be pipelined: a connection that closes
mid-group leaves the unanswered requests in doubt, and they are sent again -- ours carry
an idempotency key the receiver dedupes on, and the export ledger has claimed them before
the call (the protocol does not change). A group is retried once on a fresh connection
only when the old connection was reused and answered nothing (a kept-alive connection the
server dropped while idle); after that every unanswered request is a connection error the
engine retries with backoff.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Mapping, Sequence

__all__ = ["HttpError", "PipelinedPoster"]

_MAX_HEADER = 64 * 1024  # a response head larger than this is not a webhook answer
_MAX_KEPT = 2048  # bytes of an answer body handed back (the ledger keeps 300 characters)
_BAD_HEADER = re.compile(r"[\r\n\x00]")
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


class HttpError(OSError):
    """The connection broke or the answer was not HTTP/1.1: the request may be retried."""


class _Conn:
    def __init__(self, host: str, port: int, https: bool, timeout_s: float) -> None:
        raw = socket.create_connection((host, port), timeout=timeout_s)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        if https:
            self.sock = ssl.create_default_context().wrap_socket(raw, server_hostname=host)
        self.buf = bytearray()
        self.used = False  # has answered at least one request

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise HttpError("connection closed by the server")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                return self._take(end + 2)[:-2]
            if len(self.buf) > _MAX_HEADER:
                raise HttpError("answer line too long")
            self._fill()

    def read_response(self) -> tuple[int, bytes, bool]:
        """(status, body, server closes the connection)."""
        while True:
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                if len(self.buf) > _MAX_HEADER:
                    raise HttpError("answer head too long")
                self._fill()
            head = self._take(end + 4)
            match = _STATUS.match(head)
            if match is None:
                raise HttpError(f"not an HTTP/1.x answer: {head[:40]!r}")
            status = int(match.group(1))
            if 100 <= status < 200:
                continue  # 100 Continue and friends: the real answer follows
            headers: dict[bytes, bytes] = {}
            for line in head.split(b"\r\n")[1:]:
                name, sep, value = line.partition(b":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            close = headers.get(b"connection", b"").lower() == b"close" \
                or head.startswith(b"HTTP/1.0")
            if status in (204, 304):
                return status, b"", close
            if headers.get(b"transfer-encoding", b"").lower().endswith(b"chunked"):
                return status, self._chunked(), close
            length = headers.get(b"content-length")
            if length is not None:
                if not length.isdigit():
                    raise HttpError("bad Content-Length")
                return status, self._take(int(length))[:_MAX_KEPT], close
            # No length: the body runs to the end of the connection.
            try:
                while True:
                    self._fill()
            except HttpError:
                pass
            body = bytes(self.buf)
            self.buf.clear()
            return status, body[:_MAX_KEPT], True

    def _chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_line = self._line().split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise HttpError("bad chunk size") from None
            if size == 0:
                while self._line():  # trailers, then the empty line
                    pass
                return bytes(body[:_MAX_KEPT])
            body += self._take(size)
            self._take(2)


class PipelinedPoster:
    """POST to one URL from many threads: a kept-alive connection per thread.

    ``post_many`` answers, per request, ``(status, up to 2 kB of the body)`` or the
    exception that left it unanswered (an ``OSError``: retry it)."""

    def __init__(self, url: str, timeout_s: float, depth: int = 1) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http(s) URL")
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        default_port = self._port == (443 if self._https else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        authority = host if default_port else f"{host}:{self._port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._start = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")
        self._timeout_s = timeout_s
        self.depth = depth
        self._local = threading.local()
        self._all: list[_Conn] = []
        self._lock = threading.Lock()

    def encode(self, body: bytes, headers: Mapping[str, str]) -> bytes:
        lines = [self._start]
        for name, value in headers.items():
            if _BAD_HEADER.search(name) or _BAD_HEADER.search(value):
                raise ValueError(f"invalid header {name!r}: control characters")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
        lines.append(body)
        return b"".join(lines)

    def _connection(self) -> _Conn:
        conn: _Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _Conn(self._host, self._port, self._https, self._timeout_s)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self, conn: _Conn) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)

    def post(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        [answer] = self.post_many([(body, headers)])
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def post_many(self, requests: Sequence[tuple[bytes, Mapping[str, str]]]
                  ) -> list[tuple[int, bytes] | OSError]:
        wire = [self.encode(body, headers) for body, headers in requests]
        out: list[tuple[int, bytes] | OSError] = []
        for start in range(0, len(wire), self.depth):
            out += self._group(wire[start:start + self.depth])
        return out

    def _group(self, wire: list[bytes]) -> list[tuple[int, bytes] | OSError]:
        answers: list[tuple[int, bytes] | OSError] = []
        retried = False
        while len(answers) < len(wire):
            pending = wire[len(answers):]
            try:
                conn = self._connection()
            except OSError as exc:
                return answers + [exc] * len(pending)
            reused = conn.used
            got = 0
            try:
                conn.sock.sendall(pending[0] if len(pending) == 1 else b"".join(pending))
                for _ in pending:
                    status, body, close = conn.read_response()
                    answers.append((status, body))
                    got += 1
                    conn.used = True
                    if close:
                        self._drop(conn)
                        break
            except OSError as exc:  # ssl.SSLError and timeouts included
                self._drop(conn)
                # Idle kept-alive connection closed by the server: one fresh try. Any
                # other failure leaves the rest unanswered (the engine retries them).
                if reused and got == 0 and not retried:
                    retried = True
                    continue
                return answers + [exc] * (len(wire) - len(answers))
        return answers

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
