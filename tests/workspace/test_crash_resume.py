"""Crash and resume: a `ray-cai` process killed (SIGKILL) in the middle of `up`, `deploy` and `down`,
then run again, must converge: exactly the desired apps/jobs, no duplicate, no lock left.

Kill points are deterministic: the workspace holds the N-th API request under a path prefix for a while
(`hang_on_request`/`hang_seconds`, a test control); the test waits until that request hangs, then kills
the client. The held request is still served afterwards (it reached the server, its answer is lost),
the nastiest moment to die. Also: two `up` at once on one cluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.fakes import (
    RAY_CAI,
    cli_env,
    client_for,
    desired_names,
    fake_cluster_spec,
    fake_cluster_yaml,
    fake_project,
    inventory,
    job_duplicates,
    list_apps,
    run_cli,
    wait_until,
)

from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.cluster.errors import LockHeld
from ray_serve_cai.workspace.testing import WorkspaceHandle

HANG_SECONDS = 1.5
RESUME_TIMEOUT = 60.0
# A run killed while it holds the cluster lock leaves the lock app behind; the resumed run must take it
# over because its holder's process is gone (test_resume_takes_over_the_lock_of_a_killed_run). With True
# the test removes such a lock by hand first (as the LockHeld message tells a user to); with False (now)
# the resumed run has to deal with it. Either way it is counted.
KNOWN_STALE_LOCK = False

JOBS_YAML = """\
project:
  name: {project}
jobs:
  first: {{name: Crash First, script: job_quick.py, cpu: 0.5, memory: 0.5}}
  second: {{name: Crash Second, script: job_quick.py, cpu: 0.5, memory: 0.5, parent_job_key: first}}
  third: {{name: Crash Launch, script: launch_fake.py, cpu: 0.5, memory: 0.5, parent_job_key: second}}
"""
# The last job brings the cluster of fake nodes up from inside the workspace, as the real launch job does.
LAUNCH_SCRIPT = """\
import subprocess, sys
cmd = [sys.executable, "-m", "ray_serve_cai.cli.main", "up", "-c", "cluster.yaml", "--timeout", "60"]
sys.exit(subprocess.call(cmd))
"""
JOB_NAMES = ["Crash First", "Crash Second", "Crash Launch"]


@dataclass
class Figures:
    kill_points: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)
    stale_locks: list[str] = field(default_factory=list)  # lock apps left by a killed run


FIGURES = Figures()


@pytest.fixture(scope="module")
def figures() -> Iterator[Figures]:
    yield FIGURES
    print(
        f"\ncrash summary: kill_points={len(FIGURES.kill_points)} survived={len(FIGURES.survived)} "
        f"stale_locks_left_by_killed_runs={len(FIGURES.stale_locks)} "
        f"({'removed by hand' if KNOWN_STALE_LOCK else 'taken over by the resumed run'}) "
        f"{FIGURES.stale_locks}"
    )


def git_repo(path: Path, project: str, cluster: str) -> Path:
    """A checkout to deploy from: jobs file, cluster config, the trivial job script."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "jobs.yaml").write_text(JOBS_YAML.format(project=project))
    (path / "cluster.yaml").write_text(fake_cluster_yaml(cluster, 1))
    (path / "job_quick.py").write_text("print('job ok')\n")
    (path / "launch_fake.py").write_text(LAUNCH_SCRIPT)
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.email", "crash@example.invalid"],
        ["config", "user.name", "crash"],
        ["add", "."],
        ["commit", "-qm", "crash test"],
    ):
        subprocess.run(["git", "-C", str(path), *args], check=True)
    return path


def kill_at(
    workspace: WorkspaceHandle, args: list[str], *, cwd: Path, env: dict[str, str], prefix: str, nth: int
) -> str:
    """Start `ray-cai args`, hold the `nth` request under `prefix`, SIGKILL the tool while it waits.
    Returns the tool's output so far (for the report)."""
    workspace.set_faults(paths=prefix, hang_on_request=nth, hang_seconds=HANG_SECONDS)
    process = subprocess.Popen(
        [*RAY_CAI, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: (
                workspace.api_ok("GET", "/_workspace/faults")["injected"].get("hang", 0) >= 1
                or process.poll() is not None
            ),
            timeout=60,
            what=f"request {nth} under {prefix} to hang",
        )
        assert process.poll() is None, f"ray-cai {args[0]} ended before request {nth}: {process.stdout}"
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=30)
    time.sleep(HANG_SECONDS + 0.3)  # the held request is served now, after its client died
    workspace.clear_faults()
    return output


def lock_left(workspace: WorkspaceHandle, project_id: str, cluster: str) -> bool:
    return f"ray-{cluster}-lock" in {a["subdomain"] for a in list_apps(workspace, project_id)}


