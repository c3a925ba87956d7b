"""The Serve gateway and the nodes' Serve ingress, without Ray: real uvicorn servers on loopback.

Two stand-ins for Serve's HTTP proxy (`tests/support/apps/stream_app.py`, which answers `/-/healthz`
as Serve's proxy does), each behind a real Serve ingress (`node.serve_proxy.ingress_app`, token
checked), announced in a project directory as a worker and a head; the real gateway
(`node.gateway.create_gateway`) in front. Through the gateway: requests reach a worker's proxy with the
`/serve` prefix stripped, without CML's credential and without the cluster token; streams arrive as
produced; WebSockets pass; the head's proxy is used only when no worker answers, and a node whose
ingress goes away is left without a failed request. The ingress refuses requests without the token.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.sync.client import connect

from ray_serve_cai.node.gateway import Routes, create_gateway
from ray_serve_cai.node.serve_proxy import ingress_app, ingress_dir

SUPPORT_APPS = Path(__file__).resolve().parents[1] / "support" / "apps"
CLUSTER = "gw"
TOKEN = "gateway-test-token-" + uuid.uuid4().hex


class Server:
    """uvicorn serving `app` on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", ws="websockets-sansio"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_upstream() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(SUPPORT_APPS / "stream_app.py"), str(port)])
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=2, trust_env=False)
            return process, port
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the Serve stand-in did not start"
            time.sleep(0.1)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[dict[str, Any]]:
    token_file = tmp_path / ".ray-cai" / CLUSTER / "auth_token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text(TOKEN)
    started: dict[str, Any] = {}
    processes = []
    try:
        for name, role in (("worker-0", "worker"), ("head", "head")):
            process, port = start_upstream()
            processes.append(process)
            ingress = Server(ingress_app(port, token_file))
            record = ingress_dir(tmp_path, CLUSTER) / f"{name}.json"
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(
                json.dumps({"node": name, "role": role, "ip": "127.0.0.1", "port": ingress.port})
            )
            started[name] = {"upstream": port, "ingress": ingress, "process": process}
        gateway = Server(create_gateway(Routes(tmp_path, CLUSTER)))
        started["gateway"] = f"http://127.0.0.1:{gateway.port}"
        yield started
        gateway.stop()
    finally:
        for name in ("worker-0", "head"):
            if name in started:
                started[name]["ingress"].stop()
        for process in processes:
            process.kill()
            process.wait()


def wait_healthy(gateway: str, expected: dict[str, bool]) -> None:
    deadline = time.monotonic() + 20
    while True:
        table = httpx.get(gateway + "/ray-cai/gateway", trust_env=False, timeout=5).json()["nodes"]
        if {name: node["healthy"] for name, node in table.items()} == expected:
            return
        assert time.monotonic() < deadline, table
        time.sleep(0.1)


def test_the_gateway_routes_to_workers_streams_and_fails_over(
    nodes: dict[str, Any],
) -> None:
    gateway = nodes["gateway"]
    wait_healthy(gateway, {"worker-0": True, "head": True})
    worker_host = f"127.0.0.1:{nodes['worker-0']['upstream']}"
    with httpx.Client(
        base_url=gateway, headers={"Authorization": "Bearer cml-key"}, trust_env=False
    ) as client:
        for _ in range(5):
            echo = client.post("/serve/echo?x=1", content=b"hello").json()
            assert (echo["path"], echo["query"], echo["body_length"]) == ("/echo", "x=1", 5)
            assert echo["headers"]["host"] == worker_host, "a request went to the head while a worker answers"
            assert "authorization" not in echo["headers"], "CML's credential reached Serve"
            assert "x-ray-authorization" not in echo["headers"], "the cluster token reached Serve"

        arrivals = []
        started = time.monotonic()
        with client.stream("GET", "/serve/stream?chunks=4&interval=0.3") as response:
            for _line in response.iter_lines():
                arrivals.append(time.monotonic() - started)
        assert len(arrivals) == 4 and arrivals[-1] - arrivals[0] >= 0.6, f"not streamed: {arrivals}"

        ws_url = gateway.replace("http://", "ws://") + "/serve/ws"
        with connect(ws_url, additional_headers={"Authorization": "Bearer cml-key"}, open_timeout=10) as ws:
            ws.send("ping")
            assert ws.recv(timeout=10) == "echo:ping"

        # The worker's Serve proxy goes away (its node lives): its ingress says the request went no
        # further, and the gateway sends it to the head; none fails.
        nodes["worker-0"]["process"].kill()
        nodes["worker-0"]["process"].wait()
        head_host = f"127.0.0.1:{nodes['head']['upstream']}"
        response = client.get("/serve/echo")
        assert response.status_code == 200, response.text
        assert response.json()["headers"]["host"] == head_host

        # The worker's pod goes away: the next request goes to the head at once, none fails.
        nodes["worker-0"]["ingress"].stop()
        for _ in range(5):
            response = client.get("/serve/echo")
            assert response.status_code == 200, response.text
            assert response.json()["headers"]["host"] == head_host
        wait_healthy(gateway, {"worker-0": False, "head": True})


def test_the_serve_ingress_refuses_requests_without_the_cluster_token(nodes: dict[str, Any]) -> None:
    ingress = f"http://127.0.0.1:{nodes['worker-0']['ingress'].port}"
    assert httpx.get(ingress + "/serve/echo", trust_env=False).status_code == 401
    wrong = {"X-Ray-Authorization": "Bearer nope"}
    assert httpx.get(ingress + "/serve/echo", headers=wrong, trust_env=False).status_code == 401
    right = {"X-Ray-Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(ingress + "/serve/echo", headers=right, trust_env=False).status_code == 200
