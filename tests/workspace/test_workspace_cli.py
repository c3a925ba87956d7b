"""`ray-cai workspace start/env/status/stop` as a user runs them (subprocesses, a temporary home)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import httpx
import psutil
from support.fakes import run_cli

from ray_serve_cai.workspace.daemon import WorkspaceInfo, workspace_info
from ray_serve_cai.workspace.testing import WorkspaceHandle


def ray_cai(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_CAI_WORKSPACE_HOME": str(home)}
    env.pop("CML_API_KEY", None)
    return run_cli(["workspace", *args], env=env, timeout=90)


def test_start_env_status_stop(tmp_path: Path, test_apps_dir: Path) -> None:
    home = tmp_path / "home"
    stopped_status = ray_cai(home, "status")
    assert stopped_status.returncode == 1 and "not running" in stopped_status.stdout

    started = ray_cai(home, "start")
    assert started.returncode == 0, started.stderr
    info = workspace_info(home)
    assert isinstance(info, WorkspaceInfo)
    try:
        assert info.api_key not in started.stdout + started.stderr
        assert stat.S_IMODE((home / "state.json").stat().st_mode) == 0o600
        again = ray_cai(home, "start")
        assert again.returncode == 0 and "already running" in again.stdout
        assert workspace_info(home) == info  # same server

        status = ray_cai(home, "status", "--json")
        assert status.returncode == 0
        described = json.loads(status.stdout)
        assert described["running"] and described["url"] == info.url and described["pid"] == info.pid
        assert info.api_key not in status.stdout

        printed = ray_cai(home, "env").stdout.splitlines()
        assert printed == [f"export CML_HOST={info.url}", f"export CML_API_KEY={info.api_key}"]

        # A running app so that stop has a workload to end.
        handle = WorkspaceHandle(info)
        project = handle.create_project("cli-project", files_from=test_apps_dir)
        app = handle.api_ok(
            "POST",
            f"/api/v2/projects/{project['id']}/applications",
            json={
                "name": "cli-app",
                "subdomain": "cli-app",
                "script": "tree_app.py",
                "runtime_identifier": handle.runtime_identifier(),
            },
        )
        handle.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
        workload_pids = handle.processes()
        assert len(workload_pids) >= 3
        handle.close()
    finally:
        stopped = ray_cai(home, "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not psutil.pid_exists(info.pid) or psutil.Process(info.pid).status() == psutil.STATUS_ZOMBIE
    assert not [pid for pid in workload_pids if psutil.pid_exists(pid)]
    assert ray_cai(home, "status").returncode == 1
    assert ray_cai(home, "env").returncode == 1
    assert ray_cai(home, "stop").stdout.strip() == "workspace was not running"
    try:
        httpx.get(info.url, timeout=1, trust_env=False)
        raise AssertionError("server still answers")
    except httpx.TransportError:
        pass
