"""CPU per request of each hop of the Serve endpoint that is ours, without Ray; run by hand:

    python benchmarks/bench_hops.py [--clients 16] [--seconds 5] [--out benchmarks/results/bench_hops.json]

Each part runs in its own process so its CPU time can be read (user + system, psutil) around a
load of `--clients` keep-alive aiohttp clients for `--seconds` per path:

* upstream: `tests/support/apps/stream_app.py` (uvicorn), standing in for Serve's proxy (`/-/healthz`);
* ingress: `node.serve_tunnel.TunnelIngress` in front of it (the cluster token once per connection);
* gateway: `python -m ray_serve_cai.node.gateway` over a project directory announcing that ingress;
* pod relay: `workspace/podinit.py`'s forwarder from 127.0.0.2 to the gateway (CML's per-pod proxy).

Paths: direct (upstream), gateway (gateway → ingress → upstream), relay (pod relay → gateway → …).
On a machine where the clients and the hops share the cores, the rates are not the point: the CPU
µs per request of each hop are (the Serve endpoint's throughput on 2 cores follows their sum).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
APPS = REPO / "tests" / "support" / "apps"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
INGRESS = """
import sys, time
from ray_serve_cai.node.serve_tunnel import TunnelIngress
token = open(sys.argv[2]).read().strip()
ingress = TunnelIngress("127.0.0.1", int(sys.argv[3]), token, upstream_port=int(sys.argv[1]))
ingress.start()
assert ingress.listening, ingress.problem
while True:
    time.sleep(3600)
"""
RELAY = """
import sys
sys.path.insert(0, sys.argv[2])
import podinit
podinit._forward("127.0.0.2", int(sys.argv[1]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{host}:{port} did not listen within {timeout:.0f} s")


async def load(url: str, clients: int, seconds: float) -> int:
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        deadline = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async with session.get(url) as response:
                    await response.read()
                    assert response.status == 200, response.status
                    done += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return done


def cpu(processes: dict[str, subprocess.Popen[bytes]]) -> dict[str, float]:
    return {name: sum(psutil.Process(p.pid).cpu_times()[:2]) for name, p in processes.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    project = Path(tempfile.mkdtemp(prefix="bench-hops-"))
    token = project / ".ray-cai" / "c" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("bench-hops-token")
    processes: dict[str, subprocess.Popen[bytes]] = {}
    result: dict[str, Any] = {"load_before": os.getloadavg()[0], "clients": args.clients}
    try:
        upstream = free_port()
        processes["upstream"] = subprocess.Popen([sys.executable, str(APPS / "stream_app.py"), str(upstream)])
        wait_port("127.0.0.1", upstream)
        ingress = free_port()
        command = [sys.executable, "-c", INGRESS, str(upstream), str(token), str(ingress)]
        processes["ingress"] = subprocess.Popen(command, env=ENV)
        wait_port("127.0.0.1", ingress)
        announcements = project / ".ray-cai" / "c" / "serve-ingress"
        announcements.mkdir(parents=True)
        record = {"node": "w", "role": "worker", "ip": "127.0.0.1", "port": ingress}
        (announcements / "w.json").write_text(json.dumps(record))
        gateway = free_port()
        gateway_env = {
            **ENV,
            "CDSW_APP_PORT": str(gateway),
            "RAY_CAI_CLUSTER": "c",
            "RAY_CAI_PROJECT_DIR": str(project),
        }
        processes["gateway"] = subprocess.Popen(
            [sys.executable, "-m", "ray_serve_cai.node.gateway"], env=gateway_env
        )
        wait_port("127.0.0.1", gateway)
        relay = [sys.executable, "-c", RELAY, str(gateway), str(REPO / "ray_serve_cai" / "workspace")]
        processes["pod relay"] = subprocess.Popen(relay, env=ENV)
        wait_port("127.0.0.2", gateway)
        time.sleep(2.0)  # the gateway's first health round
        paths = {
            "direct": f"http://127.0.0.1:{upstream}/-/healthz",
            "gateway": f"http://127.0.0.1:{gateway}/serve/-/healthz",
            "relay": f"http://127.0.0.2:{gateway}/serve/-/healthz",
        }
        for name, url in paths.items():
            asyncio.run(load(url, args.clients, 0.5))  # warm-up: connections
            before = cpu(processes)
            started = time.monotonic()
            done = asyncio.run(load(url, args.clients, args.seconds))
            elapsed = time.monotonic() - started
            after = cpu(processes)
            per_request = {part: round((after[part] - before[part]) / done * 1e6) for part in processes}
            result[name] = {"requests_per_second": round(done / elapsed), "cpu_us_per_request": per_request}
            print(name, result[name], flush=True)
    finally:
        for process in processes.values():
            process.kill()
            process.wait()
    result["load_after"] = os.getloadavg()[0]
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
