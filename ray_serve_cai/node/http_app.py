"""HTTP on 127.0.0.1:$CDSW_APP_PORT: health on every node; on the head, cluster status and a
streaming proxy (HTTP and WebSocket, `ray_serve_cai._proxy`) to the Ray dashboard that adds the
token header (CML's login already guards the app URL), plus other local servers mounted under a
path prefix (`PathUpstream`, e.g. Serve under `/serve`).

`/ray-cai/health` (every node): what the node is doing, whether Ray runs, the last error from its
Ray log. `/ray-cai/healthz` (the app's polling endpoint, `CDSW_APP_POLLING_ENDPOINT`): 200 while
Ray runs or has been down for less than the start grace period, else 503 — so CML sees a node whose
Ray never starts as failing. `/ray-cai/status` (head): Ray's own view of the cluster, read from the
GCS in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Scope

from ray_serve_cai._proxy import ReverseProxy, UpstreamClient, drop_and_add, proxy_client
from ray_serve_cai.config.node_status import HEALTH_PATH, HEALTHZ_PATH, STATUS_PATH, HeadStatus, NodeHealth

logger = logging.getLogger(__name__)

# Credentials never forwarded to Ray or Serve: CML's `Authorization` (the user's API key) and any
# client-sent `X-Ray-Authorization` (only the node's own token goes upstream). Hop-by-hop headers are
# dropped by the proxy itself.
CREDENTIAL_HEADERS = frozenset({"authorization", "x-ray-authorization"})
RAY_TOKEN_HEADER = "X-Ray-Authorization"
NODE_NAME_LABEL = "ray-cai.node-name"


@dataclass
class NodeStatus:
    """Live facts the HTTP endpoints report; the launcher updates them as the node changes."""

    role: str
    node_name: str
    cluster: str
    group: str
    ray_version: str
    python_version: str
    head_id: str | None = None
    dashboard_port: int | None = None
    ray_running: Callable[[], bool] = lambda: False
    dashboard_token: Callable[[], str | None] = lambda: None
    autoscaler: Callable[[], dict[str, Any] | None] = lambda: None  # the autoscaler's last decision
    # autostop (#22): the head's idle view, and a wrapper of the path mounts (counts Serve requests)
    autostop: Callable[[], dict[str, Any] | None] = lambda: None
    # Head fault tolerance: enabled, storage, epoch, the last failover (ray_serve_cai.node.head_guard)
    fault_tolerance: Callable[[], dict[str, Any] | None] = lambda: None
    mount_wrapper: Callable[[str, Any], Any] = lambda _prefix, app: app
    # Head only, once published: gcs_address, client_address, auth_mode, token_path (a path, never the token).
    connect: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Seconds Ray may be down (starting, restarting) before /ray-cai/healthz reports the node failing.
    start_grace: float = 120.0
    phase: str = "starting"
    start_attempts: int = 0
    last_error: str | None = None
    # monotonic time since which Ray has not been running; None while it runs
    ray_down_since: float | None = field(default_factory=time.monotonic)
    # Head: where the GCS is (node rows for /ray-cai/status come from it, in process)
    gcs_address: str | None = None
    list_nodes: Callable[[str], list[dict[str, Any]]] | None = None

    def note_running(self) -> None:
        self.phase, self.ray_down_since = "running", None

    def note_failure(self, error: str) -> None:
        self.phase, self.last_error = "restarting", error
        if self.ray_down_since is None:
            self.ray_down_since = time.monotonic()

    def note_stopped(self) -> None:
        if self.ray_down_since is None:
            self.ray_down_since = time.monotonic()
        if self.phase == "running":
            self.phase = "restarting"

    def ray_down_for(self) -> float:
        return 0.0 if self.ray_down_since is None else time.monotonic() - self.ray_down_since

    def healthy(self) -> bool:
        """Ray runs, or is down for less than `start_grace`, or the node waits for its head (a
        worker's wait is bounded by its join timeout, and a missing head is the head's failure)."""
        if self.ray_running():
            return True
        return self.phase == "waiting for the head" or self.ray_down_for() <= self.start_grace

    def health(self) -> dict[str, Any]:
        running = self.ray_running()
        return {
            "role": self.role,
            "node_name": self.node_name,
            "cluster": self.cluster,
            "group": self.group,
            "ray_running": running,
            # `ray start` said the node runs (the launcher learns it a moment later)
            "phase": "running" if running else (self.phase if self.phase != "running" else "restarting"),
            "healthy": self.healthy(),
            "ray_down_for_s": round(self.ray_down_for(), 1),
            "start_grace_s": self.start_grace,
            "start_attempts": self.start_attempts,
            "last_error": self.last_error,
            "head_id": self.head_id,
            "ray_version": self.ray_version,
            "python_version": self.python_version,
        }


def summarize_nodes(raw_nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn the dashboard's `/api/v0/nodes` rows into the status shape (totals of alive nodes)."""
    nodes = []
    totals: dict[str, float] = {}
    for row in raw_nodes:
        alive = row.get("state") == "ALIVE"
        resources = {key: value for key, value in (row.get("resources_total") or {}).items()}
        labels = row.get("labels") or {}
        nodes.append(
            {
                "node_id": row.get("node_id"),
                "node_name": labels.get(NODE_NAME_LABEL) or row.get("node_name"),
                "ip": row.get("node_ip"),
                "alive": alive,
                # When this Ray node started (wall clock): a previous incarnation's raylet of the same
                # name is older than its application's start (`cluster.status.alive_in_ray`).
                "started_at": (row.get("start_time_ms") or 0) / 1000 or None,
                "is_head": bool(row.get("is_head_node")),
                "resources": resources,
            }
        )
        if alive:
            for key, value in resources.items():
                if not key.startswith("node:"):
                    totals[key] = totals.get(key, 0.0) + float(value)
    return {"alive_nodes": sum(1 for node in nodes if node["alive"]), "nodes": nodes, "resources": totals}


