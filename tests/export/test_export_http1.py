"""The webhook target's HTTP/1.1 client against servers that misbehave on purpose (a raw
socket server scripted per connection) and against the reference receiver, pipelined."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from export_factories import SECRET

from meterline.export.http1 import PipelinedPoster
from meterline.export.items import ExportItem
from meterline.export.receiver import WebhookReceiver
from meterline.export.webhook_target import WebhookTarget, WebhookTargetSettings

pytestmark = pytest.mark.timeout(60)

STATUSES = (200, 201, 409, 503, 202)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _read_requests(conn: socket.socket, n: int, buf: bytearray) -> list[bytes]:
    """Read ``n`` whole requests (head + Content-Length body) from the connection."""
    out: list[bytes] = []
    while len(out) < n:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end])
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(buf) >= end + 4 + length:
                out.append(bytes(buf[:end + 4 + length]))
                del buf[:end + 4 + length]
                continue
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return out


class Scripted:
    """Accepts connections on 127.0.0.1:0; connection i runs ``scripts[i](conn, buf)``."""

    def __init__(self, scripts: list[Callable[[socket.socket, bytearray], None]]) -> None:
        self.scripts = scripts
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for script in self.scripts:
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn:
                script(conn, bytearray())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def make(*scripts: Callable[[socket.socket, bytearray], None]) -> Scripted:
        servers.append(Scripted(list(scripts)))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _posts(n: int) -> list[tuple[bytes, dict[str, str]]]:
    return [(b'{"n":%d}' % i, {"Idempotency-Key": f"k{i}"}) for i in range(n)]


def test_pipelined_group_goes_in_one_write_and_answers_come_in_order(scripted) -> None:
    seen: list[bytes] = []

    def serve(conn: socket.socket, buf: bytearray) -> None:
        got = _read_requests(conn, 5, buf)
        seen.extend(got)
        conn.sendall(b"".join(b"HTTP/1.1 %d X\r\nContent-Length: 1\r\n\r\n%d" % (status, i)
                              for i, status in enumerate(STATUSES)))

    server = scripted(serve)
    poster = PipelinedPoster(server.url, 5.0, depth=5)
    answers = poster.post_many(_posts(5))
    assert answers == [(status, b"%d" % i) for i, status in enumerate(STATUSES)]
    assert [r.split(b"\r\n\r\n")[1] for r in seen] == [b'{"n":%d}' % i for i in range(5)]
    assert seen[0].startswith(b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1:")
    poster.close()


def test_connection_lost_mid_group_leaves_the_rest_unanswered(scripted) -> None:
    def two_then_close(conn: socket.socket, buf: bytearray) -> None:
        _read_requests(conn, 5, buf)
        conn.sendall(OK + OK)  # then the connection closes with 3 unanswered

    server = scripted(two_then_close)
    answers = PipelinedPoster(server.url, 5.0, depth=5).post_many(_posts(5))
    assert answers[:2] == [(200, b"ok")] * 2
    assert all(isinstance(a, OSError) for a in answers[2:])
    assert server.connections == 1  # a fresh connection that broke is not retried here


def test_connection_close_answer_sends_the_rest_on_a_new_connection(scripted) -> None:
    def one_then_close(conn: socket.socket, buf: bytearray) -> None:
        _read_requests(conn, 1, buf)
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")

    def rest(conn: socket.socket, buf: bytearray) -> None:
        _read_requests(conn, 2, buf)
        conn.sendall(b"HTTP/1.1 201 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n" + OK)

    server = scripted(one_then_close, rest)
    answers = PipelinedPoster(server.url, 5.0, depth=3).post_many(_posts(3))
    assert answers == [(200, b"ok"), (201, b"abcde"), (200, b"ok")]
    assert server.connections == 2


def test_idle_keepalive_closed_by_the_server_is_reopened_once(scripted) -> None:
    def answer_then_drop(conn: socket.socket, buf: bytearray) -> None:
        _read_requests(conn, 1, buf)
        conn.sendall(OK)  # keep-alive announced, then closed while idle

    def answer(conn: socket.socket, buf: bytearray) -> None:
        _read_requests(conn, 1, buf)
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    server = scripted(answer_then_drop, answer)
    poster = PipelinedPoster(server.url, 5.0)
    assert poster.post(b"{}", {}) == (200, b"ok")
    assert poster.post(b"{}", {}) == (204, b"")
    assert server.connections == 2


def test_garbage_answer_and_header_injection_are_refused(scripted) -> None:
    def garbage(conn: socket.socket, buf: bytearray) -> None:
        _read_requests(conn, 1, buf)
        conn.sendall(b"SSH-2.0-OpenSSH\r\n\r\n")

    server = scripted(garbage)
    poster = PipelinedPoster(server.url, 5.0)
    with pytest.raises(OSError, match="not an HTTP/1.x answer"):
        poster.post(b"{}", {})
    with pytest.raises(ValueError, match="control characters"):
        poster.encode(b"{}", {"Idempotency-Key": "k\r\nX-Evil: 1"})


def test_pipelined_export_to_the_reference_receiver_holds_each_line_once(
        make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(57)
    with WebhookReceiver(SECRET) as rx:
        target = WebhookTarget(WebhookTargetSettings(rx.url, SECRET, 10.0, 1, pipeline=8))
        results = target.send(items)
        target.close()
    assert {r.outcome for r in results} == {"sent"}
    assert set(rx.held) == {it.key for it in items}
    assert set(rx.deliveries.values()) == {1} and rx.bad_signatures == 0
    assert rx.requests == 57


def test_receiver_that_drops_mid_pipeline_gets_the_rest_as_retries(
        scripted, make_items: Callable[..., list[ExportItem]]) -> None:
    items = make_items(4)

    def two_then_close(conn: socket.socket, buf: bytearray) -> None:
        _read_requests(conn, 4, buf)
        conn.sendall(OK + OK)

    server = scripted(two_then_close)
    target = WebhookTarget(WebhookTargetSettings(server.url, SECRET, 5.0, 1, pipeline=4))
    results = {r.key: r.outcome for r in target.send(items)}
    target.close()
    assert [results[it.key] for it in items] == ["sent", "sent", "retry", "retry"]
