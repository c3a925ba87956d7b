"""A streaming reverse proxy for ASGI apps: HTTP bodies streamed both ways, WebSockets passed through.

One module, used by the node's HTTP server (head → Ray dashboard, head → Serve) and by the local
workspace's application listeners, so it imports nothing else of the package (stdlib, aiohttp, starlette
and websockets only).

* HTTP: the request body is sent upstream as it arrives (aiohttp with an async iterator), the response
  is relayed chunk by chunk as the upstream produces it (``aiter_raw``: content encodings pass
  unchanged), so server-sent events, chunked responses and large downloads never sit in memory.
* WebSocket: the upgrade is accepted with Starlette's WebSocket support (the ASGI server does the
  framing), the upstream side is opened with the ``websockets`` library, and messages are pumped both
  ways until either side closes; the close code and reason are passed on.
* Small messages (a declared ``Content-Length`` of at most ``SMALL_BODY_BYTES``) are read whole and
  sent in one piece, both ways: the streaming machinery (a task group per response, an async
  iterator per request body) costs more than the copy. Everything else streams.
* Headers: hop-by-hop headers (RFC 9110 §7.6.1, plus those named in ``Connection``) are dropped in both
  directions; ``headers`` (a :data:`HeaderHook`) drops or adds request headers, ``response_headers``
  response headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
import websockets
from multidict import CIMultiDict
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection

__all__ = [
    "HOP_BY_HOP",
    "NOT_CONNECTED_KEY",
    "NOT_FORWARDED_HEADER",
    "HeaderHook",
    "ReverseProxy",
    "UpstreamClient",
    "drop_and_add",
    "proxy_client",
]

logger = logging.getLogger(__name__)

NOT_CONNECTED_KEY = "ray_cai.proxy_not_connected"  # in the scope a fallback gets: no byte was sent
# A proxy in front of another ReverseProxy learns from this response header that the request went no
# further than that proxy (its upstream refused the connection), so it may be tried elsewhere.
NOT_FORWARDED_HEADER = "x-ray-cai-not-forwarded"
SMALL_BODY_BYTES = 64 * 1024  # at most this, with a Content-Length: read whole, sent in one piece
# Connection failures before anything was sent (a fallback may try another upstream).
_NOT_CONNECTED_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)

Headers = list[tuple[str, str]]
#: Rewrites the (lower-case name, value) pairs forwarded in one direction; gets the ASGI scope too.
HeaderHook = Callable[[Headers, Scope], Headers]
#: Answers a request when the upstream cannot be reached (or is not known yet).
FallbackResponder = Callable[[Request], Awaitable[Response]]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the proxy itself on the upstream request (aiohttp from the URL) or by websockets' handshake.
_REQUEST_SET_BY_PROXY = frozenset({"host"})
_WEBSOCKET_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)


class UpstreamClient:
    """The HTTP client of a proxy: one aiohttp session, made on first use inside the serving event loop.

    aiohttp, not httpx: one hop through httpx's AsyncClient cost a trivial upstream 10x its throughput
    on this machine (benchmarks/README.md, issue 24), aiohttp's C parser and pool next to nothing.
    No read timeout (a stream may be quiet for long: the client decides when to give up), no
    connection cap, never an environment proxy, never a redirect, bodies passed as they are
    (no decompression), no cookie jar; idle connections are dropped after `KEEPALIVE_SECONDS`,
    before uvicorn's 5 s, so a reused connection is never one the upstream is closing."""

    KEEPALIVE_SECONDS = 4.0

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=self.KEEPALIVE_SECONDS),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=None),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def proxy_client(connect_timeout: float = 5.0) -> UpstreamClient:
    """The client a proxy uses (see `UpstreamClient`); share one among the proxies of a server."""
    return UpstreamClient(connect_timeout)


def drop_and_add(drop: Iterable[str] = (), add: Callable[[], Mapping[str, str]] | None = None) -> HeaderHook:
    """A :data:`HeaderHook` that removes the headers named in ``drop`` (case-insensitive) and then
    appends what ``add()`` returns at call time (e.g. a token that may change)."""
    dropped = frozenset(name.lower() for name in drop)

    def hook(headers: Headers, _: Scope) -> Headers:
        kept = [(k, v) for k, v in headers if k not in dropped]
        if add is not None:
            extra = add()
            names = {name.lower() for name in extra}
            kept = [(k, v) for k, v in kept if k not in names] + [(k.lower(), v) for k, v in extra.items()]
        return kept

    return hook


def _without_hop_by_hop(raw: Iterable[tuple[bytes, bytes]] | Iterable[tuple[str, str]]) -> Headers:
    pairs = [
        (k.decode("latin-1").lower(), v.decode("latin-1"))
        if isinstance(k, bytes) and isinstance(v, bytes)
        else (str(k).lower(), str(v))
        for k, v in raw
    ]
    named_in_connection = {
        token.strip().lower()
        for k, v in pairs
        if k == "connection"
        for token in v.split(",")
        if token.strip()
    }
    return [(k, v) for k, v in pairs if k not in HOP_BY_HOP and k not in named_in_connection]


