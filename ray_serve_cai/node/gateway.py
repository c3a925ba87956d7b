"""The cluster's Serve gateway: one stable Serve endpoint that does not go dark with the head.

A small CML application without Ray (`ray-<cluster>-serve`, script `cai_integration/serve_gateway.py`),
created by Serve's pass when Serve runs a proxy on every node (pods). Its URL, `<gateway URL>/serve/`,
is what `ray-cai serve status` prints; it sits behind CML's login like every application URL.

Why an application of its own, and not the head's URL or the workers' own URLs: the head's URL goes
dark with the head (a head restart took Serve down for 19 to 314 s); the workers' URLs are many, change
as groups scale and each goes dark with its worker, so a client would have to know them all and fail
over itself. A gateway holds no state and needs no Ray, so it starts in a second or two, CML restarts
it like any application, and it keeps answering whatever node restarts — as KubeRay puts a Service in
front of the workers' Serve proxies, here with what CML offers (pods, one URL per application).

How it routes:

* the nodes announce their Serve ingress in the project (`.ray-cai/<cluster>/serve-ingress/<node>.json`:
  pod IP and port, `node.serve_proxy`); the gateway talks to each through tunnels it opens with the
  cluster token and keeps for request after request (`node.serve_tunnel`: the ingress checks the token
  once per connection, then relays bytes to the node's Serve proxy); every `HEALTH_INTERVAL_SECONDS`
  it reads the announcements and asks each node's Serve proxy for its health (`/-/healthz`: 200 only
  while the proxy runs and is not draining);
* each request goes to the next healthy worker (round robin); to the head only when no worker is
  healthy (replicas stay off the head when there are workers, so the head's restart is no event for
  Serve's traffic); a node whose tunnel does not open (its ingress refuses the connection, or its
  Serve proxy refused the ingress's) is marked down at once and the request goes to the next one
  (it reached no Serve proxy, so this is safe for every method);
* the gateway is its own HTTP/1.1 relay (`ray_serve_cai._relay`, `GatewayRelay`): each request head
  is parsed and rewritten — `/serve` stripped (Serve's `root_path` puts it back for the application),
  CML's `Authorization` dropped, `X-Forwarded-*` added — and everything else (bodies both ways,
  streams, WebSockets after Serve's 101) passes as bytes; the cluster token is in no request (only
  in each tunnel's CONNECT). An ASGI server in front of an HTTP client cost three times the CPU per
  request (benchmarks/README.md, issue 24).

`/ray-cai/healthz` answers 200 (CML's polling endpoint), `/ray-cai/gateway` the routing table.

The head's autostop sees only requests through the head's own `/serve`, so the gateway notes what it
relays (`TrafficNote`) in the project, where the head reads it: per application path, when the last
request came and how many are open now (answers not finished, WebSockets not closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_serve_cai._relay import (
    ClientConnection,
    ConnectionPool,
    Exchange,
    Headers,
    Relay,
    forwarded_headers,
    get_status,
    is_chunked,
    json_answer,
)
from ray_serve_cai.atomic import write_json_atomically
from ray_serve_cai.config.serve import SERVE_ROOT_PATH
from ray_serve_cai.node.files import token_path
from ray_serve_cai.node.serve_proxy import gateway_traffic_path, ingress_dir
from ray_serve_cai.node.serve_tunnel import TOKEN_HEADER, new_event_loop, tunnel_opener

logger = logging.getLogger("ray_serve_cai.node.gateway")

HEALTH_INTERVAL_SECONDS = 1.0
HEALTH_TIMEOUT_SECONDS = 2.0
HEALTH_PATH = "/-/healthz"  # Serve's proxy health (its own path, outside root_path), through the tunnel
TRAFFIC_HEARTBEAT_SECONDS = 10.0  # the note is rewritten at least this often while a request is open


@dataclass
class Backend:
    """One node's Serve ingress as announced, and what the last check found."""

    node: str
    role: str
    ip: str
    port: int
    healthy: bool = False
    detail: str = "not checked yet"

    @property
    def base(self) -> str:
        return f"http://{self.ip}:{self.port}"


