"""The node's Serve ingress: the cluster token checked once per connection, then bytes relayed.

Serve's HTTP proxy has no auth and stays on its pod's loopback (`127.0.0.1:SERVE_POD_PORT`). The
cluster's Serve gateway (`node.gateway`) reaches it through the node's ingress on
`<pod IP>:SERVE_INGRESS_PORT`, which works as an HTTP tunnel (RFC 9110 §9.3.6, `CONNECT`) with one
fixed destination:

    gateway → CONNECT 127.0.0.1:8000 HTTP/1.1 / X-Ray-Authorization: Bearer <cluster token> / (blank)
    ingress → (connects to Serve's proxy on its loopback) HTTP/1.1 200 Connection established
    then the gateway's HTTP/1.1 requests and WebSockets go to Serve's proxy byte for byte, and back

The request line's target is never used: the ingress opens nothing but its own pod's Serve proxy.
The gateway keeps its tunnels open and reuses them request after request (its aiohttp pool,
`_relay.ConnectionPool`), so a request costs the ingress a read and a
write each way — no HTTP parse, no header rewrite, no per-request object. A second HTTP proxy per
request was a third of the endpoint's own CPU (benchmarks/README.md, issue 24).

Refusals are HTTP answers, then the connection is closed: 401 without the cluster token or with a
wrong one (compared in constant time; nothing reaches Serve), 405 for any method but CONNECT, 400 for
a request head that does not end within `HEAD_LIMIT_BYTES` or `HANDSHAKE_SECONDS`, 502 when Serve's
proxy refuses the connection — the gateway's connect fails, so it knows nothing was sent and tries
another node.

`TunnelIngress` runs its own event loop in a daemon thread (uvloop when installed), so the node
launcher's main thread keeps supervising Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
from collections.abc import Callable

from ray_serve_cai._relay import OpenSocket, json_answer
from ray_serve_cai.config.serve import SERVE_HOST, SERVE_POD_PORT

logger = logging.getLogger("ray_serve_cai.node")

TOKEN_HEADER = "x-ray-authorization"
HEAD_LIMIT_BYTES = 8192
HANDSHAKE_SECONDS = 10.0
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class TunnelRefused(ConnectionError):
    """The ingress did not open the tunnel (its status line says why; never the token)."""


def judge(head: bytes, expected: bytes | None) -> tuple[int, str] | None:
    """None when the request head opens a tunnel; else (status, why). `expected` is
    `Bearer <token>` (None: a cluster without token auth)."""
    lines = head.split(b"\r\n")
    request_line = lines[0].split(b" ")
    if expected is not None:
        presented = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == TOKEN_HEADER.encode():
                presented = value.strip()
        if not hmac.compare_digest(presented, expected):
            return 401, "the cluster token is required"
    if len(request_line) != 3 or request_line[0] != b"CONNECT":
        return 405, "this is a node's Serve ingress: it opens tunnels (CONNECT) for the Serve gateway"
    return None


class _Pipe(asyncio.Protocol):
    """One side of a relay: what it reads, its peer writes; each side's full write buffer pauses the
    other's reading; an end of stream is passed on (half-close), and both close when both ended."""

    def __init__(self, connections: set[asyncio.BaseTransport]) -> None:
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.ended = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.ended:
            return False  # both directions are done: this side closes, its connection_lost the other
        with contextlib.suppress(OSError, RuntimeError):
            peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.connections.discard(self.transport)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # after what is buffered for it is written

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Handshake(asyncio.Protocol):
    """An accepted connection until its tunnel opens: reads the request head, judges it, connects
    to Serve's proxy, answers 200 and hands the connection to a `_Pipe`."""

    def __init__(self, ingress: TunnelIngress) -> None:
        self.ingress = ingress
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.ended = False  # the client ended its side while the tunnel was opening

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ingress.connections.add(transport)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(HANDSHAKE_SECONDS, self.refuse, 400, "no request head in time")

    def data_received(self, data: bytes) -> None:
        if self.task is not None:  # a client that sends on before the tunnel opens: kept for Serve
            self.buffer += data
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > HEAD_LIMIT_BYTES:
                self.refuse(400, "the request head is too long")
            return
        head, rest = bytes(self.buffer[:end]), self.buffer[end + 4 :]
        self.buffer = rest
        if self.timer is not None:
            self.timer.cancel()
        problem = judge(head, self.ingress.expected)
        if problem is not None:
            self.refuse(*problem)
            return
        self.task = asyncio.get_running_loop().create_task(self.open_tunnel())

    async def open_tunnel(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        connections = self.ingress.connections
        try:
            upstream_transport, upstream = await loop.create_connection(
                lambda: _Pipe(connections), SERVE_HOST, self.ingress.upstream_port
            )
        except OSError:
            self.refuse(502, "the node's Serve proxy refused the connection")
            return
        if self.closed:
            upstream_transport.close()
            return
        client = _Pipe(connections)
        client.transport, client.peer, upstream.peer = self.transport, upstream, client
        self.transport.set_protocol(client)
        self.transport.write(ESTABLISHED)
        if self.buffer:
            upstream_transport.write(bytes(self.buffer))
        self.buffer = bytearray()
        if self.ended:
            client.eof_received()

    def refuse(self, status: int, message: str) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(json_answer(status, {"error": message}, close=True))
            self.transport.close()

    def eof_received(self) -> bool:
        self.ended = True
        return self.task is not None  # before the head: close; while connecting: keep the half

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.ingress.connections.discard(self.transport)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when installed (the relays' hot path), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class TunnelIngress:
    """The tunnel server on `host:port` to Serve's proxy on `127.0.0.1:upstream_port`, in a daemon
    thread with its own event loop. `token` None: a cluster without token auth (any CONNECT opens)."""

    def __init__(self, host: str, port: int, token: str | None, upstream_port: int = SERVE_POD_PORT) -> None:
        self.host, self.requested_port, self.upstream_port = host, port, upstream_port
        self.expected = None if token is None else f"Bearer {token}".encode()
        self.connections: set[asyncio.BaseTransport] = set()
        self.port: int | None = None
        self.problem: str | None = None
        self._loop = new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-ingress", daemon=True)

    def __repr__(self) -> str:
        return f"TunnelIngress({self.host}:{self.port} -> {SERVE_HOST}:{self.upstream_port})"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                self._loop.create_server(
                    lambda: _Handshake(self), self.host, self.requested_port, reuse_address=True
                )
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except OSError as error:
            self.problem = error.strerror or type(error).__name__
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    @property
    def listening(self) -> bool:
        return self.port is not None

    def start(self, wait_seconds: float = 10.0) -> TunnelIngress:
        """Listen (waits up to `wait_seconds` for the socket; `listening`/`problem` say how it went)."""
        self._thread.start()
        if not self._ready.wait(wait_seconds):
            self.problem = f"not listening after {wait_seconds:.0f}s"
        return self

    def stop(self, wait_seconds: float = 2.0) -> None:
        """Stop listening and close every open tunnel (the gateway sees this node go)."""
        if not self._thread.is_alive():
            return

        def shut() -> None:
            if self._server is not None:
                self._server.close()
            for transport in list(self.connections):
                transport.abort()
            self._loop.stop()

        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(shut)
        self._thread.join(timeout=wait_seconds)


def tunnel_opener(token: Callable[[], str | None]) -> OpenSocket:
    """An `OpenSocket` for the gateway: a socket to a node's ingress at (host, port) with its
    tunnel open (the cluster token from `token()` at each new connection). Raises `TunnelRefused`
    (an OSError: the caller's request reached nobody) when the ingress does not open it."""

    async def open_tunnel(host: str, port: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, (host, port))
            secret = token()
            auth = f"{TOKEN_HEADER}: Bearer {secret}\r\n" if secret else ""
            request = f"CONNECT {SERVE_HOST}:{SERVE_POD_PORT} HTTP/1.1\r\nhost: {host}:{port}\r\n{auth}\r\n"
            await loop.sock_sendall(sock, request.encode("latin-1"))
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = await loop.sock_recv(sock, HEAD_LIMIT_BYTES)
                if not chunk:
                    raise TunnelRefused(f"the Serve ingress {host}:{port} closed the connection")
                reply += chunk
                if len(reply) > HEAD_LIMIT_BYTES:
                    raise TunnelRefused(f"the Serve ingress {host}:{port} sent no answer head")
            status_line = reply.split(b"\r\n", 1)[0].decode("latin-1")
            if reply != ESTABLISHED:
                raise TunnelRefused(f"the Serve ingress {host}:{port} answered {status_line!r}")
            return sock
        except BaseException:
            sock.close()
            raise

    return open_tunnel


__all__ = [
    "TOKEN_HEADER",
    "TunnelIngress",
    "TunnelRefused",
    "judge",
    "new_event_loop",
    "tunnel_opener",
]
