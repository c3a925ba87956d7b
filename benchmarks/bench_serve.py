"""Serve through the head's application URL versus straight to Serve's own port, same run.

Run by hand (not collected by pytest), from a checkout whose code is committed (the project is a
clone of it):

    flock /tmp/ray-heavy.lock python benchmarks/bench_serve.py  # --requests 400 --concurrency 16

A private local workspace (temporary home) gets a project cloned from this repository with a small
cluster (head + 1 worker) whose `ray_cluster.serve.config` is `benchmarks/serve_trivial.yaml` (a
deployment that answers `ok`, 2 replicas). `ray-cai up --local` deploys it. Then, interleaved so both
paths see the same machine load:

* latency: `--requests` sequential requests per path (one keep-alive client each), p50 and p99;
* throughput: `--concurrency` clients for `--seconds` per path, twice each, requests per second;

where "URL" is the endpoint `ray-cai serve status` prints + `hello`, with `Authorization: Bearer <key>`:
in pods the Serve gateway's URL (the workspace's app listener, the stand-in for CML's router → the
gateway pod's init relay, the stand-in for CML's per-pod proxy → the gateway → its tunnel through the
worker's Serve ingress → the worker's Serve proxy), on a shared host `<head app URL>/serve/hello` (the
workspace's app listener → the head's HTTP server → Serve's proxy); "gateway" (pods) is the gateway
pod's address without the workspace's listener in front (pod relay → gateway → ingress tunnel →
Serve's proxy); "head" is the head's own HTTP server
(`127.0.0.1:$CDSW_APP_PORT/serve/hello`, where CML's router hands requests over; the local
workspace's listener is the stand-in for that router) and "direct" is
`127.0.0.1:<serve_http_port>/hello` (in pods, inside the worker's pod: its own Serve proxy).
Targets: URL p50 <= 1.25x direct p50, URL throughput >= 0.8x direct. During each throughput round the
CPU time of each part is read (`cpu_ms_per_request`: the workspace's server, where the app listeners
run; each application's pod, its init relay apart; this process, the clients): on a saturated machine
the throughput of a path follows the sum, and the figures hold up better under other load than the
rates do. Finally the head is killed while
`ray-cai up --watch --interval 2` supervises; the outage is the time until the URL answers again.
Writes the figures as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "bench_serve.json"
CLUSTER = "bench-serve"
PROJECT = "bench-serve"
CONFIG = """\
ray_cluster:
  name: bench-serve
  num_workers: 1
  head_cpu: 1
  head_memory: 1
  worker_cpu: 1
  worker_memory: 1
  ports: {gcs: 0, client: 0, dashboard: 0}
  startup_timeout: 400
  join_timeout: 300
  serve: {config: benchmarks/serve_trivial.yaml}
