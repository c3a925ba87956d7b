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

- `start_serve` (a short-lived Ray driver, `python -m ray_serve_cai.node.serve_proxy`) starts Serve's
  controller and proxy with those options once the head's GCS is up, so whatever deploys later
  (the REST API, `serve.run` from a notebook) finds Serve where the design puts it.
- `serve_upstreams` mounts it under `/serve` of the head's HTTP server (the streaming proxy of
  `ray_serve_cai._proxy`); its port is published in the head's status (`serve_http_port`) once Serve
  answers, which is when the tool applies the Serve config.
- `project_pythonpath` puts the project directory on every node's PYTHONPATH, so Serve replicas
  import an application committed in the project without a `runtime_env`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray_serve_cai.atomic import write_atomically
from ray_serve_cai.config.serve import (
    SERVE_HOST,
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
SERVE_START_TIMEOUT_SECONDS = 180.0
INGRESS_DIR_NAME = "serve-ingress"
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


def start_serve(
    gcs_address: str,
    port: int,
    env: Mapping[str, str],
    *,
    location: str = SERVE_PROXY_LOCATION,
    timeout: float = SERVE_START_TIMEOUT_SECONDS,
) -> str | None:
    """Start Serve's controller and its proxies (`location`) on 127.0.0.1:`port` (root_path /serve)
    through a short-lived driver with the node's environment (token path, never the token). None
    when Serve runs; else why not (the launcher logs it: a later PUT of the config starts Serve the
    same way). A controller that survived a head restart is kept (Serve's start finds it)."""
    command = [
        sys.executable,
        "-m",
        "ray_serve_cai.node.serve_proxy",
        "--address",
        gcs_address,
        "--port",
        str(port),
        "--location",
        location,
    ]
    try:
        result = subprocess.run(
            command,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"Serve did not start within {timeout:.0f}s"
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return f"starting Serve exited with code {result.returncode}: {' | '.join(tail)}"
    return None


def start_serve_in_background(
    published: MutableMapping[str, Any], gcs_address: str, env: Mapping[str, str]
) -> threading.Thread:
    """Pick Serve's layout, start Serve in a thread (the head keeps supervising Ray meanwhile) and
    publish its port and proxy location in `published` (the head's status) once Serve runs."""
    location, fixed = serve_layout()
    port = fixed or pick_free_ports(1)[0]

    def run() -> None:
        started = time.monotonic()
        problem = start_serve(gcs_address, port, env, location=location)
        if problem:
            logger.warning("Ray Serve not started: %s", problem)
            return
        published[SERVE_LOCATION_KEY] = location
        published[SERVE_PORT_KEY] = port
        logger.info("Ray Serve's proxies (%s) run on %s:%s (%.1fs)", location, SERVE_HOST, port,
                    time.monotonic() - started)  # fmt: skip

    thread = threading.Thread(target=run, name="serve-start", daemon=True)
    thread.start()
    return thread


def serve_upstreams(status: Any) -> list[Any]:
    """The node's `/serve` mount: on the head, forwarded to Serve's proxy once the head's status
    (`status.connect`, read per request) has its port; on a worker in a pod, to the pod's own proxy
    (EveryNode, fixed port); none on a shared-host worker. The prefix is stripped (Serve's
    root_path puts it back for the application)."""
    from ray_serve_cai.node.http_app import PathUpstream

    if status.role != "head":
        location, fixed = serve_layout()
        if location != SERVE_PROXY_EVERY_NODE or fixed is None:
            return []
        port = fixed
        return [PathUpstream(SERVE_MOUNT, lambda: port, strip_prefix=True, name="Ray Serve")]

    def published_port() -> int | None:
        value = status.connect.get(SERVE_PORT_KEY)
        return int(value) if value else None

    return [PathUpstream(SERVE_MOUNT, published_port, strip_prefix=True, name="Ray Serve")]


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


def _start(address: str, port: int, location: str) -> int:
    """Inside the driver: connect, start Serve with the platform's options, leave it running."""
    import ray
    from ray import serve

    ray.init(address=address, namespace="serve", logging_level=logging.WARNING, log_to_driver=False)
    serve.start(
        proxy_location=location,
        http_options={"host": SERVE_HOST, "port": port, "root_path": SERVE_MOUNT},
    )
    ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start Ray Serve's proxies on the nodes' loopback.")
    parser.add_argument("--address", required=True, help="the head's GCS address")
    parser.add_argument("--port", required=True, type=int, help="Serve's HTTP port on 127.0.0.1")
    parser.add_argument("--location", default=SERVE_PROXY_LOCATION, help="HeadOnly or EveryNode")
    args = parser.parse_args(argv)
    return _start(args.address, args.port, args.location)


if __name__ == "__main__":
    sys.exit(main())
