"""Application URLs: one loopback listener per application, with CML's two ways in.

Every application gets `http://127.0.0.1:<url_port>` (the `url` field of its API object; the port is
chosen when the app is created and kept for its whole life, across workspace restarts). Plain
`127.0.0.1:<port>` URLs resolve everywhere, so browsers, curl, urllib, requests, httpx, aiohttp and
Ray's job CLI/SDK all use them unchanged. A request gets through to the app's `CDSW_APP_PORT` with

* `Authorization: Bearer <workspace API key>` (programs, exactly as on CML), or
* the application's login cookie (people): `POST /_workspace/applications/<id>/login-code` on the API
  listener (bearer key required) mints a one-time login link `<url>/_workspace/login?code=...`,
  valid for 60 seconds and once; opening it sets an HttpOnly, SameSite=Lax cookie for that
  application only (its name carries the port, its value is signed for the app's id) and redirects to
  `/`. The API listener never looks at cookies.

The credential is stripped before the request reaches the app. Everything else streams through.

Two paths behind each listener. **Programs** (`Authorization: Bearer <key>`, plain HTTP, the app
running) take the fast path: `ray_serve_cai._relay` parses the request head, rewrites its headers
and relays everything else as bytes over pooled connections — about a quarter of the CPU
of an ASGI hop here, which matters as it sits in front of every application (issue 24: the Serve
endpoint's throughput and latency targets are measured through it). **Everything else** (login
links and cookies, refusals, WebSocket upgrades, an app that is not running) takes the connection
over to uvicorn with `AppListener` (the ASGI app), whose proxy is `ray_serve_cai._proxy`. Both add
`X-Request-Id` to every answer and `X-Forwarded-Host/Proto/For` to every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.types import Message, Receive, Scope, Send

from ray_serve_cai._proxy import NOT_FORWARDED_HEADER, ReverseProxy, proxy_client
from ray_serve_cai._relay import (
    ClientConnection,
    ConnectionPool,
    Exchange,
    Headers,
    Relay,
    forwarded_headers,
    is_chunked,
)
from ray_serve_cai.workspace.controls import AppUrlPolicy
from ray_serve_cai.workspace.errors import error_body
from ray_serve_cai.workspace.model import Application

logger = logging.getLogger(__name__)

LOGIN_PATH = "/_workspace/login"
LOGIN_CODE_SECONDS = 60.0
SESSION_SECONDS = 12 * 3600
COOKIE_PREFIX = "ray-cai-app-"
LISTENER_GRACE_SECONDS = 1.0


def cookie_name(url_port: int) -> str:
    """Browsers share cookies among all ports of 127.0.0.1: the port in the name keeps apps apart."""
    return f"{COOKIE_PREFIX}{url_port}"


@dataclass
class _Code:
    app_id: str
    expires_at: float


@dataclass
class AppLogins:
    """One-time login codes and the signed session cookies they turn into (secret derived from the
    workspace API key, so cookies survive a workspace restart and die with a new key)."""

    api_key: str
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    _codes: dict[str, _Code] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._secret = hmac.new(
            self.api_key.encode(), b"ray-cai application login cookie", hashlib.sha256
        ).digest()

    def __repr__(self) -> str:
        return f"AppLogins(pending_codes={len(self._codes)})"

    def mint(self, app_id: str) -> str:
        now = self.clock()
        self._codes = {code: c for code, c in self._codes.items() if c.expires_at > now}
        code = secrets.token_urlsafe(32)
        self._codes[code] = _Code(app_id, now + LOGIN_CODE_SECONDS)
        return code

    def redeem(self, code: str, app_id: str) -> bool:
        """True once for a live code minted for `app_id`; the code is gone afterwards either way."""
        entry = self._codes.pop(code, None)
        return entry is not None and entry.app_id == app_id and entry.expires_at > self.clock()

    def session_value(self, app_id: str) -> str:
        issued = str(int(self.wall_clock()))
        return f"{issued}.{self._sign(app_id, issued)}"

    def session_valid(self, value: str, app_id: str) -> bool:
        issued, _, signature = value.partition(".")
        if not issued.isdigit() or not signature:
            return False
        if not hmac.compare_digest(signature, self._sign(app_id, issued)):
            return False
        return 0 <= self.wall_clock() - int(issued) < SESSION_SECONDS

    def _sign(self, app_id: str, issued: str) -> str:
        return hmac.new(self._secret, f"{app_id}.{issued}".encode(), hashlib.sha256).hexdigest()


def _cookies(scope: Scope) -> list[tuple[str, str]]:
    """(name, value) pairs of the request's Cookie headers; unparsable ones are skipped."""
    pairs: list[tuple[str, str]] = []
    for key, value in scope.get("headers", []):
        if key.lower() != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            name, sep, item = part.strip().partition("=")
            if sep:
                pairs.append((name.strip(), item.strip()))
    return pairs


