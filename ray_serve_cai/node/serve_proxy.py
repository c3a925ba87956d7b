"""Serve's HTTP proxies on the nodes, and the doors to them.

Serve's HTTP proxy has no auth of its own, so it stays on its pod's loopback.

* **In pods** (CML, the local workspace's pods) Serve runs `proxy_location: EveryNode` on
  `127.0.0.1:8000` of every pod (`SERVE_POD_PORT`; each pod has its own loopback), so a proxy runs
  where replicas run and none depends on the head. Every node's launcher mounts `/serve` on its own
  HTTP server (like the head always did) and opens its **Serve ingress** on `<pod IP>:8470`
  (`SERVE_INGRESS_PORT`): a tunnel to the local Serve proxy for connections that present the
  cluster token once (`node.serve_tunnel`: HTTP CONNECT with `X-Ray-Authorization: Bearer <token>`,
  checked in constant time; then bytes are relayed, no per-request work). The node announces its
  ingress in the project
  (`.ray-cai/<cluster>/serve-ingress/<node>.json`), where the cluster's Serve gateway
  (`node.gateway`) finds it.
* **On a shared host** (the local fallback, where one port per node would collide) Serve runs
  `proxy_location: HeadOnly` on `127.0.0.1:<port the head picks>`, reached through the head's
  `/serve` mount as `<head app URL>/serve/`.

Either way `http_options.root_path` is `/serve` and the mounts strip the prefix (Serve's root_path
puts it back for the application), streaming both ways and passing WebSockets.

Serve starts on demand, as it does on any Ray cluster: an idle cluster that never serves runs no
controller and no proxies (measured on 1 head + 2 workers: 2.7 of 13 idle core-seconds a minute,
and their memory). The head picks the layout when it first publishes its rendezvous and shows it in
its status (`serve_proxy_location`, `serve_http_port`); the tool's `PUT` of a Serve config carries
those options, and Ray's REST API starts Serve with them when it does not run yet. A `serve.run`
from a driver starts Serve with Ray's defaults: in pods that is the same layout (EveryNode on
127.0.0.1:8000) without the `/serve` root path (routes answer the same; only URLs the application
builds itself lack the prefix).
- `serve_upstreams` mounts it under `/serve` of the head's HTTP server (the streaming proxy of
  `ray_serve_cai._proxy`), on the published port; until Serve runs the mount answers 503 saying how
  Serve starts.
- `project_pythonpath` puts the project directory on every node's PYTHONPATH, so Serve replicas
  import an application committed in the project without a `runtime_env`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray_serve_cai.atomic import write_atomically
from ray_serve_cai.config.serve import (
    SERVE_INGRESS_PORT,
    SERVE_LOCATION_KEY,
    SERVE_POD_PORT,
    SERVE_PORT_KEY,
    SERVE_PROXY_EVERY_NODE,
    SERVE_PROXY_LOCATION,
    SERVE_ROOT_PATH,
)
from ray_serve_cai.node.files import cluster_state_dir
from ray_serve_cai.node.ports import on_shared_host, pick_free_ports

logger = logging.getLogger("ray_serve_cai.node")

SERVE_MOUNT = SERVE_ROOT_PATH
INGRESS_DIR_NAME = "serve-ingress"
# What `/serve` answers (503) while Serve does not run: it starts with the cluster's first application.
SERVE_NOT_RUNNING = (
    "Ray Serve is not running on this cluster: it starts with the first Serve application "
    "(`serve: {config: ...}` in the cluster config, `ray-cai serve deploy`, or serve.run)"
)
GATEWAY_TRAFFIC_FILE = "serve-gateway-traffic.json"


def serve_layout() -> tuple[str, int | None]:
    """Where Serve's proxies run on this cluster and on which loopback port: EveryNode on 8000 in
    pods; HeadOnly on a port the head picks (None here) on a shared host."""
    if on_shared_host():
        return SERVE_PROXY_LOCATION, None
    return SERVE_PROXY_EVERY_NODE, SERVE_POD_PORT


def project_pythonpath(env: Mapping[str, str], project_dir: Path | str) -> str:
    """PYTHONPATH with the project directory first (once), for Ray's workers on this node."""
    project = str(Path(project_dir).resolve())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != project]
    return os.pathsep.join([project, *parts])


