"""End to end: Ray's own autoscaler adds and removes worker applications (real Ray, local workspace).

A cluster whose only group is autoscaled (min 0 / max 2, 1 CPU per worker), a head that runs no
tasks (`head_ray_cpus: 0`) and `idle_timeout: 20`; the head's `AUTOSCALER_UPDATE_INTERVAL_S` is 1.
`up` creates only the head; a Ray client asking for 4 one-CPU tasks (demand above max) gets exactly
2 worker apps that run them; an `up` meanwhile changes nothing; after the tasks and the idle
timeout the group is back to 0 apps and none of their Ray processes is left. Then the same with 20 %
of the API requests failing: no duplicate and no leaked app. The workspace API key (the workload's
CDSW_APIV2_KEY) is in no command line, no autoscaler file or log, and not in ray_cluster_info.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from support.cli import LocalCluster, ray_processes
from support.fakes import FAULTS, inventory

from ray_serve_cai.node.ray_node import node_temp_dir
from ray_serve_cai.workspace.testing import WorkspaceHandle

CLUSTER = "auto"
PROJECT = "ray-cai-e2e-autoscale"
HEAD = f"ray-{CLUSTER}-head"
WORKERS = [f"ray-{CLUSTER}-worker-{i}" for i in range(4)]  # any the autoscaler might name
CONFIG = """\
ray_cluster:
  name: auto
  min_workers: 0
  max_workers: 2
  head_cpu: 1
  head_memory: 1
  head_ray_cpus: 0
  worker_cpu: 1
  worker_memory: 1
  ports: {gcs: 0, client: 0, dashboard: 0}
  startup_timeout: 300
  join_timeout: 300
  autoscaling: {idle_timeout: 20}
  environment: {AUTOSCALER_UPDATE_INTERVAL_S: "1"}
"""

CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, os, time, ray
    ray.init(logging_level="error")

    @ray.remote(num_cpus=1)
    def work(seconds):
        time.sleep(seconds)
        return os.environ.get("RAY_CAI_NODE_NAME")

    print(json.dumps(ray.get([work.remote(8) for _ in range(4)], timeout=400)))
    """
)

# A real-Ray group beside the shared cluster's; the module brings up its own (tests/ray/conftest.py).
pytestmark = pytest.mark.xdist_group("ray-2")


class Env(LocalCluster):
    """The autoscaled cluster: its app list read through injected faults, its worker apps by name."""

    def app_list(self) -> list[dict[str, Any]]:
        """Every app of the project (retried: faults may be on)."""
        path = f"/api/v2/projects/{self.project_id}/applications"
        for _ in range(200):
            try:
                response = self.workspace.api("GET", path, params={"page_size": 1000})
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                return list(response.json()["applications"])
        raise AssertionError("could not list the apps")

    def workers(self) -> list[str]:
        return sorted(
            a["subdomain"] for a in self.app_list() if a["subdomain"].startswith(f"ray-{CLUSTER}-worker-")
        )

    def run_client(self, connect_env: dict[str, str]) -> list[str]:
        client_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CDSW_"))}
        for _attempt in range(2):
            run = subprocess.run(
                [sys.executable, "-c", CLIENT_SCRIPT],
                env={**client_env, **connect_env},
                capture_output=True,
                text=True,
                timeout=500,
            )
            lost_server = ("Starting Ray client server failed", "ZombieProcess")  # see test_cluster_e2e
            if run.returncode == 0 or not any(sign in run.stderr for sign in lost_server):
                break
        assert run.returncode == 0, run.stderr[-3000:]
        return list(json.loads(run.stdout.strip().splitlines()[-1]))


