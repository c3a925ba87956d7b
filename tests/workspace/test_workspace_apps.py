"""Applications in the workspace: lifecycle, status from the HTTP endpoint, process trees, Host routing."""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from ray_serve_cai.workspace.testing import WorkspaceHandle


@pytest.fixture(scope="module")
def project(workspace: WorkspaceHandle, test_apps_dir: Path) -> dict[str, Any]:
    return workspace.create_project(
        f"apps-{uuid.uuid4().hex[:8]}", files_from=test_apps_dir, environment={"PROJECT_VAR": "p1"}
    )


def create_app(workspace: WorkspaceHandle, project: dict[str, Any], **fields: Any) -> dict[str, Any]:
    subdomain = f"app-{uuid.uuid4().hex[:8]}"
    body = {
        "name": subdomain,
        "subdomain": subdomain,
        "script": "http_app.py",
        "runtime_identifier": workspace.runtime_identifier(),
        **fields,
    }
    return workspace.api_ok("POST", f"/api/v2/projects/{project['id']}/applications", json=body)


def app_path(project: dict[str, Any], app: dict[str, Any], suffix: str = "") -> str:
    return f"/api/v2/projects/{project['id']}/applications/{app['id']}{suffix}"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def seconds_between(earlier: str, later: str) -> float:
    """Seconds from one API timestamp (RFC 3339 UTC) to another."""
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def delete_app(workspace: WorkspaceHandle, project: dict[str, Any], app: dict[str, Any]) -> None:
    assert workspace.api_ok("DELETE", app_path(project, app)) == {}


