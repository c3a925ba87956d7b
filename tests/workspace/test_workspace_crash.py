"""The workspace survives its own crash: the server is SIGKILLed and started again on the same home.

Each test runs its own workspace (the session one must not die). After a restart the state is the
one the API last answered (SQLite), live workloads are re-adopted (same pids, routing, logs, stop and
delete work), dead ones are marked as CML would, and nothing tagged by the workspace is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from support.fakes import (
    RAY_CAI,
    cli_env,
    desired_names,
    fake_cluster_spec,
    fake_cluster_yaml,
    inventory,
    job_duplicates,
    run_cli,
    wait_until,
    write_fake_project_files,
)

from ray_serve_cai.workspace.daemon import (
    WorkspaceError,
    reset_workspace,
    start_workspace,
    stop_workspace,
    workspace_info,
)
from ray_serve_cai.workspace.processes import WORKLOAD_MARKER, WORKSPACE_MARKER
from ray_serve_cai.workspace.statefile import read_state
from ray_serve_cai.workspace.store import SCHEMA_VERSION, db_path
from ray_serve_cai.workspace.supervisor import LOST_REASON
from ray_serve_cai.workspace.testing import WorkspaceHandle

STOP_GRACE = 2.0


class Crashable:
    """A private workspace that a test may SIGKILL and start again. Started by `ray-cai workspace
    start`, as a user does: the server is then nobody's child here (init reaps it)."""

    def __init__(self, home: Path, *options: str) -> None:
        self.home = home
        self.options = ["--stop-grace-seconds", str(STOP_GRACE), *options]
        self.handle = self.start()

    def kill(self) -> None:
        """SIGKILL the server (its workloads keep running) and wait until it is gone."""
        pid = self.handle.info.pid
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), timeout=10, what="the killed server to be gone")
        self.handle.close()

    def start(self) -> WorkspaceHandle:
        args = ["workspace", "start", "--home", str(self.home), *self.options]
        started = run_cli(args, timeout=60)
        assert started.returncode == 0, started.stderr
        info = workspace_info(self.home)
        assert info is not None
        self.handle = WorkspaceHandle(info)
        return self.handle

    def stop(self) -> None:
        self.handle.close()
        stop_workspace(self.home)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def crashable(tmp_path: Path) -> Iterator[Crashable]:
    workspace = Crashable(tmp_path / "home", "--no-app-restart")
    try:
        yield workspace
    finally:
        workspace.stop()


def create_app(ws: WorkspaceHandle, project: dict[str, Any], subdomain: str, **fields: Any) -> dict[str, Any]:
    body = {"name": subdomain, "subdomain": subdomain, "script": "http_app.py", **fields}
    body.setdefault("runtime_identifier", ws.runtime_identifier())
    return ws.api_ok("POST", f"/api/v2/projects/{project['id']}/applications", json=body)


def app_path(project: dict[str, Any], app: dict[str, Any], suffix: str = "") -> str:
    return f"/api/v2/projects/{project['id']}/applications/{app['id']}{suffix}"


def app_call(ws: WorkspaceHandle, app: dict[str, Any], path: str) -> httpx.Response:
    """A request to the app with the bearer key: at its own URL (`url`, one listener per app) when
    the workspace gives one, else routed by `Host: <subdomain>.localhost`."""
    headers = {"Authorization": f"Bearer {ws.api_key}"}
    if app.get("url"):
        return httpx.get(f"{app['url']}{path}", headers=headers, timeout=30, trust_env=False)
    headers["Host"] = f"{app['subdomain']}.{ws.domain}"
    return httpx.get(f"http://127.0.0.1:{ws.port}{path}", headers=headers, timeout=30, trust_env=False)


def workload_pids(ws: WorkspaceHandle) -> dict[str, set[int]]:
    """Live tagged processes of the workspace, by workload id."""
    found: dict[str, set[int]] = {}
    for process in ws.api_ok("GET", "/_workspace/processes")["processes"]:
        found.setdefault(str(process["workload_id"]), set()).add(int(process["pid"]))
    return found


