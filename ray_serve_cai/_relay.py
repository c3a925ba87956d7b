"""An HTTP/1.1 relay: each request head is parsed and rewritten, everything else passes as bytes.

One module, used by the cluster's Serve gateway (`node.gateway`: to the nodes' Serve ingress through
authenticated tunnels) and by the local workspace's application URLs (`workspace.app_urls`: its fast
path), so it imports nothing else of the package (stdlib and httptools only).

Why not an ASGI server and an HTTP client (uvicorn → `_proxy.ReverseProxy` → aiohttp): such a hop
cost ~330 µs of CPU per request on this machine (half of it aiohttp's client, most of the rest
uvicorn's ASGI cycle) and about a millisecond of latency; on 2 shared cores throughput follows the sum
of the hops' CPU (benchmarks/README.md, issue 24). Here a request costs one C parse of its head
(httptools, llhttp), one header rewrite, and raw writes:

* **requests**: the `Relay` decides per head — forward it (an `Exchange` with the rewritten path and
  headers: see `forwarded_headers`), answer it here (bytes), or hand the connection to a `fallback`
  protocol (e.g. uvicorn with the full ASGI app) with every byte received so far; the body follows
  as it arrives (a chunked body re-chunked as it is decoded);
* **responses** go back byte for byte as the upstream sends them (parsed only to see where each
  ends: streams, server-sent events and large downloads pass as produced, nothing is held); an
  exchange's `head_hook` may rewrite the response head (e.g. add a request id);
* **WebSockets**: after the upgrade request and the upstream's `101`, both ways are relayed as bytes;
* upstream connections are pooled per (host, port) and reused (idle ones closed after
  `KEEPALIVE_SECONDS`, before uvicorn drops them at 5 s); one that does not open reached nobody;
  a request whose reused connection closes before any byte of an answer is started again, once,
  on a new connection (the upstream closed it as idle as the request went out: on a loaded machine
  the margin can run out), as browsers do — when its body so far is at most `REPLAY_LIMIT_BYTES`;
* one request at a time per client connection (no pipelining: no browser or proxy sends it); an
  idle client connection is closed after `CLIENT_IDLE_SECONDS`, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import httptools

logger = logging.getLogger(__name__)

#: Opens a socket to (host, port) ready for HTTP (e.g. a tunnel whose CONNECT was answered 200);
#: raises OSError when it cannot, which means nothing was sent.
OpenSocket = Callable[[str, int], Awaitable[socket.socket]]

Headers = Sequence[tuple[bytes, bytes]]
KEEPALIVE_SECONDS = 4.0
CLIENT_IDLE_SECONDS = 5.0
CONNECT_SECONDS = 5.0
HEAD_LIMIT_BYTES = 64 * 1024
REPLAY_LIMIT_BYTES = 64 * 1024
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_SET_HERE = frozenset({b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def json_answer(status: int, body: Any, *, close: bool = False, headers: Headers = ()) -> bytes:
    """A whole HTTP/1.1 answer with a JSON body."""
    data = json.dumps(body).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode(),
        b"content-type: application/json",
        b"content-length: %d" % len(data),
        *(name + b": " + value for name, value in headers),
    ]
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + data


def is_chunked(headers: Headers) -> bool:
    """Whether a request's body comes chunked (`Transfer-Encoding: chunked`)."""
    return any(n == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers)


