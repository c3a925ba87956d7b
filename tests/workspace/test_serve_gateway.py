"""The Serve gateway and the nodes' Serve ingress, without Ray: real servers on loopback.

Two stand-ins for Serve's HTTP proxy (`tests/support/apps/stream_app.py`, which answers `/-/healthz`
as Serve's proxy does), each behind a real Serve ingress (`node.serve_tunnel.TunnelIngress`: the
cluster token once per connection, then bytes relayed), announced in a project directory as a worker
and a head; the real gateway
(`node.gateway.Gateway`) in front. Through the gateway: requests reach a worker's proxy with the
`/serve` prefix stripped, without CML's credential and without the cluster token; streams arrive as
produced; WebSockets pass; the head's proxy is used only when no worker answers, and a node whose
ingress goes away is left without a failed request. The ingress answers a connection without the
token, or with a wrong one, with 401 and closes it without ever connecting to Serve's proxy.
"""

from __future__ import annotations

import json
import socket
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
from support.fakes import wait_until
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ray_serve_cai.node.gateway import Gateway, Routes
from ray_serve_cai.node.serve_proxy import gateway_traffic_path, ingress_dir
from ray_serve_cai.node.serve_tunnel import TunnelIngress

SUPPORT_APPS = Path(__file__).resolve().parents[1] / "support" / "apps"
CLUSTER = "gw"
TOKEN = "gateway-test-token-" + uuid.uuid4().hex


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
            ingress = TunnelIngress("127.0.0.1", 0, TOKEN, upstream_port=port).start()
            assert ingress.listening, ingress.problem
            record = ingress_dir(tmp_path, CLUSTER) / f"{name}.json"
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(
                json.dumps({"node": name, "role": role, "ip": "127.0.0.1", "port": ingress.port})
            )
            started[name] = {"upstream": port, "ingress": ingress, "process": process}
        gateway = Gateway(Routes(tmp_path, CLUSTER)).start()
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
    # Serve's proxy sees the Host the gateway addressed: the node's ingress.
    worker_host = f"127.0.0.1:{nodes['worker-0']['ingress'].port}"
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

        # The worker's Serve proxy goes away (its node lives): its ingress cannot open a tunnel to it,
        # so the request went nowhere, and the gateway sends it to the head; none fails.
        nodes["worker-0"]["process"].kill()
        nodes["worker-0"]["process"].wait()
        head_host = f"127.0.0.1:{nodes['head']['ingress'].port}"
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


