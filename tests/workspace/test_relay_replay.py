"""The relay (`ray_serve_cai._relay`, under the Serve gateway and the workspace's application URLs)
and an upstream that closes a kept-alive connection just as the next request goes out on it.

Real sockets on loopback: a relay on an asyncio loop in a thread, an upstream of raw sockets that
answers the first request of each connection and then, as a server does whose idle timer has just
run out, closes the connection when the next request arrives, without answering. A request that met
such a connection is sent again, once, on a new connection, body and all; a new connection that
also closes unanswered is a 502, not a loop.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from ray_serve_cai._relay import ClientConnection, ConnectionPool, Exchange, Headers, Relay, is_chunked


class OneUpstream(Relay):
    """Every request to one upstream, as the workspace's application URLs send theirs."""

    def __init__(self, port: int) -> None:
        super().__init__(ConnectionPool())
        self.port = port

    def request(
        self, client: ClientConnection, method: bytes, url: bytes, headers: Headers, upgrade: bool
    ) -> Exchange:
        kept = [(n, v) for n, v in headers if n != b"host"]
        return Exchange(
            method=method, path=url, headers=kept, sink=client, chunked=is_chunked(headers), node="upstream"
        )

    async def connect(self, exchange: Exchange) -> None:
        try:
            upstream = await self.pool.acquire(("127.0.0.1", self.port), fresh=exchange.replayed)
        except OSError:
            exchange.sink.fail(502, {"error": "no upstream"})
            return
        exchange.attach(upstream, f"127.0.0.1:{self.port}")


@dataclass
class Upstream:
    """Answers the first request of each connection (echoing its body); the next one it reads and
    then closes the connection unanswered. `close_first`: closes each connection unanswered at once."""

    close_first: bool = False
    sock: socket.socket = field(default_factory=socket.socket)
    connections: int = 0
    bodies: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            body = _read_request(conn)
            if body is None or self.close_first:
                return
            self.bodies.append(body)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
            _read_request(conn)  # the next request arrives: the connection closes, nothing answered

    def close(self) -> None:
        self.sock.close()


def _read_request(conn: socket.socket) -> bytes | None:
    """One request with a content-length body; its body (None: the connection closed first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return body


@pytest.fixture
def relay_to() -> Iterator[Callable[[Upstream], str]]:
    """`relay_to(upstream)`: the URL of a relay in front of it (its loop runs in a thread)."""
    loops: list[tuple[asyncio.AbstractEventLoop, threading.Thread]] = []

    def start(upstream: Upstream) -> str:
        loop = asyncio.new_event_loop()
        relay = OneUpstream(upstream.port)
        server = loop.run_until_complete(loop.create_server(lambda: ClientConnection(relay), "127.0.0.1", 0))
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        loops.append((loop, thread))
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for loop, thread in loops:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_a_request_on_a_kept_alive_connection_the_upstream_closes_is_sent_again_once(
    relay_to: Callable[[Upstream], str],
) -> None:
    upstream = Upstream()
    try:
        url = relay_to(upstream)
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
            first = client.post("/predict", content=b"first")
            second = client.post("/predict", content=b"second" * 1000)
        assert (first.status_code, first.content) == (200, b"first")
        assert (second.status_code, second.content) == (200, b"second" * 1000), second.text
        # The second request went out on the kept connection, met its close, and went again, whole.
        assert upstream.connections == 2 and upstream.bodies == [b"first", b"second" * 1000]
    finally:
        upstream.close()


def test_a_new_connection_closed_unanswered_is_a_502_not_a_loop(relay_to: Callable[[Upstream], str]) -> None:
    upstream = Upstream(close_first=True)
    try:
        url = relay_to(upstream)
        answer = httpx.post(f"{url}/predict", content=b"x", timeout=10, trust_env=False)
        assert answer.status_code == 502 and "upstream did not answer" in answer.text
        assert upstream.connections == 1, "a request that never reused a connection is not sent again"
    finally:
        upstream.close()
