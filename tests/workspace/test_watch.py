"""Self-healing: `RayCluster.watch` (and `ray-cai up --watch`) restarts a dead worker, a dead head and an
app stuck in STARTING past `startup_timeout`, within about one interval."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from support.fakes import (
    RAY_CAI,
    cli_env,
    client_for,
    fake_cluster_spec,
    fake_cluster_yaml,
    fake_project,
    list_apps,
    run_cli,
    wait_until,
)

from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.config import parse_deploy_spec
from ray_serve_cai.deploy.orchestrator import DeployOptions, deploy
from ray_serve_cai.workspace.testing import WorkspaceHandle

INTERVAL = 1.0
# Deadlines of the waits below, generous for a loaded machine: how fast the watch heals is measured by
# benchmarks/bench_deadlines.py (target: one interval plus the restart itself, within INTERVAL + 4 s).
HEAL_DEADLINE = 60.0
RUNS_ROUTE = "POST /api/v2/projects/{project_id}/jobs/{job_id}/runs"
RESTART_ROUTE = "POST /api/v2/projects/{project_id}/applications/{application_id}:restart"


def app_by_name(workspace: WorkspaceHandle, project_id: str, name: str) -> dict[str, Any]:
    return next(a for a in list_apps(workspace, project_id) if a["subdomain"] == name)


def kill(pid: int) -> None:
    """SIGKILL one process of a workload; in a pod, killing its init already ended the others."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def pids_of(workspace: WorkspaceHandle, app_id: str) -> list[int]:
    processes = workspace.api_ok("GET", "/_workspace/processes")["processes"]
    return [int(p["pid"]) for p in processes if p["workload_id"] == app_id]


def wait_running_again(
    workspace: WorkspaceHandle, project_id: str, name: str, old_pids: list[int], since: float
) -> float:
    """Seconds from `since` until the app runs again with a new process."""

    def healed() -> bool:
        app = app_by_name(workspace, project_id, name)
        pids = pids_of(workspace, app["id"])
        return app["status"] == "APPLICATION_RUNNING" and bool(pids) and not set(pids) & set(old_pids)

    workspace.wait_for(
        lambda: healed(), bool, timeout=HEAL_DEADLINE, interval=0.1, what=f"{name} to run again"
    )
    return time.monotonic() - since


class Watcher:
    """`RayCluster.watch` in a thread, stopped by `close()`."""

    def __init__(self, rc: RayCluster) -> None:
        self.stop = threading.Event()
        self.passes = 0
        self.actions: list[str] = []
        self.errors: list[BaseException] = []

        def on_pass(plan: Any, _status: Any) -> None:
            self.passes += 1
            self.actions += [a.describe() for a in plan.actions]

        def run() -> None:
            try:
                rc.watch(interval=INTERVAL, on_pass=on_pass, should_stop=self.stop.is_set)
            except BaseException as err:  # reported by the test
                self.errors.append(err)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "watch did not stop"
        assert not self.errors, f"watch raised: {self.errors!r}"