class AppListener:
    """The ASGI app behind one application's URL: login, auth, then the streaming proxy."""

    def __init__(
        self,
        app_id: str,
        url_port: int,
        lookup: Callable[[str], Application | None],
        logins: AppLogins,
        api_key: str,
        proxy: ReverseProxy | None = None,
        policy: AppUrlPolicy | None = None,
    ) -> None:
        self.policy = policy or AppUrlPolicy()
        self.app_id = app_id
        self.url_port = url_port
        self.lookup = lookup
        self.logins = logins
        self._key = api_key.encode()
        self.cookie = cookie_name(url_port)
        self.proxy = proxy or ReverseProxy(self._upstream, headers=self._forwarded_headers)
        self.fast: FastPath | None = None  # set when its server runs (`_front`)

    def __repr__(self) -> str:
        return f"AppListener(app_id={self.app_id!r}, port={self.url_port})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return
        request_id = uuid.uuid4().hex

        async def send_with_request_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        if scope["type"] == "http" and scope["path"] == LOGIN_PATH:
            await self._login(Request(scope, receive))(scope, receive, send_with_request_id)
            return
        if not self._authorized(scope):
            await self._refusal(scope, receive, send_with_request_id)
            return
        if scope["type"] == "websocket" and not self.policy.websocket_upgrades:
            await send({"type": "websocket.close", "code": 1008})  # a gateway that refuses upgrades: 403
            return
        app = self.lookup(self.app_id)
        if app is None or app.status != "APPLICATION_RUNNING" or app.app_port is None:
            status = "deleted" if app is None else app.status
            name = self.app_id if app is None else app.subdomain
            response = JSONResponse(
                error_body(14, f"application {name!r} is not running (status {status})"), 503
            )
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013})
                return
            await response(scope, receive, send_with_request_id)
            return
        await self.proxy(scope, receive, send_with_request_id)

    # ------------------------------------------------------------------------------- auth

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", []):
            if key.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._key):
                    return True
        return any(
            name == self.cookie and self.logins.session_valid(value, self.app_id)
            for name, value in _cookies(scope)
        )

    def _login(self, request: Request) -> Response:
        code = request.query_params.get("code", "")
        if not code or not self.logins.redeem(code, self.app_id):
            return _refusal_page(
                "This login link is not valid (it works once, within a minute). "
                "Run <code>ray-cai dashboard --local</code> again for a new one."
            )
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            self.cookie,
            self.logins.session_value(self.app_id),
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="lax",
        )
        response.headers["cache-control"] = "no-store"
        response.headers["referrer-policy"] = "no-referrer"
        return response

    async def _refusal(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        accept = next(
            (v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"accept"), ""
        )
        if "text/html" in accept:
            response: Response = _refusal_page(
                "Login required. Run <code>ray-cai dashboard --local</code> and open the link it prints "
                "(programs send <code>Authorization: Bearer &lt;API key&gt;</code>)."
            )
        else:
            response = JSONResponse(
                error_body(16, "authentication required (Authorization: Bearer <API key>, or a login link)"),
                401,
                headers={"www-authenticate": 'Bearer realm="ray-cai local workspace"'},
            )
        await response(scope, receive, send)

    # ------------------------------------------------------------------------------ proxy

    def _upstream(self, _: Scope) -> str | None:
        app = self.lookup(self.app_id)
        if app is None or app.app_port is None:
            return None
        # In a pod the app serves on the pod's loopback; the pod's init forwards its address there.
        return f"http://{app.pod_ip or '127.0.0.1'}:{app.app_port}"

    def _forwarded_headers(self, headers: list[tuple[str, str]], _: Scope) -> list[tuple[str, str]]:
        """The app never sees the credential that let the request in: no Authorization, no login cookie."""
        kept: list[tuple[str, str]] = []
        for key, value in headers:
            if key == "authorization":
                continue
            if key == "cookie":
                others = [
                    p.strip() for p in value.split(";") if p.strip().partition("=")[0].strip() != self.cookie
                ]
                if not others:
                    continue
                value = "; ".join(others)
            kept.append((key, value))
        return kept


def _refusal_page(message: str) -> HTMLResponse:
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Login required</title></head>"
        f"<body><h1>Login required</h1><p>{message}</p></body></html>"
    )
    return HTMLResponse(body, status_code=401, headers={"cache-control": "no-store"})


