"""The plumbing of the test HTTP peers (stripe-mock's recording proxy, the Chargebee peer):
a threaded HTTP/1.1 server on 127.0.0.1:0 run from a daemon thread, quiet, that hands every
request with its body to one method.

A subclass implements ``_handle(handler, body)`` and answers with :func:`respond`; the
server keeps connections alive (the SDKs reuse theirs) and lives for a ``with`` block.
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from types import TracebackType
from typing import Self

__all__ = ["LOOPBACK", "LoopbackServer", "respond"]

LOOPBACK = "127.0.0.1"


class LoopbackServer:
    """Serves GET, POST and DELETE on a free loopback port through :meth:`_handle`."""

    thread_name = "loopback-http"

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def address(self) -> str:
        """``host:port``: the ``Host`` header of a request sent straight to this server."""
        return self.url.removeprefix("http://")

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        # A short poll interval: stop() waits for the serve loop to notice.
        self._thread = Thread(target=self._server.serve_forever, daemon=True,
                              kwargs={"poll_interval": 0.05}, name=self.thread_name)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: the SDKs reuse their connections

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # the servers record what they got; stderr noise helps nobody

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server._handle(self, b"")

            def do_DELETE(self) -> None:  # noqa: N802
                server._handle(self, b"")

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                server._handle(self, self.rfile.read(length) if length else b"")

        return Handler


def respond(handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]],
            data: bytes) -> None:
    """Answer with a Content-Length; a client that went away only closes the connection."""
    try:
        handler.send_response(status)
        for k, v in headers:
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    except OSError:
        handler.close_connection = True
