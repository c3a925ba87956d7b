"""The wall-clock targets the test suite used to assert, measured here instead (no Ray).

Run by hand (not collected by pytest):

    python benchmarks/bench_deadlines.py [--out benchmarks/results/bench_deadlines.json]

Tests assert behaviour (gives up with a clear error, heals, streams); how *soon* is a figure that
moves with the machine's load, so it lives here, with the target each test once asserted. Starts its
own local workspace in a temporary home (CML's automatic restarts off, as in the tests) and stops
it, and every process it started, before it exits; exits 1 when a target is missed.

| measure | target (the old test's bound) | test that keeps the behaviour |
|---|---|---|
| CMLClient to a closed port, retry deadline 2 s, timeout 2 s | < 5 s | test_cml_client: unreachable host |
| 429 with Retry-After 1 s, retry deadline 2.5 s | 2.0 ≤ s < 3.5 | test_cml_client: Retry-After honoured |
| cluster lock, every create failing, patience 3 s | 3 ≤ s < 30 | test_faults: lock gives up |
| `ray-cai check` to a closed port | ≤ FIRST_CONTACT_DEADLINE + 10 s | test_bad_input: unreachable host |
| `ray-cai deploy` to a closed port | < 120 s | test_deploy_e2e: unreachable host |
| worker launcher without a rendezvous, join timeout 3 s | < 45 s | test_node_ray: join timeout |
| a stream's chunk lag, through the node proxy / the app URL | < 0.5 s | test_proxy: stream as produced |
| `up --watch --interval 1`: killed worker running again | ≤ interval + 4 s | test_watch: CLI heals |
| `up --watch --interval 1`: app stuck in STARTING restarted | ≤ 1.5 + 2 intervals + 4 s | test_watch |

The head launcher's SIGTERM → exit (target: inside the workspace's 10 s stop grace; test_node_ray's
head restart) is `bench_node_stop.py`, with real Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the suite's fake nodes and CLI environment

from support.fakes import (  # noqa: E402
    RAY_CAI,
    TEST_APPS,
    cli_env,
    fake_cluster_yaml,
    list_apps,
    write_fake_project_files,
)

from ray_serve_cai.cluster import lock as lock_module  # noqa: E402
from ray_serve_cai.cluster.errors import ClusterError  # noqa: E402
from ray_serve_cai.cluster.lock import cluster_lock  # noqa: E402
from ray_serve_cai.cml import CMLClient, CMLConnectionError, CMLSettings, RateLimited  # noqa: E402
from ray_serve_cai.cml._retry import FIRST_CONTACT_DEADLINE  # noqa: E402
from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace  # noqa: E402
from ray_serve_cai.workspace.testing import WorkspaceHandle  # noqa: E402

Row = dict[str, Any]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


def until_raised(call: Callable[[], Any], error: type[BaseException]) -> float:
    """Seconds until `call` raised `error` (what a deadline ends with)."""
    started = time.monotonic()
    try:
        call()
    except error:
        return time.monotonic() - started
    raise AssertionError(f"expected {error.__name__}")


def row(name: str, seconds: float, low: float | None, high: float, note: str = "") -> Row:
    met = seconds < high and (low is None or seconds >= low)
    bound = f"{low:g} ≤ s < {high:g}" if low is not None else f"< {high:g}"
    print(f"{name:<62} {seconds:7.2f} s   target {bound:<14} {'ok' if met else 'MISSED'} {note}", flush=True)
    return {"measure": name, "seconds": round(seconds, 3), "low": low, "high": high, "met": met}


def cml_unreachable() -> Row:
    port = closed_port()
    settings = CMLSettings(host=f"http://127.0.0.1:{port}", api_key="k" * 20, retry_deadline=2, timeout=2)
    with CMLClient(settings) as client:
        seconds = until_raised(client.list_projects, CMLConnectionError)
    return row("CMLClient, closed port (deadline 2 s, timeout 2 s)", seconds, None, 5)


def retry_after(ws: WorkspaceHandle, project_id: str) -> Row:
    ws.set_faults(error_rate=1.0, statuses=[429], retry_after_seconds=1, seed=4)
    try:
        short = CMLSettings(host=ws.url, api_key=ws.api_key, retry_deadline=2.5)
        with CMLClient(short) as client:
            seconds = until_raised(lambda: client.get_project(project_id), RateLimited)
    finally:
        ws.clear_faults()
    return row("429 + Retry-After 1 s, deadline 2.5 s", seconds, 2.0, 3.5)


def lock_patience(ws: WorkspaceHandle, project_id: str) -> Row:
    patience = lock_module.FAILING_CREATE_PATIENCE
    lock_module.FAILING_CREATE_PATIENCE = 3.0
    ws.set_faults(error_rate=1.0, statuses=[503], only_creates=True, paths=f"/api/v2/projects/{project_id}")
    started = time.monotonic()
    try:
        settings = CMLSettings(host=ws.url, api_key=ws.api_key, retry_deadline=20)
        with (
            CMLClient(settings) as client,
            contextlib.suppress(ClusterError),
            cluster_lock(client, project_id, "dl", ttl=60, wait=1.0),
        ):
            raise AssertionError("the lock was taken although every create failed")
    finally:
        seconds = time.monotonic() - started
        ws.clear_faults()
        lock_module.FAILING_CREATE_PATIENCE = patience
    return row("cluster lock, every create 503, patience 3 s", seconds, 3.0, 30)


def cli_unreachable(ws: WorkspaceHandle, command: str, high: float, cwd: Path) -> Row:
    env = cli_env(ws, CML_HOST=f"http://127.0.0.1:{closed_port()}")
    seconds, proc = timed(
        lambda: subprocess.run(
            [*RAY_CAI, command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
        )
    )
    return row(f"`ray-cai {command}`, closed port", seconds, None, high, f"(exit {proc.returncode})")


def lonely_worker(tmp: Path) -> Row:
    project = tmp / "lonely"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CDSW_"))}
    env |= {
        "PYTHONPATH": str(REPO),
        "CDSW_IP_ADDRESS": "127.0.0.1",
        "CDSW_APP_PORT": str(closed_port()),
        "RAY_CAI_CLUSTER": "bench",
        "RAY_CAI_ROLE": "worker",
        "RAY_CAI_GROUP": "cpu",
        "RAY_CAI_NODE_NAME": "ray-bench-cpu-0",
        "RAY_CAI_NUM_CPUS": "1",
        "RAY_CAI_NUM_GPUS": "0",
        "RAY_CAI_MEMORY_GB": "1",
        "RAY_CAI_GCS_PORT": "0",
        "RAY_CAI_CLIENT_PORT": "0",
        "RAY_CAI_DASHBOARD_PORT": "0",
        "RAY_CAI_JOIN_TIMEOUT": "3",
    }
    script = REPO / "cai_integration" / "ray_worker.py"
    seconds, proc = timed(
        lambda: subprocess.run(
            [sys.executable, str(script)], cwd=project, env=env, capture_output=True, timeout=120
        )
    )
    return row(
        "worker launcher, no rendezvous, join timeout 3 s", seconds, None, 45, f"(exit {proc.returncode})"
    )


def max_lag(base: str, headers: dict[str, str]) -> float:
    arrivals: list[tuple[float, float]] = []
    with httpx.stream(
        "GET", base + "/stream?chunks=4&interval=1", headers=headers, trust_env=False, timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.strip():
                arrivals.append((float(line.split()[-1]), time.time()))
    return max(received - sent for sent, received in arrivals)


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, trust_env=False, timeout=2)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not answer within {timeout} s") from None
            time.sleep(0.05)


@contextlib.contextmanager
def process(argv: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, **kwargs)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stream_lag(ws: WorkspaceHandle, project: dict[str, Any]) -> list[Row]:
    rows = []
    upstream_port, head_port = closed_port(), closed_port()
    with process(
        [sys.executable, str(TEST_APPS / "stream_app.py"), str(upstream_port)], stdout=subprocess.DEVNULL
    ):
        wait_http(f"http://127.0.0.1:{upstream_port}/")
        head = [
            sys.executable,
            str(TEST_APPS / "head_http.py"),
            str(head_port),
            str(upstream_port),
            str(upstream_port),
        ]
        with process(head, env={**os.environ, "TEST_RAY_TOKEN": "bench-token"}):
            wait_http(f"http://127.0.0.1:{head_port}/ray-cai/health")
            lag = max_lag(f"http://127.0.0.1:{head_port}", {})
            rows.append(row("stream chunk lag, through the node's proxy", lag, None, 0.5))
    app = ws.api_ok(
        "POST",
        f"/api/v2/projects/{project['id']}/applications",
        json={
            "name": "bench-stream",
            "subdomain": "bench-stream",
            "script": "stream_app.py",
            "runtime_identifier": ws.runtime_identifier(),
        },
    )
    ws.wait_for_app(project["id"], app["id"], ["APPLICATION_RUNNING"], 60)
    url = next(a["url"] for a in list_apps(ws, project["id"]) if a["id"] == app["id"])
    lag = max_lag(url, {"Authorization": f"Bearer {ws.api_key}"})
    rows.append(row("stream chunk lag, through the workspace's app URL", lag, None, 0.5))
    ws.api("DELETE", f"/api/v2/projects/{project['id']}/applications/{app['id']}")
    return rows


def pids_of(ws: WorkspaceHandle, app_id: str) -> list[int]:
    return [
        int(p["pid"])
        for p in ws.api_ok("GET", "/_workspace/processes")["processes"]
        if p["workload_id"] == app_id
    ]


def app_named(ws: WorkspaceHandle, project_id: str, name: str) -> dict[str, Any]:
    return next(a for a in list_apps(ws, project_id) if a["subdomain"] == name)


def wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def watching(ws: WorkspaceHandle, project: dict[str, Any], cwd: Path, config: str) -> Iterator[None]:
    """`ray-cai up --watch --interval 1` on a fake cluster, until it prints that it watches."""
    log = cwd / f"{config}.err"
    argv = [*RAY_CAI, "up", "--project", project["name"], "-c", config, "--watch", "--interval", "1"]
    with (
        open(log, "w") as err,
        process(
            [*argv, "--timeout", "60"], cwd=cwd, env=cli_env(ws), stdout=subprocess.DEVNULL, stderr=err
        ) as proc,
    ):
        wait(lambda: "watching cluster" in log.read_text(), 90, "the watch to start")
        yield
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def watch_heals(ws: WorkspaceHandle, project: dict[str, Any], tmp: Path) -> list[Row]:
    rows = []
    (tmp / "heal.yaml").write_text(fake_cluster_yaml("bheal", 1))
    with watching(ws, project, tmp, "heal.yaml"):
        worker = app_named(ws, project["id"], "ray-bheal-worker-0")
        old = pids_of(ws, worker["id"])
        started = time.monotonic()
        for pid in old:
            os.kill(pid, signal.SIGKILL)

        def healed() -> bool:
            app = app_named(ws, project["id"], worker["subdomain"])
            pids = pids_of(ws, app["id"])
            return app["status"] == "APPLICATION_RUNNING" and bool(pids) and not set(pids) & set(old)

        wait(healed, 120, "the killed worker to run again")
        rows.append(
            row("watch (interval 1 s): killed worker running again", time.monotonic() - started, None, 5)
        )
    subprocess.run(
        [*RAY_CAI, "down", "--project", project["name"], "-c", "heal.yaml"],
        cwd=tmp,
        env=cli_env(ws),
        capture_output=True,
        timeout=120,
    )

    (tmp / "stuck.yaml").write_text(fake_cluster_yaml("bstuck", 1, startup_timeout=1.5))
    restart = "POST /api/v2/projects/{project_id}/applications/{application_id}:restart"
    with watching(ws, project, tmp, "stuck.yaml"):
        worker = app_named(ws, project["id"], "ray-bstuck-worker-0")
        ws.set_latency(app_start_seconds=30)  # every start now hangs in STARTING
        try:
            ws.api_ok("POST", f"/api/v2/projects/{project['id']}/applications/{worker['id']}:restart")
            ws.reset_counters()
            started = time.monotonic()
            wait(
                lambda: ws.counters()["counts"].get(restart, 0) >= 1,
                120,
                "the watch to restart the stuck app",
            )
            seconds = time.monotonic() - started
        finally:
            ws.set_latency(app_start_seconds=0)
        rows.append(
            row("watch (interval 1 s): stuck app restarted (startup 1.5 s)", seconds, None, 1.5 + 2 + 4)
        )
        ws.api_ok("POST", f"/api/v2/projects/{project['id']}/applications/{worker['id']}:restart")
        ws.wait_for_app(project["id"], worker["id"], ["APPLICATION_RUNNING"], 60)
    subprocess.run(
        [*RAY_CAI, "down", "--project", project["name"], "-c", "stuck.yaml"],
        cwd=tmp,
        env=cli_env(ws),
        capture_output=True,
        timeout=120,
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_deadlines.json")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-deadlines-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        info = start_workspace(home, app_restart=False)
        ws = WorkspaceHandle(info)
        try:
            files = write_fake_project_files(tmp / "files")
            for name in ("stream_app.py",):
                shutil.copy(TEST_APPS / name, files / name)
            project = ws.create_project(
                "bench-deadlines", files_from=files, default_project_engine_type="legacy_engine"
            )
            rows.append(cml_unreachable())
            rows.append(retry_after(ws, project["id"]))
            rows.append(lock_patience(ws, project["id"]))
            rows.append(cli_unreachable(ws, "check", FIRST_CONTACT_DEADLINE + 10, tmp))
            rows.append(cli_unreachable(ws, "deploy", 120, REPO))  # this checkout's config, as a user
            rows.append(lonely_worker(tmp))
            rows += stream_lag(ws, project)
            rows += watch_heals(ws, project, tmp)
            ws.api("DELETE", f"/api/v2/projects/{project['id']}", timeout=120)
        finally:
            ws.close()
            stop_workspace(home)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_before": load, "rows": rows}, indent=2) + "\n")
    missed = [r["measure"] for r in rows if not r["met"]]
    print(f"{len(rows) - len(missed)} of {len(rows)} targets met" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