"""


def cli(
    repo: Path, env: dict[str, str], *args: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ray_serve_cai.cli.main", *args, "--local", "--project", PROJECT]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latencies(client: httpx.Client, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.get(url)
        out.append(time.perf_counter() - started)
        assert response.status_code == 200 and response.text.strip('"') == "ok", response.text
    return out


def inside(netns: Path | None, work: Any) -> Any:
    """`work()` in the network namespace `netns` (a pod's loopback), or here when None."""
    if netns is None:
        return work()
    from ray_serve_cai.workspace.pods import in_netns

    return in_netns(netns, work)


def throughput(
    make: Any,
    url: str,
    concurrency: int,
    seconds: float,
    netns: Path | None = None,
    parts: dict[str, list[Any]] | None = None,
    cpu_ms: dict[str, list[float]] | None = None,
) -> float:
    """Requests per second of `concurrency` clients for `seconds`; with `parts`, the CPU ms per
    request each part spent meanwhile is appended to `cpu_ms[part]`."""
    before = cpu_seconds(parts) if parts else {}
    deadline = time.monotonic() + seconds
    counts = [0] * concurrency

    def worker(index: int) -> None:
        def run() -> None:
            with make() as client:
                while time.monotonic() < deadline:
                    response = client.get(url)
                    if response.status_code == 200:
                        counts[index] += 1

        inside(netns, run)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    elapsed = time.monotonic() - started
    if parts and cpu_ms is not None and sum(counts):
        after = cpu_seconds(parts)
        for name in parts:
            cpu_ms.setdefault(name, []).append((after[name] - before[name]) * 1000 / sum(counts))
    return sum(counts) / elapsed


def component_processes(handle: Any, project_id: str, workspace_pid: int) -> dict[str, list[Any]]:
    """The processes of each part on the path, by name: the workspace (its app listeners run in its
    server process; its children are the workloads' pods, counted apart), each application's process
    tree (its pod: the gateway's pod init relay and server; a node's launcher, ingress, Ray and Serve's
    proxy and replicas) and this process (the benchmark's clients)."""
    import psutil

    found: dict[str, dict[int, Any]] = {
        "workspace": {workspace_pid: psutil.Process(workspace_pid)},
        "client": {os.getpid(): psutil.Process()},
    }
    apps = project_apps(handle, project_id)
    names = {a["id"]: a["subdomain"].removeprefix(f"ray-{CLUSTER}-") for a in apps}
    for process in handle.api_ok("GET", "/_workspace/processes")["processes"]:
        name = names.get(process["workload_id"])
        if name is None:
            continue
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(int(process["pid"]))
            for member in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # the pod's init: CML's per-pod proxy stand-in
                    if any(arg.endswith("podinit.py") for arg in member.cmdline()):
                        found.setdefault(f"{name} pod relay", {})[member.pid] = member
                        continue
                found.setdefault(name, {})[member.pid] = member  # each process once
    return {name: list(members.values()) for name, members in found.items()}


def cpu_seconds(parts: dict[str, list[Any]]) -> dict[str, float]:
    """User + system CPU seconds of each part so far (processes that ended since count as 0)."""
    import psutil

    out: dict[str, float] = {}
    for name, processes in parts.items():
        total = 0.0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        out[name] = total
    return out


def serve_port(repo: Path, env: dict[str, str], deadline: float) -> int:
    """Serve's proxy port, once the head publishes it (`status --json` → ray.serve_http_port): the
    head starts Serve a few seconds after Ray, so `up` may answer before it is there."""
    last = ""
    while time.monotonic() < deadline:
        result = cli(repo, env, "status", "--json", timeout=120)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            port = json.loads(result.stdout)["ray"].get("serve_http_port")
            if port:
                return int(port)
        last = (result.stderr or result.stdout)[-300:]
        time.sleep(1.0)
    raise RuntimeError(f"the head did not publish serve_http_port within the deadline; last: {last}")


def serve_endpoint(repo: Path, env: dict[str, str]) -> str:
    """The Serve endpoint `ray-cai serve status` names (what users call)."""
    result = cli(repo, env, "serve", "status", "--json", timeout=120)
    return str(json.loads(result.stdout)["url"])


def head_pod_ip(handle: Any, project_id: str) -> str:
    """Where the workspace's app listener sends the head's requests: its pod IP (CDSW_IP_ADDRESS)."""
    import psutil

    head = head_app(handle, project_id)
    for process in handle.api_ok("GET", "/_workspace/processes")["processes"]:
        if process["workload_id"] == head["id"]:
            with contextlib.suppress(psutil.Error):
                return psutil.Process(int(process["pid"])).environ().get("CDSW_IP_ADDRESS") or "127.0.0.1"
    raise RuntimeError("the head's process was not found")


def pod_netns(handle: Any, workload_id: str) -> Path | None:
    """The network namespace of a workload's pod (`/proc/<pid>/ns/net`), None when it shares the host's."""
    for process in handle.api_ok("GET", "/_workspace/processes")["processes"]:
        if process["workload_id"] == workload_id:
            path = Path(f"/proc/{int(process['pid'])}/ns/net")
            with contextlib.suppress(OSError):
                if os.readlink(path) != os.readlink("/proc/self/ns/net"):
                    return path
            return None
    return None


def project_apps(handle: Any, project_id: str) -> list[dict[str, Any]]:
    return list(handle.api_ok("GET", f"/api/v2/projects/{project_id}/applications")["applications"])


def head_app(handle: Any, project_id: str) -> dict[str, Any]:
    return next(a for a in project_apps(handle, project_id) if a["subdomain"] == f"ray-{CLUSTER}-head")


def app_environ(handle: Any, app_id: str) -> dict[str, str]:
    """The environment of an application's process (the workspace runs it on this machine)."""
    import psutil

    for process in handle.api_ok("GET", "/_workspace/processes")["processes"]:
        if process["workload_id"] == app_id:
            with contextlib.suppress(psutil.Error):
                return dict(psutil.Process(int(process["pid"])).environ())
    return {}


def worker_app(handle: Any, project_id: str) -> dict[str, Any]:
    apps = handle.api_ok("GET", f"/api/v2/projects/{project_id}/applications")["applications"]
    return next(a for a in apps if a["subdomain"] == f"ray-{CLUSTER}-worker-0")


def head_app_port(handle: Any, project_id: str) -> int:
    """The head's CDSW_APP_PORT, from its launcher's environment (the workspace runs it locally)."""
    import psutil

    head = head_app(handle, project_id)
    for process in handle.api_ok("GET", "/_workspace/processes")["processes"]:
        if process["workload_id"] == head["id"]:
            with contextlib.suppress(psutil.Error):
                port = psutil.Process(int(process["pid"])).environ().get("CDSW_APP_PORT")
                if port:
                    return int(port)
    raise RuntimeError("the head's CDSW_APP_PORT was not found")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="sequential requests per path")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput round")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--shared-host", action="store_true", help="no pods (default: a pod per node where possible)"
    )
    parser.add_argument(
        "--no-head-kill", action="store_true", help="skip the head-kill outage measurement (minutes)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace
    from ray_serve_cai.workspace.testing import WorkspaceHandle

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    home = work / "home"
    from ray_serve_cai.workspace.pods import pods_possible

    info = start_workspace(home, pods=False if args.shared_host else pods_possible()[0])
    handle = WorkspaceHandle(info)
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    (repo / "ray_cluster_config.yaml").write_text(CONFIG)
    subprocess.run(["git", "-C", str(repo), "commit", "-qam", "bench: serve cluster"], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_"))}
    env.update(RAY_CAI_WORKSPACE_HOME=str(home), COLUMNS="200", NO_COLOR="1")
    result: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "args": vars(args) | {"out": str(args.out)},
    }
    try:
        started = time.monotonic()
        up = cli(repo, env, "up", "--json")
        assert up.returncode == 0, up.stderr
        status = json.loads(up.stdout)["status"]
        result["up_seconds"] = round(time.monotonic() - started, 1)
        project_id = status["project_id"]
        port = serve_port(repo, env, deadline=time.monotonic() + 300)
        endpoint = serve_endpoint(repo, env)
        via_url = endpoint + "hello"
        head = head_app(handle, project_id)
        direct = f"http://127.0.0.1:{port}/hello"
        head_port = head_app_port(handle, project_id)
        head_ip = head_pod_ip(handle, project_id)
        via_head = f"http://{head_ip}:{head_port}/serve/hello"
        # Straight to a Serve proxy: the worker's (where the replicas run) in pods, the head's otherwise.
        worker = worker_app(handle, project_id)
        netns = pod_netns(handle, worker["id"]) or pod_netns(handle, head["id"])
        result["pods"] = netns is not None
        result["endpoint"] = endpoint
        headers = {"Authorization": f"Bearer {info.api_key}"}

        def url_client() -> httpx.Client:
            return httpx.Client(headers=headers, timeout=30, trust_env=False)

        def direct_client() -> httpx.Client:
            return httpx.Client(timeout=30, trust_env=False)

        paths = {
            "url": (url_client, via_url, None),
            "head": (direct_client, via_head, None),
            "direct": (direct_client, direct, netns),
        }
        gateway = next(
            (a for a in project_apps(handle, project_id) if a["subdomain"] == f"ray-{CLUSTER}-serve"), None
        )
        if gateway is not None:  # the gateway's own server, without the workspace's URL listener in front
            gateway_env = app_environ(handle, gateway["id"])
            address = f"{gateway_env.get('CDSW_IP_ADDRESS', '127.0.0.1')}:{gateway_env.get('CDSW_APP_PORT')}"
            paths["gateway"] = (direct_client, f"http://{address}/serve/hello", None)
        lat: dict[str, list[float]] = {name: [] for name in paths}
        clients = {name: make() for name, (make, _, _) in paths.items()}
        try:
            for name, (_, target, ns) in paths.items():
                inside(ns, partial(latencies, clients[name], target, 20))  # warm-up: connections, replicas
            for _ in range(4):
                for name, (_, target, ns) in paths.items():
                    lat[name] += inside(ns, partial(latencies, clients[name], target, args.requests // 4))
        finally:
            for client in clients.values():
                client.close()
        rps: dict[str, list[float]] = {name: [] for name in paths}
        parts = component_processes(handle, project_id, info.pid)
        cpu: dict[str, dict[str, list[float]]] = {name: {} for name in paths}
        result["load_before"] = os.getloadavg()[0]
        for _ in range(2):
            for name, (make, target, ns) in paths.items():
                rps[name].append(
                    throughput(make, target, args.concurrency, args.seconds, ns, parts, cpu[name])
                )
        result["load_after"] = os.getloadavg()[0]
        for path in paths:
            result[path] = {
                "p50_ms": round(statistics.median(lat[path]) * 1000, 2),
                "p99_ms": round(percentile(lat[path], 0.99) * 1000, 2),
                "rps": round(statistics.mean(rps[path]), 1),
                "rps_rounds": [round(r, 1) for r in rps[path]],
                # CPU ms per request of each part during this path's throughput rounds (mean of the
                # rounds): on a saturated machine, throughput follows their sum.
                "cpu_ms_per_request": {k: round(statistics.mean(v), 3) for k, v in cpu[path].items()},
            }
        result["p50_ratio"] = round(result["url"]["p50_ms"] / result["direct"]["p50_ms"], 2)
        result["rps_ratio"] = round(result["url"]["rps"] / result["direct"]["rps"], 2)
        result["head_p50_ratio"] = round(result["head"]["p50_ms"] / result["direct"]["p50_ms"], 2)
        result["head_rps_ratio"] = round(result["head"]["rps"] / result["direct"]["rps"], 2)
        if "gateway" in result:
            result["gateway_p50_ratio"] = round(result["gateway"]["p50_ms"] / result["direct"]["p50_ms"], 2)
            result["gateway_rps_ratio"] = round(result["gateway"]["rps"] / result["direct"]["rps"], 2)
        result["p50_target_met"] = result["p50_ratio"] <= 1.25
        result["rps_target_met"] = result["rps_ratio"] >= 0.8

        if not args.no_head_kill:
            result["head_restart_outage_seconds"] = head_restart_outage(
                repo, env, handle, project_id, via_url, headers
            )
    finally:
        cli(repo, env, "down", timeout=300)
        handle.close()
        stop_workspace(home)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def head_restart_outage(
    repo: Path, env: dict[str, str], handle: Any, project_id: str, url: str, headers: dict[str, str]
) -> float:
    """Kill the head's processes while `up --watch --interval 2` runs; seconds until the URL answers."""
    command = [sys.executable, "-m", "ray_serve_cai.cli.main", "up", "--watch", "--interval", "2", "--local"]
    watch = subprocess.Popen(
        [*command, "--project", PROJECT],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(watch.stderr or []), daemon=True).start()
    try:
        deadline = time.monotonic() + 600
        while not any("watching" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        head = head_app(handle, project_id)
        processes = handle.api_ok("GET", "/_workspace/processes")["processes"]
        killed = time.monotonic()
        for process in processes:
            if process["workload_id"] == head["id"]:
                with contextlib.suppress(ProcessLookupError):  # the pod's init took it along
                    os.kill(int(process["pid"]), signal.SIGKILL)
        with httpx.Client(headers=headers, timeout=5, trust_env=False) as client:
            while True:
                assert time.monotonic() - killed < 600, "Serve did not come back within 600 s"
                try:
                    if client.get(url).status_code == 200:
                        return round(time.monotonic() - killed, 1)
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