def wait_for_script(ws: WorkspaceHandle, workload_id: str, script: str) -> None:
    """Until a process of the workload runs `script`. A job run is ENGINE_RUNNING once its workload is
    spawned; in a pod its script is started a moment later by the pod's init."""

    def runs_script() -> bool:
        for pid in workload_pids(ws).get(workload_id, set()):
            with contextlib.suppress(psutil.Error):
                if any(script in arg for arg in psutil.Process(pid).cmdline()):
                    return True
        return False

    wait_until(runs_script, timeout=60, interval=0.1, what=f"{workload_id} to run {script}")


def kill_pids(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def kill_workload(ws: WorkspaceHandle, workload_id: str) -> None:
    kill_pids(workload_pids(ws).get(workload_id, set()))


def test_running_apps_are_readopted_after_a_crash(crashable: Crashable, test_apps_dir: Path) -> None:
    ws = crashable.handle
    project = ws.create_project("crash-apps", files_from=test_apps_dir)
    echo = create_app(ws, project, "crash-echo", environment={"APP_VAR": "kept"})
    tree = create_app(ws, project, "crash-tree", script="tree_app.py")
    doomed = create_app(ws, project, "crash-doomed")
    for app in (echo, tree, doomed):
        ws.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
    before = workload_pids(ws)
    tree_pids = ws.host_pids(
        tree["id"], json.loads((ws.project_dir(project["id"]) / f"tree-pids-{tree['id']}.json").read_text())
    )
    listed = ws.api_ok("GET", f"/api/v2/projects/{project['id']}/applications")["applications"]
    url, tag = ws.url, read_state(crashable.home)["workspace_tag"]

    crashable.kill()
    kill_pids(before[doomed["id"]])  # dies while no server watches it
    # A process tagged by this workspace that no record can explain (spawned, then the server died
    # before the pid was written): the restart must end it.
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, WORKSPACE_MARKER: tag, WORKLOAD_MARKER: "lost-workload"},
        start_new_session=True,
    )
    try:
        ws = crashable.start()
        assert ws.url == url, "a restart keeps the workspace's URL (workloads hold it in CDSW_API_URL)"
        wait_until(lambda: stray.poll() is not None, timeout=15, what="the unadoptable stray to be ended")
    finally:
        if stray.poll() is None:
            stray.kill()
        stray.wait()

    # Same projects, same applications (ids, order, fields); the live ones keep their processes.
    assert ws.api_ok("GET", "/api/v2/projects")["projects"][0]["id"] == project["id"]
    after = ws.api_ok("GET", f"/api/v2/projects/{project['id']}/applications")["applications"]
    assert [a["id"] for a in after] == [a["id"] for a in listed]
    for old, new in zip(listed, after, strict=True):
        if old["id"] != doomed["id"]:
            assert new == old
    failed = ws.wait_for_app(project["id"], doomed["id"], {"APPLICATION_FAILED"})
    assert "workspace server was down" in Path(failed["log_path"]).read_text()
    live = workload_pids(ws)
    assert live[echo["id"]] == before[echo["id"]] and live[tree["id"]] == before[tree["id"]]
    assert doomed["id"] not in live

    # Routing reaches the adopted app's port; its environment is the one it was started with.
    echoed = app_call(ws, echo, "/hello").json()
    assert echoed["path"] == "/hello" and echoed["env"]["APP_VAR"] == "kept"
    # An adopted app's end is still seen: it exits 3 → APPLICATION_FAILED.
    app_call(ws, echo, "/exit?code=3")
    ws.wait_for_app(project["id"], echo["id"], {"APPLICATION_FAILED"})
    # Stop of an adopted app ends its whole tree, including the grandchild that left its session.
    ws.api_ok("POST", app_path(project, tree, ":stop"))
    ws.wait_for_app(project["id"], tree["id"], {"APPLICATION_STOPPED"})
    assert not any(_alive(pid) for pid in tree_pids.values()), tree_pids
    # A re-adopted app restarts and deletes as usual.
    ws.api_ok("POST", app_path(project, doomed, ":restart"))
    ws.wait_for_app(project["id"], doomed["id"], {"APPLICATION_RUNNING"})
    for app in (echo, tree, doomed):
        assert ws.api_ok("DELETE", app_path(project, app)) == {}
    assert ws.processes() == []


