"""Stand-in node for bench_cluster.py: no Ray, only what the reconciler checks.

Runs as head or worker (`RAY_CAI_ROLE`, copied into every app by the reconciler). A worker
"joins" the head the way a Ray worker joins through the rendezvous: it writes
`.bench-join/<cluster>/<node name>` (its pid) in the project directory — its working
directory — before it starts to listen. The head answers `GET /ray-cai/status` with every node
that has joined and whose process is still alive (pid checked in /proc, so a deleted app drops
out), itself included, in the shape the head launcher uses: `{alive_nodes, nodes: [{node_name,
alive}]}`. No API call is made, so the workspace counters see only the tool under test.
Every node answers 200 on `/` (CML's polling endpoint) and on `/ray-cai/health`.
"""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROLE = os.environ.get("RAY_CAI_ROLE", "worker")
NODE_NAME = os.environ.get("RAY_CAI_NODE_NAME", "unknown")
JOIN_DIR = Path(".bench-join") / os.environ.get("RAY_CAI_CLUSTER", "default")


def join() -> None:
    JOIN_DIR.mkdir(parents=True, exist_ok=True)
    temp = JOIN_DIR / f".{NODE_NAME}.tmp"
    temp.write_text(str(os.getpid()))
    temp.replace(JOIN_DIR / NODE_NAME)


def is_bench_node(pid: int) -> bool:
    try:
        return b"bench_app.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def cluster_view() -> dict[str, object]:
    nodes = []
    for entry in sorted(JOIN_DIR.iterdir()) if JOIN_DIR.is_dir() else []:
        if entry.name.startswith("."):
            continue
        try:
            pid = int(entry.read_text())
        except (OSError, ValueError):
            continue
        if is_bench_node(pid):
            nodes.append({"node_name": entry.name, "alive": True})
    return {"alive_nodes": len(nodes), "nodes": nodes}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/ray-cai/status" and ROLE == "head":
            body = cluster_view()
        else:
            body = {"role": ROLE, "node_name": NODE_NAME, "ray": False}
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        return None


if __name__ == "__main__":
    join()
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Handler).serve_forever()
