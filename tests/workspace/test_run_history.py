"""Jobs that outlive their cluster, without Ray: the history kept in the project read through CML's
project-file API (`job list/status/logs`, `logs NODE` for a cluster that is gone), job schedules
firing in the workspace with a fake job script, `deploy`'s scheduled-run jobs, and bad input of
`run` / `job submit` (exit 2, the flag named, no API call)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support.fakes import cli_env, fake_project, run_cli, wait_until

from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.config import parse_deploy_spec
from ray_serve_cai.config.history import (
    META_ATTEMPT,
    META_MAX_RETRIES,
    META_RECORD,
    META_SUBMITTER,
    attempt_log_path,
    merge_job,
    node_logs_path,
    record_path,
)
from ray_serve_cai.deploy.schedules import ensure_scheduled_runs
from ray_serve_cai.workspace.testing import WorkspaceHandle

CLUSTER = "hist"
PROJECT = "run-history"


@pytest.fixture(scope="module")
def project(workspace: WorkspaceHandle, project_files: Path) -> Iterator[dict[str, Any]]:
    with fake_project(workspace, PROJECT, project_files) as created:
        yield created


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def row(submission_id: str, attempt: int, status: str, start: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "SUBMISSION",
        "submission_id": submission_id,
        "status": status,
        "entrypoint": "python train.py",
        "start_time": start,
        "end_time": start + 2000,
        "message": extra.pop("message", ""),
        "metadata": {
            META_RECORD: "train-1",
            META_ATTEMPT: str(attempt),
            META_SUBMITTER: "ana@laptop",
            META_MAX_RETRIES: "1",
        },
        **extra,
    }


def test_history_of_a_gone_cluster_through_the_project_file_api(
    workspace: WorkspaceHandle, project: dict[str, Any], tmp_path: Path
) -> None:
    """What a head left in the project (records in the format it writes, a worker's kept logs) is
    what `job list/status/logs` and `logs NODE` show once the cluster is gone, and they say so."""
    root = workspace.project_dir(project["id"])
    record = merge_job(None, CLUSTER, row("train-1", 1, "FAILED", 1_800_000_000_000, message="exit code 3"))
    record = merge_job(record, CLUSTER, row("train-1-retry1", 2, "SUCCEEDED", 1_800_000_010_000))
    write(root, record_path(CLUSTER, "train-1"), record.to_json())
    write(root, attempt_log_path(CLUSTER, "train-1", "train-1"), "first try\n")
    write(root, attempt_log_path(CLUSTER, "train-1", "train-1-retry1"), "second try: MARKER-OK\n")
    other = merge_job(None, CLUSTER, {**row("solo", 1, "STOPPED", 1_700_000_000_000), "metadata": {}})
    write(root, record_path(CLUSTER, "solo"), other.to_json())
    write(
        root,
        f"{node_logs_path(CLUSTER, 'ray-hist-worker-0')}/raylet.out",
        "".join(f"r{i}\n" for i in range(50)),
    )
    write(root, f"{node_logs_path(CLUSTER, 'ray-hist-worker-0')}/events/event_RAYLET.log", "{}\n")

    env = cli_env(workspace)
    target = ["--project", PROJECT, "--cluster", CLUSTER]

    def cli(*args: str) -> Any:
        proc = run_cli([*args, *target], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc

    listed = cli("job", "list", "--json")
    assert "from the history kept in the project" in listed.stderr, listed.stderr
    jobs = json.loads(listed.stdout)["jobs"]
    assert [j["submission_id"] for j in jobs] == ["solo", "train-1"], "oldest first"
    assert jobs[1] == {
        "submission_id": "train-1",
        "status": "SUCCEEDED",
        "entrypoint": "python train.py",
        "attempts": 2,
        "cluster": CLUSTER,
        "start_time": 1_800_000_000_000,
        "end_time": 1_800_000_012_000,
    }
    assert json.loads(cli("job", "list", "--history", "--json").stdout)["jobs"] == jobs

    status = json.loads(cli("job", "status", "train-1-retry1", "--json").stdout)
    assert status["source"] == "history" and status["submitter"] == "ana@laptop"
    assert [a["status"] for a in status["attempts"]] == ["FAILED", "SUCCEEDED"]
    plain = cli("job", "status", "train-1").stdout
    assert "attempts:   2 (max retries 1)" in plain and "exit code 3" in plain

    logs = cli("job", "logs", "train-1")
    assert logs.stdout == "first try\nsecond try: MARKER-OK\n"
    assert "--- attempt 2: train-1-retry1 SUCCEEDED" in logs.stderr
    assert cli("job", "logs", "train-1-retry1").stdout == "second try: MARKER-OK\n"

    node = cli("logs", "worker-0", "--tail", "3")
    assert node.stdout == "r47\nr48\nr49\n" and "from the history kept in the project" in node.stderr
    files = json.loads(cli("logs", "ray-hist-worker-0", "--list", "--json").stdout)
    assert files == {
        "node": "ray-hist-worker-0",
        "source": "history",
        "files": ["events/event_RAYLET.log", "raylet.out"],
    }

    missing = run_cli(["job", "status", "nope", *target], cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "no job 'nope'" in missing.stderr and "Traceback" not in missing.stderr
    unknown_node = run_cli(["logs", "worker-7", *target], cwd=tmp_path, env=env)
    assert unknown_node.returncode == 1 and "kept: ray-hist-worker-0" in unknown_node.stderr


def test_a_job_schedule_fires_as_on_cml(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    """A job with CML's cron `schedule` gets a run at the next minute; a paused one does not."""
    root = workspace.project_dir(project["id"])
    (root / "scheduled.py").write_text("import time\nprint('fired at', time.time())\n")
    job = workspace.api_ok(
        "POST",
        f"/api/v2/projects/{project['id']}/jobs",
        json={"name": "every minute", "script": "scheduled.py", "schedule": "* * * * *", "timezone": "UTC"},
    )
    paused = workspace.api_ok(
        "POST",
        f"/api/v2/projects/{project['id']}/jobs",
        json={"name": "paused", "script": "scheduled.py", "schedule": "* * * * *", "paused": True},
    )

    def runs(job_id: str) -> list[dict[str, Any]]:
        return list(
            workspace.api_ok("GET", f"/api/v2/projects/{project['id']}/jobs/{job_id}/runs")["job_runs"]
        )

    try:
        wait_until(
            lambda: bool(runs(job["id"])), timeout=90, interval=1, what="a run started by the schedule"
        )
        first = runs(job["id"])[0]
        run = workspace.wait_for_run(project["id"], job["id"], first["id"], timeout=60)
        assert run["status"] == "ENGINE_SUCCEEDED"
        assert not runs(paused["id"]), "a paused job does not fire"
    finally:
        for job_id in (job["id"], paused["id"]):
            workspace.api("DELETE", f"/api/v2/projects/{project['id']}/jobs/{job_id}")


def test_deploy_keeps_scheduled_runs_as_scheduled_cml_jobs(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    spec = parse_deploy_spec(
        {
            "jobs": {"git_sync": {"name": "Git Sync", "script": "cai_integration/git_sync.py"}},
            "scheduled_runs": {
                "nightly": {
                    "name": "Nightly Ray run",
                    "command": "python train.py",
                    "schedule": "30 2 * * 1-5",
                    "timezone": "Europe/Berlin",
                    "cluster": "nightly",
                    "timeout": 600,
                }
            },
        },
        env={},
    )
    settings = CMLSettings(host=workspace.url, api_key=workspace.api_key)
    with CMLClient(settings) as client:
        first = ensure_scheduled_runs(client, project["id"], spec, None)
        again = ensure_scheduled_runs(client, project["id"], spec, None)
        job = client.get_job(project["id"], first.jobs["nightly"].id)
        try:
            assert first.created == ["nightly"] and again.created == again.updated == []
            assert job.script == "cai_integration/scheduled_run.py" and job.schedule == "30 2 * * 1-5"
            assert job.model_extra["timezone"] == "Europe/Berlin" and job.parent_id is None
            assert job.environment["RAY_CAI_RUN_COMMAND"] == "python train.py"
            assert job.environment["RAY_CAI_RUN_CLUSTER"] == "nightly"
            assert job.environment["RAY_CAI_RUN_TIMEOUT"] == "600"
        finally:
            client.delete_job(project["id"], job.id)


# (command words, the rest, what the error must say): `-p never-created` goes between the two.
BAD_INPUT = [
    (["run"], ["--max-retries", "-1", "--", "true"], "--max-retries: must be 0 or more"),
    (["run"], ["--timeout", "0", "--", "true"], "--timeout: must be more than 0 seconds"),
    (["run"], ["--cluster", "Bad_Name", "--", "true"], "--cluster: 'Bad_Name'"),
    (["run"], ["--", " "], "ENTRYPOINT: the command to run is empty"),
    (["run"], ["--runtime-env", "missing.yaml", "--", "true"], "--runtime-env: missing.yaml: file not found"),
    (["run"], ["--config", "absent.yaml", "--", "true"], "absent.yaml"),
    (["run"], ["--driver-on", "anywhere", "--", "true"], "--driver-on: 'anywhere' is not one of"),
    (["job", "submit"], ["--no-wait", "--max-retries", "1", "--", "true"], "retries need a follower"),
    (["job", "submit"], ["--metadata", "ray_cai_record=x", "--", "true"], "the tool's own"),
    (["job", "submit"], ["--timeout", "-5", "--", "true"], "--timeout: must be more than 0 seconds"),
    (["job", "list"], ["--cluster", "-x-"], "--cluster: '-x-'"),
    (["logs"], ["worker-0", "--cluster", "UPPER"], "--cluster: 'UPPER'"),
]


def test_bad_input_of_run_and_jobs(workspace: WorkspaceHandle, tmp_path: Path) -> None:
    """Exit 2 naming the flag, no traceback, and not one API call."""
    (tmp_path / "ray_cluster_config.yaml").write_text("ray_cluster:\n  name: bad-input\n  num_workers: 0\n")
    env = cli_env(workspace)
    workspace.reset_counters()

    def attempt(case: tuple[list[str], list[str], str]) -> str | None:
        words, rest, expect = case
        proc = run_cli([*words, "-p", "never-created", *rest], cwd=tmp_path, env=env, timeout=60)
        output = proc.stdout + proc.stderr
        if proc.returncode != 2 or expect not in output or "Traceback" in output:
            return f"{words + rest}: exit {proc.returncode}, wanted {expect!r} in:\n{output[:600]}"
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = [p for p in pool.map(attempt, BAD_INPUT) if p]
    assert not problems, "\n\n".join(problems)
    calls = workspace.counters()
    assert calls["total"] == 0, f"bad input reached the API: {calls['counts']}"
