"""`ray-cai doctor --local`: every check passes against the local workspace and states what it
emulates; with WebSocket upgrades refused on app URLs (a workspace control) that one check is a
`warn` saying what the tool does instead. The probe project, job and app are gone afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
from support.fakes import cli_env, run_cli

from ray_serve_cai.deploy.doctor import ALL_CHECKS, FSYNC, WEBSOCKET
from ray_serve_cai.workspace.testing import WorkspaceHandle

REPO_ROOT = Path(__file__).resolve().parents[2]  # a git checkout: the probe project is cloned from it


def doctor_projects(workspace: WorkspaceHandle) -> list[str]:
    projects = workspace.api_ok("GET", "/api/v2/projects", params={"page_size": 1000})["projects"]
    return [p["name"] for p in projects if p["name"].startswith("ray-cai-doctor-")]


def test_doctor_local_passes_every_check(workspace: WorkspaceHandle) -> None:
    done = run_cli(["doctor", "--local", "--json"], cwd=REPO_ROOT, env=cli_env(workspace), timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"]} == set(ALL_CHECKS)
    not_ok = [c for c in report["checks"] if c["status"] != "ok"]
    assert not not_ok, not_ok
    assert all("local workspace" in c["detail"] or c["name"] == "api-key-is-valid" for c in report["checks"])
    # The fsync check names the project's filesystem (RocksDB, head fault tolerance's store: ext4 upstream).
    fsync = next(c for c in report["checks"] if c["name"] == FSYNC)
    assert f" on {filesystem_of(workspace.home)} at /" in fsync["detail"], fsync
    assert doctor_projects(workspace) == []


def filesystem_of(path: Path) -> str:
    """The type of the filesystem `path` is on (the longest mount point that holds it)."""
    here = str(path.resolve())
    mounts = [
        p
        for p in psutil.disk_partitions(all=True)
        if here == p.mountpoint or here.startswith(p.mountpoint.rstrip("/") + "/")
    ]
    return max(mounts, key=lambda p: len(p.mountpoint)).fstype


def test_doctor_warns_when_app_urls_refuse_websockets(controls: WorkspaceHandle) -> None:
    controls.set_app_urls(websocket_upgrades=False)
    done = run_cli(["doctor", "--local"], cwd=REPO_ROOT, env=cli_env(controls), timeout=600)
    assert done.returncode == 0, done.stderr  # a warning does not block the tool
    row = next(line for line in done.stdout.splitlines() if WEBSOCKET in line)
    assert "warn" in row and "403" in done.stdout
    assert "polls job logs over HTTP" in " ".join(done.stdout.split())
    assert doctor_projects(controls) == []
