"""Serve on the head: its one HTTP proxy on the head's loopback, reached as `<head app URL>/serve/`.

CML gives one URL per pod and Serve's HTTP proxy has no auth of its own, so it must stay on the
pod's loopback; in the local workspace every node shares one host, where a proxy per node on one
port would collide. So Serve runs `proxy_location: HeadOnly` on `127.0.0.1:<port the head picks>`
with `http_options.root_path: /serve`, and the head's HTTP server forwards `/serve/...` to it
(streaming both ways, WebSockets passed) behind CML's login, like the dashboard.

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
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from ray_serve_cai.config.serve import SERVE_HOST, SERVE_PORT_KEY, SERVE_ROOT_PATH
from ray_serve_cai.node.ports import pick_free_ports

logger = logging.getLogger("ray_serve_cai.node")

SERVE_MOUNT = SERVE_ROOT_PATH
SERVE_START_TIMEOUT_SECONDS = 180.0


def project_pythonpath(env: Mapping[str, str], project_dir: Path | str) -> str:
    """PYTHONPATH with the project directory first (once), for Ray's workers on this node."""
    project = str(Path(project_dir).resolve())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != project]
    return os.pathsep.join([project, *parts])


def start_serve(
    gcs_address: str, port: int, env: Mapping[str, str], *, timeout: float = SERVE_START_TIMEOUT_SECONDS
) -> str | None:
    """Start Serve's controller and HeadOnly proxy on 127.0.0.1:`port` (root_path /serve) through a
    short-lived driver with the node's environment (token path, never the token). None when Serve
    runs; else why not (the launcher logs it: a later PUT of the config starts Serve the same way)."""
    command = [
        sys.executable,
        "-m",
        "ray_serve_cai.node.serve_proxy",
        "--address",
        gcs_address,
        "--port",
        str(port),
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
    """Pick Serve's port, start Serve in a thread (the head keeps supervising Ray meanwhile) and
    publish the port in `published` (the head's status) once Serve runs."""
    port = pick_free_ports(1)[0]

    def run() -> None:
        started = time.monotonic()
        problem = start_serve(gcs_address, port, env)
        if problem:
            logger.warning("Ray Serve not started: %s", problem)
            return
        published[SERVE_PORT_KEY] = port
        logger.info("Ray Serve's proxy runs on %s:%s (%.1fs)", SERVE_HOST, port, time.monotonic() - started)

    thread = threading.Thread(target=run, name="serve-start", daemon=True)
    thread.start()
    return thread


def serve_upstreams(status: Any) -> list[Any]:
    """The head's `/serve` mount: forwarded to Serve's proxy once the head's status (`status.connect`,
    read per request) has its port, with the prefix stripped (Serve's root_path puts it back for the
    application); none on a worker."""
    from ray_serve_cai.node.http_app import PathUpstream

    if status.role != "head":
        return []

    def port() -> int | None:
        value = status.connect.get(SERVE_PORT_KEY)
        return int(value) if value else None

    return [PathUpstream(SERVE_MOUNT, port, strip_prefix=True, name="Ray Serve")]


def _start(address: str, port: int) -> int:
    """Inside the driver: connect, start Serve with the platform's options, leave it running."""
    import ray
    from ray import serve

    ray.init(address=address, namespace="serve", logging_level=logging.WARNING, log_to_driver=False)
    serve.start(
        proxy_location="HeadOnly",
        http_options={"host": SERVE_HOST, "port": port, "root_path": SERVE_MOUNT},
    )
    ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start Ray Serve's HeadOnly proxy on the head's loopback.")
    parser.add_argument("--address", required=True, help="the head's GCS address")
    parser.add_argument("--port", required=True, type=int, help="Serve's HTTP port on 127.0.0.1")
    args = parser.parse_args(argv)
    return _start(args.address, args.port)


if __name__ == "__main__":
    sys.exit(main())