@dataclass
class Routes:
    """The gateway's routing table: announced nodes, their health, the round robin."""

    project_dir: Path
    cluster: str
    backends: dict[str, Backend] = field(default_factory=dict)
    token: str | None = None
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    def choose(self, avoid: set[str] = frozenset()) -> Backend | None:  # type: ignore[assignment]
        """The next healthy worker, else the head, else None (none in `avoid`)."""
        healthy = [b for b in self.backends.values() if b.healthy and b.node not in avoid]
        pool = [b for b in healthy if b.role != "head"] or healthy
        if not pool:
            return None
        return pool[next(self._turn) % len(pool)]

    def mark_down(self, node: str, why: str) -> None:
        backend = self.backends.get(node)
        if backend is not None and backend.healthy:
            backend.healthy, backend.detail = False, why
            logger.warning("node %s taken out of rotation: %s", node, why)

    def read_announcements(self) -> None:
        """The nodes' ingress files (a node gone without withdrawing its file fails its checks)."""
        found: dict[str, Backend] = {}
        for path in sorted(ingress_dir(self.project_dir, self.cluster).glob("*.json")):
            try:
                record = json.loads(path.read_text())
                node, ip, port = str(record["node"]), str(record["ip"]), int(record["port"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            known = self.backends.get(node)
            found[node] = known if known is not None and (known.ip, known.port) == (ip, port) else Backend(
                node, str(record.get("role", "worker")), ip, port
            )  # fmt: skip
        self.backends = found
        if self.token is None:
            with contextlib.suppress(OSError):
                self.token = token_path(self.project_dir, self.cluster).read_text().strip() or None

    async def check(self, pool: ConnectionPool) -> None:
        """One round: every announced node's Serve proxy health, in parallel (through the tunnels)."""
        self.read_announcements()
        pool.prune()

        async def one(backend: Backend) -> None:
            try:
                probe = get_status(pool, backend.ip, backend.port, HEALTH_PATH)
                status = await asyncio.wait_for(probe, HEALTH_TIMEOUT_SECONDS)
                healthy, detail = status == 200, f"HTTP {status}"
            except (OSError, asyncio.TimeoutError) as error:
                healthy, detail = False, type(error).__name__
            if healthy != backend.healthy:
                logger.info("node %s: %s", backend.node, "healthy" if healthy else f"unhealthy ({detail})")
            backend.healthy, backend.detail = healthy, detail

        await asyncio.gather(*(one(b) for b in list(self.backends.values())))

    def table(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "nodes": {
                b.node: {"role": b.role, "ingress": b.base, "healthy": b.healthy, "detail": b.detail}
                for b in self.backends.values()
            },
        }


def application_path(path: bytes) -> str:
    """The first segment of a request's path under the mount (`/iris/predict?x=1` → `/iris`): how the
    head's autostop tells Serve applications apart (by route prefix)."""
    first = path.split(b"?", 1)[0].lstrip(b"/").split(b"/", 1)[0]
    return "/" + first.decode("latin-1")


class TrafficNote:
    """The Serve requests the gateway relays, for the head's autostop: per application path, when the
    last request came (wall clock: another pod reads it) and how many are open now. The health loop
    asks once a second for the note that is `due()` — when it changed, and every
    `TRAFFIC_HEARTBEAT_SECONDS` while a request is open, so that a reader can tell an open request
    from a gateway that died with one (`at`: when it was written) — and writes it off the relay's
    event loop (an fsync on the project filesystem, NFS on CML), then marks it `written()`."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = path, clock
        self.last_request: dict[str, float] = {}
        self.connections: weakref.WeakKeyDictionary[ClientConnection, str] = weakref.WeakKeyDictionary()
        self._written: tuple[dict[str, float], dict[str, int]] | None = None
        self._written_at = 0.0

    def seen(self, client: ClientConnection, key: str) -> None:
        self.last_request[key] = self.clock()
        self.connections[client] = key

    def open_now(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for client, key in list(self.connections.items()):
            if not client.closed and (client.exchange is not None or client.spliced_to is not None):
                counts[key] = counts.get(key, 0) + 1
        return counts

    def due(self) -> dict[str, Any] | None:
        """The note to write now, else None (on the relay's loop: it reads the connections)."""
        state = (dict(self.last_request), self.open_now())
        now = self.clock()
        heartbeat = any(state[1].values()) and now - self._written_at >= TRAFFIC_HEARTBEAT_SECONDS
        if state == self._written and not heartbeat:
            return None
        return {"at": now, "last_request": state[0], "open": state[1]}

    def written(self, note: dict[str, Any]) -> None:
        self._written, self._written_at = (note["last_request"], note["open"]), note["at"]


class GatewayRelay(Relay):
    """Requests under `/serve` go to a healthy node (the next one when a node's tunnel does not open:
    nothing reached it), `/serve` stripped; everything else is one of the gateway's pages."""

    MOUNT = SERVE_ROOT_PATH.encode()
    DROP = frozenset({b"authorization", TOKEN_HEADER.encode()})  # CML's credential, a forged token

    def __init__(self, routes: Routes, pool: ConnectionPool, traffic: TrafficNote | None = None) -> None:
        super().__init__(pool)
        self.routes, self.traffic = routes, traffic

    def request(
        self, client: ClientConnection, method: bytes, url: bytes, headers: Headers, upgrade: bool
    ) -> Exchange | bytes | None:
        path = url.split(b"?", 1)[0]
        if path != self.MOUNT and not path.startswith(self.MOUNT + b"/"):
            status, body = self.page(path.decode("latin-1"))
            return json_answer(status, body)
        rest = url[len(self.MOUNT) :]  # "" → "/", "?q=1" → "/?q=1"
        path = rest if rest.startswith(b"/") else b"/" + rest
        if self.traffic is not None:
            self.traffic.seen(client, application_path(path))
        return Exchange(
            method=method,
            path=path,
            headers=forwarded_headers(headers, client.peer, drop=self.DROP, upgrade=upgrade),
            sink=client,
            upgrade=upgrade,
            chunked=is_chunked(headers),
        )

    def page(self, path: str) -> tuple[int, Any]:
        if path == "/ray-cai/healthz":
            return 200, {"ok": True}
        if path == "/ray-cai/gateway":
            return 200, self.routes.table()
        if path == "/":
            return 200, {"serve": SERVE_ROOT_PATH + "/", **self.routes.table()}
        return 404, {"error": "not found", "serve": SERVE_ROOT_PATH + "/"}

    async def connect(self, exchange: Exchange) -> None:
        """The next healthy node whose tunnel opens gets the request; 503 when none is left."""
        while True:
            backend = self.routes.choose(exchange.tried)
            if backend is None:
                table = self.routes.table()
                exchange.sink.fail(503, {"error": "no Serve proxy of the cluster answers (yet)", **table})
                return
            exchange.tried.add(backend.node)
            exchange.node = f"node {backend.node}"
            try:
                upstream = await self.pool.acquire((backend.ip, backend.port), fresh=exchange.replayed)
            except (OSError, asyncio.TimeoutError):
                self.routes.mark_down(backend.node, "refused a connection")
                continue
            if getattr(exchange.sink, "closed", False):
                self.pool.release(upstream)  # the client left while the tunnel opened: unused
                return
            exchange.attach(upstream, f"{backend.ip}:{backend.port}")
            return


class Gateway:
    """The gateway's server on `host:port` over `routes`: the relay (`GatewayRelay` on `_relay`) and the
    health loop, on one event loop. `run()` in the calling thread until SIGTERM/SIGINT; `start()` /
    `stop()` in a daemon thread (tests)."""

    def __init__(self, routes: Routes, host: str = "127.0.0.1", port: int = 0) -> None:
        self.routes, self.host, self.requested_port = routes, host, port
        self.port: int | None = None
        self.pool = ConnectionPool(tunnel_opener(lambda: routes.token))
        self.traffic = TrafficNote(gateway_traffic_path(routes.project_dir, routes.cluster))
        self.relay = GatewayRelay(routes, self.pool, self.traffic)
        self._loop = new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    async def _health_loop(self) -> None:
        while True:
            started = time.monotonic()
            with contextlib.suppress(Exception):
                await self.routes.check(self.pool)
            note = self.traffic.due()
            if note is not None:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(write_json_atomically, self.traffic.path, note)
                    self.traffic.written(note)
            await asyncio.sleep(max(0.1, HEALTH_INTERVAL_SECONDS - (time.monotonic() - started)))

    async def serve(self) -> None:
        """Listen, check the nodes once, then serve until `stop()` (or a signal in `run()`)."""
        self._stopped = asyncio.Event()
        server = await asyncio.get_running_loop().create_server(
            lambda: ClientConnection(self.relay), self.host, self.requested_port, reuse_address=True
        )
        self.port = int(server.sockets[0].getsockname()[1])
        await self.routes.check(self.pool)
        health = asyncio.create_task(self._health_loop())
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            health.cancel()
            server.close()
            self.relay.close()
            with contextlib.suppress(asyncio.CancelledError):
                await health

    def run(self) -> None:
        """Serve in this thread until SIGTERM or SIGINT."""
        loop = self._loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop_soon)
            await self.serve()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def stop_soon(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    def start(self, wait_seconds: float = 20.0) -> Gateway:
        """Serve in a daemon thread; returns once listening (`port`)."""
        self._thread = threading.Thread(
            target=lambda: self._loop.run_until_complete(self.serve()), name="serve-gateway", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(wait_seconds):
            raise RuntimeError(f"the gateway did not listen within {wait_seconds:.0f}s")
        return self

    def stop(self, wait_seconds: float = 5.0) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.stop_soon)
        if self._thread is not None:
            self._thread.join(timeout=wait_seconds)


def main() -> int:
    """`python -m ray_serve_cai.node.gateway`: serve on 127.0.0.1:$CDSW_APP_PORT until stopped."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s ray-cai gateway %(levelname)s %(message)s"
    )
    cluster = os.environ.get("RAY_CAI_CLUSTER", "").strip()
    port = os.environ.get("CDSW_APP_PORT", "").strip()
    if not cluster or not port.isdigit():
        print("ray-cai gateway: RAY_CAI_CLUSTER and CDSW_APP_PORT must be set", file=sys.stderr)
        return 2
    project = Path(os.environ.get("RAY_CAI_PROJECT_DIR", "").strip() or os.getcwd())
    routes = Routes(project, cluster)
    logger.info("Serve gateway of cluster %s on 127.0.0.1:%s (nodes from %s)", cluster, port,
                ingress_dir(project, cluster))  # fmt: skip
    Gateway(routes, "127.0.0.1", int(port)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