def forwarded_headers(
    headers: Headers, peer: str, *, drop: frozenset[bytes] = frozenset(), upgrade: bool = False
) -> list[tuple[bytes, bytes]]:
    """A request's headers as the upstream gets them: hop-by-hop ones (RFC 9110 §7.6.1, and those
    named in `Connection`; a WebSocket handshake keeps `Connection` and `Upgrade`) and `drop` removed,
    `Host` left to the relay, `X-Forwarded-Proto/-Host/-For` set (`peer` appended to the chain), a
    chunked body announced again (the relay re-chunks it)."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name == b"connection"
        for token in value.split(b",")
    }
    dropped = drop | _SET_HERE | _HOP_BY_HOP | named
    if upgrade:
        dropped -= {b"connection", b"upgrade"}
    kept = [(n, v) for n, v in headers if n not in dropped]
    if is_chunked(headers):
        kept.append((b"transfer-encoding", b"chunked"))
    host = next((v for n, v in headers if n == b"host"), b"")
    earlier = next((v for n, v in headers if n == b"x-forwarded-for"), b"")
    client = peer.encode("latin-1")
    kept.append((b"x-forwarded-proto", b"http"))
    if host:
        kept.append((b"x-forwarded-host", host))
    kept.append((b"x-forwarded-for", earlier + b", " + client if earlier else client))
    return kept


# ------------------------------------------------------------------------------------ upstream side


class Upstream(asyncio.Protocol):
    """One tunnel to a node's Serve proxy: carries one exchange at a time, relays its response."""

    def __init__(self, pool: ConnectionPool, key: tuple[str, int]) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.keep_alive = True
        self.renew_parser = False
        self.spliced = False
        self.closed = False
        self.idle_since = 0.0
        self.reused = False  # taken from the pool's idle connections (not opened for this exchange)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes while idle: nothing asked for them
            self.close()
            return
        exchange.responded = True
        if exchange.head_hook is not None and not self.spliced:
            out = exchange.rewrite_heads(data)
            if out:
                exchange.sink.write(out)
        else:
            exchange.sink.write(data)
        if self.spliced:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.spliced = True  # Serve's 101: from here on, bytes both ways
            exchange.upgraded(self)
        except httptools.HttpParserError:  # not HTTP: pass on what came, end both connections
            self.exchange = None
            self.close()
            exchange.sink.finish(keep_alive=False)
        if self.renew_parser:
            self.parser, self.renew_parser = httptools.HttpResponseParser(self), False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        exchange = self.exchange
        if exchange is not None and exchange.method == b"HEAD" and self.status >= 200:
            self.renew_parser = True  # the parser would wait for the body a HEAD answer never has
            self.on_message_complete()

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None or self.status < 200:  # an interim answer (100 Continue): the rest follows
            return
        self.exchange = None
        reusable = self.keep_alive and exchange.request_done and not exchange.upgrade
        if reusable:
            self.pool.release(self)
        else:
            self.close()
        # An answer before the whole request arrived, or a refused upgrade: that connection is done.
        exchange.sink.finish(keep_alive=exchange.request_done and not exchange.upgrade)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(self)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.sink.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.sink.resume_reading()


async def open_tcp(host: str, port: int) -> socket.socket:
    """A plain TCP connection (TCP_NODELAY: a relay passes each write on as it comes)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class ConnectionPool:
    """Idle upstream connections per (host, port), most recently used first; new ones come from
    `open_socket` (plain TCP by default)."""

    def __init__(self, open_socket: OpenSocket = open_tcp) -> None:
        self.open_socket = open_socket
        self.idle: dict[tuple[str, int], list[Upstream]] = {}

    async def acquire(self, key: tuple[str, int], fresh: bool = False) -> Upstream:
        """An idle connection to `key`, or a new one (`fresh`: always; OSError: it did not open,
        nothing was sent)."""
        idle = [] if fresh else self.idle.get(key, [])
        now = time.monotonic()
        while idle:
            upstream = idle.pop()
            if not upstream.closed and now - upstream.idle_since < KEEPALIVE_SECONDS:
                upstream.reused = True
                return upstream
            upstream.close()
        loop = asyncio.get_running_loop()
        sock = await asyncio.wait_for(self.open_socket(*key), CONNECT_SECONDS)
        try:
            _, upstream = await loop.create_connection(lambda: Upstream(self, key), sock=sock)
        except BaseException:
            sock.close()
            raise
        return upstream

    def release(self, upstream: Upstream) -> None:
        upstream.idle_since = time.monotonic()
        self.idle.setdefault(upstream.key, []).append(upstream)

    def forget(self, upstream: Upstream) -> None:
        idle = self.idle.get(upstream.key)
        if idle and upstream in idle:
            idle.remove(upstream)

    def prune(self) -> None:
        """Close connections idle for `KEEPALIVE_SECONDS` (called now and then)."""
        now = time.monotonic()
        for idle in self.idle.values():
            for upstream in [u for u in idle if now - u.idle_since >= KEEPALIVE_SECONDS]:
                idle.remove(upstream)
                upstream.close()

    def close(self) -> None:
        for idle in self.idle.values():
            for upstream in idle:
                upstream.close()
        self.idle.clear()


# ------------------------------------------------------------------------------------- exchanges


class Sink:
    """Where an exchange's response goes (a client connection, or a health check)."""

    def write(self, data: bytes) -> None: ...
    def finish(self, *, keep_alive: bool) -> None: ...
    def fail(self, status: int, body: Any, headers: Headers = ()) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


