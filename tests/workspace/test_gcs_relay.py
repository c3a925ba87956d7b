"""The worker's GCS relay on loopback (real sockets, no Ray): it forwards to the newest head, closes
open connections when the head changes, ignores a stale epoch, and refuses while no head is known."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest
from support.fakes import wait_until

from ray_serve_cai.node import gcs_relay
from ray_serve_cai.node.gcs_relay import GcsRelay, Target


class Named(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def named_server(name: bytes) -> Named:
    """A stand-in GCS: answers every line with its name."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for _ in self.rfile:
                self.wfile.write(name + b"\n")

    server = Named(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def ask(sock: socket.socket) -> bytes:
    sock.sendall(b"who\n")
    return sock.recv(64).strip()


@pytest.fixture
def heads() -> Iterator[tuple[Named, Named]]:
    a, b = named_server(b"a"), named_server(b"b")
    yield a, b
    for server in (a, b):
        server.shutdown()
        server.server_close()


def test_the_relay_follows_the_newest_head(
    heads: tuple[Named, Named], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcs_relay, "POLL_SECONDS", 0.05)
    a, b = heads
    current: list[Target | None] = [None]
    relay = GcsRelay("127.0.0.1", 0, lambda: current[0])
    port = relay.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as refused:
            assert refused.recv(64) == b""  # no head yet: closed at once (the client retries)

        current[0] = Target("127.0.0.1", a.server_address[1], "head-a", epoch=1)
        wait_until(lambda: relay.target == current[0], timeout=5, what="the relay to see head a")
        old = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert ask(old) == b"a"

        current[0] = Target("127.0.0.1", b.server_address[1], "head-b", epoch=2)
        wait_until(lambda: relay.target == current[0], timeout=5, what="the relay to see head b")
        assert old.recv(64) == b""  # the connection to the old head was closed: gRPC reconnects
        old.close()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as new:
            assert ask(new) == b"b"

        current[0] = Target("127.0.0.1", a.server_address[1], "head-a", epoch=1)  # a stale head.json
        with socket.create_connection(("127.0.0.1", port), timeout=5) as still_b:
            assert ask(still_b) == b"b"
        assert relay.connections == 3
    finally:
        relay.stop()