def serve_publication(exclude: set[int]) -> dict[str, Any]:
    """The head's Serve layout for its status: where Serve's proxies run (or will, once Serve starts)
    and on which loopback port (on a shared host picked here, never one of `exclude`: Ray's)."""
    location, fixed = serve_layout()
    return {SERVE_LOCATION_KEY: location, SERVE_PORT_KEY: fixed or pick_free_ports(1, exclude=exclude)[0]}


def serve_upstreams(status: Any) -> list[Any]:
    """The node's `/serve` mount: on the head, forwarded to Serve's proxy once the head's status
    (`status.connect`, read per request) has its port; on a worker in a pod, to the pod's own proxy
    (EveryNode, fixed port); none on a shared-host worker. The prefix is stripped (Serve's
    root_path puts it back for the application)."""
    if status.role != "head":
        location, fixed = serve_layout()
        if location != SERVE_PROXY_EVERY_NODE or fixed is None:
            return []
        port = fixed
        return [_serve_mount(lambda: port)]

    def published_port() -> int | None:
        value = status.connect.get(SERVE_PORT_KEY)
        return int(value) if value else None

    return [_serve_mount(published_port)]


def _serve_mount(port: Callable[[], int | None]) -> Any:
    from ray_serve_cai.node.http_app import PathUpstream

    return PathUpstream(SERVE_MOUNT, port, strip_prefix=True, name="Ray Serve", unavailable=SERVE_NOT_RUNNING)


# --------------------------------------------------------------------------- the Serve ingress


def ingress_dir(project_dir: Path | str, cluster: str) -> Path:
    """`.ray-cai/<cluster>/serve-ingress/`: one file per node whose Serve ingress listens."""
    return cluster_state_dir(project_dir, cluster) / INGRESS_DIR_NAME


def gateway_traffic_path(project_dir: Path | str, cluster: str) -> Path:
    """`.ray-cai/<cluster>/serve-gateway-traffic.json`: the Serve requests the cluster's gateway
    relayed (`node.gateway.TrafficNote`), which the head's autostop counts as activity."""
    return cluster_state_dir(project_dir, cluster) / GATEWAY_TRAFFIC_FILE


class ServeIngress:
    """The node's Serve ingress on `<pod IP>:SERVE_INGRESS_PORT` (`node.serve_tunnel`: the cluster
    token once per connection, then bytes relayed to Serve's proxy on the pod's loopback) and its
    announcement in the project; `stop` withdraws the announcement, then closes the ingress."""

    def __init__(
        self, project_dir: Path, cluster: str, node_name: str, role: str, ip: str, token_file: Path | None
    ) -> None:
        from ray_serve_cai.node.serve_tunnel import TunnelIngress

        self.record = ingress_dir(project_dir, cluster) / f"{node_name}.json"
        self.announcement = {"node": node_name, "role": role, "ip": ip, "port": SERVE_INGRESS_PORT}
        token = token_file.read_text().strip() if token_file is not None else None
        self.tunnel = TunnelIngress(ip, SERVE_INGRESS_PORT, token, upstream_port=SERVE_POD_PORT)

    def start(self, wait_seconds: float = 10.0) -> ServeIngress:
        self.tunnel.start(wait_seconds)
        if self.tunnel.listening:
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_atomically(self.record, json.dumps({**self.announcement, "started_at": started}) + "\n")
            logger.info("Serve ingress on %s:%s", self.announcement["ip"], SERVE_INGRESS_PORT)
        else:
            logger.warning("the Serve ingress could not listen on %s:%s: %s", self.announcement["ip"],
                           SERVE_INGRESS_PORT, self.tunnel.problem)  # fmt: skip
        return self

    def stop(self, wait_seconds: float = 2.0) -> None:
        with contextlib.suppress(OSError):
            self.record.unlink()
        self.tunnel.stop(wait_seconds)


def start_serve_ingress(settings: Any, token_file: Path | None) -> ServeIngress | None:
    """The node's Serve ingress where Serve runs on every node (pods); None on a shared host."""
    if serve_layout()[0] != SERVE_PROXY_EVERY_NODE:
        return None
    node = (settings.cluster, settings.node_name, settings.role, settings.node_ip)
    return ServeIngress(Path(settings.project_dir), *node, token_file).start()