@dataclass
class Exchange:
    """One request on its way: the rebuilt head, the body so far, the node it went to."""

    method: bytes
    path: bytes  # with the query, /serve stripped
    headers: list[tuple[bytes, bytes]]
    sink: Sink
    chunked: bool = False
    upgrade: bool = False
    request_done: bool = False
    responded: bool = False
    upstream: Upstream | None = None
    pending: list[bytes] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    node: str | None = None
    target: tuple[str, int] | None = None  # where the relay sends it, when it knows at once
    on_upgrade: Callable[[Upstream], None] | None = None
    head_hook: Callable[[bytes], bytes] | None = None  # rewrites each response head (status line on)
    sent: bytearray | None = field(default_factory=bytearray)  # the body so far, to send it again
    replayed: bool = False  # started again: `Relay.connect` then takes a new connection (`fresh`)
    again: Callable[[Exchange], None] | None = None  # `Relay.start`, set when it started
    _head: bytes = b""  # a response head not complete yet (only with head_hook)
    _heads_done: bool = False

    def rewrite_heads(self, data: bytes) -> bytes:
        """What goes to the client of `data`: each response head passed through `head_hook` once it
        is complete (interim 1xx heads too, until the final one), the body as it is."""
        if self._heads_done or self.head_hook is None:
            return data
        buffer, out = self._head + data, b""
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._head = buffer
                return out
            head, buffer = buffer[: end + 4], buffer[end + 4 :]
            out += self.head_hook(head)
            status = head[9:12]
            if not (status.startswith(b"1") and status != b"101"):
                self._heads_done, self._head = True, b""
                return out + buffer

    def head(self, host: str) -> bytes:
        lines = [self.method, b" ", self.path, b" HTTP/1.1\r\nhost: ", host.encode("latin-1"), b"\r\n"]
        for name, value in self.headers:
            lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        return b"".join(lines)

    def body(self, data: bytes) -> None:
        if self.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._keep(data)
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def request_complete(self) -> None:
        self.request_done = True
        if self.chunked:
            last = b"0\r\n\r\n"
            self._keep(last)
            if self.upstream is None:
                self.pending.append(last)
            else:
                self.upstream.write(last)

    def attach(self, upstream: Upstream, host: str) -> None:
        self.upstream = upstream
        upstream.exchange = self
        upstream.status, upstream.keep_alive = 0, True
        upstream.write(self.head(host) + b"".join(self.pending))
        self.pending = []

    def upgraded(self, upstream: Upstream) -> None:
        if self.on_upgrade is not None:
            self.on_upgrade(upstream)

    def _keep(self, data: bytes) -> None:
        if self.sent is not None:
            self.sent += data
            if len(self.sent) > REPLAY_LIMIT_BYTES:
                self.sent = None  # too large to keep: this one is not sent again

    def upstream_lost(self, upstream: Upstream) -> None:
        if self.responded:
            self.sink.finish(keep_alive=False)
        elif upstream.reused and self.sent is not None and self.again is not None and not self.replayed:
            # Started again from the choice of an upstream: the same one on a new connection, or
            # another when that one does not open (the gateway's nodes).
            self.replayed, self.upstream, self.pending = True, None, [bytes(self.sent)]
            self.tried.clear()
            self.again(self)
        else:
            self.sink.fail(502, {"error": f"{self.node or 'the upstream'} did not answer the request"})