class FastPath(Relay):
    """The listener's fast path (`ray_serve_cai._relay`): plain HTTP requests with the workspace
    API key as `Authorization: Bearer` to a running application; every other request goes to the
    listener's uvicorn (None from `request`)."""

    def __init__(self, listener: AppListener, pool: ConnectionPool) -> None:
        super().__init__(pool)
        self.listener = listener
        self.login_path = LOGIN_PATH.encode()
        self.cookie_prefix = (listener.cookie + "=").encode()

    def request(
        self, client: ClientConnection, method: bytes, url: bytes, headers: Headers, upgrade: bool
    ) -> Exchange | bytes | None:
        if upgrade or url.split(b"?", 1)[0] == self.login_path or not self._bearer(headers):
            return None
        app = self.listener.lookup(self.listener.app_id)
        if app is None or app.status != "APPLICATION_RUNNING" or app.app_port is None:
            return None
        request_id = uuid.uuid4().hex.encode()
        exchange = Exchange(
            method=method,
            path=url,
            headers=forwarded_headers(self._without_login_cookie(headers), client.peer, drop=_DROP),
            sink=client,
            chunked=is_chunked(headers),
            head_hook=lambda head: _with_request_id(head, request_id),
            node=app.subdomain,
            target=(app.pod_ip or "127.0.0.1", app.app_port),
        )
        return exchange

    async def connect(self, exchange: Exchange) -> None:
        assert exchange.target is not None
        host, port = exchange.target
        try:
            upstream = await self.pool.acquire(exchange.target, fresh=exchange.replayed)
        except (OSError, asyncio.TimeoutError):
            answer_id = uuid.uuid4().hex.encode()
            headers = [(NOT_FORWARDED_HEADER.encode(), b"1"), (b"x-request-id", answer_id)]
            exchange.sink.fail(502, {"error": "the upstream server did not answer"}, headers)
            return
        if getattr(exchange.sink, "closed", False):
            self.pool.release(upstream)
            return
        exchange.attach(upstream, f"{host}:{port}")

    def _bearer(self, headers: Headers) -> bool:
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.listener._key):
                    return True
        return False

    def _without_login_cookie(self, headers: Headers) -> Headers:
        """The app never sees the login cookie (other cookies pass)."""
        if not any(name == b"cookie" for name, _ in headers):
            return headers
        kept: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name == b"cookie":
                parts = [part.strip() for part in value.split(b";")]
                others = [part for part in parts if part and not part.startswith(self.cookie_prefix)]
                if not others:
                    continue
                value = b"; ".join(others)
            kept.append((name, value))
        return kept


_DROP = frozenset({b"authorization"})


def _with_request_id(head: bytes, request_id: bytes) -> bytes:
    """A response head with the listener's `X-Request-Id` (the app's own, if any, replaced)."""
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0], *(line for line in lines[1:] if not line.lower().startswith(b"x-request-id:"))]
    return b"\r\n".join([*kept, b"x-request-id: " + request_id]) + b"\r\n\r\n"