class Watcher:
    """Lists the apps every 0.3 s: the most worker apps at once, and any name held twice."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.most = 0
        self.names: set[str] = set()
        self.duplicates: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            names = [a["subdomain"] for a in self.env.app_list()]
            self.duplicates += [n for n, c in Counter(names).items() if c > 1]
            workers = [n for n in names if n.startswith(f"ray-{CLUSTER}-worker-")]
            self.most = max(self.most, len(workers))
            self.names.update(workers)
            self._stop.wait(0.3)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def wait_until(check: Any, timeout: float, what: str, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def processes_showing(secret: str) -> list[str]:
    shown = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if secret in " ".join(proc.info["cmdline"] or []):
                shown.append(" ".join(proc.info["cmdline"])[:200])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return shown


def files_containing(root: Path, secret: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
                found.append(str(path))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def cluster(workspace: WorkspaceHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    config = tmp_path_factory.mktemp("autoscale") / "ray_cluster_config.yaml"
    config.write_text(CONFIG)
    env = Env(workspace, PROJECT, config=config, info_file=config.parent / "ray_cluster_info.json")
    try:
        env.workspace.clear_faults()
        env.up()
        yield env
    finally:
        workspace.clear_faults()
        env.down()
        if env.project_id:
            for proc in ray_processes(env.project_dir, CLUSTER, [HEAD, *WORKERS]):
                proc.kill()


def scale_out_and_back(env: Env, connect_env: dict[str, str], *, check_up: bool) -> Watcher:
    """4 one-CPU tasks on a cluster that allows 2 workers; then idle until the workers are gone."""
    with Watcher(env) as watcher:
        result: dict[str, list[str]] = {}
        client = threading.Thread(target=lambda: result.update(ran_on=env.run_client(connect_env)))
        client.start()
        if check_up:
            wait_until(lambda: len(env.workers()) == 2, 240, "the autoscaler to create 2 worker apps")
            # An `up` while the autoscaler's workers exist keeps them: nothing to do.
            plan = env.cli_json("up", "--no-wait")["plan"]
            assert plan["actions"] == [], plan
        client.join(timeout=600)
        assert set(result["ran_on"]) <= {WORKERS[0], WORKERS[1]} and len(result["ran_on"]) == 4, result
        wait_until(lambda: env.workers() == [], 180, "the idle workers to be removed")
    return watcher


def test_ray_autoscaler_adds_and_removes_worker_apps(cluster: Env) -> None:
    env, workspace = cluster, cluster.workspace
    key = workspace.api_key
    up = env.up_result
    assert [a["action"] + " " + a["name"] for a in up["plan"]["actions"]] == [f"create {HEAD}"]
    assert up["status"]["state"] == "ready" and env.workers() == []
    (group,) = up["status"]["groups"]
    assert (group["current"], group["desired"], group["min"], group["max"]) == (0, 0, 0, 2)

    connect_env = env.cli_json("connect")["env"]
    watcher = scale_out_and_back(env, connect_env, check_up=True)
    assert watcher.most == 2 and watcher.names == {WORKERS[0], WORKERS[1]}, (watcher.most, watcher.names)
    assert watcher.duplicates == []
    # The removed workers' Ray processes went with their apps.
    wait_until(
        lambda: not ray_processes(env.project_dir, CLUSTER, WORKERS), 60, "the workers' Ray processes to end"
    )

    status = env.cli_json("status")
    (group,) = status["groups"]
    assert (group["current"], group["min"], group["max"]) == (0, 0, 2)
    decision = status["autoscaler"]
    assert decision and decision["desired"] == {"worker": 0} and decision["deleted"], decision

    # The workload's key reaches the autoscaler through its environment only.
    assert processes_showing(key) == []
    state = env.project_dir / ".ray-cai" / CLUSTER
    assert (state / "autoscaling.json").is_file() and key not in (state / "autoscaling.json").read_text()
    assert files_containing(state, key) == []  # decision file, collected logs
    head_session = node_temp_dir(env.project_dir, CLUSTER, HEAD) / "session_latest" / "logs"
    monitor_logs = list(head_session.glob("monitor*"))
    assert monitor_logs and any("ray-auto-worker-0" in p.read_text(errors="replace") for p in monitor_logs)
    assert files_containing(head_session, key) == []
    assert key not in env.info_file.read_text()

    # The same with 20 % of the API requests failing (and lost create answers).
    workspace.set_faults(**FAULTS, seed=7)
    try:
        watcher = scale_out_and_back(env, connect_env, check_up=False)
        injected = workspace.api_ok("GET", "/_workspace/faults")["injected"]
    finally:
        workspace.clear_faults()
    assert sum(injected.values()) > 0, injected
    assert watcher.most <= 2 and watcher.duplicates == [], (watcher.most, watcher.duplicates)
    left = inventory(workspace, env.project_id, CLUSTER, [HEAD])
    assert left.clean, left
    wait_until(
        lambda: not ray_processes(env.project_dir, CLUSTER, WORKERS), 60, "the workers' Ray processes to end"
    )