@dataclass
class _Target:
    base: str  # http://127.0.0.1:PORT (no trailing slash)
    path: str  # the path sent upstream (already stripped of a mount prefix when asked)


class _UpstreamResponse(StreamingResponse):
    """Relays an aiohttp streaming response; the upstream connection is released however it ends."""

    def __init__(self, upstream: aiohttp.ClientResponse, headers: Headers) -> None:
        super().__init__(upstream.content.iter_any(), status_code=upstream.status)
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._upstream.content.at_eof():
                self._upstream.release()  # the connection goes back to the pool
            else:
                self._upstream.close()  # the client left mid-stream: this connection is done


class _WholeResponse(Response):
    """A small upstream answer passed on as it came: status, headers (its Content-Length
    included) and body, in two ASGI messages."""

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:  # no Response.__init__ work
        self.status_code = status
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self.body = body
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


async def _bad_gateway(request: Request) -> Response:
    headers = {NOT_FORWARDED_HEADER: "1"} if request.scope.get(NOT_CONNECTED_KEY) else None
    return JSONResponse({"error": "the upstream server did not answer"}, status_code=502, headers=headers)


class ReverseProxy:
    """An ASGI app that forwards every HTTP request and WebSocket it gets to one upstream.

    ``upstream`` returns ``http://127.0.0.1:PORT`` for a request scope, or None when there is none
    (yet): then ``fallback`` answers (default: 502 JSON), as it does when the upstream refuses the
    connection. ``strip_prefix`` removes a mount prefix from the path sent upstream. ``client`` is
    shared across requests; the owner closes it (:meth:`aclose`).
    """

    def __init__(
        self,
        upstream: Callable[[Scope], str | None],
        *,
        headers: HeaderHook | None = None,
        response_headers: HeaderHook | None = None,
        fallback: FallbackResponder = _bad_gateway,
        strip_prefix: str = "",
        client: UpstreamClient | None = None,
        forwarded_proto: str = "http",
    ) -> None:
        self.upstream = upstream
        self.headers = headers
        self.response_headers = response_headers
        self.fallback = fallback
        self.strip_prefix = strip_prefix.rstrip("/")
        self.client = client or proxy_client()
        self.forwarded_proto = forwarded_proto

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            response = await self.forward_http(Request(scope, receive))
            await response(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.forward_websocket(WebSocket(scope, receive, send))
        # lifespan and other scope types: nothing to do (the enclosing app owns its lifespan)

    # ------------------------------------------------------------------------------------ targets

    def _target(self, scope: Scope) -> _Target | None:
        base = self.upstream(scope)
        if base is None:
            return None
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path.decode("latin-1")
        prefix = self.strip_prefix
        if prefix and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix) :] or "/"
        query = scope.get("query_string", b"").decode("latin-1")
        return _Target(base.rstrip("/"), f"{path}?{query}" if query else path)

    def _request_headers(self, scope: Scope, *, websocket: bool) -> Headers:
        headers = [
            (k, v) for k, v in _without_hop_by_hop(scope.get("headers", [])) if k not in _REQUEST_SET_BY_PROXY
        ]
        if websocket:
            headers = [(k, v) for k, v in headers if k not in _WEBSOCKET_HANDSHAKE]
        original_host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        client = scope.get("client")
        forwarded = [("x-forwarded-proto", self.forwarded_proto)]
        if original_host:
            forwarded.append(("x-forwarded-host", original_host))
        if client:
            earlier = next((v for k, v in headers if k == "x-forwarded-for"), "")
            forwarded.append(("x-forwarded-for", f"{earlier}, {client[0]}" if earlier else str(client[0])))
        names = {k for k, _ in forwarded}
        headers = [(k, v) for k, v in headers if k not in names] + forwarded
        return self.headers(headers, scope) if self.headers else headers

    # --------------------------------------------------------------------------------------- HTTP

    async def forward_http(self, request: Request) -> Response:
        """Send `request` upstream as it streams in; the returned response streams the answer."""
        target = self._target(request.scope)
        if target is None:
            return await self.fallback(request)
        headers = self._request_headers(request.scope, websocket=False)
        length, chunked = _declared_length(request.scope)
        content: bytes | AsyncIterator[bytes] | None = None
        if chunked or (length is not None and length > SMALL_BODY_BYTES):
            content = _request_body(request)
        elif length:
            try:
                content = await request.body()
            except ClientDisconnect:
                return Response(status_code=499)
        try:
            upstream = await self.client.session().request(
                request.method,
                target.base + target.path,
                headers=CIMultiDict(headers),
                data=content,
                allow_redirects=False,
            )
        except ClientDisconnect:
            return Response(status_code=499)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            logger.debug("upstream %s unreachable: %s", target.base, type(error).__name__)
            # A fallback may try elsewhere only when nothing reached this upstream.
            request.scope[NOT_CONNECTED_KEY] = isinstance(error, _NOT_CONNECTED_ERRORS)
            return await self.fallback(request)
        if upstream.headers.get(NOT_FORWARDED_HEADER):  # a proxy behind us could not reach its upstream
            upstream.release()
            request.scope[NOT_CONNECTED_KEY] = True
            return await self.fallback(request)
        response_headers = _without_hop_by_hop(upstream.raw_headers)
        if self.response_headers:
            response_headers = self.response_headers(response_headers, request.scope)
        size = upstream.headers.get("content-length", "")
        if size.isdigit() and int(size) <= SMALL_BODY_BYTES:
            try:
                body = await upstream.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                upstream.close()
                request.scope[NOT_CONNECTED_KEY] = False
                return await _bad_gateway(request)  # the request reached it: no other attempt
            upstream.release()
            return _WholeResponse(upstream.status, response_headers, body)
        return _UpstreamResponse(upstream, response_headers)

    # ---------------------------------------------------------------------------------- WebSocket

    async def forward_websocket(self, websocket: WebSocket) -> None:
        """Open the same WebSocket upstream, accept the client's with the upstream's subprotocol, then
        pump messages both ways until one side closes."""
        target = self._target(websocket.scope)
        if target is None:
            await websocket.close(code=1013, reason="upstream not available")
            return
        url = "ws" + target.base.removeprefix("http") + target.path
        offered = [
            p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()
        ]
        try:
            upstream = await websockets.connect(
                url,
                additional_headers=self._request_headers(websocket.scope, websocket=True),
                subprotocols=offered or None,  # type: ignore[arg-type]
                user_agent_header=None,
                proxy=None,
                max_size=None,
                compression=None,
                open_timeout=10,
                ping_interval=None,
            )
        except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError) as error:
            logger.debug("upstream WebSocket %s refused: %s", target.base, type(error).__name__)
            status = getattr(getattr(error, "response", None), "status_code", None)
            await websocket.close(
                code=1011 if status is None else 1008, reason="upstream refused the WebSocket"
            )
            return
        async with upstream:
            await websocket.accept(subprotocol=upstream.subprotocol)
            await _pump(websocket, upstream)


