"""Test application: a Ray node without Ray, for tests where Ray is not the point.

Serves HTTP on 127.0.0.1:$CDSW_APP_PORT: `/` (200), `/ray-cai/health`, `/ray-cai/healthz`, and on
the head (`RAY_CAI_ROLE=head`) `/ray-cai/status`, built from the same models as the real node's
(`ray_serve_cai.config.node_status`). Every node writes a heartbeat
file `.ray-cai/<cluster>/fake/<RAY_CAI_NODE_NAME>` (pid + time) in the project directory (the working
directory) every second and removes it on SIGTERM; the head reports as alive the nodes whose
heartbeat is fresh and whose process still exists, so a killed node drops out at once.

A node started while the file `.ray-cai/<cluster>/fake-never-join/<RAY_CAI_NODE_NAME>` exists never
joins: it answers HTTP but writes no heartbeat, and its health page says Ray is not running, with
a last error, as a real node whose `ray start` keeps failing does.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ray_serve_cai.config.node_status import HEALTH_PATH, HEALTHZ_PATH, STATUS_PATH, HeadStatus, NodeHealth

HEARTBEAT_SECONDS = 1.0
FRESH_SECONDS = 3.0

CLUSTER = os.environ.get("RAY_CAI_CLUSTER", "default")
POD_IP = os.environ.get("CDSW_IP_ADDRESS", "127.0.0.1")
APP_PORT = int(os.environ.get("CDSW_APP_PORT", "0") or 0)
NODE_NAME = os.environ.get("RAY_CAI_NODE_NAME", f"fake-{POD_IP}-{os.getpid()}")
ROLE = os.environ.get("RAY_CAI_ROLE", "worker")
HEAD_ID = uuid.uuid4().hex
HEARTBEATS = Path(os.environ.get("RAY_CAI_PROJECT_DIR", ".")) / ".ray-cai" / CLUSTER / "fake"
MY_HEARTBEAT = HEARTBEATS / NODE_NAME
NEVER_JOIN = HEARTBEATS.parent / "fake-never-join" / NODE_NAME
JOINS = not NEVER_JOIN.exists()
LAST_ERROR = (
    None if JOINS else f"fake ray start failed: OSError: [Errno 98] Address already in use ({NEVER_JOIN})"
)
START_GRACE_SECONDS = 5.0  # like a real node's: the polling endpoint fails only after it
STARTED = time.monotonic()


def write_heartbeat() -> None:
    HEARTBEATS.mkdir(parents=True, exist_ok=True)
    temporary = HEARTBEATS / f".{NODE_NAME}.{os.getpid()}.tmp"
    beat = {"pid": os.getpid(), "ip": POD_IP, "port": APP_PORT, "time": time.time(), "role": ROLE}
    temporary.write_text(json.dumps(beat))
    os.replace(temporary, MY_HEARTBEAT)


def heartbeat_forever() -> None:
    while True:
        with contextlib.suppress(OSError):  # the project directory may be going away
            write_heartbeat()
        time.sleep(HEARTBEAT_SECONDS)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def node_alive(beat: dict[str, Any]) -> bool:
    """Its process exists: seen directly on a shared host; in another pod (another pid namespace)
    through the pod's address, which goes with the pod."""
    ip = str(beat.get("ip") or "127.0.0.1")
    if ip in ("127.0.0.1", POD_IP):
        return pid_alive(int(beat.get("pid", 0)))
    try:
        with socket.create_connection((ip, int(beat.get("port") or 0)), timeout=0.5):
            return True
    except OSError:
        return False


def alive_nodes() -> list[dict[str, Any]]:
    nodes = []
    now = time.time()
    for path in sorted(HEARTBEATS.glob("*")):
        if path.name.startswith("."):
            continue
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if now - float(beat.get("time", 0)) <= FRESH_SECONDS and node_alive(beat):
            nodes.append(
                {
                    "node_id": f"fake-{beat.get('ip')}-{beat['pid']}",
                    "node_name": path.name,
                    "alive": True,
                    "resources": {},
                }
            )
    return nodes


class Handler(BaseHTTPRequestHandler):
    def _json(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        health = NodeHealth(
            role=ROLE,
            node_name=NODE_NAME,
            cluster=CLUSTER,
            ray_running=JOINS,
            phase="running" if JOINS else "restarting",
            healthy=JOINS or time.monotonic() - STARTED <= START_GRACE_SECONDS,
            last_error=LAST_ERROR,
            head_id=HEAD_ID,
        )
        if path == HEALTH_PATH:
            self._json(200, health.model_dump(mode="json"))
        elif path == HEALTHZ_PATH:
            self._json(200 if health.healthy else 503, health.model_dump(mode="json"))
        elif path == STATUS_PATH and ROLE == "head":
            nodes = alive_nodes()
            status = HeadStatus(
                head_id=HEAD_ID,
                ray_version="fake",
                python_version=platform.python_version(),
                ray_running=True,
                alive_nodes=len(nodes),
                nodes=nodes,
            )
            self._json(200, status.body())
        elif path == "/":
            self._json(200, {"fake_ray_node": NODE_NAME})
        else:
            self._json(404, {"error": f"no route {path}"})

    def log_message(self, *args: object) -> None:
        return None


def on_sigterm(*_: object) -> None:
    with contextlib.suppress(OSError):
        MY_HEARTBEAT.unlink()
    os._exit(0)


def main() -> None:
    signal.signal(signal.SIGTERM, on_sigterm)
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Handler)
    if JOINS:
        write_heartbeat()
        threading.Thread(target=heartbeat_forever, daemon=True).start()
    sys.stdout.write(f"fake ray {ROLE} {NODE_NAME} serving on {server.server_address}\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
