"""Test process: the head node's real HTTP server (`ray_serve_cai.node.http_app.AppServer`) in front of
a stand-in dashboard on 127.0.0.1:argv[2], listening on argv[1]; `/serve/...` goes to argv[3] (with the
prefix kept, as for Serve's `root_path`). The token comes from $TEST_RAY_TOKEN (a test value)."""

import os
import sys
import threading

from ray_serve_cai.node.http_app import AppServer, NodeStatus, PathUpstream

port, dashboard_port, serve_port = (int(arg) for arg in sys.argv[1:4])
token = os.environ.get("TEST_RAY_TOKEN")
status = NodeStatus(
    role="head",
    node_name="ray-test-head",
    cluster="test",
    group="head",
    ray_version="test",
    python_version=sys.version.split()[0],
    dashboard_port=dashboard_port,
    ray_running=lambda: True,
    dashboard_token=lambda: token,
)
server = AppServer(status, port, upstreams=[PathUpstream("/serve", lambda: serve_port, name="Serve")])
server.start()
print("ready", flush=True)
threading.Event().wait()
