"""What ray-cai makes of a head's answers while it fails over (issue 23, items 5 and 6), against a
stand-in for Ray's dashboard run as the cluster's head application (`support/apps/ray_dashboard_standin.py`)
and reached as every client reaches a head: through its application URL, with the API key.

- `job submit` (JobsClient.submit): with head fault tolerance on and a worker alive, the driver is
  kept off the head (a label selector) unless the user placed it (entrypoint resources) or pinned it
  to the head (`--driver-on head`: Ray's head resource); without fault tolerance or workers, Ray's
  default placement;
- `job status` (JobsClient.get): a job Ray marked FAILED on a transient error during a failover
  (ray#65025: `JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE`) while its supervisor actor lives reads RUNNING,
  with why; with its supervisor dead, or failed for another reason, it stays FAILED.
- Serve's apply after a head restart: a controller that is recovering (no `controller_info` yet, its
  actor RESTARTING) is waited for, and what it recovered is not applied again; with no controller in
  the GCS (its state lost) the config is applied at once; a recovered Serve missing an application
  gets the config (Serve's declarative PUT leaves the unchanged ones alone).
The real-Ray side: tests/ray/test_head_ft_ray.py (a live job through a head replacement) and
tests/ray/test_serve_rollout.py (Serve RUNNING through a head replacement, not applied again).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.fakes import client_for, delete_project

from ray_serve_cai.access.head import AppEndpoint
from ray_serve_cai.access.jobs import GROUP_LABEL, HEAD_RESOURCE, JobsClient, JobSubmission
from ray_serve_cai.access.serve import APPLICATIONS_PATH, SERVE_CONTROLLER_ACTOR
from ray_serve_cai.cluster.serve import ServeScope, apply
from ray_serve_cai.config.serve import ServeConfig
from ray_serve_cai.workspace.testing import WorkspaceHandle

CLUSTER = "fo"
HEAD = f"ray-{CLUSTER}-head"
APP = {"name": "iris", "route_prefix": "/iris", "import_path": "iris:app", "runtime_env": {}}
DESIRED = ServeConfig(document={"applications": [APP]}, source="serve_config.yaml")
# Serve's GET without a controller (Ray 2.60's ServeInstanceDetails.get_empty_schema_dict()).
NO_CONTROLLER = {"controller_info": {}, "proxies": {}, "applications": {}, "target_capacity": None}


def recovered(*apps: dict[str, Any]) -> dict[str, Any]:
    """Serve's GET from a running controller that runs these applications."""
    return {
        "controller_info": {"node_id": "n1", "actor_id": "a1"},
        "proxies": {},
        "applications": {
            app["name"]: {
                "name": app["name"],
                "status": "RUNNING",
                "deployed_app_config": app,
                "source": "declarative",
            }
            for app in apps
        },
        "target_capacity": None,
    }


def job_details(submission_id: str, error_type: str, message: str) -> dict[str, Any]:
    """Ray's JobDetails of a job its monitor marked FAILED."""
    return {
        "type": "SUBMISSION", "submission_id": submission_id, "job_id": None, "status": "FAILED",
        "entrypoint": "python train.py", "message": message, "error_type": error_type,
        "start_time": 1_780_000_000_000, "end_time": 1_780_000_090_000, "driver_exit_code": None,
    }  # fmt: skip


@dataclass
class Head:
    workspace: WorkspaceHandle
    project_id: str
    app: dict[str, Any]

    def scene(self, **scene: Any) -> None:
        assert self.workspace.app_request(self.app, "PUT", "/_standin", json=scene).status_code == 200

    def seen(self) -> dict[str, Any]:
        response = self.workspace.app_request(self.app, "GET", "/_standin")
        assert response.status_code == 200
        return dict(response.json())

    def scope(self) -> ServeScope:
        client = client_for(self.workspace)
        client.list_applications(self.project_id)  # the client learns the head's URL
        return ServeScope(client, CLUSTER, None, Path("."), startup_timeout=60, project_id=self.project_id)


@pytest.fixture(scope="module")
def head(workspace: WorkspaceHandle, test_apps_dir: Path) -> Iterator[Head]:
    project = workspace.create_project(f"failover-{uuid.uuid4().hex[:8]}", files_from=test_apps_dir)
    try:
        body = {
            "name": HEAD, "subdomain": HEAD, "script": "ray_dashboard_standin.py",
            "runtime_identifier": workspace.runtime_identifier(),
        }  # fmt: skip
        app = workspace.api_ok("POST", f"/api/v2/projects/{project['id']}/applications", json=body)
        app = workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
        yield Head(workspace, project["id"], app)
    finally:
        delete_project(workspace, project["id"])


