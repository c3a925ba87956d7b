"""HTTP on 127.0.0.1:$CDSW_APP_PORT: health on every node; on the head, cluster status and a
proxy to the Ray dashboard that adds the token header (CML's login already guards the app URL)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

# Incoming headers never forwarded: hop-by-hop ones, and credentials meant for CML, not Ray.
DROPPED_REQUEST_HEADERS = {
    "host",
    "authorization",
    "x-ray-authorization",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "accept-encoding",
}
DROPPED_RESPONSE_HEADERS = {
    "content-encoding",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
}
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
    # Head only, once published: gcs_address, client_address, auth_mode, token_path (a path, never the token).
    connect: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def health(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "node_name": self.node_name,
            "cluster": self.cluster,
            "group": self.group,
            "ray_running": self.ray_running(),
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
                "is_head": bool(row.get("is_head_node")),
                "resources": resources,
            }
        )
        if alive:
            for key, value in resources.items():
                if not key.startswith("node:"):
                    totals[key] = totals.get(key, 0.0) + float(value)
    return {"alive_nodes": sum(1 for node in nodes if node["alive"]), "nodes": nodes, "resources": totals}


def create_app(status: NodeStatus) -> Starlette:
    """The app HTTP server of one node."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=3.0), follow_redirects=False)

    def dashboard_headers() -> dict[str, str]:
        token = status.dashboard_token()
        return {"X-Ray-Authorization": f"Bearer {token}"} if token else {}

    def dashboard_url(path: str) -> str | None:
        if status.dashboard_port is None:
            return None
        return f"http://127.0.0.1:{status.dashboard_port}{path}"

    async def health(_: Request) -> JSONResponse:
        return JSONResponse(status.health())

    async def cluster_status(_: Request) -> JSONResponse:
        body: dict[str, Any] = {
            "head_id": status.head_id,
            "ray_version": status.ray_version,
            "python_version": status.python_version,
            "ray_running": status.ray_running(),
            **status.connect,
        }
        if (decision := status.autoscaler()) is not None:
            body["autoscaler"] = decision
        url = dashboard_url("/api/v0/nodes?limit=10000&detail=false")
        if url is None or not status.ray_running():
            return JSONResponse(
                {**body, "alive_nodes": 0, "nodes": [], "resources": {}, "error": "ray is not running"}, 503
            )
        try:
            response = await client.get(url, headers=dashboard_headers())
            response.raise_for_status()
            rows = response.json()["data"]["result"]["result"]
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as error:
            message = f"dashboard not ready: {type(error).__name__}"
            return JSONResponse(
                {**body, "alive_nodes": 0, "nodes": [], "resources": {}, "error": message}, 503
            )
        return JSONResponse({**body, **summarize_nodes(rows)})

    async def proxy(request: Request) -> Response:
        path = request.url.path
        if status.role != "head":
            if path == "/":
                return HTMLResponse(f"<h1>Ray worker {status.node_name}</h1><p>see /ray-cai/health</p>")
            return JSONResponse({"error": "not found"}, 404)
        query = f"?{request.url.query}" if request.url.query else ""
        url = dashboard_url(path + query)
        if url is None:
            return _starting_page(status, path)
        headers = {
            key: value for key, value in request.headers.items() if key.lower() not in DROPPED_REQUEST_HEADERS
        }
        headers.update(dashboard_headers())
        try:
            upstream = await client.request(
                request.method, url, headers=headers, content=await request.body()
            )
        except httpx.HTTPError:
            return _starting_page(status, path)
        response_headers = {
            key: value
            for key, value in upstream.headers.items()
            if key.lower() not in DROPPED_RESPONSE_HEADERS
        }
        return Response(upstream.content, status_code=upstream.status_code, headers=response_headers)

    routes = [
        Route("/ray-cai/health", health, methods=["GET"]),
        Route("/ray-cai/status", cluster_status, methods=["GET"]),
        Route("/{path:path}", proxy, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    ]
    if status.role != "head":
        routes.pop(1)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):  # type: ignore[no-untyped-def]
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def _starting_page(status: NodeStatus, path: str) -> Response:
    """`/` must answer 200 while Ray starts (CML polls it); other paths say the dashboard is not up."""
    if path == "/":
        return HTMLResponse(f"<h1>Ray head {status.node_name}</h1><p>the Ray dashboard is starting</p>")
    return JSONResponse({"error": "the Ray dashboard is not reachable yet"}, 503)


class AppServer:
    """uvicorn in a daemon thread, so the main thread keeps signals and supervises Ray."""

    def __init__(self, status: NodeStatus, port: int, host: str = "127.0.0.1") -> None:
        config = uvicorn.Config(
            create_app(status), host=host, port=port, log_level="warning", access_log=False, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="app-http", daemon=True)

    def start(self, wait_seconds: float = 10.0) -> None:
        self.thread.start()
        deadline = threading.Event()
        for _ in range(int(wait_seconds / 0.05)):
            if self.server.started or not self.thread.is_alive():
                break
            deadline.wait(0.05)
        if not self.server.started:
            raise RuntimeError("the app HTTP server did not start (is CDSW_APP_PORT free?)")

    def stop(self, wait_seconds: float = 2.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=wait_seconds)
