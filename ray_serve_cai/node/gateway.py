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
* requests stream both ways and WebSockets pass (`ray_serve_cai._proxy`, the code the nodes use),
  `/serve` stripped (Serve's `root_path` puts it back for the application); CML's `Authorization`
  never goes on, and the cluster token is in no request (only in each tunnel's CONNECT).
* `/serve/...` goes straight to the proxy (no router, no middleware on the hot path).

`/ray-cai/healthz` answers 200 (CML's polling endpoint), `/ray-cai/gateway` the routing table.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ray_serve_cai._proxy import NOT_CONNECTED_KEY, ReverseProxy, UpstreamClient, drop_and_add, proxy_client
from ray_serve_cai.config.serve import SERVE_ROOT_PATH
from ray_serve_cai.node.files import token_path
from ray_serve_cai.node.serve_proxy import ingress_dir
from ray_serve_cai.node.serve_tunnel import TOKEN_HEADER, tunnel_opener

logger = logging.getLogger("ray_serve_cai.node.gateway")

HEALTH_INTERVAL_SECONDS = 1.0
HEALTH_TIMEOUT_SECONDS = 2.0
HEALTH_PATH = "/-/healthz"  # Serve's proxy health (its own path, outside root_path), through the tunnel
ATTEMPTS_KEY = "ray_cai.gateway_attempts"
NODE_KEY = "ray_cai.gateway_node"


@dataclass
class Backend:
    """One node's Serve ingress as announced, and what the last check found."""

    node: str
    role: str
    base: str  # http://<pod IP>:<port>
    healthy: bool = False
    detail: str = "not checked yet"


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
                node, base = str(record["node"]), f"http://{record['ip']}:{int(record['port'])}"
            except (OSError, ValueError, KeyError, TypeError):
                continue
            known = self.backends.get(node)
            found[node] = known if known is not None and known.base == base else Backend(
                node, str(record.get("role", "worker")), base
            )  # fmt: skip
        self.backends = found
        if self.token is None:
            with contextlib.suppress(OSError):
                self.token = token_path(self.project_dir, self.cluster).read_text().strip() or None

    async def check(self, client: UpstreamClient) -> None:
        """One round: every announced node's Serve proxy health, in parallel (through the tunnels)."""
        self.read_announcements()
        timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_SECONDS)

        async def one(backend: Backend) -> None:
            try:
                async with client.session().get(backend.base + HEALTH_PATH, timeout=timeout) as response:
                    await response.read()
                    healthy, detail = response.status == 200, f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
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


def _pages(routes: Routes, client: UpstreamClient) -> Starlette:
    """The gateway's own pages (CML's polling endpoint, the routing table) and its lifespan: the health
    loop, and the proxy's client closed at the end."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"ok": True})

    async def table(_: Request) -> Response:
        return JSONResponse(routes.table())

    async def home(_: Request) -> Response:
        return JSONResponse({"serve": SERVE_ROOT_PATH + "/", **routes.table()})

    async def health_loop() -> None:
        while True:
            started = time.monotonic()
            with contextlib.suppress(Exception):
                await routes.check(client)
            await asyncio.sleep(max(0.1, HEALTH_INTERVAL_SECONDS - (time.monotonic() - started)))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await routes.check(client)
        task = asyncio.create_task(health_loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()

    return Starlette(
        routes=[Route("/ray-cai/healthz", healthz), Route("/ray-cai/gateway", table), Route("/", home)],
        lifespan=lifespan,
    )


def create_gateway(routes: Routes) -> ASGIApp:
    """The gateway's ASGI app over `routes` (its health loop runs in the app's lifespan)."""
    client = proxy_client(open_socket=tunnel_opener(lambda: routes.token))

    def upstream(scope: Scope) -> str | None:
        tried = scope.setdefault(ATTEMPTS_KEY, set())
        backend = routes.choose(avoid=tried)
        if backend is None:
            return None
        tried.add(backend.node)
        scope[NODE_KEY] = backend.node
        return backend.base

    async def next_node(request: Request) -> Response:
        """The chosen node refused the connection (nothing was sent): the next one; 502 when the
        request may have reached it; 503 when no node is left."""
        node = request.scope.get(NODE_KEY)
        if node is not None:
            if not request.scope.get(NOT_CONNECTED_KEY):
                return JSONResponse({"error": f"node {node} did not answer the request"}, 502)
            routes.mark_down(str(node), "refused a connection")
            request.scope[NODE_KEY] = None
            return await proxy.forward_http(request)
        return JSONResponse({"error": "no Serve proxy of the cluster answers (yet)", **routes.table()}, 503)

    proxy = ReverseProxy(
        upstream,
        headers=drop_and_add(("authorization", TOKEN_HEADER)),
        fallback=next_node,
        strip_prefix=SERVE_ROOT_PATH,
        client=client,
    )

    pages = _pages(routes, client)
    mount = SERVE_ROOT_PATH + "/"

    async def gateway(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "lifespan" and (path.startswith(mount) or path == SERVE_ROOT_PATH):
            await proxy(scope, receive, send)
        else:
            await pages(scope, receive, send)

    return gateway


def main() -> int:
    """`python -m ray_serve_cai.node.gateway`: serve on 127.0.0.1:$CDSW_APP_PORT until stopped."""
    import uvicorn

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
    uvicorn.run(
        create_gateway(routes),
        host="127.0.0.1",
        port=int(port),
        log_level="warning",
        access_log=False,
        lifespan="on",
        ws="websockets-sansio",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