def test_watch_restarts_a_killed_worker_a_stopped_worker_and_a_killed_head(
    controls: WorkspaceHandle, project_files: Path
) -> None:
    with fake_project(controls, "watch-heal", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        spec = fake_cluster_spec("wheal", 2)
        _, status = RayCluster(client, pid, spec, poll_interval=0.2).up(timeout=30)
        assert status.ready
        with client_for(controls) as watch_client:
            watcher = Watcher(RayCluster(watch_client, pid, spec, poll_interval=0.2))
            try:
                timings: dict[str, float] = {}
                # 1. a worker's process is killed
                worker = app_by_name(controls, pid, "ray-wheal-worker-0")
                old = pids_of(controls, worker["id"])
                for process_id in old:
                    kill(process_id)
                timings["killed worker"] = wait_running_again(
                    controls, pid, worker["subdomain"], old, time.monotonic()
                )
                # 2. a worker is stopped through the API
                worker = app_by_name(controls, pid, "ray-wheal-worker-1")
                old = pids_of(controls, worker["id"])
                controls.api_ok("POST", f"/api/v2/projects/{pid}/applications/{worker['id']}:stop")
                timings["stopped worker"] = wait_running_again(
                    controls, pid, worker["subdomain"], old, time.monotonic()
                )
                # 3. the head's process is killed
                head = app_by_name(controls, pid, "ray-wheal-head")
                old = pids_of(controls, head["id"])
                for process_id in old:
                    kill(process_id)
                timings["killed head"] = wait_running_again(
                    controls, pid, head["subdomain"], old, time.monotonic()
                )
            finally:
                watcher.close()
        print(
            f"\nwatch healing times (interval {INTERVAL:g}s): "
            + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        )
        assert any("restart" in a for a in watcher.actions), watcher.actions
        _, status = RayCluster(client, pid, spec, poll_interval=0.2).up(timeout=30)
        assert status.ready and status.ray["alive_nodes"] == 3


def test_watch_leaves_a_failed_app_to_cmls_automatic_restart(
    controls: WorkspaceHandle, project_files: Path
) -> None:
    """With CML's automatic restart on (the workspace does it as CML does), a killed worker is
    restarted once, by the workspace, and the watch adds no restart of its own; with it off, the
    watch restarts the failed app itself once `cml_restart_wait` has passed."""
    with fake_project(controls, "watch-cml", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        spec = fake_cluster_spec("wcml", 1).model_copy(update={"cml_restart_wait": 20.0})
        _, status = RayCluster(client, pid, spec, poll_interval=0.2).up(timeout=30)
        assert status.ready
        worker = app_by_name(controls, pid, "ray-wcml-worker-0")
        controls.set_restart_policy(enabled=True, max_attempts=1, delay_seconds=2.0)
        with client_for(controls) as watch_client:
            watcher = Watcher(RayCluster(watch_client, pid, spec, poll_interval=0.2))
            try:
                controls.reset_counters()
                old = pids_of(controls, worker["id"])
                for process_id in old:
                    kill(process_id)
                controls.wait_for_app(pid, worker["id"], ["APPLICATION_FAILED"], timeout=10)
                healed = wait_running_again(controls, pid, worker["subdomain"], old, time.monotonic())
                passes = watcher.passes
                controls.wait_for(
                    lambda: watcher.passes, lambda n: n >= passes + 2, timeout=20, what="2 passes"
                )
                assert controls.counters()["counts"].get(RESTART_ROUTE, 0) == 0, watcher.actions
                attempts = controls.restart_policy()["attempts"]
                assert attempts.get(worker["id"]) == 1, attempts
                print(f"\nworker restarted by the workspace (CML's policy) after {healed:.1f}s; watch: none")

                # CML's restarts off (an administrator's choice): the watch acts after its wait.
                controls.set_restart_policy(enabled=False)
                short = spec.model_copy(update={"cml_restart_wait": 1.0})
                watcher.close()
                watcher = Watcher(RayCluster(watch_client, pid, short, poll_interval=0.2))
                old = pids_of(controls, worker["id"])
                for process_id in old:
                    kill(process_id)
                wait_running_again(controls, pid, worker["subdomain"], old, time.monotonic())
                assert controls.counters()["counts"].get(RESTART_ROUTE, 0) == 1
            finally:
                watcher.close()
                controls.set_restart_policy(enabled=False)
        RayCluster(client, pid, spec).down()


def test_watch_restarts_an_app_stuck_in_starting(controls: WorkspaceHandle, project_files: Path) -> None:
    with fake_project(controls, "watch-stuck", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        spec = fake_cluster_spec("wstuck", 1, startup_timeout=1.5)
        _, status = RayCluster(client, pid, spec, poll_interval=0.2).up(timeout=30)
        assert status.ready
        worker = app_by_name(controls, pid, "ray-wstuck-worker-0")
        controls.set_latency(app_start_seconds=30)  # every start now hangs in STARTING
        controls.api_ok("POST", f"/api/v2/projects/{pid}/applications/{worker['id']}:restart")
        controls.reset_counters()
        started = time.monotonic()
        with client_for(controls) as watch_client:
            watcher = Watcher(RayCluster(watch_client, pid, spec, poll_interval=0.2))
            try:
                controls.wait_for(
                    lambda: controls.counters()["counts"].get(RESTART_ROUTE, 0),
                    lambda n: n >= 1,
                    timeout=HEAL_DEADLINE,
                    interval=0.1,
                    what=f"watch to restart the stuck app (actions so far: {watcher.actions})",
                )
                restarted_after = time.monotonic() - started
            finally:
                watcher.close()
        # Only with the watch stopped: with `startup_timeout` 1.5 s it takes any start slower than that
        # (a new pod and a node process on a loaded machine) for a stuck one and restarts it again.
        controls.set_latency(app_start_seconds=0)
        controls.api_ok("POST", f"/api/v2/projects/{pid}/applications/{worker['id']}:restart")
        controls.wait_for_app(pid, worker["id"], ["APPLICATION_RUNNING"], timeout=30)
        print(f"\nstuck app restarted {restarted_after:.1f}s after it got stuck (startup_timeout 1.5s)")
        assert any("stuck in STARTING" in a for a in watcher.actions), watcher.actions


def test_up_watch_cli_heals_a_killed_worker_and_stops_on_sigterm(
    controls: WorkspaceHandle, project_files: Path, tmp_path: Path
) -> None:
    (tmp_path / "c.yaml").write_text(fake_cluster_yaml("wcli", 1))
    with fake_project(controls, "watch-cli", project_files) as project:
        pid = project["id"]
        args = [
            "up",
            "--project",
            project["name"],
            "-c",
            "c.yaml",
            "--watch",
            "--interval",
            "1",
            "--timeout",
            "30",
        ]
        log = tmp_path / "watch.err"
        with open(log, "w") as err_file:
            process = subprocess.Popen(
                [*RAY_CAI, *args],
                cwd=tmp_path,
                env=cli_env(controls),
                stdout=subprocess.DEVNULL,
                stderr=err_file,
            )
        try:
            # Kill only once `up` is done and watching: a failure during `up`'s own wait fails `up`.
            controls.wait_for(
                lambda: log.read_text(), lambda text: "watching cluster" in text, timeout=30, what="watching"
            )
            worker = app_by_name(controls, pid, "ray-wcli-worker-0")
            old = pids_of(controls, worker["id"])
            for process_id in old:
                kill(process_id)
            seconds = wait_running_again(controls, pid, worker["subdomain"], old, time.monotonic())
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        stderr = log.read_text()
        print(f"\n`ray-cai up --watch --interval 1` healed a killed worker in {seconds:.1f}s")
        assert process.returncode == 0, stderr
        assert "healed" in stderr and "stopped watching" in stderr
        assert "Traceback" not in stderr


def test_status_wait_reports_once_ready_and_gives_up_at_its_deadline(
    controls: WorkspaceHandle, project_files: Path, tmp_path: Path
) -> None:
    """`status --wait SECONDS` observes until the cluster is ready and then reports as `status` does
    (exit 0); a cluster that stays not ready gets the last status at the deadline (exit 1, said on
    stderr). It changes nothing: no application route is called."""
    (tmp_path / "c.yaml").write_text(fake_cluster_yaml("wait", 1))
    with fake_project(controls, "status-wait", project_files) as project:
        target = ["--project", project["name"], "-c", "c.yaml"]

        def ray_cai(*args: str) -> subprocess.CompletedProcess[str]:
            return run_cli([*args, *target], cwd=tmp_path, env=cli_env(controls), timeout=120)

        controls.set_latency(app_start_seconds=3)  # not ready at the first observation
        assert ray_cai("up", "--no-wait").returncode == 0
        controls.reset_counters()
        waited = ray_cai("status", "--wait", "60", "--json")
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["state"] == "ready"
        counts = controls.counters()["counts"]
        assert counts.get("GET /api/v2/projects/{project_id}/applications", 0) >= 2, counts  # it waited
        assert not [route for route in counts if route.startswith(("POST", "PATCH", "DELETE"))], counts

        worker = app_by_name(controls, project["id"], "ray-wait-worker-0")
        controls.api_ok("POST", f"/api/v2/projects/{project['id']}/applications/{worker['id']}:stop")
        controls.wait_for_app(project["id"], worker["id"], ["APPLICATION_STOPPED"], timeout=30)
        late = ray_cai("status", "--wait", "3")
        assert late.returncode == 1, late.stdout
        assert "not ready after waiting 3s" in late.stderr, late.stderr
        assert ray_cai("down").returncode == 0


def test_a_launch_job_with_watch_keeps_supervising(
    controls: WorkspaceHandle, project_files: Path, tmp_path: Path
) -> None:
    """`arguments: --watch N` on the launch job: deploy reports it SUPERVISING once the cluster is
    ready, the run keeps healing the cluster, and a deploy with nothing changed starts no new run."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "-C", str(repo), "init", "-q", "-b", "main"], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=w", "-c", "user.email=w@example.invalid", "commit", "-q",
         "--allow-empty", "-m", "x"],
        check=True,
    )  # fmt: skip
    (project_files / "launch.py").write_text(
        "import sys\nfrom ray_serve_cai.deploy.steps import main\nsys.exit(main('launch_ray_cluster'))\n"
    )
    launch = {"name": "Launch Supervising", "script": "launch.py", "arguments": "--watch 1", "timeout": 600}
    spec = parse_deploy_spec(
        {"project": {"name": "watch-supervise"}, "jobs": {"launch_ray_cluster": launch}}, env={}
    )
    cluster = fake_cluster_spec("wsup", 1)
    options = DeployOptions(repo=repo, poll_interval=0.5, project_timeout=30, chain_timeout=120)
    with fake_project(controls, "watch-supervise", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        first = deploy(client, spec, cluster, options)
        assert first.succeeded and first.jobs[0].status == "SUPERVISING", first.as_dict()
        job_id, run_id = first.jobs[0].job_id, first.jobs[0].run_id
        try:
            worker = app_by_name(controls, pid, "ray-wsup-worker-0")
            controls.api_ok("POST", f"/api/v2/projects/{pid}/applications/{worker['id']}:stop")
            wait_until(
                lambda: app_by_name(controls, pid, "ray-wsup-worker-0")["status"] == "APPLICATION_STOPPED",
                timeout=30,
                what="the worker to stop",
            )
            wait_until(
                lambda: RayCluster(client, pid, cluster).status().ready,
                timeout=HEAL_DEADLINE,
                what="the supervising launch job to heal the stopped worker",
            )
            before = controls.counters()["counts"].get(RUNS_ROUTE, 0)
            second = deploy(client, spec, cluster, options)
            assert second.succeeded and second.jobs[0].run_id == run_id
            assert controls.counters()["counts"].get(RUNS_ROUTE, 0) == before
        finally:
            controls.api_ok("POST", f"/api/v2/projects/{pid}/jobs/{job_id}/runs/{run_id}:stop")
            RayCluster(client, pid, cluster).down()
