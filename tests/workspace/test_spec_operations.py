"""The operations of CML's spec the tool itself does not call, served as the spec says (every answer
is checked against the spec by the conformance plugin): project names and batches, collaborators,
machine users, runtimes registered/validated/disabled, jobs across projects."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ray_serve_cai.workspace.testing import WorkspaceHandle


@pytest.fixture
def project(workspace: WorkspaceHandle) -> Iterator[dict[str, Any]]:
    created = workspace.create_project(f"ops-{uuid.uuid4().hex[:8]}")
    try:
        yield created
    finally:
        workspace.api("DELETE", f"/api/v2/projects/{created['id']}")


def test_project_names_batches_and_collaborators(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    pid, name = project["id"], project["name"]
    names = workspace.api_ok(
        "GET", "/api/v2/projectnames", params={"search_filter": json.dumps({"name": name})}
    )
    assert names["project_names"] == [name]
    batch = workspace.api_ok(
        "GET", "/api/v2/projects/batch", params=[("project_ids", pid), ("project_ids", "nope")]
    )
    assert [p["id"] for p in batch["projects"]] == [pid]

    base = f"/api/v2/projects/{pid}/collaborators"
    assert workspace.api_ok("PUT", f"{base}/alice", json={"permission": "write"}) == {}
    workspace.api_ok("PUT", f"{base}/bob", json={"permission": "read"})
    listed = workspace.api_ok("GET", base, params={"search_filter": json.dumps({"permission": "write"})})
    assert [(c["user"]["username"], c["permission"]) for c in listed["collaborators"]] == [("alice", "write")]
    assert workspace.api_ok("DELETE", f"{base}/alice") == {}
    assert workspace.api("DELETE", f"{base}/alice").status_code == 404
    assert workspace.api("PUT", f"{base}/carol", json={"permission": "owner"}).status_code == 400
    machine = workspace.api_ok("GET", f"/api/v2/projects/{pid}/machineusers")
    assert machine == {"run_as_machine_user_collaborators": [], "next_page_token": ""}


def test_runtimes_register_validate_and_status(workspace: WorkspaceHandle) -> None:
    image = f"docker.example.com/team/custom-runtime:{uuid.uuid4().hex[:6]}"
    assert workspace.api_ok("GET", "/api/v2/runtimes:validate", params={"url": image}) == {"success": True}
    assert (
        workspace.api_ok("GET", "/api/v2/runtimes:validate", params={"url": "not an image"})["success"]
        is False
    )
    registered = workspace.api_ok("POST", "/api/v2/runtimes", json={"url": image})
    assert registered == {"validation_success": True, "insert_success": True}
    assert workspace.api_ok("POST", "/api/v2/runtimes", json={"url": image})["insert_success"] is False
    found = workspace.api_ok(
        "GET", "/api/v2/runtimes", params={"search_filter": json.dumps({"image_identifier": image})}
    )
    assert [r["status"] for r in found["runtimes"]] == ["ENABLED"]
    changed = workspace.api_ok(
        "POST", "/api/v2/runtimes:update", json={"status": "DISABLED", "image_identifier": [image]}
    )
    assert changed == {"rows_affected": 1}
    found = workspace.api_ok(
        "GET", "/api/v2/runtimes", params={"search_filter": json.dumps({"image_identifier": image})}
    )
    assert [r["status"] for r in found["runtimes"]] == ["DISABLED"]
    credential = {"docker_credential_id": "c1", "runtime_identifier": image}
    assert workspace.api_ok("POST", "/api/v2/runtimes/credential:set", json=credential) == {}
    assert workspace.api("POST", "/api/v2/runtimes:update", json={"status": "GONE"}).status_code == 400


def test_jobs_across_projects_carry_their_project(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    runtime = workspace.runtime_identifier()
    job = workspace.api_ok(
        "POST",
        f"/api/v2/projects/{project['id']}/jobs",
        json={"name": "everywhere", "script": "x.py", "runtime_identifier": runtime},
    )
    every = workspace.api_ok("GET", "/api/v2/jobs", params={"page_size": 1000})["jobs"]
    mine = next(j for j in every if j["id"] == job["id"])
    assert mine["project"] == {
        "public_identifier": project["id"],
        "name": project["name"],
        "default_project_engine": "ml_runtime",
    }
    assert (
        workspace.api(
            "GET", "/api/v2/jobs", params={"search_filter": json.dumps({"project_id": "x"})}
        ).status_code
        == 400
    )