# --------------------------------------------------------------------------------------- clients


class ClientConnection(asyncio.Protocol, Sink):
    """One client connection: parses request heads, asks the `Relay` what to do with each, writes
    what comes back. With `fallback`, a request the relay declines (`Relay.request` → None) takes
    the whole connection to a new `fallback()` protocol, with every byte of that request so far."""

    def __init__(self, relay: Relay, fallback: Callable[[], asyncio.Protocol] | None = None) -> None:
        self.relay = relay
        self.fallback = fallback
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.raw = bytearray()  # the bytes of the request being read (for a hand-over)
        self.exchange: Exchange | None = None
        self.local: bytes | None = None
        self.handover = False
        self.spliced_to: Upstream | None = None
        self.keep_alive = True
        self.idle_timer: asyncio.TimerHandle | None = None
        self.closed = False

    # ---- transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        self.relay.clients.add(self)
        self._idle()

    def data_received(self, data: bytes) -> None:
        if self.spliced_to is not None:
            self.spliced_to.write(data)
            return
        between = self.exchange is None and self.local is None
        if between:
            self.head_bytes += len(data)  # reset when a head is complete
            if self.fallback is not None:
                self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0] if upgrade.args and isinstance(upgrade.args[0], int) else len(data)
            if self.exchange is not None and not self.handover:
                self.exchange.request_done = True
                if data[offset:]:
                    self.exchange.body(data[offset:])
        except httptools.HttpParserError:
            if not self.handover:
                self.fail(400, {"error": "not a valid HTTP/1.1 request"})
                return
        if self.handover:
            self._hand_over()
            return
        if self.exchange is None and self.local is None and self.head_bytes > HEAD_LIMIT_BYTES:
            self.fail(431, {"error": "the request head is too large"})

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.clients.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        upstream = self.exchange.upstream if self.exchange is not None else self.spliced_to
        self.exchange = None
        if upstream is not None:  # the client left mid-exchange: that connection is done
            upstream.exchange = None
            upstream.close()

    def pause_writing(self) -> None:
        upstream = self.exchange.upstream if self.exchange is not None else self.spliced_to
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.exchange.upstream if self.exchange is not None else self.spliced_to
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    # ---- parser callbacks

    def on_message_begin(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip()))

    def on_headers_complete(self) -> None:
        if self.handover:
            return
        if self.exchange is not None or self.local is not None:
            self.fail(400, {"error": "pipelined requests are not supported"})
            return
        self.head_bytes = 0
        self.keep_alive = self.parser.should_keep_alive()
        upgrade = self.parser.should_upgrade()
        decision = self.relay.request(self, self.parser.get_method(), self.url, self.headers, upgrade)
        if decision is None and self.fallback is not None:
            self.handover = True
        elif isinstance(decision, Exchange):
            self.raw = bytearray()
            decision.on_upgrade = self._splice
            self.exchange = decision
            self.relay.start(decision)
        else:
            self.raw = bytearray()
            self.local = decision or json_answer(404, {"error": "not found"})

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None and not self.handover:
            self.exchange.body(body)

    def on_message_complete(self) -> None:
        if self.handover:
            return
        if self.local is not None:
            answer, self.local = self.local, None
            self.write(answer)
            self.finish(keep_alive=b"connection: close" not in answer.split(b"\r\n\r\n", 1)[0])
            return
        if self.exchange is not None:
            self.exchange.request_complete()
            if self.transport is not None:
                self.transport.pause_reading()  # the next request waits for this answer

    # ---- Sink

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def finish(self, *, keep_alive: bool) -> None:
        self.exchange = None
        self.raw = bytearray()
        if self.transport is None or self.closed:
            return
        if not (keep_alive and self.keep_alive):
            self.transport.close()
            return
        self.transport.resume_reading()
        self._idle()

    def fail(self, status: int, body: Any, headers: Headers = ()) -> None:
        self.write(json_answer(status, body, close=True, headers=headers))
        self.exchange = None
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def _splice(self, upstream: Upstream) -> None:
        self.spliced_to = upstream
        self.exchange = None
        if self.transport is not None:
            self.transport.resume_reading()

    def _hand_over(self) -> None:
        """The rest of this connection is the fallback protocol's, from this request's first byte."""
        assert self.fallback is not None and self.transport is not None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        self.relay.clients.discard(self)
        protocol = self.fallback()
        transport, raw = self.transport, bytes(self.raw)
        self.transport, self.raw = None, bytearray()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(raw)

    def _idle(self) -> None:
        if self.transport is not None:
            loop = asyncio.get_running_loop()
            self.idle_timer = loop.call_later(CLIENT_IDLE_SECONDS, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if self.exchange is None and self.spliced_to is None and self.transport is not None:
            self.transport.close()


# ------------------------------------------------------------------------------------ the relay


class Relay:
    """Decides for a `ClientConnection` what each request becomes and where it goes."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.clients: set[ClientConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def request(
        self, client: ClientConnection, method: bytes, url: bytes, headers: Headers, upgrade: bool
    ) -> Exchange | bytes | None:
        """An `Exchange` to send upstream (`start`), an answer to give here (bytes, once the request
        has been read), or None: the connection's fallback takes it."""
        raise NotImplementedError

    async def connect(self, exchange: Exchange) -> None:
        """Attach `exchange` to an upstream connection (`Exchange.attach`; a new one when it is
        `replayed`: `ConnectionPool.acquire(..., fresh=True)`), or fail its sink."""
        raise NotImplementedError

    def start(self, exchange: Exchange) -> None:
        exchange.again = self.start
        task = asyncio.get_running_loop().create_task(self.connect(exchange))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close_clients(self) -> None:
        """Close every client connection and stop every request on its way."""
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.close()
        for task in self.tasks:
            task.cancel()

    def close(self) -> None:
        self.close_clients()
        self.pool.close()


class _Status(Sink):
    """A health check's sink: the status line of a small answer, read to its end."""

    def __init__(self) -> None:
        self.head = b""
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        if len(self.head) < 64:
            self.head += data[:64]

    def finish(self, *, keep_alive: bool) -> None:
        if not self.done.done():
            parts = self.head.split(b" ", 2)
            self.done.set_result(int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0)

    def fail(self, status: int, body: Any, headers: Headers = ()) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"HTTP {status}"))


async def get_status(pool: ConnectionPool, host: str, port: int, path: str) -> int:
    """`GET path` through a tunnel to (host, port): the answer's status (OSError: no tunnel)."""
    sink = _Status()
    exchange = Exchange(method=b"GET", path=path.encode(), headers=[], sink=sink, request_done=True)
    upstream = await pool.acquire((host, port))
    exchange.node = f"{host}:{port}"
    exchange.attach(upstream, f"{host}:{port}")
    try:
        return await sink.done
    finally:
        if not sink.done.done() or upstream.exchange is exchange:
            upstream.exchange = None
            upstream.close()


__all__ = [
    "ClientConnection",
    "ConnectionPool",
    "Exchange",
    "OpenSocket",
    "Relay",
    "forwarded_headers",
    "get_status",
    "is_chunked",
    "json_answer",
    "open_tcp",
]