def _front(listener: AppListener, pool: ConnectionPool) -> Callable[..., asyncio.Protocol]:
    """uvicorn's protocol factory for a listener: the fast path first, uvicorn's own HTTP protocol
    (with the ASGI `AppListener`) for the requests the fast path leaves (`ClientConnection.fallback`)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    relay = FastPath(listener, pool)
    listener.fast = relay

    def protocol(**kwargs: Any) -> asyncio.Protocol:
        return ClientConnection(relay, fallback=lambda: AutoHTTPProtocol(**kwargs))

    return protocol


class _ListenerServer(uvicorn.Server):
    """A uvicorn server started on an already bound socket inside the running event loop (no
    signal handlers of its own: the workspace's main server owns them)."""

    async def open(self, sock: socket.socket) -> None:
        if not self.config.loaded:
            self.config.load()
        self.lifespan = self.config.lifespan_class(self.config)
        await self.startup(sockets=[sock])

    async def close(self) -> None:
        if self.started:
            await self.shutdown()


@dataclass
class _Open:
    listener: AppListener
    server: _ListenerServer
    sock: socket.socket


def bind_loopback(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class AppListeners:
    """The open listeners, one per application. `sync(apps)` opens what is missing (new or
    re-adopted apps, on their recorded port) and closes what belongs to deleted apps."""

    def __init__(
        self,
        logins: AppLogins,
        api_key: str,
        lookup: Callable[[str], Application | None],
        policy: AppUrlPolicy | None = None,
    ) -> None:
        self.policy = policy or AppUrlPolicy()  # shared by every listener (a `/_workspace` control)
        self.logins = logins
        self._key = api_key
        self.lookup = lookup
        self._open: dict[str, _Open] = {}
        self._lock = asyncio.Lock()
        self._client = proxy_client()
        self._pool = ConnectionPool()  # the fast path's connections to the apps
        # Told the open URL ports after every change (pods relay them on their own loopback).
        self.on_ports: Callable[[set[int]], Awaitable[None]] | None = None

    def __repr__(self) -> str:
        return f"AppListeners(open={len(self._open)})"

    def ports(self) -> dict[str, int]:
        return {app_id: entry.listener.url_port for app_id, entry in self._open.items()}

    async def sync(self, apps: Iterable[Application]) -> None:
        wanted = {app.id: app for app in apps}
        async with self._lock:
            closing = [self._open.pop(app_id) for app_id in [a for a in self._open if a not in wanted]]
            for app in wanted.values():
                if app.id not in self._open:
                    await self._start(app)
            if self.on_ports is not None:
                await self.on_ports(set(self.ports().values()))
        # Closed outside the lock and together: each close waits out uvicorn's shutdown pause, and
        # 64 parallel deletes must not queue behind each other's pauses.
        await asyncio.gather(*(self._close_entry(entry) for entry in closing), return_exceptions=True)

    async def close_all(self) -> None:
        async with self._lock:
            await asyncio.gather(
                *(self._close(app_id) for app_id in list(self._open)), return_exceptions=True
            )
        await self._client.aclose()
        self._pool.close()

    async def _start(self, app: Application) -> None:
        try:
            sock = bind_loopback(app.url_port)
        except OSError as error:
            # The recorded port is taken (e.g. by another program since a workspace restart): the
            # app keeps working on a new port; its URL changes and the API shows the new one.
            sock = bind_loopback(0)
            logger.warning(
                "application %s: port %d is not free (%s); its URL moves to port %d",
                app.id,
                app.url_port,
                error.strerror,
                sock.getsockname()[1],
            )
            app.url_port = int(sock.getsockname()[1])
        listener = AppListener(app.id, app.url_port, self.lookup, self.logins, self._key, policy=self.policy)
        listener.proxy.client = self._client
        config = uvicorn.Config(
            listener,
            http=_front(listener, self._pool),  # type: ignore[arg-type]
            log_level="warning",
            log_config=None,  # the workspace configured logging once; do not reconfigure per app
            access_log=False,
            lifespan="off",
            ws="websockets-sansio",
            timeout_graceful_shutdown=LISTENER_GRACE_SECONDS,
        )
        server = _ListenerServer(config)
        await server.open(sock)
        self._open[app.id] = _Open(listener, server, sock)

    async def _close(self, app_id: str) -> None:
        await self._close_entry(self._open.pop(app_id))

    @staticmethod
    async def _close_entry(entry: _Open) -> None:
        try:
            await entry.server.close()
        finally:
            entry.sock.close()
            if entry.listener.fast is not None:
                entry.listener.fast.close_clients()


def login_code_answer(app: Application, logins: AppLogins) -> dict[str, object]:
    """The control endpoint's answer: the one-time login link (a secret: never logged)."""
    code = logins.mint(app.id)
    return {
        "login_url": f"http://127.0.0.1:{app.url_port}{LOGIN_PATH}?code={code}",
        "expires_in_seconds": LOGIN_CODE_SECONDS,
    }


__all__ = [
    "LOGIN_PATH",
    "AppListener",
    "AppListeners",
    "AppLogins",
    "cookie_name",
    "login_code_answer",
]