def test_the_gateway_relays_bodies_both_ways_and_answers_its_own_pages(nodes: dict[str, Any]) -> None:
    """A streamed (chunked) upload arrives whole, a 5 MiB download arrives whole (flow control over
    the relay), HEAD gets no body, a WebSocket passes bytes and its close code; the client's
    connection is reused; the gateway's pages answer outside /serve."""
    import hashlib

    gateway = nodes["gateway"]
    wait_healthy(gateway, {"worker-0": True, "head": True})
    with httpx.Client(base_url=gateway, trust_env=False, timeout=30) as client:
        pieces = [bytes([i]) * 100_000 for i in range(7)]
        upload = client.post("/serve/upload", content=iter(pieces)).json()  # no length: chunked
        assert upload["length"] == 700_000
        assert upload["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()

        download = client.get("/serve/bytes?mb=5")
        assert download.status_code == 200 and len(download.content) == 5 * 1024 * 1024

        head = client.head("/serve/echo")
        assert head.status_code == 200 and head.content == b""
        echo = client.get("/serve/echo", params={"q": "a b"}).json()  # the same connection, after HEAD
        assert (echo["path"], echo["query"]) == ("/echo", "q=a+b")
        assert echo["headers"]["x-forwarded-proto"] == "http"
        assert echo["headers"]["x-forwarded-host"] == gateway.removeprefix("http://")
        assert echo["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert client.get("/serve").text == "stream app"  # the mount itself: Serve's root

        assert client.get("/ray-cai/healthz").json() == {"ok": True}
        assert client.get("/elsewhere").status_code == 404

    ws_url = gateway.replace("http://", "ws://") + "/serve/ws"
    with connect(ws_url, subprotocols=["chat"], open_timeout=10) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "chat"
        ws.send(b"\x00\x01" * 40_000)
        assert ws.recv(timeout=10) == b"\x00\x01" * 40_000
        ws.send("close:4001")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001


def test_the_gateway_notes_its_serve_traffic_for_the_heads_autostop(
    nodes: dict[str, Any], tmp_path: Path
) -> None:
    """The head's autostop sees only its own `/serve`: the gateway writes what it relays to the
    project — when each application path last had a request, and how many are open (a stream until
    its end, a WebSocket until it closes)."""
    gateway = nodes["gateway"]
    wait_healthy(gateway, {"worker-0": True, "head": True})
    path = gateway_traffic_path(tmp_path, CLUSTER)

    def note() -> dict[str, Any]:
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def is_open() -> dict[str, int]:
        return {k: v for k, v in (note().get("open") or {}).items() if v}

    before = time.time()
    with httpx.Client(
        base_url=gateway, headers={"Authorization": "Bearer cml-key"}, trust_env=False
    ) as client:
        assert client.get("/serve/echo").status_code == 200
        wait_until(lambda: note().get("last_request", {}).get("/echo", 0) >= before, 10, 0.1, "the note")
        assert is_open() == {}
        with client.stream("GET", "/serve/stream?chunks=8&interval=0.5") as response:
            wait_until(lambda: is_open() == {"/stream": 1}, 10, 0.1, "the stream to be noted open")
            lines = list(response.iter_lines())
        assert len(lines) == 8
        wait_until(lambda: is_open() == {}, 10, 0.1, "the stream's end to be noted")

    ws_url = gateway.replace("http://", "ws://") + "/serve/ws"
    with connect(ws_url, additional_headers={"Authorization": "Bearer cml-key"}, open_timeout=10) as ws:
        ws.send("ping")
        assert ws.recv(timeout=10) == "echo:ping"
        wait_until(lambda: is_open() == {"/ws": 1}, 10, 0.1, "the WebSocket to be noted open")
    wait_until(lambda: is_open() == {}, 10, 0.1, "the WebSocket's close to be noted")
    assert set(note()["last_request"]) == {"/echo", "/stream", "/ws"}


class CountingListener:
    """A TCP listener on loopback that counts the connections it accepts (and answers nothing)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.sock.close()
        for connection in self.accepted:
            connection.close()


def exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a new connection to 127.0.0.1:`port`; everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_the_serve_ingress_refuses_connections_without_the_cluster_token() -> None:
    serve = CountingListener()
    ingress = TunnelIngress("127.0.0.1", 0, TOKEN, upstream_port=serve.port).start()
    try:
        refused = {
            "plain HTTP": b"GET /serve/echo HTTP/1.1\r\nhost: x\r\n\r\n",
            "no token": b"CONNECT 127.0.0.1:8000 HTTP/1.1\r\nhost: x\r\n\r\n",
            "wrong token": b"CONNECT 127.0.0.1:8000 HTTP/1.1\r\nx-ray-authorization: Bearer nope\r\n\r\n"
            b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n",
        }
        for what, data in refused.items():
            answer = exchange(ingress.port, data)
            assert answer.startswith(b"HTTP/1.1 401 "), (what, answer)
            assert TOKEN.encode() not in answer
        right = f"x-ray-authorization: Bearer {TOKEN}\r\n".encode()
        # The token without CONNECT opens nothing either: the ingress relays tunnels only.
        assert exchange(ingress.port, b"GET /echo HTTP/1.1\r\n" + right + b"\r\n").startswith(
            b"HTTP/1.1 405 "
        )
        assert serve.accepted == [], "a connection without a valid CONNECT reached Serve's proxy"

        with socket.create_connection(("127.0.0.1", ingress.port), timeout=10) as sock:
            sock.sendall(b"CONNECT 127.0.0.1:8000 HTTP/1.1\r\n" + right + b"\r\n")
            assert sock.recv(1024) == b"HTTP/1.1 200 Connection established\r\n\r\n"
            sock.sendall(b"bytes for Serve")
            deadline = time.monotonic() + 10
            while not serve.accepted:
                assert time.monotonic() < deadline, "the tunnel did not reach Serve's proxy"
                time.sleep(0.02)
            serve.accepted[0].settimeout(10)
            assert serve.accepted[0].recv(1024) == b"bytes for Serve"
            serve.accepted[0].sendall(b"and back")
            assert sock.recv(1024) == b"and back"
    finally:
        ingress.stop()
        serve.close()


def test_the_serve_ingress_answers_502_when_serve_is_not_there() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = int(unused.getsockname()[1])  # bound, never listening: connections are refused
        ingress = TunnelIngress("127.0.0.1", 0, TOKEN, upstream_port=port).start()
        try:
            connect = f"CONNECT 127.0.0.1:8000 HTTP/1.1\r\nx-ray-authorization: Bearer {TOKEN}\r\n\r\n"
            assert exchange(ingress.port, connect.encode()).startswith(b"HTTP/1.1 502 ")
        finally:
            ingress.stop()