def test_every_answered_change_survives_a_kill(crashable: Crashable, test_apps_dir: Path) -> None:
    """What the API answered is committed: kill -9 right after the last answer loses none of it."""
    ws = crashable.handle
    project = ws.create_project("crash-answers", files_from=test_apps_dir, environment={"P": "1"})
    jobs_path = f"/api/v2/projects/{project['id']}/jobs"
    runtime = ws.runtime_identifier()
    jobs = [
        ws.api_ok(
            "POST", jobs_path, json={"name": f"j{i}", "script": "job_ok.py", "runtime_identifier": runtime}
        )
        for i in range(10)
    ]
    patched = ws.api_ok("PATCH", f"{jobs_path}/{jobs[3]['id']}", json={"name": "renamed", "timeout": 7})
    assert ws.api_ok("DELETE", f"{jobs_path}/{jobs[5]['id']}") == {}
    crashable.kill()  # no pause: the last answer has just arrived
    ws = crashable.start()
    listed = ws.api_ok("GET", jobs_path, params={"page_size": 100})["jobs"]
    expected = [patched if j["id"] == patched["id"] else j for j in jobs if j["id"] != jobs[5]["id"]]
    assert listed == expected  # same ids, fields, creation order
    assert (
        ws.api_ok("GET", f"/api/v2/projects/{project['id']}")
        == ws.api_ok("GET", "/api/v2/projects")["projects"][0]
    )
    # New timestamps sort after the stored ones (the clock is restored).
    later = ws.api_ok(
        "POST", jobs_path, json={"name": "later", "script": "job_ok.py", "runtime_identifier": runtime}
    )
    assert later["created_at"] > max(j["updated_at"] for j in listed)


def test_a_job_run_is_readopted_or_marked_failed_never_running_forever(
    crashable: Crashable, test_apps_dir: Path
) -> None:
    ws = crashable.handle
    project = ws.create_project("crash-jobs", files_from=test_apps_dir)
    jobs_path = f"/api/v2/projects/{project['id']}/jobs"
    runtime = ws.runtime_identifier()

    def job(name: str, seconds: str, **fields: Any) -> dict[str, Any]:
        body = {"name": name, "script": "job_sleep.py", "runtime_identifier": runtime, **fields}
        environment = {"SLEEP_SECONDS": seconds, "UNTIL_FILE": "survivor.done"}
        return ws.api_ok("POST", jobs_path, json={**body, "environment": environment})

    # The survivor runs until the test lets it end (the file below), however long the restart takes.
    survivor = job("survivor", "120")
    child = job("child", "0", parent_job_id=survivor["id"])
    victim = job("victim", "60")
    survivor_run = ws.api_ok("POST", f"{jobs_path}/{survivor['id']}/runs", json={})
    victim_run = ws.api_ok("POST", f"{jobs_path}/{victim['id']}/runs", json={})
    for item, run in ((survivor, survivor_run), (victim, victim_run)):
        ws.wait_for_run(project["id"], item["id"], run["id"], {"ENGINE_RUNNING"})
        wait_for_script(ws, run["id"], "job_sleep.py")  # its whole process tree is there
    pids = workload_pids(ws)
    survivor_pids = pids[survivor_run["id"]]

    crashable.kill()
    kill_pids(pids[victim_run["id"]])
    ws = crashable.start()

    lost = ws.wait_for_run(project["id"], victim["id"], victim_run["id"], timeout=10)
    # Its exit code is unknown — or, in a pod whose init recorded it before it was killed too, SIGKILL's.
    assert lost["status"] == "ENGINE_FAILED"
    assert lost["failure_reason"] in (
        LOST_REASON,
        "script exited with code 137 while the workspace server was down",
    )
    # The survivor is still running in the same process, then ends with its real exit code, and its
    # dependent job runs as after any success.
    adopted = ws.api_ok("GET", f"{jobs_path}/{survivor['id']}/runs/{survivor_run['id']}")
    assert adopted["status"] == "ENGINE_RUNNING"
    # The same processes, not restarted (in a pod its script may have started after the snapshot).
    assert survivor_pids <= workload_pids(ws)[survivor_run["id"]]
    (ws.project_dir(project["id"]) / "survivor.done").write_text("")
    done = ws.wait_for_run(project["id"], survivor["id"], survivor_run["id"], timeout=30)
    assert done["status"] == "ENGINE_SUCCEEDED" and done["exit_code"] == 0
    child_runs = ws.wait_for(
        lambda: ws.api_ok("GET", f"{jobs_path}/{child['id']}/runs")["job_runs"], lambda runs: len(runs) == 1
    )
    assert ws.wait_for_run(project["id"], child["id"], child_runs[0]["id"])["status"] == "ENGINE_SUCCEEDED"
    assert ws.processes() == []