def _declared_length(scope: Scope) -> tuple[int | None, bool]:
    """The request's Content-Length (None when absent or unreadable) and whether it is chunked."""
    length: int | None = None
    chunked = False
    for key, value in scope.get("headers", []):
        name = key.lower()
        if name == b"content-length":
            with contextlib.suppress(ValueError):
                length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


async def _request_body(request: Request) -> AsyncIterator[bytes]:
    async for chunk in request.stream():
        if chunk:
            yield chunk


def _sendable(code: int | None) -> int:
    """A close code that may go on the wire: 1005 (no code) becomes 1000, 1006/1015 (abnormal) 1011."""
    if code is None or code == 1005:
        return 1000
    return 1011 if code in (1006, 1015) else code


async def _client_to_upstream(client: WebSocket, upstream: ClientConnection) -> None:
    """Relay the client's messages; when it disconnects, close the upstream with its code."""
    while True:
        message = await client.receive()
        if message["type"] == "websocket.disconnect":
            await upstream.close(code=_sendable(message.get("code")), reason=message.get("reason") or "")
            return
        if message.get("bytes") is not None:
            await upstream.send(message["bytes"])
        elif message.get("text") is not None:
            await upstream.send(message["text"])


async def _upstream_to_client(client: WebSocket, upstream: ClientConnection) -> None:
    """Relay the upstream's messages; when it closes, close the client with its code."""
    try:
        async for data in upstream:
            if isinstance(data, bytes):
                await client.send_bytes(data)
            else:
                await client.send_text(data)
    except websockets.exceptions.ConnectionClosed:
        pass
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
        await client.close(code=_sendable(upstream.close_code), reason=upstream.close_reason or "")


async def _pump(client: WebSocket, upstream: ClientConnection) -> None:
    """Relay messages both ways; when one side closes, close the other with the same code."""
    tasks = [
        asyncio.ensure_future(_client_to_upstream(client, upstream)),
        asyncio.ensure_future(_upstream_to_client(client, upstream)),
    ]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in done:
            error = task.exception()
            if error is not None and not isinstance(
                error, (WebSocketDisconnect, websockets.exceptions.ConnectionClosed, OSError)
            ):
                logger.debug("WebSocket relay ended: %s", type(error).__name__)
    finally:
        for task in tasks:
            task.cancel()
