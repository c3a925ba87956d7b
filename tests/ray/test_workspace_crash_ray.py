"""The workspace survives its own crash under a ready real-Ray cluster (its own workspace: the session
one must not die). The workspace-only crash cases are in tests/workspace/test_workspace_crash.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from support.fakes import RAY_CAI, SMALL_CLUSTER_YAML, wait_until

from ray_serve_cai.workspace.daemon import stop_workspace, workspace_info
from ray_serve_cai.workspace.processes import WORKSPACE_MARKER
from ray_serve_cai.workspace.statefile import read_state
from ray_serve_cai.workspace.testing import WorkspaceHandle

# The second real-Ray group: a worker of its own beside the shared cluster (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("ray-2")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


WORKERS = 1  # a head and a worker: what survives holds for more workers too (each node is a raylet to start)
RAY_CONFIG = SMALL_CLUSTER_YAML.format(name="crashray", workers=WORKERS)


def _raylets(tag: str) -> set[int]:
    """Raylet processes started by the workspace with this tag."""
    found = set()
    for process in psutil.process_iter(["name"]):
        try:
            if process.info["name"] == "raylet" and process.environ().get(WORKSPACE_MARKER) == tag:
                found.add(process.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _tagged(tag: str) -> list[int]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(WORKSPACE_MARKER) == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (psutil.Error, OSError):
            continue
    return found


def test_a_ready_ray_cluster_survives_a_crash_of_the_workspace(tmp_path: Path) -> None:
    """`kill -9` of the server under a ready 1 head + 1 worker cluster: after `ray-cai workspace
    start`, status shows the same ready cluster with the same apps, the same raylets; down leaves
    no Ray process."""
    home, config = tmp_path / "home", tmp_path / "ray_cluster_config.yaml"
    config.write_text(RAY_CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_"))}
    env.update(RAY_CAI_WORKSPACE_HOME=str(home), COLUMNS="200")
    repo = Path(__file__).resolve().parents[2]
    project = "ray-cai-crash-ray"

    def cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
        command = [*RAY_CAI, *args, "--local", "--project", project, "--config", str(config), "--json"]
        return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)

    try:
        up = cli("up")
        assert up.returncode == 0, f"{up.stderr}\n{up.stdout}"
        info = workspace_info(home)
        assert info is not None
        ws = WorkspaceHandle(info)
        project_id = json.loads(up.stdout)["status"]["project_id"]
        apps_path = f"/api/v2/projects/{project_id}/applications"
        before = {a["subdomain"]: a["id"] for a in ws.api_ok("GET", apps_path)["applications"]}
        tag = read_state(home)["workspace_tag"]
        raylets = _raylets(tag)
        assert len(raylets) == 1 + WORKERS, raylets

        os.kill(info.pid, signal.SIGKILL)
        wait_until(lambda: not _alive(info.pid), timeout=10, what="the killed server to be gone")
        ws.close()
        assert _raylets(tag) == raylets  # the cluster does not notice

        started = subprocess.run(
            [*RAY_CAI, "workspace", "start"], env=env, capture_output=True, text=True, timeout=60
        )
        assert started.returncode == 0, started.stderr
        status = cli("status")
        assert status.returncode == 0, f"{status.stderr}\n{status.stdout}"
        described = json.loads(status.stdout)
        assert described["state"] == "ready" and described["ray"]["alive_nodes"] == 1 + WORKERS, described
        ws = WorkspaceHandle(workspace_info(home) or info)
        after = {a["subdomain"]: a["id"] for a in ws.api_ok("GET", apps_path)["applications"]}
        assert after == before
        assert _raylets(tag) == raylets
        ws.close()

        down = cli("down")
        assert down.returncode == 0, f"{down.stderr}\n{down.stdout}"
        wait_until(lambda: not _tagged(tag), timeout=30, what="every process of the cluster to end")
        assert _raylets(tag) == set()
    finally:
        stop_workspace(home)
