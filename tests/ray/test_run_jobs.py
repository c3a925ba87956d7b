"""End to end with real Ray: a cluster per run, retries, deadlines, schedules, history after the nodes.

One cluster (`rj`: a head and one worker) is brought up once, by a `ray-cai run --local` that the test
SIGKILLs while its job runs; the cluster then serves the other cases before the same command, run
again, re-attaches to that run and tears the cluster down:

1. `run --driver-on head` of a job that prints a marker, the tool SIGKILLed while the job runs (the
   cluster stays);
2. `run --keep --max-retries 2` of a job exiting 3 → exit 1, the record shows 3 attempts;
3. `run --keep --timeout 10` of a 120 s job → exit 1, FAILED with the deadline as the reason;
4. a scheduled run (`deploy`'s CML job with a cron schedule) fires in the workspace and succeeds (the
   job is then deleted: it would fire every minute);
5. a deleted worker's logs are readable with `ray-cai logs` (kept in the project as they grew);
6. the command of (1) run again → re-attaches at once (one cluster, one job; the deleted worker is
   replaced meanwhile), exit 0 with the marker, tears the cluster down: no application of it is left,
   and `job logs ID` still shows the marker.

The cases share the cluster, so they run in file order; each says what it needs from earlier ones.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.fakes import RAY_CAI, REPO_ROOT, SMALL_CLUSTER_YAML, run_cli, wait_until

from ray_serve_cai.cluster.runtimes import choose_runtime
from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.config import parse_deploy_spec
from ray_serve_cai.deploy.schedules import ensure_scheduled_runs
from ray_serve_cai.workspace.testing import WorkspaceHandle

pytestmark = pytest.mark.ray

CLUSTER = "rj"
PROJECT = "ray-cai-e2e-run-jobs"
CONFIG_IN_PROJECT = "rj_cluster.yaml"
RELEASE_FILE = "release-rj"  # the first job waits for it (in the project directory, its cwd)
# Prints a marker, waits (at most 5 minutes) for the test to release it, prints another. Markers are
# printed as sums so the entrypoint Ray echoes into the log ("Running entrypoint ...") never holds them.
WAITING_JOB = (
    "import pathlib, time\n"
    "print('MARKER-' + 'BEFORE-KILL', flush=True)\n"
    f"for _ in range(600):\n    if pathlib.Path('{RELEASE_FILE}').exists(): break\n    time.sleep(0.5)\n"
    "print('MARKER-' + 'AFTER-REATTACH', flush=True)\n"
)
# Its driver on the head: case 5 deletes the worker while it runs (with `--driver-on auto` a head with
# fault tolerance, as in pods, puts the driver on that worker, and the job would die with it).
FIRST_RUN = ["run", "--driver-on", "head", "--", "python", "-c", WAITING_JOB]


class Lines:
    """A process's output collected by a thread, line by line, as it arrives."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            time.sleep(0.1)
        raise AssertionError(
            f"no line matching {pattern!r} within {timeout}s; got:\n" + "\n".join(self.lines[-30:])
        )

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Env:
    workspace: WorkspaceHandle
    config: Path
    env: dict[str, str]
    project_id: str = ""
    run_id: str = ""
    head_app_id: str = ""
    scheduled_job_id: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    def args(self, args: list[str]) -> list[str]:
        """ARGS with the target flags before a `--` in ARGS."""
        split = args.index("--") if "--" in args else len(args)
        return [*args[:split], "--local", "--project", PROJECT, "--config", str(self.config), *args[split:]]

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run_cli(self.args(list(args)), cwd=REPO_ROOT, env=self.env, timeout=timeout)

    def by_name(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A history command that names the cluster only (no config file needed)."""
        args_ = [*args, "--local", "--project", PROJECT, "--cluster", CLUSTER]
        return run_cli(args_, cwd=REPO_ROOT, env=self.env, timeout=120)

    def popen(self, *args: str) -> tuple[subprocess.Popen[str], Lines, Lines]:
        proc = subprocess.Popen(
            [*RAY_CAI, *self.args(list(args))], cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        return proc, Lines(proc.stdout), Lines(proc.stderr)

    def client(self) -> CMLClient:
        return CMLClient(CMLSettings(host=self.workspace.url, api_key=self.workspace.api_key))

    def apps(self) -> dict[str, dict[str, Any]]:
        listed = self.workspace.api_ok("GET", f"/api/v2/projects/{self.project_id}/applications")[
            "applications"
        ]
        return {a["name"]: a for a in listed if a["name"].startswith(f"ray-{CLUSTER}-")}

    def project_path(self, relative: str) -> Path:
        return self.workspace.project_dir(self.project_id) / relative

    def status(self, job_id: str) -> dict[str, Any]:
        proc = self.by_name("job", "status", job_id, "--json")
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout))


@pytest.fixture(scope="module")
def env(workspace: WorkspaceHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    config = tmp_path_factory.mktemp("run-jobs") / "ray_cluster_config.yaml"
    config.write_text(SMALL_CLUSTER_YAML.format(name=CLUSTER, workers=1))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_"))}
    base.update(RAY_CAI_WORKSPACE_HOME=str(workspace.home), COLUMNS="200", NO_COLOR="1")
    state = Env(workspace, config, base)
    try:
        yield state
    finally:
        if state.project_id and state.scheduled_job_id:
            workspace.api("DELETE", f"/api/v2/projects/{state.project_id}/jobs/{state.scheduled_job_id}")
        if state.project_id and state.apps():
            state.cli("down")


def test_run_brings_up_its_cluster_and_the_tool_can_be_killed(env: Env) -> None:
    proc, out, err = env.popen(*FIRST_RUN)
    try:
        found = err.wait_for(r"run (\w+): bringing up cluster 'rj' for job (run-\w+-\w+)", timeout=120)
        env.run_id, env.facts["first_job"] = found.group(1), found.group(2)
        out.wait_for("MARKER-BEFORE-KILL", timeout=600)  # the cluster is up and the job runs
        os.killpg(proc.pid, signal.SIGKILL)  # the tool dies without any chance to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with env.client() as client:
        env.project_id = client.find_project_by_name(PROJECT).id  # type: ignore[union-attr]
    apps = env.apps()
    assert set(apps) == {"ray-rj-head", "ray-rj-worker-0"}, apps
    env.head_app_id = apps["ray-rj-head"]["id"]
    marker = json.loads(env.project_path(f".ray-cai/{CLUSTER}/runs/{env.run_id}.json").read_text())
    assert marker["created_cluster"] is True and marker["record_id"] == env.facts["first_job"]


def test_scheduled_run_is_created_as_a_cml_job_with_its_schedule(env: Env) -> None:
    """Created now, fired within the next minute while the next cases run (checked in `..._fired`)."""
    with env.client() as client:
        client.upload_project_file(env.project_id, CONFIG_IN_PROJECT, env.config.read_bytes())
        spec = parse_deploy_spec(
            {
                "jobs": {"git_sync": {"name": "Git Sync", "script": "cai_integration/git_sync.py"}},
                "scheduled_runs": {
                    "every_minute": {
                        "name": "Scheduled Ray run",
                        "command": "python -c \"print('SCHEDULED-' + 'MARKER')\"",
                        "schedule": "* * * * *",
                        "cluster_config": CONFIG_IN_PROJECT,
                        "keep": True,  # the cluster belongs to the first run; this one only uses it
                    }
                },
            },
            env={},
        )
        runtime = choose_runtime(client.list_runtimes(), gpu=False)  # as `deploy` chooses one
        made = ensure_scheduled_runs(client, env.project_id, spec, runtime)
    env.scheduled_job_id = made.jobs["every_minute"].id
    env.facts["scheduled_at"] = time.monotonic()


def test_a_failing_job_is_retried_as_new_attempts_of_one_record(env: Env) -> None:
    job = "import sys; print('attempt-' + 'output'); sys.exit(3)"
    proc = env.cli("run", "--keep", "--max-retries", "2", "--", "python", "-c", job)
    assert proc.returncode == 1, proc.stderr
    assert "using the running cluster 'rj'" in proc.stderr and "stays up" in proc.stderr
    assert proc.stdout.count("attempt-output") == 3, proc.stdout
    record_id = re.search(r"job (run-\w+-\w+) FAILED after 3 attempts", proc.stderr)
    assert record_id, proc.stderr
    status = env.status(record_id.group(1))
    assert [a["submission_id"] for a in status["attempts"]] == [
        record_id.group(1),
        f"{record_id.group(1)}-retry1",
        f"{record_id.group(1)}-retry2",
    ]
    assert status["status"] == "FAILED" and all(a["status"] == "FAILED" for a in status["attempts"])
    assert status["max_retries"] == 2 and "@" in status["submitter"]
    # The head wrote the record into the project as the attempts ran: the same three attempts.
    on_disk = env.project_path(f".ray-cai/{CLUSTER}/jobs/{record_id.group(1)}/record.json")
    wait_until(lambda: len(json.loads(on_disk.read_text())["attempts"]) == 3, 30, 0.5, "the record on disk")


def test_the_deadline_stops_the_job_and_fails_it(env: Env) -> None:
    started = time.monotonic()
    proc = env.cli("run", "--keep", "--timeout", "10", "--", "python", "-c", "import time; time.sleep(120)",
                   timeout=90)  # fmt: skip  # "within a minute", with room for a loaded machine
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    record_id = re.search(r"job (run-\w+-\w+) FAILED: deadline", proc.stderr)
    assert record_id, proc.stderr
    print(f"\n--timeout 10 on a 120 s job: exit 1 after {took:.0f}s")
    status = env.status(record_id.group(1))
    assert status["status"] == "FAILED" and "deadline" in status["message"] and "10s" in status["message"]
    assert len(status["attempts"]) == 1, "a deadline is not retried"


def test_a_scheduled_run_fires_in_the_workspace(env: Env) -> None:
    project, job = env.project_id, env.scheduled_job_id

    def runs() -> list[dict[str, Any]]:
        return list(env.workspace.api_ok("GET", f"/api/v2/projects/{project}/jobs/{job}/runs")["job_runs"])

    wait_until(lambda: bool(runs()), timeout=90, interval=1, what="the schedule to fire")
    run = env.workspace.wait_for_run(project, job, runs()[0]["id"], timeout=300)
    log = Path(run["log_path"]).read_text()
    # Once is enough: the schedule fires every minute, and a later run's `up` would heal the worker
    # case 5 deletes before case 6 can. The job goes (`paused` is read-only in CML's UpdateJob).
    deleted = env.workspace.api("DELETE", f"/api/v2/projects/{project}/jobs/{job}")
    assert deleted.status_code == 200, deleted.text
    env.scheduled_job_id = ""
    assert run["status"] == "ENGINE_SUCCEEDED", log[-3000:]
    assert "SCHEDULED-MARKER" in log and "ray-cai run" in log, log[-3000:]


def test_a_deleted_workers_logs_are_read_from_the_project(env: Env) -> None:
    kept = env.project_path(f".ray-cai/{CLUSTER}/logs/ray-rj-worker-0/raylet.out")
    assert kept.stat().st_size > 0, "the worker keeps its logs in the project while it runs"
    worker = env.apps()["ray-rj-worker-0"]
    env.workspace.api_ok("DELETE", f"/api/v2/projects/{env.project_id}/applications/{worker['id']}")
    wait_until(lambda: "ray-rj-worker-0" not in env.apps(), 60, 0.5, "the worker app to be deleted")
    proc = env.by_name("logs", "worker-0", "--tail", "-1")
    assert proc.returncode == 0, proc.stderr
    assert "from the history kept in the project" in proc.stderr
    assert "raylet" in proc.stdout.lower() and len(proc.stdout) > 100, proc.stdout[-500:]
    listed = json.loads(env.by_name("logs", "worker-0", "--list", "--json").stdout)
    assert listed["source"] == "history" and "raylet.out" in listed["files"]


def test_the_same_command_reattaches_and_the_cluster_is_torn_down(env: Env) -> None:
    proc, out, err = env.popen(*FIRST_RUN)
    try:
        err.wait_for(rf"re-attaching to run {env.run_id} in progress", timeout=60)
        err.wait_for(rf"following job {env.facts['first_job']}", timeout=120)  # at once, the head answers
        err.wait_for(r"healing the cluster meanwhile: .*ray-rj-worker-0", timeout=120)  # the deleted worker
        assert env.apps()["ray-rj-head"]["id"] == env.head_app_id, "the same cluster, not a second one"
        env.project_path(RELEASE_FILE).write_text("go\n")
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out.thread.join(5)
    err.thread.join(5)
    assert code == 0, err.text
    assert "MARKER-BEFORE-KILL" in out.text and "MARKER-AFTER-REATTACH" in out.text
    assert "tore down cluster 'rj'" in err.text
    assert env.apps() == {}, "no application of the run's cluster is left"
    runs = [p.name for p in env.project_path(f".ray-cai/{CLUSTER}/jobs").iterdir() if env.run_id in p.name]
    assert runs == [env.facts["first_job"]], f"one job for the run, got {runs}"
    assert not env.project_path(f".ray-cai/{CLUSTER}/runs/{env.run_id}.json").exists()

    logs = env.by_name("job", "logs", env.facts["first_job"])
    assert logs.returncode == 0, logs.stderr
    assert "MARKER-BEFORE-KILL" in logs.stdout and "MARKER-AFTER-REATTACH" in logs.stdout
    assert "from the history kept in the project" in logs.stderr
    listed = json.loads(env.by_name("job", "list", "--json").stdout)["jobs"]
    first = next(j for j in listed if j["submission_id"] == env.facts["first_job"])
    assert first["status"] == "SUCCEEDED" and first["attempts"] == 1 and first["cluster"] == CLUSTER
