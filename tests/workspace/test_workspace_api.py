"""The workspace's CML API v2 surface: auth, error shape, projects, runtimes, lists, input validation."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from ray_serve_cai.workspace.testing import WorkspaceHandle


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_error(response: httpx.Response, status: int, code: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["details"] == []
    for word in words:
        assert word in body["message"], body["message"]
    return body


@pytest.fixture(scope="module")
def project(workspace: WorkspaceHandle) -> dict[str, Any]:
    return workspace.create_project(unique("api"), environment={"PROJECT_VAR": "p"})


def test_every_response_has_a_request_id_and_auth_is_required(workspace: WorkspaceHandle) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": workspace.api_key}):
        response = httpx.get(f"{workspace.url}/api/v2/projects", headers=headers, trust_env=False)
        body = assert_error(response, 401, 16)
        assert response.headers["x-request-id"]
        assert workspace.api_key not in response.text and "wrong-key" not in body["message"]
    controls = httpx.get(f"{workspace.url}/_workspace/counters", trust_env=False)
    assert controls.status_code == 401
    ok = workspace.api("GET", "/api/v2/projects")
    assert ok.status_code == 200 and ok.headers["x-request-id"]
    assert workspace.api_key not in repr(workspace) and workspace.api_key not in repr(workspace.info)


def test_unknown_route_and_unknown_ids_are_not_found(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    assert_error(workspace.api("GET", "/api/v2/nothing-here"), 404, 5)
    assert_error(workspace.api("GET", "/api/v2/projects/no-such-project"), 404, 5, "no-such-project")
    assert_error(workspace.api("GET", f"/api/v2/projects/{project['id']}/jobs/nope"), 404, 5, "nope")
    assert_error(workspace.api("GET", "/api/v2/projects/nope/applications"), 404, 5)


def test_project_create_get_patch_delete(workspace: WorkspaceHandle) -> None:
    name = unique("proj")
    created = workspace.api_ok(
        "POST",
        "/api/v2/projects",
        json={"name": name, "template": "local", "description": "d", "environment": {"A": "1"}, "gpu": 2},
    )
    assert created["creation_status"] == "creating"
    assert created["default_engine_type"] == "ml_runtime" and created["visibility"] == "private"
    assert set(created["owner"]) == {"username", "name", "email"} and created["creator"]["name"]
    assert json.loads(created["environment"]) == {"A": "1"}
    ready = workspace.wait_for(
        lambda: workspace.api_ok("GET", f"/api/v2/projects/{created['id']}"),
        lambda p: p["creation_status"] == "success",
    )
    assert workspace.project_dir(ready["id"]).is_dir()

    patched = workspace.api_ok(
        "PATCH",
        f"/api/v2/projects/{created['id']}",
        json={"environment": json.dumps({"B": "2"}), "description": "new", "visibility": "public"},
    )
    assert json.loads(patched["environment"]) == {"B": "2"}  # replaces the whole map
    assert patched["description"] == "new" and patched["visibility"] == "public"
    assert patched["updated_at"] > created["updated_at"]
    # On update the environment is a JSON string, as CML's update model has it.
    assert_error(
        workspace.api("PATCH", f"/api/v2/projects/{created['id']}", json={"environment": {"C": "3"}}),
        400,
        3,
        "environment",
    )
    legacy = workspace.api_ok(
        "POST",
        "/api/v2/projects",
        json={"name": unique("legacy"), "default_project_engine_type": "legacy_engine"},
    )
    assert legacy["default_engine_type"] == "legacy_engine"

    assert workspace.api_ok("DELETE", f"/api/v2/projects/{created['id']}") == {}
    assert workspace.api("GET", f"/api/v2/projects/{created['id']}").status_code == 404
    assert not workspace.project_dir(created["id"]).exists()
    workspace.api_ok("DELETE", f"/api/v2/projects/{legacy['id']}")


def test_project_bad_input(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    assert_error(workspace.api("POST", "/api/v2/projects", json={}), 400, 3, "name")
    assert_error(
        workspace.api("POST", "/api/v2/projects", json={"name": "x", "template": "git"}), 400, 3, "template"
    )
    assert_error(
        workspace.api("POST", "/api/v2/projects", json={"name": "x", "template": "nope"}), 400, 3, "template"
    )
    assert_error(
        workspace.api("POST", "/api/v2/projects", json={"name": "x", "environment": "{}"}),
        400,
        3,
        "environment",
    )
    assert_error(workspace.api("POST", "/api/v2/projects", content=b"not json"), 400, 3, "JSON")
    assert_error(
        workspace.api("POST", "/api/v2/projects", json={"name": project["name"]}), 409, 6, "already exists"
    )


def make_git_repo(path: Path) -> Path:
    path.mkdir()
    (path / "hello.py").write_text("print('hello from git')\n")
    (path / "sub").mkdir()
    (path / "sub" / "data.txt").write_text("data\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=path, check=True)
    subprocess.run([*git, "add", "."], cwd=path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=path, check=True)
    return path


def test_git_template_really_clones(workspace: WorkspaceHandle, tmp_path: Path) -> None:
    repo = make_git_repo(tmp_path / "repo")
    for git_url in (str(repo), repo.as_uri()):
        created = workspace.api_ok(
            "POST", "/api/v2/projects", json={"name": unique("git"), "git_url": git_url}
        )
        assert created["creation_status"] == "creating"
        ready = workspace.wait_for(
            lambda created=created: workspace.api_ok("GET", f"/api/v2/projects/{created['id']}"),
            lambda p: p["creation_status"] != "creating",
        )
        assert ready["creation_status"] == "success", ready
        directory = workspace.project_dir(created["id"])
        assert (directory / "hello.py").read_text() == "print('hello from git')\n"
        assert (directory / "sub" / "data.txt").is_file() and (directory / ".git").is_dir()
        workspace.api_ok("DELETE", f"/api/v2/projects/{created['id']}")


def test_failed_clone_ends_in_error_without_leaking_credentials(
    workspace: WorkspaceHandle, tmp_path: Path
) -> None:
    missing = f"file://user:s3cret-token@localhost{tmp_path}/does-not-exist"
    created = workspace.api_ok(
        "POST", "/api/v2/projects", json={"name": unique("badgit"), "git_url": missing}
    )
    failed = workspace.wait_for(
        lambda: workspace.api_ok("GET", f"/api/v2/projects/{created['id']}"),
        lambda p: p["creation_status"] != "creating",
    )
    assert failed["creation_status"] == "error" and "git clone failed" in failed["error_message"]
    assert "s3cret-token" not in json.dumps(failed)
    # Workloads need a ready project.
    runtime = workspace.runtime_identifier()
    job = workspace.api_ok(
        "POST",
        f"/api/v2/projects/{created['id']}/jobs",
        json={"name": "j", "script": "x.py", "runtime_identifier": runtime},
    )
    assert_error(
        workspace.api("POST", f"/api/v2/projects/{created['id']}/jobs/{job['id']}/runs"), 400, 9, "not ready"
    )
    workspace.api_ok("DELETE", f"/api/v2/projects/{created['id']}")


def test_runtimes_list(workspace: WorkspaceHandle) -> None:
    runtimes = workspace.api_ok("GET", "/api/v2/runtimes")["runtimes"]
    assert len(runtimes) >= 2
    for runtime in runtimes:
        assert {"image_identifier", "editor", "kernel", "edition", "full_version", "status"} <= set(runtime)
        # The runtimes the workspace ships are enabled (a custom one test_spec_operations.py registers
        # in this session workspace, and disables, may be listed too: whichever ran first).
        assert runtime["status"] == "ENABLED" or runtime["edition"] == "Custom", runtime
    assert sum(r["edition"] != "Custom" for r in runtimes) >= 2
    standard = workspace.api_ok(
        "GET",
        "/api/v2/runtimes",
        params={"search_filter": json.dumps({"edition": "Standard", "editor": "JupyterLab"})},
    )["runtimes"]
    assert (
        len(standard) == 1
        and "ml-runtime-pbj-jupyterlab-python3.11-standard" in standard[0]["image_identifier"]
    )
    cuda = workspace.runtime_identifier("Nvidia GPU")
    assert "-cuda:" in cuda


def test_pagination_search_and_sort(workspace: WorkspaceHandle) -> None:
    created = workspace.api_ok(
        "POST", "/api/v2/projects", json={"name": unique("pages"), "template": "local"}
    )
    base = f"/api/v2/projects/{created['id']}/jobs"
    runtime = workspace.runtime_identifier()
    names = [f"job-{i:02d}" for i in range(25)]
    for name in names:
        workspace.api_ok("POST", base, json={"name": name, "script": "a.py", "runtime_identifier": runtime})

    first = workspace.api_ok("GET", base)
    assert len(first["jobs"]) == 10 and first["next_page_token"]  # default page size 10
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = workspace.api_ok("GET", base, params={"page_size": 7, "page_token": token})
        seen += [job["name"] for job in page["jobs"]]
        pages += 1
        token = page["next_page_token"]
        if token == "":
            break
    assert seen == names and pages == 4
    assert_error(workspace.api("GET", base, params={"page_token": "garbage!"}), 400, 3, "page_token")

    found = workspace.api_ok(
        "GET", base, params={"search_filter": json.dumps({"name": "job-1"}), "page_size": 100}
    )
    assert sorted(job["name"] for job in found["jobs"]) == [f"job-1{i}" for i in range(10)]
    both = workspace.api_ok(
        "GET",
        base,
        params={"search_filter": json.dumps({"name": "job-2", "script": "a.py"}), "page_size": 100},
    )
    assert len(both["jobs"]) == 5
    none = workspace.api_ok(
        "GET", base, params={"search_filter": json.dumps({"name": "job-2", "script": "b.py"})}
    )
    assert none == {"jobs": [], "next_page_token": ""}
    by_creator = workspace.api_ok(
        "GET",
        base,
        params={"search_filter": json.dumps({"creator.username": found["jobs"][0]["creator"]["username"]})},
    )
    assert len(by_creator["jobs"]) == 10
    assert_error(workspace.api("GET", base, params={"search_filter": "{bad"}), 400, 3, "search_filter")

    newest_first = workspace.api_ok("GET", base, params={"sort": "-created_at", "page_size": 3})
    assert [job["name"] for job in newest_first["jobs"]] == ["job-24", "job-23", "job-22"]
    by_name = workspace.api_ok("GET", base, params={"sort": "-name", "page_size": 2})
    assert [job["name"] for job in by_name["jobs"]] == ["job-24", "job-23"]
    ascending = workspace.api_ok("GET", base, params={"sort": "+name,-created_at", "page_size": 1})
    assert ascending["jobs"][0]["name"] == "job-00"
    projects = workspace.api_ok(
        "GET", "/api/v2/projects", params={"search_filter": json.dumps({"name": "pages-"})}
    )
    assert created["id"] in [p["id"] for p in projects["projects"]]
    workspace.api_ok("DELETE", f"/api/v2/projects/{created['id']}")


def test_job_input_validation(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    base = f"/api/v2/projects/{project['id']}/jobs"
    runtime = workspace.runtime_identifier()
    assert_error(
        workspace.api("POST", base, json={"script": "a.py", "runtime_identifier": runtime}), 400, 3, "name"
    )
    assert_error(
        workspace.api("POST", base, json={"name": "n", "runtime_identifier": runtime}), 400, 3, "script"
    )
    assert_error(
        workspace.api("POST", base, json={"name": "n", "script": "a.py"}),
        400,
        3,
        "runtime image must be specified",
    )
    assert_error(
        workspace.api("POST", base, json={"name": "n", "script": "a.py", "runtime_identifier": "nope:1"}),
        400,
        3,
        "runtime_identifier",
    )
    assert_error(
        workspace.api(
            "POST", base, json={"name": "n", "script": "a.py", "runtime_identifier": runtime, "cpu": "two"}
        ),
        400,
        3,
        "cpu",
    )
    assert_error(
        workspace.api(
            "POST",
            base,
            json={"name": "n", "script": "a.py", "runtime_identifier": runtime, "parent_job_id": "x"},
        ),
        404,
        5,
        "parent_job_id",
    )
    assert_error(
        workspace.api("POST", "/api/v2/projects/nope/jobs", json={"name": "n", "script": "a.py"}),
        404,
        5,
        "nope",
    )


def test_application_input_validation(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    base = f"/api/v2/projects/{project['id']}/applications"
    runtime = workspace.runtime_identifier()
    good = {"name": "n", "subdomain": "ok-sub", "script": "app.py", "runtime_identifier": runtime}
    for missing in ("name", "subdomain", "script"):
        body = {k: v for k, v in good.items() if k != missing}
        assert_error(workspace.api("POST", base, json=body), 400, 3, missing)
    assert_error(
        workspace.api("POST", base, json={k: v for k, v in good.items() if k != "runtime_identifier"}),
        400,
        3,
        "runtime image must be specified",
    )
    for bad in ("Upper", "under_score", "-lead", "trail-", "double--dash", "a" * 64, "dot.ted"):
        assert_error(workspace.api("POST", base, json={**good, "subdomain": bad}), 400, 3, "Subdomain")
    assert_error(workspace.api("POST", base, json={**good, "environment": "{}"}), 400, 3, "environment")
    assert_error(workspace.api("POST", base, json={**good, "script": "/abs/app.py"}), 400, 3, "script")
    assert workspace.api_ok("GET", base)["applications"] == []


def test_request_bodies_follow_protobuf_json_rules_and_name_the_bad_field(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    """One validation layer (bodies.py): null means unset, unknown fields are ignored, int64 may come
    as a string, defaults are the model's, and a bad value is a CML 400 naming its field."""
    base = f"/api/v2/projects/{project['id']}/jobs"
    runtime = workspace.runtime_identifier()
    job = workspace.api_ok(
        "POST",
        base,
        json={
            "name": "bodies",
            "script": "a.py",
            "runtime_identifier": runtime,
            "cpu": None,
            "timeout": "30",
            "not_a_cml_field": 1,
        },
    )
    assert (job["cpu"], job["memory"], job["timeout"], job["kill_on_timeout"]) == (1.0, 1.0, "30", True)
    assert "not_a_cml_field" not in job
    path = f"{base}/{job['id']}"
    assert_error(workspace.api("PATCH", path, json={"cpu": -1}), 400, 3, "cpu must not be negative")
    assert_error(
        workspace.api("PATCH", path, json={"kill_on_timeout": "yes"}),
        400,
        3,
        "kill_on_timeout must be a boolean",
    )
    # `paused` is read-only on a Job: CML ignores it in an update, and so does the workspace.
    assert workspace.api_ok("PATCH", path, json={"paused": True})["paused"] is False
    assert_error(workspace.api("PATCH", path, json={"name": ""}), 400, 3, "name is required")
    unchanged = workspace.api_ok("PATCH", path, json={"name": None, "memory": 2})
    assert unchanged["name"] == "bodies" and unchanged["memory"] == 2  # null: not set, not changed
    workspace.api_ok("DELETE", path)