def test_stop_keeps_the_state_and_reset_deletes_it(crashable: Crashable, test_apps_dir: Path) -> None:
    ws = crashable.handle
    project = ws.create_project("crash-stop", files_from=test_apps_dir)
    app = create_app(ws, project, "stop-kept")
    ws.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
    pids = workload_pids(ws)[app["id"]]
    env = {**os.environ, "RAY_CAI_WORKSPACE_HOME": str(crashable.home)}
    stopped = run_cli(["workspace", "stop"], env=env, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_alive(pid) for pid in pids)

    ws = crashable.start()
    kept = ws.api_ok("GET", app_path(project, app))
    assert kept["status"] == "APPLICATION_STOPPED" and kept["stopped_at"]
    ws.api_ok("POST", app_path(project, app, ":restart"))
    ws.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})

    # A server killed, then `workspace stop`: the workloads end, and the next start shows them stopped.
    crashable.kill()
    pids = {int(p) for p in psutil.pids() if _has_marker(p, app["id"])}
    assert pids
    assert run_cli(["workspace", "stop"], env=env, timeout=60).returncode == 0
    assert not any(_alive(pid) for pid in pids)
    ws = crashable.start()
    assert ws.api_ok("GET", app_path(project, app))["status"] == "APPLICATION_STOPPED"

    refused = subprocess.run(  # an answer on stdin: a process of its own
        [*RAY_CAI, "workspace", "reset"], env=env, input="n\n", capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and workspace_info(crashable.home) is not None
    reset = run_cli(["workspace", "reset", "--yes"], env=env, timeout=60)
    assert reset.returncode == 0, reset.stderr
    assert workspace_info(crashable.home) is None
    ws = crashable.start()
    assert ws.api_ok("GET", "/api/v2/projects")["projects"] == []


def _has_marker(pid: int, workload_id: str) -> bool:
    try:
        return psutil.Process(pid).environ().get(WORKLOAD_MARKER) == workload_id
    except (psutil.Error, OSError):
        return False


def test_a_damaged_or_newer_database_is_refused_not_replaced(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    db_path(home).write_bytes(b"this is not an sqlite database, but it is somebody's data" * 100)
    with pytest.raises(WorkspaceError, match="damaged"):
        start_workspace(home, stop_grace_seconds=STOP_GRACE)
    assert db_path(home).read_bytes().startswith(b"this is not an sqlite database")

    db_path(home).unlink()
    with sqlite3.connect(db_path(home)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(WorkspaceError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        start_workspace(home, stop_grace_seconds=STOP_GRACE)
    # `stop` still works, and `reset` is the way out.
    assert stop_workspace(home) is False
    reset_workspace(home)
    assert not db_path(home).exists()
    info = start_workspace(home, stop_grace_seconds=STOP_GRACE)
    try:
        assert WorkspaceHandle(info).api_ok("GET", "/api/v2/projects")["projects"] == []
    finally:
        stop_workspace(home)


def test_a_failed_app_is_restarted_by_the_workspace_as_cml_does(tmp_path: Path, test_apps_dir: Path) -> None:
    """CML's restart policy with a short delay: a killed app is restarted once; when the attempts are
    used up it stays failed. Also after a crash: an app that died meanwhile is restarted."""
    workspace = Crashable(tmp_path / "home", "--app-restart-attempts", "1", "--app-restart-delay", "0.5")
    try:
        ws = workspace.handle
        project = ws.create_project("restarts", files_from=test_apps_dir)
        app = create_app(ws, project, "restarted")
        ws.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
        first = workload_pids(ws)[app["id"]]
        kill_workload(ws, app["id"])
        ws.wait_for_app(project["id"], app["id"], {"APPLICATION_FAILED"})
        pending = ws.api_ok("GET", "/_workspace/restart-policy")
        assert pending["pending"].keys() == {app["id"]} and pending["max_attempts"] == 1
        ws.wait_for(
            lambda: ws.api_ok("GET", app_path(project, app)),
            lambda a: a["status"] == "APPLICATION_RUNNING" and workload_pids(ws).get(app["id"]),
            what="the automatic restart",
        )
        assert workload_pids(ws)[app["id"]].isdisjoint(first)
        policy = ws.api_ok("GET", "/_workspace/restart-policy")
        assert policy["attempts"] == {app["id"]: 1} and policy["automatic_restarts"] == 1
        # Attempts used up: the next failure is final (the decision is made when FAILED is entered).
        kill_workload(ws, app["id"])
        ws.wait_for_app(project["id"], app["id"], {"APPLICATION_FAILED"})
        assert ws.api_ok("GET", "/_workspace/restart-policy")["pending"] == {}

        # A user's restart resets the count; the app dies while the server is down; the new server
        # marks it failed and restarts it.
        ws.api_ok("POST", app_path(project, app, ":restart"))
        ws.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
        pids = workload_pids(ws)[app["id"]]
        workspace.kill()
        kill_pids(pids)
        ws = workspace.start()
        ws.wait_for(
            lambda: ws.api_ok("GET", "/_workspace/restart-policy"),
            lambda p: p["automatic_restarts"] == 1,
            what="the restart of the app that died while the server was down",
        )
        ws.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
        assert (
            "workspace server was down"
            in Path(ws.api_ok("GET", app_path(project, app))["log_path"]).read_text()
        )
        # The policy can be switched off while it runs; unknown keys are refused.
        assert ws.set_restart_policy(enabled=False, delay_seconds=9)["enabled"] is False
        back = ws.api_ok("DELETE", "/_workspace/restart-policy")  # the start options again
        assert (back["enabled"], back["max_attempts"], back["delay_seconds"]) == (True, 1, 0.5)
        typo = ws.api("PUT", "/_workspace/restart-policy", json={"max_attempt": 2})
        assert typo.status_code == 400 and "max_attempt" in typo.json()["message"]
    finally:
        workspace.stop()


# ------------------------------------------------ (b) the server dies in the middle of up / deploy

JOBS_YAML = """\
project:
  name: {project}
jobs:
  first: {{name: Crash First, script: job_quick.py, cpu: 0.5, memory: 0.5}}
  launch: {{name: Crash Launch, script: launch_fake.py, cpu: 0.5, memory: 0.5, parent_job_key: first}}
"""
LAUNCH_SCRIPT = """\
import subprocess, sys
cmd = [sys.executable, "-m", "ray_serve_cai.cli.main", "up", "-c", "cluster.yaml", "--timeout", "60"]
sys.exit(subprocess.call(cmd))
"""


def _git_repo(path: Path, project: str, cluster: str) -> Path:
    write_fake_project_files(path)
    (path / "jobs.yaml").write_text(JOBS_YAML.format(project=project))
    (path / "cluster.yaml").write_text(fake_cluster_yaml(cluster, 1))
    (path / "launch_fake.py").write_text(LAUNCH_SCRIPT)
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.email", "crash@example.invalid"],
        ["config", "user.name", "crash"],
        ["add", "."],
        ["commit", "-qm", "server crash test"],
    ):
        subprocess.run(["git", "-C", str(path), *args], check=True)
    return path


def _no_orphans(ws: WorkspaceHandle) -> list[str]:
    """Tagged processes whose workload is not an active app or run of the workspace."""
    active: set[str] = set()
    for project in ws.api_ok("GET", "/api/v2/projects", params={"page_size": 100})["projects"]:
        base = f"/api/v2/projects/{project['id']}"
        for app in ws.api_ok("GET", f"{base}/applications", params={"page_size": 1000})["applications"]:
            if app["status"] in ("APPLICATION_STARTING", "APPLICATION_RUNNING"):
                active.add(app["id"])
        for job in ws.api_ok("GET", f"{base}/jobs", params={"page_size": 1000})["jobs"]:
            for run in ws.api_ok("GET", f"{base}/jobs/{job['id']}/runs")["job_runs"]:
                if run["status"] in ("ENGINE_STARTING", "ENGINE_RUNNING"):
                    active.add(run["id"])
    return sorted(set(workload_pids(ws)) - active)


@pytest.mark.parametrize("command", ["up", "deploy"])
def test_server_killed_in_the_middle_of_a_command_then_resumed(
    command: str, crashable: Crashable, tmp_path: Path
) -> None:
    """The server holds a request of `up` (a node create) or `deploy` (the run create) and is killed
    there; it starts again while the command retries; running the command again converges."""
    ws = crashable.handle
    cluster = f"srv{command}"
    name = f"server-crash-{command}"
    repo = _git_repo(tmp_path / "repo", name, cluster)
    project = ws.create_project(name, files_from=repo, default_project_engine_type="legacy_engine")
    if command == "up":
        args = ["up", "--project", name, "-c", "cluster.yaml", "--timeout", "60"]
        # 1 GET projects, 2 GET apps, 3 GET runtimes, 4 POST lock, 5 GET apps, 6-7 POST node apps
        ws.set_faults(paths="/api/v2/", hang_on_request=6, hang_seconds=60)
    else:
        args = ["deploy", "--jobs", "jobs.yaml", "-c", "cluster.yaml", "--json", "--timeout", "90"]
        # requests under /jobs: 1 list, 2-3 POST jobs, 4 latest run, 5 POST run
        ws.set_faults(paths=f"/api/v2/projects/{project['id']}/jobs", hang_on_request=5, hang_seconds=60)
    env = cli_env(ws)
    first = subprocess.Popen(
        [*RAY_CAI, *args], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_until(
            lambda: (
                ws.api_ok("GET", "/_workspace/faults")["injected"].get("hang", 0) >= 1
                or first.poll() is not None
            ),
            timeout=60,
            what=f"the held request of {command}",
        )
        assert first.poll() is None, first.communicate()[0]
        crashable.kill()
        ws = crashable.start()
        first.communicate(timeout=180)  # it may converge by its retries or give up: either is fine
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()

    resumed = run_cli(args, cwd=repo, env=env, timeout=180)
    assert resumed.returncode == 0, f"{resumed.stdout}\n{resumed.stderr}"
    expected = desired_names(fake_cluster_spec(cluster, 1))
    if command == "deploy":
        duplicates, mismatch = job_duplicates(ws, project["id"], ["Crash First", "Crash Launch"])
        assert not duplicates and not mismatch, (duplicates, mismatch)
    found = inventory(ws, project["id"], cluster, expected)
    assert found.clean, found
    assert _no_orphans(ws) == []
    down = run_cli(["down", "--project", name, "-c", "cluster.yaml"], cwd=repo, env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert ws.processes() == []