@dataclass(frozen=True)
class PathUpstream:
    """Another local server mounted under a path prefix of the head's HTTP server (e.g. Serve's HTTP
    proxy under `/serve`). `port()` is asked per request (None: not up yet → 503). With
    `strip_prefix` the upstream sees paths without the prefix; without it (Serve with
    `root_path: /serve`) it sees them as the client sent them. `unavailable`: the 503's message when
    the upstream does not answer (default: "<name> is not reachable yet")."""

    prefix: str
    port: Callable[[], int | None]
    strip_prefix: bool = False
    name: str = "upstream"
    unavailable: str | None = None


def create_app(status: NodeStatus, upstreams: Sequence[PathUpstream] = ()) -> Starlette:
    """The app HTTP server of one node; on the head, `upstreams` are mounted before the dashboard."""
    forwarder = proxy_client()

    async def health(_: Request) -> JSONResponse:
        return JSONResponse(NodeHealth(**status.health()).model_dump(mode="json"))

    async def healthz(_: Request) -> JSONResponse:
        body = NodeHealth(**status.health())
        return JSONResponse(body.model_dump(mode="json"), 200 if body.healthy else 503)

    async def cluster_status(_: Request) -> JSONResponse:
        return await _head_status(status)

    dashboard = _dashboard_proxy(status, forwarder)

    async def worker_page(request: Request) -> Response:
        if request.url.path == "/":
            return HTMLResponse(f"<h1>Ray worker {status.node_name}</h1><p>see /ray-cai/health</p>")
        return JSONResponse({"error": "not found"}, 404)

    routes = [
        Route(HEALTH_PATH, health, methods=["GET"]),
        Route(HEALTHZ_PATH, healthz, methods=["GET"]),
        Route(STATUS_PATH, cluster_status, methods=["GET"]),
    ]
    for u in upstreams:  # the head's, and a worker's own Serve proxy in a pod
        prefix = u.prefix.rstrip("/")
        routes.append(Mount(prefix, app=status.mount_wrapper(prefix, _mounted(u, forwarder))))
    if status.role == "head":
        routes.append(Mount("", app=dashboard))
    else:
        routes = [route for route in routes if getattr(route, "path", None) != STATUS_PATH]
        routes.append(Route("/{path:path}", worker_page))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):  # type: ignore[no-untyped-def]
        yield
        await forwarder.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def _dashboard_proxy(status: NodeStatus, client: UpstreamClient) -> ReverseProxy:
    """The Ray dashboard behind the node's port, with the Ray token added (CML's login is the door)."""

    def dashboard_headers() -> dict[str, str]:
        token = status.dashboard_token()
        return {RAY_TOKEN_HEADER: f"Bearer {token}"} if token else {}

    def dashboard_base(_: Scope) -> str | None:
        if status.dashboard_port is None:
            return None
        return f"http://127.0.0.1:{status.dashboard_port}"

    async def dashboard_unreachable(request: Request) -> Response:
        return _starting_page(status, request.url.path)

    return ReverseProxy(
        dashboard_base,
        headers=drop_and_add(CREDENTIAL_HEADERS, dashboard_headers),
        fallback=dashboard_unreachable,
        client=client,
    )