def test_drivers_go_to_workers_when_the_head_has_fault_tolerance_unless_placed(head: Head) -> None:
    nodes = [
        {"node_name": HEAD, "is_head": True, "alive": True},
        {"node_name": "w0", "is_head": False, "alive": True},
    ]
    on = {"head_fault_tolerance": {"enabled": True, "storage": "rocksdb", "epoch": 1}, "nodes": nodes}
    endpoint = AppEndpoint(head.app["url"], head.workspace.api_key)
    off_head = {GROUP_LABEL: "!head"}

    def placements(status: dict[str, Any], *submissions: JobSubmission) -> list[tuple[Any, Any]]:
        head.scene(status=status)
        with JobsClient(endpoint) as jobs:
            for submission in submissions:
                jobs.submit(submission)
        sent = head.seen()["submitted"]
        return [(body.get("entrypoint_label_selector"), body.get("entrypoint_resources")) for body in sent]

    auto, pinned = JobSubmission("python train.py"), JobSubmission("python train.py", driver="head")
    placed = JobSubmission("python train.py", entrypoint_resources={"GPU_A100": 1})
    always = JobSubmission("python train.py", driver="workers")
    assert placements(on, auto, pinned, placed, always) == [
        (off_head, None), (None, {HEAD_RESOURCE: 0.001}), (None, {"GPU_A100": 1}), (off_head, None),
    ]  # fmt: skip
    no_ft = {**on, "head_fault_tolerance": {"enabled": False, "storage": "memory", "epoch": None}}
    head_only = {**on, "nodes": nodes[:1]}
    assert placements(no_ft, auto) == [(None, None)]  # a head restart loses the job wherever it runs
    assert placements(head_only, auto) == [(None, None)]  # no worker: Ray's default, the head


def test_a_live_job_ray_marked_failed_during_a_failover_reads_running(head: Head) -> None:
    unknown = "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE"
    transient = "Unexpected error occurred: RPC Error message: Cancelled; RPC Error details: "
    head.scene(
        jobs={
            "live": job_details("live", unknown, transient),
            "gone": job_details("gone", unknown, transient),
            "broken": job_details("broken", "JOB_ENTRYPOINT_COMMAND_ERROR", "Job entrypoint command failed"),
        },
        actors={"_ray_internal_job_actor_live": ["DEAD", "ALIVE"], "_ray_internal_job_actor_gone": ["DEAD"]},
    )
    endpoint = AppEndpoint(head.app["url"], head.workspace.api_key)
    with JobsClient(endpoint) as jobs:
        live, gone, broken = jobs.get("live"), jobs.get("gone"), jobs.get("broken")
    assert live.status == "RUNNING" and live.end_time is None and live.raw["status"] == "RUNNING"
    assert "ray#65025" in live.message and transient.strip() in live.message, live.message
    assert (gone.status, gone.message) == ("FAILED", transient), "a dead supervisor: the job did fail"
    assert (broken.status, broken.message) == ("FAILED", "Job entrypoint command failed")
    counts = head.seen()["counts"]
    assert counts["GET /api/v0/actors"] == 2, counts  # a job that failed for its own reason: no lookup


def test_serve_waits_for_a_recovering_controller_and_applies_nothing_it_recovered(head: Head) -> None:
    head.scene(
        serve=[NO_CONTROLLER, NO_CONTROLLER, recovered(APP)], actors={SERVE_CONTROLLER_ACTOR: ["RESTARTING"]}
    )
    decision = apply(head.scope(), DESIRED, 8000)
    seen = head.seen()
    assert not decision.put, decision
    assert seen["counts"][f"GET {APPLICATIONS_PATH}"] == 3, seen["counts"]  # it waited for the controller
    assert seen["counts"]["GET /api/v0/actors"] == 2 and not seen["puts"], seen


def test_serve_applies_at_once_when_no_controller_survived(head: Head) -> None:
    head.scene(serve=[NO_CONTROLLER], actors={SERVE_CONTROLLER_ACTOR: ["DEAD"]})
    decision = apply(head.scope(), DESIRED, 8000)
    seen = head.seen()
    assert decision.put and decision.reason.startswith("Serve has no applications"), decision
    assert seen["counts"][f"GET {APPLICATIONS_PATH}"] == 1, seen["counts"]  # no wait: nothing is recovering
    assert [app["name"] for app in seen["puts"][0]["applications"]] == ["iris"], seen["puts"]


def test_serve_applies_what_a_recovered_controller_is_missing(head: Head) -> None:
    other = {**APP, "name": "other", "route_prefix": "/other", "import_path": "other:app"}
    desired = ServeConfig(document={"applications": [APP, other]}, source="serve_config.yaml")
    head.scene(serve=[recovered(APP)], actors={SERVE_CONTROLLER_ACTOR: ["ALIVE"]})
    decision = apply(head.scope(), desired, 8000)
    seen = head.seen()
    assert decision.put and decision.reason == "missing: other", decision
    assert len(seen["puts"]) == 1 and "GET /api/v0/actors" not in seen["counts"], seen
