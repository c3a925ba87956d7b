"""Secrets stay secret through the whole local flow: `deploy --local`, `status`, `connect`, `dashboard`,
`job ...`, `logs`, a crash of the workspace under the ready cluster, `down`.

A workspace in its own home with a recognisable API key (set in its state file before it starts), a
recognisable GH_PAT in the environment, and the Ray token read from `.ray-cai/<cluster>/auth_token`.
Login codes (printed by `dashboard` only) are secrets too. None may appear in any (other)
stdout/stderr, any file under the workspace's logs, `ray_cluster_info.json`, any job or application
`environment` the API returns, or an error message; the token file is 0600.

The same run (its workspace is its own, so it may die) is where the ready real-Ray cluster survives a
crash of the workspace: `kill -9` of the server, then `ray-cai workspace start`: `status` shows the same
ready cluster with the same apps and the same raylets, and `down` leaves no process of the workspace's.
The workspace-only crash cases are in tests/workspace/test_workspace_crash.py.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from support.fakes import RAY_CAI, clone_with_small_cluster, wait_until

from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace, workspace_info
from ray_serve_cai.workspace.processes import WORKSPACE_MARKER
from ray_serve_cai.workspace.statefile import read_state, write_state
from ray_serve_cai.workspace.testing import WorkspaceHandle

CLUSTER = "secretsc"
PROJECT = "ray-cai-secrets"


def environments(handle: WorkspaceHandle, project_id: str) -> list[str]:
    """The raw `environment` of every job and application, as the API returns them."""
    found = []
    base = f"/api/v2/projects/{project_id}"
    for kind in ("jobs", "applications"):
        for item in handle.api_ok("GET", f"{base}/{kind}", params={"page_size": 1000})[kind]:
            found.append(json.dumps(item.get("environment")))
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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


def survive_a_crash(
    handle: WorkspaceHandle,
    home: Path,
    project_id: str,
    ray_cai: Callable[..., subprocess.CompletedProcess[str]],
    target: tuple[str, ...],
) -> WorkspaceHandle:
    """`kill -9` of the workspace server under the ready cluster (1 head + 1 worker), then `ray-cai
    workspace start`: the same ready cluster, the same apps, the same raylets. Returns the handle of
    the restarted workspace. (Was tests/ray/test_workspace_crash_ray.py, with its own cluster.)"""
    apps_path = f"/api/v2/projects/{project_id}/applications"
    before = {a["subdomain"]: a["id"] for a in handle.api_ok("GET", apps_path)["applications"]}
    tag = read_state(home)["workspace_tag"]
    raylets = _raylets(tag)
    assert len(raylets) == 2, raylets
    pid = handle.info.pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), timeout=10, what="the killed server to be gone")
    handle.close()
    assert _raylets(tag) == raylets  # the cluster does not notice

    started = ray_cai("workspace", "start", timeout=60)
    assert started.returncode == 0, started.stderr
    status = ray_cai("status", *target, "--json")
    assert status.returncode == 0, f"{status.stderr}\n{status.stdout}"
    described = json.loads(status.stdout)
    assert described["state"] == "ready" and described["ray"]["alive_nodes"] == 2, described
    info = workspace_info(home)
    assert info is not None and info.pid != pid
    handle = WorkspaceHandle(info)
    after = {a["subdomain"]: a["id"] for a in handle.api_ok("GET", apps_path)["applications"]}
    assert after == before
    assert _raylets(tag) == raylets
    return handle


def test_no_secret_leaks_through_the_local_flow_nor_a_workspace_crash(tmp_path: Path) -> None:
    api_key = f"APIKEY-{secrets.token_hex(12)}-MARK"
    gh_pat = f"ghp_PATMARK{secrets.token_hex(12)}"
    home = tmp_path / "ws-home"
    write_state(home, {"api_key": api_key, "home": str(home)})  # the workspace keeps a key it finds
    repo = clone_with_small_cluster(tmp_path / "repo", CLUSTER, workers=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_", "GITHUB_"))}
    env.update(
        RAY_CAI_WORKSPACE_HOME=str(home),
        CML_PROJECT_NAME=PROJECT,
        GH_PAT=gh_pat,
        FORCE_REBUILD="false",
        COLUMNS="200",
    )

    info = start_workspace(home)
    handle = WorkspaceHandle(info)
    outputs: list[str] = []
    token = ""
    try:
        assert info.api_key == api_key
        # The project exists before `deploy` (it finds it by name), created from this clone.
        project = handle.api_ok(
            "POST",
            "/api/v2/projects",
            json={
                "name": PROJECT,
                "git_url": str(repo),  # the spec's way: a git URL, no template
                "default_project_engine_type": "legacy_engine",
            },
        )
        handle.wait_for(
            lambda: handle.api_ok("GET", f"/api/v2/projects/{project['id']}"),
            lambda p: p["creation_status"] != "creating",
            timeout=120,
            what="project clone",
        )
        project_dir = handle.project_dir(project["id"])

        def ray_cai(
            *args: str, timeout: float = 900, record: bool = True
        ) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run(
                [*RAY_CAI, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
            )
            if record:
                outputs.extend([proc.stdout, proc.stderr])
            return proc

        started = time.monotonic()
        deployed = ray_cai("deploy", "--local", "--json")
        assert deployed.returncode == 0, f"deploy failed:\n{deployed.stderr}\n{deployed.stdout}"
        print(f"\nsecrets: deploy took {time.monotonic() - started:.0f}s")
        token_path = project_dir / ".ray-cai" / CLUSTER / "auth_token"
        token = token_path.read_text().strip()
        assert len(token) >= 16
        assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
        for args in (
            ("status", "--local"),
            ("status", "--local", "--json"),
            ("connect", "--local"),
            ("connect", "--local", "--json"),
        ):
            proc = ray_cai(*args, "-p", PROJECT, "-c", "ray_cluster_config.yaml")
            assert proc.returncode == 0, f"{args}: {proc.stderr}"
        # `dashboard` is the one command that prints a login code: none may show up anywhere else.
        login_codes = []
        for args in (("dashboard", "--local", "--json"), ("dashboard", "--local")):
            proc = ray_cai(*args, "-p", PROJECT, "-c", "ray_cluster_config.yaml", record=False)
            assert proc.returncode == 0, f"{args}: {proc.stderr}"
            url = json.loads(proc.stdout)["url"] if "--json" in args else proc.stdout.splitlines()[-1]
            login_codes.append(url.split("code=", 1)[1])
            assert api_key not in proc.stdout + proc.stderr and gh_pat not in proc.stdout + proc.stderr
        assert len(login_codes[0]) >= 32 and login_codes[0] != login_codes[1]
        target = ("--local", "-p", PROJECT, "-c", "ray_cluster_config.yaml")
        for args, code in (
            (
                ("job", "submit", *target, "--submission-id", "secret-job", "--", "python", "-c", "print(1)"),
                0,
            ),
            (("job", "status", "secret-job", *target, "--json"), 0),
            (("job", "logs", "secret-job", *target), 0),
            (("job", "list", *target, "--json"), 0),
            (("job", "status", "no-such-job", *target), 1),
            (("logs", *target, "--list", "--json"), 0),
            (("logs", *target, "--tail", "200"), 0),
        ):
            proc = ray_cai(*args)
            assert proc.returncode == code, f"{args}: {proc.stderr}"
        env_texts = environments(handle, project["id"])
        bad = ray_cai("up", "--local", "-p", PROJECT, "-c", "missing.yaml")  # an error message too
        assert bad.returncode == 2

        handle = survive_a_crash(handle, home, project["id"], ray_cai, target)
        tag = read_state(home)["workspace_tag"]
        down = ray_cai("down", *target)
        assert down.returncode == 0, down.stderr
        wait_until(lambda: not _tagged(tag), timeout=30, what="every process of the cluster to end")
        assert _raylets(tag) == set()
        env_texts += environments(handle, project["id"])

        places: dict[str, str] = {f"output {i}": text for i, text in enumerate(outputs)}
        places |= {f"environment {i}": text for i, text in enumerate(env_texts)}
        for log in [*sorted((home / "logs").rglob("*")), home / "server.log"]:
            if log.is_file():
                places[str(log)] = log.read_text(errors="replace")
        places["ray_cluster_info.json"] = (project_dir / "ray_cluster_info.json").read_text()
        for log in sorted((project_dir / ".ray-cai").rglob("*")):
            if log.is_file() and log.name != "auth_token" and log.stat().st_size < 5_000_000:
                places[str(log)] = log.read_text(errors="replace")
        found = [
            f"{name} in {where}"
            for where, text in places.items()
            for name, secret in (
                ("API key", api_key),
                ("GH_PAT", gh_pat),
                ("Ray token", token),
                *(("login code", code) for code in login_codes),
            )
            if secret in text
        ]
        print(f"secrets: checked {len(places)} places, {len(found)} secrets found")
        assert not found, found
    finally:
        handle.close()
        stop_workspace(home)
