"""Jobs and job runs: real processes, statuses, env, chaining, one active run, timeout, stop."""

from __future__ import annotations

import ipaddress
import json
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from ray_serve_cai.workspace.testing import WorkspaceHandle


@pytest.fixture(scope="module")
def project(workspace: WorkspaceHandle, test_apps_dir: Path) -> dict[str, Any]:
    return workspace.create_project(
        f"jobs-{uuid.uuid4().hex[:8]}", files_from=test_apps_dir, environment={"PROJECT_VAR": "from-project"}
    )


def create_job(workspace: WorkspaceHandle, project: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = {
        "name": f"job-{uuid.uuid4().hex[:6]}",
        "runtime_identifier": workspace.runtime_identifier(),
        **fields,
    }
    return workspace.api_ok("POST", f"/api/v2/projects/{project['id']}/jobs", json=body)


def run_job(
    workspace: WorkspaceHandle, project: dict[str, Any], job: dict[str, Any], **body: Any
) -> dict[str, Any]:
    return workspace.api_ok("POST", f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs", json=body)


def runs_of(workspace: WorkspaceHandle, project: dict[str, Any], job: dict[str, Any]) -> list[dict[str, Any]]:
    path = f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs"
    return workspace.api_ok("GET", path, params={"sort": "-created_at"})["job_runs"]


def test_job_fields_round_trip_and_patch(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    parent = create_job(workspace, project, script="job_ok.py")
    job = create_job(
        workspace,
        project,
        script="job_ok.py",
        cpu=2,
        memory=4,
        nvidia_gpu=1,
        environment={"JOB_VAR": "j"},
        arguments="--x 1",
        timeout=30,
        kill_on_timeout=True,
        kernel="python3",
        parent_job_id=parent["id"],
    )
    assert job["parent_id"] == parent["id"] and "parent_job_id" not in job
    assert (job["cpu"], job["memory"], job["nvidia_gpu"], job["timeout"]) == (
        2,
        4,
        1,
        "30",
    )  # int64: a string
    assert json.loads(job["environment"]) == {"JOB_VAR": "j"} and job["arguments"] == "--x 1"
    got = workspace.api_ok("GET", f"/api/v2/projects/{project['id']}/jobs/{job['id']}")
    assert got == job
    patched = workspace.api_ok(
        "PATCH",
        f"/api/v2/projects/{project['id']}/jobs/{job['id']}",
        json={"parent_id": "", "name": "renamed", "environment": json.dumps({"K": "v"}), "timeout": 5},
    )
    assert patched["parent_id"] == "" and patched["name"] == "renamed" and patched["timeout"] == "5"
    assert json.loads(patched["environment"]) == {"K": "v"}
    cycle = workspace.api(
        "PATCH", f"/api/v2/projects/{project['id']}/jobs/{parent['id']}", json={"parent_id": parent["id"]}
    )
    assert cycle.status_code == 400 and "parent_id" in cycle.json()["message"]
    for item in (job, parent):
        assert workspace.api_ok("DELETE", f"/api/v2/projects/{project['id']}/jobs/{item['id']}") == {}
    assert workspace.api("GET", f"/api/v2/projects/{project['id']}/jobs/{job['id']}").status_code == 404


def test_run_succeeds_with_cml_environment_and_arguments(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    job = create_job(
        workspace, project, script="job_ok.py", arguments="one 'two words'", environment={"JOB_VAR": "j"}
    )
    run = run_job(workspace, project, job, environment={"RUN_VAR": "r"})
    assert run["status"] == "ENGINE_SCHEDULING" and run["job_id"] == job["id"]
    done = workspace.wait_for_run(project["id"], job["id"], run["id"])
    assert done["status"] == "ENGINE_SUCCEEDED", done
    for stamp in ("created_at", "scheduling_at", "starting_at", "running_at", "finished_at"):
        assert done[stamp], stamp
    assert done["created_at"] <= done["starting_at"] <= done["running_at"] <= done["finished_at"]
    output = json.loads((workspace.project_dir(project["id"]) / f"job-out-{run['id']}.json").read_text())
    assert output["argv"] == ["one", "two words"]
    assert Path(output["cwd"]) == workspace.project_dir(project["id"])
    env = output["env"]
    assert env["CDSW_PROJECT_ID"] == project["id"] and env["CDSW_DOMAIN"] == workspace.domain
    pod_cidr = workspace.network().get("pod_cidr") if workspace.pods else None
    if pod_cidr:  # its own pod's address, as on CML
        assert ipaddress.ip_address(env["CDSW_IP_ADDRESS"]) in ipaddress.ip_network(pod_cidr)
    else:
        assert env["CDSW_IP_ADDRESS"] == "127.0.0.1"
    assert env["CDSW_ENGINE_ID"]
    assert env["JOB_ARGUMENTS"] == "one 'two words'"
    assert (env["PROJECT_VAR"], env["JOB_VAR"], env["RUN_VAR"]) == ("from-project", "j", "r")
    assert output["has_api_key"]
    log = Path(done["log_path"]).read_text()
    assert "job ok" in log and workspace.api_key not in log


def test_shell_script_runs_with_bash(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    job = create_job(workspace, project, script="job_shell.sh", arguments="a b")
    run = run_job(workspace, project, job)
    assert workspace.wait_for_run(project["id"], job["id"], run["id"])["status"] == "ENGINE_SUCCEEDED"
    assert (workspace.project_dir(project["id"]) / "shell-out.txt").read_text().strip() == "a b"


def test_failing_and_missing_scripts_fail(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    failing = create_job(workspace, project, script="job_fail.py")
    run = workspace.wait_for_run(project["id"], failing["id"], run_job(workspace, project, failing)["id"])
    assert run["status"] == "ENGINE_FAILED" and "3" in run["failure_reason"]
    assert "job failing" in Path(run["log_path"]).read_text()
    missing = create_job(workspace, project, script="not_there.py")
    run = workspace.wait_for_run(project["id"], missing["id"], run_job(workspace, project, missing)["id"])
    assert run["status"] == "ENGINE_FAILED" and "not found" in run["failure_reason"]


def test_children_run_after_parent_succeeds_never_after_failure(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    root = create_job(workspace, project, script="job_ok.py")
    child_a = create_job(workspace, project, script="job_ok.py", parent_job_id=root["id"])
    child_b = create_job(workspace, project, script="job_fail.py", parent_job_id=root["id"])
    grandchild_of_a = create_job(workspace, project, script="job_ok.py", parent_job_id=child_a["id"])
    grandchild_of_b = create_job(workspace, project, script="job_ok.py", parent_job_id=child_b["id"])

    root_run = run_job(workspace, project, root)
    workspace.wait_for_run(project["id"], root["id"], root_run["id"])
    a_runs = workspace.wait_for(lambda: runs_of(workspace, project, child_a), lambda runs: len(runs) == 1)
    b_runs = workspace.wait_for(lambda: runs_of(workspace, project, child_b), lambda runs: len(runs) == 1)
    assert (
        workspace.wait_for_run(project["id"], child_a["id"], a_runs[0]["id"])["status"] == "ENGINE_SUCCEEDED"
    )
    assert workspace.wait_for_run(project["id"], child_b["id"], b_runs[0]["id"])["status"] == "ENGINE_FAILED"
    assert a_runs[0]["created_at"] > root_run["created_at"]
    g_runs = workspace.wait_for(
        lambda: runs_of(workspace, project, grandchild_of_a), lambda runs: len(runs) == 1
    )
    workspace.wait_for_run(project["id"], grandchild_of_a["id"], g_runs[0]["id"])
    # A failed parent starts nothing. Dependent runs are created in the same step that ends the
    # parent run, so once the parent is seen finished its children's runs would already be listed.
    assert runs_of(workspace, project, grandchild_of_b) == []

    # Running a failing root starts no child at all.
    failing_root = create_job(workspace, project, script="job_fail.py")
    orphan = create_job(workspace, project, script="job_ok.py", parent_job_id=failing_root["id"])
    workspace.wait_for_run(project["id"], failing_root["id"], run_job(workspace, project, failing_root)["id"])
    assert runs_of(workspace, project, orphan) == []


def test_one_active_run_per_job_and_stop(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    job = create_job(workspace, project, script="job_sleep.py", environment={"SLEEP_SECONDS": "30"})
    first = run_job(workspace, project, job)
    second = workspace.api("POST", f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs", json={})
    assert second.status_code == 400
    assert second.json()["code"] == 9
    assert second.json()["message"] == f"job run for job {job['id']} already active"
    running = workspace.wait_for_run(project["id"], job["id"], first["id"], {"ENGINE_RUNNING"})
    pids = workspace.processes()
    assert pids
    stopping = workspace.api_ok(
        "POST", f"/api/v2/projects/{project['id']}/jobs/{job['id']}/runs/{running['id']}:stop"
    )
    assert stopping["status"] in ("ENGINE_STOPPING", "ENGINE_STOPPED")
    stopped = workspace.wait_for_run(project["id"], job["id"], first["id"])
    assert stopped["status"] == "ENGINE_STOPPED" and stopped["finished_at"]
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids)
    # Free again: a new run is accepted, and the list is newest first with sort=-created_at.
    third = run_job(workspace, project, job, environment={"SLEEP_SECONDS": "0"})
    workspace.wait_for_run(project["id"], job["id"], third["id"])
    assert [run["id"] for run in runs_of(workspace, project, job)] == [third["id"], first["id"]]


def test_timeout_ends_the_run_as_timedout(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    job = create_job(
        workspace, project, script="job_sleep.py", timeout=1, environment={"SLEEP_SECONDS": "30"}
    )
    run = run_job(workspace, project, job)
    done = workspace.wait_for_run(project["id"], job["id"], run["id"], timeout=15)
    assert done["status"] == "ENGINE_TIMEDOUT" and "timed out" in done["failure_reason"]
    assert workspace.processes() == []


def test_job_start_latency_holds_the_run_before_it_starts(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    job = create_job(workspace, project, script="job_ok.py")
    workspace.set_latency(job_start_seconds=1.0)
    try:
        run = run_job(workspace, project, job)
        assert run["status"] == "ENGINE_SCHEDULING" and "starting_at" not in run  # not yet: left out
        done = workspace.wait_for_run(project["id"], job["id"], run["id"])
        assert done["status"] == "ENGINE_SUCCEEDED"
        # It was held SCHEDULING for the injected latency before it started.
        started = datetime.fromisoformat(done["starting_at"]) - datetime.fromisoformat(done["created_at"])
        assert started.total_seconds() >= 1.0
    finally:
        workspace.set_latency()