def remove_stale_lock(
    workspace: WorkspaceHandle, project_id: str, cluster: str, figures: Figures, what: str
) -> None:
    lock = f"ray-{cluster}-lock"
    for app in list_apps(workspace, project_id):
        if app["subdomain"] == lock:
            figures.stale_locks.append(what)
            if KNOWN_STALE_LOCK:
                workspace.api_ok("DELETE", f"/api/v2/projects/{project_id}/applications/{app['id']}")


def resume_ok(args: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = run_cli(args, cwd=cwd, env=env, timeout=RESUME_TIMEOUT)
    assert result.returncode == 0, (
        f"resumed `ray-cai {' '.join(args)}` failed:\n{result.stderr}\n{result.stdout}"
    )
    assert "Traceback" not in result.stderr
    return result


def assert_converged(
    workspace: WorkspaceHandle, project_id: str, cluster: str, expected: list[str], what: str
) -> None:
    found = inventory(workspace, project_id, cluster, expected)
    assert found.clean, f"after resuming {what}: {found}"


# `up` of head + 2 workers (legacy-engine project) sends: 1 GET projects, 2 GET apps, 3 GET runtimes,
# 4 POST lock app, 5 GET apps (under the lock), 6-8 POST node apps (in parallel), 9 DELETE lock, 10+ GET apps.
UP_KILL_POINTS = {
    2: "observing",
    4: "lock create",
    5: "under lock",
    6: "node create",
    9: "lock release",
    10: "waiting",
}
# `down` sends: 1 GET projects, 2 GET apps, 3 POST lock (its runtime is the apps' own: no runtime
# list), 4 GET apps (under the lock), 5-7 DELETE nodes (a running app is deleted directly), 8 DELETE lock.
DOWN_KILL_POINTS = {2: "before the lock", 3: "lock create", 5: "deleting", 8: "lock release"}
# `deploy` requests under /projects/<id>/jobs: 1 list, 2-4 POST jobs, 5 latest run, 6 POST run, 7+ following.
DEPLOY_KILL_POINTS = {3: "job create", 6: "run create", 8: "following the chain"}


def kill_points(points: dict[int, str]) -> list[int]:
    return sorted(points)


@pytest.mark.parametrize("nth", kill_points(UP_KILL_POINTS))
def test_up_killed_then_resumed(
    nth: int, controls: WorkspaceHandle, figures: Figures, project_files: Path, tmp_path: Path
) -> None:
    what = f"up killed at request {nth} ({UP_KILL_POINTS[nth]})"
    figures.kill_points.append(what)
    cluster = f"cu{nth}"
    (tmp_path / "c.yaml").write_text(fake_cluster_yaml(cluster, 2))
    with fake_project(controls, f"crash-up-{nth}", project_files) as project:
        args = ["up", "--project", project["name"], "-c", "c.yaml", "--timeout", "30"]
        env = cli_env(controls)
        kill_at(controls, args, cwd=tmp_path, env=env, prefix="/api/v2/", nth=nth)
        remove_stale_lock(controls, project["id"], cluster, figures, what)
        resume_ok(args, cwd=tmp_path, env=env)
        assert_converged(controls, project["id"], cluster, desired_names(fake_cluster_spec(cluster, 2)), what)
        resume_ok(["down", "--project", project["name"], "-c", "c.yaml"], cwd=tmp_path, env=env)
    figures.survived.append(what)


@pytest.mark.parametrize("nth", kill_points(DOWN_KILL_POINTS))
def test_down_killed_then_resumed(
    nth: int, controls: WorkspaceHandle, figures: Figures, project_files: Path, tmp_path: Path
) -> None:
    what = f"down killed at request {nth} ({DOWN_KILL_POINTS[nth]})"
    figures.kill_points.append(what)
    cluster = f"cd{nth}"
    (tmp_path / "c.yaml").write_text(fake_cluster_yaml(cluster, 2))
    with (
        fake_project(controls, f"crash-down-{nth}", project_files) as project,
        client_for(controls) as client,
    ):
        _, status = RayCluster(client, project["id"], fake_cluster_spec(cluster, 2), poll_interval=0.2).up(
            timeout=30
        )
        assert status.ready
        args = ["down", "--project", project["name"], "-c", "c.yaml"]
        env = cli_env(controls)
        kill_at(controls, args, cwd=tmp_path, env=env, prefix="/api/v2/", nth=nth)
        remove_stale_lock(controls, project["id"], cluster, figures, what)
        resume_ok(args, cwd=tmp_path, env=env)
        assert_converged(controls, project["id"], cluster, [], what)
    figures.survived.append(what)


@pytest.mark.parametrize("nth", sorted(DEPLOY_KILL_POINTS))
def test_deploy_killed_then_resumed(
    nth: int, controls: WorkspaceHandle, figures: Figures, project_files: Path, tmp_path: Path
) -> None:
    what = f"deploy killed at jobs request {nth} ({DEPLOY_KILL_POINTS[nth]})"
    figures.kill_points.append(what)
    name, cluster = f"crash-deploy-{nth}", f"cj{nth}"
    repo = git_repo(tmp_path / "repo", name, cluster)
    with fake_project(controls, name, project_files) as project:
        for file in ("cluster.yaml", "launch_fake.py"):
            (controls.project_dir(project["id"]) / file).write_text((repo / file).read_text())
        args = ["deploy", "--jobs", "jobs.yaml", "-c", "cluster.yaml", "--json", "--timeout", "60"]
        env = cli_env(controls)
        kill_at(controls, args, cwd=repo, env=env, prefix=f"/api/v2/projects/{project['id']}/jobs", nth=nth)
        result = resume_ok(args, cwd=repo, env=env)
        duplicates, mismatch = job_duplicates(controls, project["id"], JOB_NAMES)
        assert not duplicates and not mismatch, f"after resuming {what}: {duplicates} {mismatch}"
        assert '"succeeded": true' in result.stdout
        for job in controls.api_ok("GET", f"/api/v2/projects/{project['id']}/jobs")["jobs"]:
            runs = controls.api_ok("GET", f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs")[
                "job_runs"
            ]
            active = [
                r for r in runs if r["status"] not in ("ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_STOPPED")
            ]
            assert not active, f"{job['name']} still has runs going: {active}"
            assert runs and runs[-1]["status"] == "ENGINE_SUCCEEDED", f"{job['name']}: {runs}"
        assert_converged(controls, project["id"], cluster, desired_names(fake_cluster_spec(cluster, 1)), what)
    figures.survived.append(what)


def test_resume_takes_over_the_lock_of_a_killed_run(
    controls: WorkspaceHandle, project_files: Path, tmp_path: Path
) -> None:
    cluster = "cstale"
    (tmp_path / "c.yaml").write_text(fake_cluster_yaml(cluster, 1))
    with fake_project(controls, "crash-stale-lock", project_files) as project:
        args = ["up", "--project", project["name"], "-c", "c.yaml", "--timeout", "30"]
        env = cli_env(controls)
        kill_at(controls, args, cwd=tmp_path, env=env, prefix="/api/v2/", nth=5)  # lock held, observing
        assert lock_left(controls, project["id"], cluster), "the kill point should leave the lock behind"
        # The dead run's lock would expire only after its TTL (120 s): the resumed run removes it at once
        # because its holder is gone (and says so), well within the deadline below on a loaded machine.
        try:
            result = run_cli(args, cwd=tmp_path, env=env, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("the resumed `up` was still waiting for the dead run's lock after 90 s")
        assert result.returncode == 0, result.stderr
        assert "removing the stale lock of cluster cstale" in result.stderr, result.stderr
        assert_converged(controls, project["id"], cluster, desired_names(fake_cluster_spec(cluster, 1)), "up")


def test_two_ups_at_once_create_no_duplicates(
    controls: WorkspaceHandle, project_files: Path, tmp_path: Path
) -> None:
    """Run A holds the lock (its observation under the lock is held 2 s); B starts meanwhile: B waits for
    the lock and then finds nothing to do; a third run with a short lock wait names A as the holder."""
    cluster = "ctwo"
    (tmp_path / "c.yaml").write_text(fake_cluster_yaml(cluster, 2))
    with fake_project(controls, "crash-two-ups", project_files) as project, client_for(controls) as client:
        args = ["up", "--project", project["name"], "-c", "c.yaml", "--timeout", "30", "--json"]
        env = cli_env(controls)
        controls.set_faults(paths="/api/v2/", hang_on_request=5, hang_seconds=3.0)
        first = subprocess.Popen(
            [*RAY_CAI, *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        second: subprocess.Popen[str] | None = None
        try:
            wait_until(
                lambda: controls.api_ok("GET", "/_workspace/faults")["injected"].get("hang", 0) >= 1,
                timeout=30,
                what="the first run to hold the lock",
            )
            second = subprocess.Popen(
                [*RAY_CAI, *args],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            with pytest.raises(LockHeld) as held:
                RayCluster(client, project["id"], fake_cluster_spec(cluster, 3), lock_wait=0.5).up(timeout=5)
            assert f"pid {first.pid}" in str(held.value) and "ray-ctwo-lock" in str(held.value)
            _, err_a = first.communicate(timeout=60)
            out_b, err_b = second.communicate(timeout=60)
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
            controls.clear_faults()
        assert first.returncode == 0, err_a
        assert second.returncode == 0, err_b
        summary_b = _plan_summary(out_b)
        assert summary_b["create"] == 0, f"the second run created apps too: {summary_b}"
        assert_converged(
            controls, project["id"], cluster, desired_names(fake_cluster_spec(cluster, 2)), "two ups"
        )
        RayCluster(client, project["id"], fake_cluster_spec(cluster, 2)).down()


def _plan_summary(stdout: str) -> dict[str, Any]:
    import json

    return dict(json.loads(stdout)["plan"]["summary"])
