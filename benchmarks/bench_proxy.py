"""Figures for the streaming proxy (`ray_serve_cai/_proxy.py`), run by hand:

* time to first byte of a streamed response (`/stream`, first chunk at once, then one a second),
  directly vs through the head node's HTTP server vs through the local workspace's app URL in front
  of the head (the real local path: listener → head → upstream);
* throughput of a 50 MiB download on each path (MB/s);
* peak RSS of the node's HTTP server process (and of the workspace) during the 50 MiB transfer.

The upstream is `tests/support/apps/stream_app.py` (a real uvicorn app standing in for the dashboard), the
node is the real `AppServer` (`tests/support/apps/head_http.py`). No Ray is started.

    python benchmarks/bench_proxy.py [--repeat 20] [--mb 50] [--out benchmarks/results/bench_proxy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
APPS = REPO / "tests" / "support" / "apps"
sys.path.insert(0, str(REPO))

from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace  # noqa: E402
from ray_serve_cai.workspace.testing import WorkspaceHandle  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, trust_env=False, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def time_to_first_byte(url: str, headers: dict[str, str]) -> float:
    with httpx.Client(trust_env=False, timeout=30) as client:
        started = time.perf_counter()
        with client.stream("GET", url, headers=headers) as response:
            for chunk in response.iter_raw():
                if chunk:
                    return time.perf_counter() - started
    raise RuntimeError("no body")


def download(url: str, headers: dict[str, str]) -> tuple[int, float]:
    received = 0
    with httpx.Client(trust_env=False, timeout=120) as client:
        started = time.perf_counter()
        with client.stream("GET", url, headers=headers) as response:
            for chunk in response.iter_raw():
                received += len(chunk)
        return received, time.perf_counter() - started


def peak_rss_during(process: psutil.Process, work: Callable[[], Any]) -> tuple[int, int, Any]:
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return baseline, peak, result


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "min": ordered[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=20, help="TTFB samples per path")
    parser.add_argument("--mb", type=int, default=50, help="MiB per download")
    parser.add_argument("--downloads", type=int, default=3, help="downloads per path")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_proxy.json")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    processes: list[subprocess.Popen[bytes]] = []
    home = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    handle: WorkspaceHandle | None = None
    env = {**os.environ, "PYTHONPATH": str(REPO), "TEST_RAY_TOKEN": "bench-token"}
    try:
        upstream_port, head_port = free_port(), free_port()
        processes.append(
            subprocess.Popen([sys.executable, str(APPS / "stream_app.py"), str(upstream_port)], env=env)
        )
        wait_http(f"http://127.0.0.1:{upstream_port}/")
        head = subprocess.Popen(
            [
                sys.executable,
                str(APPS / "head_http.py"),
                str(head_port),
                str(upstream_port),
                str(upstream_port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        processes.append(head)
        wait_http(f"http://127.0.0.1:{head_port}/ray-cai/health")

        # The workspace app in front of a head server of its own (the full local chain).
        handle = WorkspaceHandle(start_workspace(home))
        project = handle.create_project("bench-proxy")
        script = handle.project_dir(project["id"]) / "head.py"
        script.write_text(
            "import os, sys\n"
            f"os.execv(sys.executable, [sys.executable, {str(APPS / 'head_http.py')!r}, "
            f"os.environ['CDSW_APP_PORT'], '{upstream_port}', '{upstream_port}'])\n"
        )
        app = handle.api_ok(
            "POST",
            f"/api/v2/projects/{project['id']}/applications",
            json={
                "name": "bench-head",
                "subdomain": "bench-head",
                "script": "head.py",
                "runtime_identifier": handle.runtime_identifier(),
                "environment": {"TEST_RAY_TOKEN": "bench-token", "PYTHONPATH": str(REPO)},
            },
        )
        app = handle.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"}, timeout=60)
        auth = {"Authorization": f"Bearer {handle.api_key}"}
        paths = {
            "direct": (f"http://127.0.0.1:{upstream_port}", {}),
            "node proxy": (f"http://127.0.0.1:{head_port}", {}),
            "app URL -> node proxy": (app["url"], auth),
        }
        results: dict[str, Any] = {"paths": {}, "mb": args.mb}
        for name, (base, headers) in paths.items():
            time_to_first_byte(f"{base}/stream?chunks=2&interval=0", headers)  # warm up
            ttfb = [
                time_to_first_byte(f"{base}/stream?chunks=2&interval=1", headers) for _ in range(args.repeat)
            ]
            download(f"{base}/bytes?mb=1", headers)
            rates = []
            for _ in range(args.downloads):
                received, seconds = download(f"{base}/bytes?mb={args.mb}", headers)
                assert received == args.mb * 1024 * 1024, received
                rates.append(received / seconds / 1e6)
            results["paths"][name] = {
                "ttfb_ms": {k: v * 1000 for k, v in summary(ttfb).items()},
                "mb_per_s": rates,
            }

        node = psutil.Process(head.pid)
        baseline, peak, _ = peak_rss_during(
            node, lambda: download(f"http://127.0.0.1:{head_port}/bytes?mb={args.mb}", {})
        )
        results["node_rss_mib"] = {
            "before": baseline / 2**20,
            "peak": peak / 2**20,
            "growth": (peak - baseline) / 2**20,
        }
        workspace = psutil.Process(int(handle.api_ok("GET", "/_workspace/health")["pid"]))
        baseline, peak, _ = peak_rss_during(
            workspace, lambda: download(f"{app['url']}/bytes?mb={args.mb}", auth)
        )
        results["workspace_rss_mib"] = {
            "before": baseline / 2**20,
            "peak": peak / 2**20,
            "growth": (peak - baseline) / 2**20,
        }
        results["machine"] = {
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "python": platform.python_version(),
            "httpx": httpx.__version__,
        }
        head_commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        results["commit"] = head_commit.stdout.strip()

        print(f"{'path':<24} {'TTFB median ms':>15} {'p95 ms':>8} {'MB/s (median)':>14}")
        for name, figures in results["paths"].items():
            print(
                f"{name:<24} {figures['ttfb_ms']['median']:>15.2f} {figures['ttfb_ms']['p95']:>8.2f}"
                f" {statistics.median(figures['mb_per_s']):>14.0f}"
            )
        for label, key in (("node", "node_rss_mib"), ("workspace", "workspace_rss_mib")):
            rss = results[key]
            print(
                f"{label} RSS during {args.mb} MiB: {rss['before']:.1f} -> peak {rss['peak']:.1f} MiB"
                f" (+{rss['growth']:.1f})"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {args.out}")
        return 0
    finally:
        if handle is not None:
            handle.close()
            stop_workspace(home)
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    raise SystemExit(main())