async def _head_status(status: NodeStatus) -> JSONResponse:
    """The head's status endpoint: Ray's view (alive nodes, resources, head_id), 503 while Ray is down."""
    body: dict[str, Any] = {
        "head_id": status.head_id,
        "ray_version": status.ray_version,
        "python_version": status.python_version,
        "ray_running": status.ray_running(),
        **status.connect,
    }
    if (decision := status.autoscaler()) is not None:
        body["autoscaler"] = decision
    if (idle_view := status.autostop()) is not None:  # autostop (#22)
        body["autostop"] = idle_view
    if (fault_tolerance := status.fault_tolerance()) is not None:
        body["head_fault_tolerance"] = fault_tolerance
    address, list_nodes = status.gcs_address, status.list_nodes
    if address is None or list_nodes is None or not status.ray_running():
        error = "ray is not running" + (f"; last error: {status.last_error}" if status.last_error else "")
        return JSONResponse(HeadStatus(**body, error=error).body(), 503)
    try:
        rows = await asyncio.to_thread(list_nodes, address)
    except Exception as error:  # the GCS is going away or overloaded: say so, the caller polls
        failed = HeadStatus(**body, error=f"GCS not answering: {type(error).__name__}")
        return JSONResponse(failed.body(), 503)
    return JSONResponse(HeadStatus(**body, **summarize_nodes(rows)).body())


def _mounted(upstream: PathUpstream, client: UpstreamClient) -> ReverseProxy:
    def base(_: Scope) -> str | None:
        port = upstream.port()
        return None if port is None else f"http://127.0.0.1:{port}"

    async def not_up(_: Request) -> Response:
        return JSONResponse({"error": upstream.unavailable or f"{upstream.name} is not reachable yet"}, 503)

    return ReverseProxy(
        base,
        headers=drop_and_add(CREDENTIAL_HEADERS),
        fallback=not_up,
        # Starlette's Mount already moved the prefix into root_path; the raw path still has it.
        strip_prefix=upstream.prefix if upstream.strip_prefix else "",
        client=client,
    )


def _starting_page(status: NodeStatus, path: str) -> Response:
    """`/` must answer 200 while Ray starts (CML polls it); other paths say the dashboard is not up."""
    if path == "/":
        return HTMLResponse(f"<h1>Ray head {status.node_name}</h1><p>the Ray dashboard is starting</p>")
    return JSONResponse({"error": "the Ray dashboard is not reachable yet"}, 503)


class AppServer:
    """uvicorn in a daemon thread, so the main thread keeps signals and supervises Ray."""

    def __init__(
        self,
        status: NodeStatus,
        port: int,
        host: str = "127.0.0.1",
        upstreams: Sequence[PathUpstream] = (),
    ) -> None:
        config = uvicorn.Config(
            create_app(status, upstreams),
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            ws="websockets-sansio",  # WebSocket upgrades pass to the dashboard (needs `websockets`)
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="app-http", daemon=True)

    def begin(self) -> None:
        """Start serving in the background; `wait_started` confirms it."""
        if not self.thread.is_alive() and not self.server.started:
            self.thread.start()

    def wait_started(self, wait_seconds: float = 10.0) -> None:
        deadline = time.monotonic() + wait_seconds
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the app HTTP server did not start (is CDSW_APP_PORT free?)")

    def start(self, wait_seconds: float = 10.0) -> None:
        self.begin()
        self.wait_started(wait_seconds)

    def stop(self, wait_seconds: float = 2.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=wait_seconds)
