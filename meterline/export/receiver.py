"""A reference receiver for the signed webhook: verify, dedupe by key, count.

It is what a receiver must do (docs/export.md), small enough to read, and what the tests
and the throughput benchmark run against on 127.0.0.1:0::

    with WebhookReceiver(secret) as rx:
        ... export to rx.url ...
        assert rx.held == {key: line, ...}      # each line once, by idempotency key
        rx.deliveries[key]                      # how often it came on the wire

``respond`` (optional) decides the answer per request before anything is applied, to play
a receiver that is down (503), refuses (400) or slow. HTTP/1.1 keep-alive, one thread per
connection (ThreadingHTTPServer).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from meterline.export.signed_http import IDEMPOTENCY_HEADER, verify_signature

__all__ = ["WebhookReceiver"]

# (request number from 1, idempotency header) -> status to answer, or None to accept.
Respond = Callable[[int, str], int | None]


class WebhookReceiver:
    def __init__(self, secret: str, *, respond: Respond | None = None,
                 tolerance_s: float = 300.0) -> None:
        self.secret = secret
        self.respond = respond
        self.tolerance_s = tolerance_s
        self.held: dict[str, dict[str, Any]] = {}
        self.deliveries: Counter[str] = Counter()
        self.requests = 0
        self.bad_signatures = 0
        self.refused = 0
        self.lock = threading.Lock()
        self.seen_headers: list[dict[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes: with Nagle on, the body waits for the
            # client's delayed ACK (40 ms) on every kept-alive request.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return  # quiet: tests and the benchmark print their own summary

            def do_GET(self) -> None:  # noqa: N802 - /stats: what it holds, for a parent
                answer = orjson.dumps(receiver.stats())
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status, answer = receiver.handle(dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="webhook-receiver",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hooks/meterline"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"held": len(self.held), "deliveries": sum(self.deliveries.values()),
                    "requests": self.requests, "bad_signatures": self.bad_signatures}

    # -- what a receiver does ------------------------------------------------------------

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        with self.lock:
            self.requests += 1
            number = self.requests
            self.seen_headers.append(headers)
        if not verify_signature(self.secret, headers, body, self.tolerance_s):
            with self.lock:
                self.bad_signatures += 1
            return 401, b'{"error":"bad signature"}'
        key = headers.get(IDEMPOTENCY_HEADER) or headers.get(IDEMPOTENCY_HEADER.lower()) or ""
        if self.respond is not None:
            status = self.respond(number, key)
            if status is not None:
                with self.lock:
                    self.refused += 1
                return status, orjson.dumps({"error": f"answering {status}"})
        doc = orjson.loads(body)
        with self.lock:
            for line in doc["lines"]:
                k = line["idempotency_key"]
                self.deliveries[k] += 1
                self.held.setdefault(k, line)  # a repeat changes nothing: dedupe by key
        return 200, orjson.dumps({"id": f"rx-{number}"})


def main() -> None:
    """``python -m meterline.export.receiver``: the same receiver on aiohttp (its C HTTP
    parser answers several times faster than http.server), on 127.0.0.1:<free port>, with
    the secret from $METERLINE_WEBHOOK_SECRET; prints the URL, stops when stdin closes. The
    benchmark runs it in its own process so that sender and receiver each get a core."""
    import asyncio
    import os
    import sys

    from aiohttp import web

    rx = WebhookReceiver(os.environ["METERLINE_WEBHOOK_SECRET"])

    async def post(request: web.Request) -> web.Response:
        status, answer = rx.handle(dict(request.headers), await request.read())
        return web.Response(status=status, body=answer, content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(rx.stats())

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/hooks/meterline", post)
        app.router.add_get("/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(f"http://127.0.0.1:{port}/hooks/meterline", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
