"""The workspace's test controls: request counters by route template, seeded faults, process listing."""

from __future__ import annotations

import uuid

import httpx
import pytest

from ray_serve_cai.workspace.testing import WorkspaceHandle


def test_counters_count_api_requests_by_route_template(controls: WorkspaceHandle) -> None:
    project = controls.api_ok("POST", "/api/v2/projects", json={"name": f"count-{uuid.uuid4().hex[:6]}"})
    controls.api_ok("GET", f"/api/v2/projects/{project['id']}")
    controls.api_ok("GET", f"/api/v2/projects/{project['id']}/applications")
    controls.api_ok("GET", f"/api/v2/projects/{project['id']}/applications")
    controls.api("GET", "/_workspace/processes")  # controls are not counted
    snapshot = controls.counters()
    assert snapshot["counts"] == {
        "POST /api/v2/projects": 1,
        "GET /api/v2/projects/{project_id}": 1,
        "GET /api/v2/projects/{project_id}/applications": 2,
    }
    assert snapshot["total"] == 4
    controls.reset_counters()
    assert controls.counters() == {"counts": {}, "total": 0}
    controls.api_ok("DELETE", f"/api/v2/projects/{project['id']}")


def outcomes(workspace: WorkspaceHandle, n: int) -> list[object]:
    seen: list[object] = []
    for _ in range(n):
        try:
            response = httpx.get(
                f"{workspace.url}/api/v2/runtimes",
                headers={"Authorization": f"Bearer {workspace.api_key}"},
                trust_env=False,
            )
            seen.append((response.status_code, response.headers.get("retry-after")))
        except httpx.TransportError:
            seen.append("reset")
    return seen


def test_faults_are_seeded_and_shaped(controls: WorkspaceHandle) -> None:
    controls.set_faults(error_rate=0.5, statuses=[429, 503], reset_rate=0.2, seed=7)
    first = outcomes(controls, 40)
    controls.set_faults(error_rate=0.5, statuses=[429, 503], reset_rate=0.2, seed=7)
    assert outcomes(controls, 40) == first  # reproducible with a seed
    assert "reset" in first and (200, None) in first and (503, None) in first
    assert (429, "1") in first  # 429 carries Retry-After
    error = None
    for _ in range(50):
        response = controls.api("GET", "/api/v2/projects")
        if response.status_code == 503:
            error = response
            break
    assert error is not None and error.json()["code"] == 14 and error.headers["x-request-id"]
    # Faults never apply to the controls themselves.
    for _ in range(20):
        assert controls.api("GET", "/_workspace/counters").status_code == 200
    controls.clear_faults()
    assert set(outcomes(controls, 10)) == {(200, None)}


def test_dropped_create_response_still_creates(controls: WorkspaceHandle) -> None:
    name = f"dropped-{uuid.uuid4().hex[:6]}"
    controls.set_faults(drop_create_response_rate=1.0, seed=1)
    response = controls.api("POST", "/api/v2/projects", json={"name": name})
    assert response.status_code == 502
    assert controls.api("GET", "/api/v2/projects").status_code == 200  # reads are untouched
    controls.set_faults(drop_create_response_rate=1.0, drop_mode="reset", seed=1)
    with pytest.raises(httpx.TransportError):
        httpx.post(
            f"{controls.url}/api/v2/projects",
            json={"name": f"{name}-reset"},
            headers={"Authorization": f"Bearer {controls.api_key}"},
            trust_env=False,
        )
    controls.clear_faults()
    listed = controls.api_ok("GET", "/api/v2/projects", params={"search_filter": f'{{"name": "{name}"}}'})
    assert sorted(p["name"] for p in listed["projects"]) == [name, f"{name}-reset"]
    for project in listed["projects"]:
        controls.api_ok("DELETE", f"/api/v2/projects/{project['id']}")


def test_bad_control_input_is_rejected(controls: WorkspaceHandle) -> None:
    assert controls.api("PUT", "/_workspace/faults", json={"error_rate": 2}).status_code == 400
    assert controls.api("PUT", "/_workspace/faults", json={"statuses": [200]}).status_code == 400
    assert controls.api("PUT", "/_workspace/latency", json={"app_start_seconds": -1}).status_code == 400
    assert controls.api_ok("GET", "/_workspace/latency") == {
        "app_start_seconds": 0.0,
        "job_start_seconds": 0.0,
    }
    assert controls.api_ok("GET", "/_workspace/processes")["pids"] == []


def test_a_typo_in_a_control_is_refused_naming_the_key(controls: WorkspaceHandle) -> None:
    """`error_rates` instead of `error_rate` must not silently inject nothing."""
    typo = controls.api("PUT", "/_workspace/faults", json={"error_rates": 1.0})
    assert typo.status_code == 400 and typo.json()["code"] == 3
    assert "'error_rates'" in typo.json()["message"] and "error_rate" in typo.json()["message"]
    assert controls.api_ok("GET", "/_workspace/faults")["plan"] is None  # nothing was configured
    latency_typo = controls.api("PUT", "/_workspace/latency", json={"app_start": 1})
    assert latency_typo.status_code == 400 and "'app_start'" in latency_typo.json()["message"]