def test_app_starts_runs_routes_and_stops(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    app = create_app(workspace, project, environment={"APP_LISTEN_DELAY": "0.8", "APP_VAR": "a"}, cpu=2)
    assert app["status"] == "APPLICATION_STARTING" and app["cpu"] == 2
    assert json.loads(app["environment"]) == {"PROJECT_VAR": "p1", "APP_LISTEN_DELAY": "0.8", "APP_VAR": "a"}
    running = workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
    assert running["running_at"] and running["starting_at"] and Path(running["log_path"]).is_file()
    # It was STARTING until it answered HTTP, at least the listen delay after its process started.
    assert seconds_between(running["starting_at"], running["running_at"]) >= 0.8

    # At the app's own URL, with the bearer key (stripped before it reaches the app).
    assert app["url"].startswith("http://127.0.0.1:") and running["url"] == app["url"]
    response = workspace.app_request(app, "POST", "/some/path?x=1", content=b"hello")
    assert response.status_code == 200 and response.headers["x-request-id"]
    echoed = response.json()
    assert (echoed["method"], echoed["path"], echoed["query"], echoed["body"]) == (
        "POST",
        "/some/path",
        "x=1",
        "hello",
    )
    assert "authorization" not in echoed["headers"]
    assert echoed["env"]["APP_VAR"] == "a" and echoed["env"]["PROJECT_VAR"] == "p1"
    assert echoed["env"]["CDSW_PROJECT_ID"] == project["id"]
    unauthenticated = httpx.get(f"{app['url']}/", trust_env=False)
    assert unauthenticated.status_code == 401 and workspace.api_key not in unauthenticated.text
    wrong_key = httpx.get(f"{app['url']}/", headers={"Authorization": "Bearer nope"}, trust_env=False)
    assert wrong_key.status_code == 401

    stopping = workspace.api_ok("POST", app_path(project, app, ":stop"))
    assert stopping["status"] in ("APPLICATION_STOPPING", "APPLICATION_STOPPED")
    stopped = workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_STOPPED"})
    assert stopped["stopped_at"]
    not_running = workspace.app_request(app, "GET", "/")
    assert not_running.status_code == 503 and "not running" in not_running.json()["message"]
    assert workspace.processes() == []
    delete_app(workspace, project, app)


def test_app_that_never_answers_and_exits_fails(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    app = create_app(workspace, project, script="exit_app.py", environment={"APP_EXIT_CODE": "0"})
    failed = workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_FAILED", "APPLICATION_STOPPED"})
    assert failed["status"] == "APPLICATION_FAILED"  # it exited while STARTING
    delete_app(workspace, project, app)


def test_running_app_exit_code_decides_failed_or_stopped(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    for code, expected in ((3, "APPLICATION_FAILED"), (0, "APPLICATION_STOPPED")):
        app = create_app(workspace, project)
        workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
        workspace.app_request(app, "GET", f"/exit?code={code}")
        assert workspace.wait_for_app(project["id"], app["id"], {expected})["stopped_at"]
        delete_app(workspace, project, app)


def test_polling_endpoint_decides_running(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    app = create_app(workspace, project, environment={"CDSW_APP_POLLING_ENDPOINT": "/health"})
    assert workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})["running_at"]
    delete_app(workspace, project, app)


def test_stop_ends_the_whole_tree_including_an_escaped_grandchild(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    app = create_app(workspace, project, script="tree_app.py")
    workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
    pid_file = workspace.project_dir(project["id"]) / f"tree-pids-{app['id']}.json"
    pids = workspace.host_pids(app["id"], json.loads(pid_file.read_text()))  # pod pids -> host pids
    assert all(alive(pid) for pid in pids.values())
    assert set(pids.values()) <= set(workspace.processes())
    assert os.getsid(pids["escaped"]) != os.getsid(pids["app"])  # it left the app's session
    workspace.api_ok("POST", app_path(project, app, ":stop"))
    workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_STOPPED"})
    assert not any(alive(pid) for pid in pids.values()), pids
    assert workspace.processes() == []
    delete_app(workspace, project, app)


def test_restart_patch_and_delete(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    app = create_app(workspace, project, script="tree_app.py")
    workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
    pid_file = workspace.project_dir(project["id"]) / f"tree-pids-{app['id']}.json"
    first_pids = workspace.host_pids(app["id"], json.loads(pid_file.read_text()))  # pod pids -> host pids

    patched = workspace.api_ok(
        "PATCH",
        app_path(project, app),
        json={"script": "http_app.py", "environment": json.dumps({"APP_VAR": "patched"}), "memory": 8},
    )
    assert patched["status"] == "APPLICATION_RUNNING" and patched["memory"] == 8  # PATCH does not restart
    assert json.loads(patched["environment"]) == {"APP_VAR": "patched"}
    assert alive(first_pids["app"])

    restarted = workspace.api_ok("POST", app_path(project, app, ":restart"))
    assert restarted["status"] == "APPLICATION_STARTING"
    workspace.wait_for(lambda: not any(alive(p) for p in first_pids.values()), bool, what="old tree to end")
    running = workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
    assert running["running_at"] > app["created_at"]
    echoed = workspace.app_request(app, "GET", "/").json()
    assert echoed["env"]["APP_VAR"] == "patched" and "PROJECT_VAR" not in echoed["env"]

    # Restart of a stopped app starts it again.
    workspace.api_ok("POST", app_path(project, app, ":stop"))
    workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_STOPPED"})
    workspace.api_ok("POST", app_path(project, app, ":restart"))
    workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
    live = workspace.processes()
    assert live

    # Delete stops first, leaves nothing behind and frees the subdomain.
    delete_app(workspace, project, app)
    assert not any(alive(pid) for pid in live)
    assert workspace.processes() == []
    assert workspace.api("GET", app_path(project, app)).status_code == 404
    again = create_app(workspace, project, subdomain=app["subdomain"], name="again")
    delete_app(workspace, project, again)


def test_subdomain_is_unique_across_the_workspace(
    workspace: WorkspaceHandle, project: dict[str, Any], test_apps_dir: Path
) -> None:
    other = workspace.create_project(f"apps-other-{uuid.uuid4().hex[:6]}", files_from=test_apps_dir)
    app = create_app(workspace, project, script="exit_app.py", environment={"APP_SLEEP": "0"})
    duplicate = workspace.api(
        "POST",
        f"/api/v2/projects/{other['id']}/applications",
        json={
            "name": "dup",
            "subdomain": app["subdomain"],
            "script": "http_app.py",
            "runtime_identifier": workspace.runtime_identifier(),
        },
    )
    assert duplicate.status_code == 409 and duplicate.json()["code"] == 6
    assert "subdomain" in duplicate.json()["message"]
    delete_app(workspace, project, app)
    workspace.api_ok("DELETE", f"/api/v2/projects/{other['id']}")


def test_app_start_latency_keeps_it_starting(workspace: WorkspaceHandle, project: dict[str, Any]) -> None:
    workspace.set_latency(app_start_seconds=1.0)
    try:
        app = create_app(workspace, project)
        assert app["status"] == "APPLICATION_STARTING" and "starting_at" not in app  # not yet: left out
        running = workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
        # Its process started only after the injected latency.
        assert seconds_between(running["created_at"], running["starting_at"]) >= 1.0
    finally:
        workspace.set_latency()
    delete_app(workspace, project, app)


def test_deleting_a_project_stops_its_apps(workspace: WorkspaceHandle, test_apps_dir: Path) -> None:
    doomed = workspace.create_project(f"doomed-{uuid.uuid4().hex[:6]}", files_from=test_apps_dir)
    app = create_app(workspace, doomed)
    workspace.wait_for_app(doomed["id"], app["id"], {"APPLICATION_RUNNING"})
    assert workspace.processes()
    workspace.api_ok("DELETE", f"/api/v2/projects/{doomed['id']}")
    assert workspace.processes() == []


def test_a_restart_right_after_a_failure_is_not_caught_by_the_old_trees_sweep(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    """The app's script dies; the moment the API says FAILED a client restarts it (as `up` and the
    watch do): the new engine keeps running — the sweep of what the old one left behind is over."""
    import signal
    import time

    app = create_app(workspace, project, script="tree_app.py")
    workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
    pid_file = workspace.project_dir(project["id"]) / f"tree-pids-{app['id']}.json"
    old = workspace.host_pids(app["id"], json.loads(pid_file.read_text()))
    os.kill(old["app"], signal.SIGKILL)
    workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_FAILED"}, timeout=20)
    assert not any(alive(pid) for pid in old.values()), old  # the old tree is gone when FAILED shows
    workspace.api_ok("POST", app_path(project, app, ":restart"))
    workspace.wait_for_app(project["id"], app["id"], {"APPLICATION_RUNNING"})
    new = workspace.host_pids(app["id"], json.loads(pid_file.read_text()))
    assert new["app"] != old["app"]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the old sweep had up to its grace period to strike
        assert all(alive(pid) for pid in new.values()), new
        time.sleep(0.1)
    assert workspace.api_ok("GET", app_path(project, app))["status"] == "APPLICATION_RUNNING"
    delete_app(workspace, project, app)
