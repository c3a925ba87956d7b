"""Behaviour of the CML client against the local workspace (a real HTTP server, real processes).

The workspace's test controls (`/_workspace/counters`, `/faults`) show what went over the wire.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ray_serve_cai.cml import (
    APPLICATION_RUNNING,
    APPLICATION_STOPPED,
    ENGINE_STOPPED,
    ENGINE_SUCCEEDED,
    Application,
    CMLClient,
    CMLConnectionError,
    CMLSettings,
    CreateJob,
    CreateOutcomeUnknown,
    NotFound,
    Project,
    RateLimited,
    RefusedField,
    RetryPolicy,
    Unauthorized,
)
from ray_serve_cai.cml import _client as client_module

T = TypeVar("T")

APP_SCRIPT = textwrap.dedent(
    """
    import json, os
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({
                "path": self.path,
                "host": self.headers.get("Host"),
                "marker": os.environ.get("APP_MARKER"),
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Handler).serve_forever()
    """
)

JOB_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    with open("job-%s.json" % os.environ.get("CDSW_ENGINE_ID", "x"), "w") as f:
        json.dump({"argv": sys.argv[1:], "env": os.environ.get("RUN_MARKER"),
                   "job_arguments": os.environ.get("JOB_ARGUMENTS")}, f)
    time.sleep(float(os.environ.get("SLEEP", "0")))
    """
)


# -- helpers -------------------------------------------------------------------------------------
def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_for(check: Callable[[], T | None], timeout: float = 60, interval: float = 0.25) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def counts(workspace: Any) -> dict[str, int]:
    snapshot = workspace.counters()
    return dict(snapshot.get("counts", snapshot))


def count_of(workspace: Any, method: str, route: str) -> int:
    return counts(workspace).get(f"{method} /api/v2{route}", 0)


def api_json(workspace: Any, method: str, path: str, **kwargs: Any) -> Any:
    """The workspace fixture's raw call, decoded (it may hand back a response or the JSON itself)."""
    result = workspace.api(method, path, **kwargs)
    return result.json() if hasattr(result, "json") and callable(result.json) else result


def project_dir(workspace: Any, project: Project) -> Path:
    path = Path(workspace.home) / "projects" / project.id
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def settings(workspace: Any) -> CMLSettings:
    return CMLSettings(host=workspace.url, api_key=workspace.api_key, retry_deadline=30)


@pytest.fixture
def client(settings: CMLSettings, workspace: Any) -> Iterator[CMLClient]:
    workspace.clear_faults()
    workspace.reset_counters()
    with CMLClient(settings) as c:
        yield c
    workspace.clear_faults()


@pytest.fixture
def runtime_id(client: CMLClient) -> str:
    enabled = [r for r in client.list_runtimes(search_filter={"edition": "Standard"}) if r.is_enabled]
    assert enabled, "the workspace offers no enabled Standard runtime"
    return enabled[0].image_identifier


@pytest.fixture
def project(client: CMLClient, workspace: Any) -> Iterator[Project]:
    created = client.create_project(unique("cml-test"))
    created = wait_for(lambda: (p := client.get_project(created.id)).creation_status != "creating" and p)
    assert created.creation_status == "success"
    directory = project_dir(workspace, created)
    (directory / "app.py").write_text(APP_SCRIPT)
    (directory / "job.py").write_text(JOB_SCRIPT)
    yield created
    client.delete_project(created.id)
    with pytest.raises(NotFound):
        client.get_project(created.id)


@pytest.fixture
def running_apps(client: CMLClient, project: Project) -> Iterator[list[Application]]:
    """Applications created by a test; deleted afterwards so no process outlives the test."""
    apps: list[Application] = []
    yield apps
    for app in apps:
        with contextlib.suppress(NotFound):
            client.delete_application(project.id, app.id)


# -- projects ------------------------------------------------------------------------------------
def test_project_create_get_patch_environment_round_trip(client: CMLClient, workspace: Any) -> None:
    name = unique("env-project")
    created = client.create_project(name, description="d", environment={"A": "1"})
    assert created.name == name and created.environment == {"A": "1"}

    raw = api_json(workspace, "GET", f"/api/v2/projects/{created.id}")
    assert isinstance(raw["environment"], str), "CML returns environment as a JSON string"

    updated = client.update_project(created.id, environment={"A": "1", "B": "two words"}, description="e")
    assert updated.environment == {"A": "1", "B": "two words"}
    fetched = client.get_project(created.id)
    assert fetched.environment == {"A": "1", "B": "two words"}
    assert fetched.description == "e"
    assert count_of(workspace, "PATCH", "/projects/{project_id}") == 1


def test_find_project_by_name_is_exact_across_substring_matches(client: CMLClient) -> None:
    base = unique("ray")
    made = {n: client.create_project(n) for n in (base, f"{base}-cluster", f"{base}-cluster-old")}

    substring_hits = client.list_projects(search_filter={"name": f"{base}-cluster"})
    assert {p.name for p in substring_hits} >= {f"{base}-cluster", f"{base}-cluster-old"}

    for name, project in made.items():
        found = client.find_project_by_name(name)
        assert found is not None and found.id == project.id
    assert client.find_project_by_name(f"{base}-clust") is None


def test_get_missing_project_is_not_found(client: CMLClient) -> None:
    with pytest.raises(NotFound) as info:
        client.get_project("no-such-project")
    assert info.value.status_code == 404


# -- jobs and pagination -------------------------------------------------------------------------
def test_list_jobs_follows_every_page(
    client: CMLClient, project: Project, workspace: Any, runtime_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(25):
        client.create_job(project.id, name=f"job-{i:02d}", script="job.py", runtime_identifier=runtime_id)

    workspace.reset_counters()
    jobs = client.list_jobs(project.id)
    assert sorted(j.name for j in jobs) == [f"job-{i:02d}" for i in range(25)]
    assert count_of(workspace, "GET", "/projects/{project_id}/jobs") == 1  # one call at page_size=100

    monkeypatch.setattr(client_module, "PAGE_SIZE", 10)
    workspace.reset_counters()
    paged = client.list_jobs(project.id, search_filter={"name": "job-"})
    assert len({j.id for j in paged}) == 25
    assert count_of(workspace, "GET", "/projects/{project_id}/jobs") == 3


def test_job_parent_is_parent_id_on_create_and_on_read(
    client: CMLClient, project: Project, runtime_id: str
) -> None:
    rt = CreateJob(name="root", script="job.py", runtime_identifier=runtime_id)
    root = client.create_job(project.id, rt)
    child = client.create_job(
        project.id,
        name="child",
        script="job.py",
        parent_id=root.id,
        nvidia_gpu=0,
        runtime_identifier=runtime_id,
    )
    assert child.parent_id == root.id
    assert client.get_job(project.id, child.id).parent_id == root.id
    assert root.parent_id is None

    other = client.create_job(project.id, name="other", script="job.py", runtime_identifier=runtime_id)
    moved = client.update_job(project.id, child.id, parent_id=other.id, environment={"K": "v"})
    assert moved.parent_id == other.id and moved.environment == {"K": "v"}
    assert client.find_job_by_name(project.id, "child") is not None

    client.delete_job(project.id, other.id)
    with pytest.raises(NotFound):
        client.get_job(project.id, other.id)


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("job", "paused"),
        ("job", "timezone"),
        ("job", "description"),
        ("project", "default_project_engine_type"),
    ],
)
def test_a_field_cml_would_ignore_is_refused_before_sending(
    client: CMLClient, project: Project, workspace: Any, kind: str, field: str
) -> None:
    """Read-only (`Job.paused`, `Job.timezone`) and unknown fields are bad input (exit 2), not sent."""
    workspace.reset_counters()
    update = client.update_job if kind == "job" else client.update_project
    ids = (project.id, "any-job") if kind == "job" else (project.id,)
    with pytest.raises(RefusedField, match=field) as caught:
        update(*ids, **{field: "x"})
    assert caught.value.exit_code == 2 and workspace.counters()["total"] == 0


def test_job_runs_newest_first_arguments_and_environment(
    client: CMLClient, project: Project, workspace: Any, runtime_id: str
) -> None:
    job = client.create_job(project.id, name="quick", script="job.py", runtime_identifier=runtime_id)
    assert client.latest_job_run(project.id, job.id) is None

    first = client.create_job_run(project.id, job.id, environment={"RUN_MARKER": "one"}, arguments="--a 1")
    done = wait_for(lambda: (r := client.get_job_run(project.id, job.id, first.id)).is_terminal and r)
    assert done.status == ENGINE_SUCCEEDED and done.succeeded

    second = client.create_job_run(project.id, job.id)
    wait_for(lambda: client.get_job_run(project.id, job.id, second.id).is_terminal)

    runs = client.list_job_runs(project.id, job.id)
    assert [r.id for r in runs] == [second.id, first.id]
    latest = client.latest_job_run(project.id, job.id)
    assert latest is not None and latest.id == second.id

    outputs = [p.read_text() for p in project_dir(workspace, project).glob("job-*.json")]
    assert any('"one"' in text and "--a" in text for text in outputs), outputs


def test_stop_job_run(client: CMLClient, project: Project, runtime_id: str) -> None:
    job = client.create_job(
        project.id,
        name="sleeper",
        script="job.py",
        environment={"SLEEP": "120"},
        runtime_identifier=runtime_id,
    )
    run = client.create_job_run(project.id, job.id)
    assert run.is_active
    client.stop_job_run(project.id, job.id, run.id)
    stopped = wait_for(
        lambda: (r := client.get_job_run(project.id, job.id, run.id)).is_terminal and r, timeout=30
    )
    assert stopped.status == ENGINE_STOPPED


# -- applications --------------------------------------------------------------------------------
def test_application_lifecycle_and_app_request(
    client: CMLClient, project: Project, running_apps: list[Application], runtime_id: str
) -> None:
    subdomain = unique("cmltest")
    app = client.create_application(
        project.id,
        name=subdomain,
        subdomain=subdomain,
        script="app.py",
        cpu=1,
        memory=1,
        nvidia_gpu=0,
        environment={"APP_MARKER": "hello"},
        runtime_identifier=runtime_id,
        description="client test",
    )
    running_apps.append(app)
    assert app.environment == {"APP_MARKER": "hello"}

    wait_for(lambda: client.get_application(project.id, app.id).status == APPLICATION_RUNNING)
    listed = [a for a in client.list_applications(project.id) if a.id == app.id]
    assert listed and listed[0].is_running and listed[0].nvidia_gpu == 0

    # The local workspace's own URL for the app (its `url` field), for the object and for its name.
    assert client.app_url(app) == app.model_extra["url"] == client.app_url(subdomain)
    assert client.app_url(app).startswith("http://127.0.0.1:")

    def reached() -> Any:
        response = client.app_request(app, "GET", "/some/path?x=1")
        return response.status_code == 200 and response.json()

    body = wait_for(reached, timeout=30)
    assert body["marker"] == "hello"
    assert body["path"] == "/some/path?x=1"

    client.stop_application(project.id, app.id)
    wait_for(lambda: client.get_application(project.id, app.id).status == APPLICATION_STOPPED)

    client.restart_application(project.id, app.id)
    wait_for(lambda: client.get_application(project.id, app.id).is_running)

    updated = client.update_application(project.id, app.id, environment={"APP_MARKER": "changed"})
    assert updated.environment == {"APP_MARKER": "changed"}

    client.delete_application(project.id, app.id)
    running_apps.clear()
    with pytest.raises(NotFound):
        client.get_application(project.id, app.id)


def test_list_applications_follows_every_page(
    client: CMLClient,
    project: Project,
    running_apps: list[Application],
    workspace: Any,
    runtime_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = unique("page")
    for i in range(25):
        name = f"{prefix}-{i}"
        running_apps.append(
            client.create_application(
                project.id, name=name, subdomain=name, script="app.py", runtime_identifier=runtime_id
            )
        )
    monkeypatch.setattr(client_module, "PAGE_SIZE", 10)
    workspace.reset_counters()
    apps = client.list_applications(project.id, search_filter={"name": prefix})
    assert {a.id for a in apps} == {a.id for a in running_apps}
    assert count_of(workspace, "GET", "/projects/{project_id}/applications") == 3


# -- errors, retries, redaction ------------------------------------------------------------------
def test_bad_key_is_unauthorized_without_the_key(
    workspace: Any, settings: CMLSettings, caplog: pytest.LogCaptureFixture
) -> None:
    bad_key = "definitely-wrong-" + uuid.uuid4().hex
    bad = CMLSettings(host=settings.host, api_key=bad_key, retry_deadline=5)
    with caplog.at_level(logging.DEBUG), CMLClient(bad) as client, pytest.raises(Unauthorized) as info:
        client.list_projects()
    text = str(info.value)
    assert "401" in text and "CML_API_KEY" in text
    assert bad_key not in text and bad_key not in repr(info.value)
    assert bad_key not in caplog.text and workspace.api_key not in caplog.text


def test_injected_503_and_429_are_retried(settings: CMLSettings, project: Project, workspace: Any) -> None:
    workspace.set_faults(error_rate=0.5, statuses=[503, 429], seed=7, retry_after_seconds=0)
    workspace.reset_counters()
    calls = 6
    fast = RetryPolicy(deadline=30, base=0.05, cap=0.5)  # same logic, shorter waits
    with CMLClient(settings, retry=fast) as client:
        for _ in range(calls):
            assert client.get_project(project.id).id == project.id
    workspace.clear_faults()
    sent = count_of(workspace, "GET", "/projects/{project_id}")
    assert sent > calls, f"expected retries on top of {calls} calls, saw {sent}"


def test_connection_resets_are_retried(client: CMLClient, project: Project, workspace: Any) -> None:
    workspace.set_faults(reset_rate=0.4, seed=3)
    workspace.reset_counters()
    for _ in range(5):
        assert client.list_jobs(project.id) == []
    workspace.clear_faults()
    assert count_of(workspace, "GET", "/projects/{project_id}/jobs") > 5


def test_dropped_create_response_is_outcome_unknown_and_not_repeated(
    client: CMLClient, project: Project, workspace: Any, runtime_id: str
) -> None:
    workspace.set_faults(drop_create_response_rate=1.0, seed=1)
    workspace.reset_counters()
    with pytest.raises(CreateOutcomeUnknown) as info:
        client.create_job(project.id, name="maybe", script="job.py", runtime_identifier=runtime_id)
    workspace.clear_faults()
    assert info.value.maybe_applied
    assert "list before creating" in str(info.value)
    assert count_of(workspace, "POST", "/projects/{project_id}/jobs") == 1
    # Observing again shows what happened: the job exists exactly once.
    assert [j.name for j in client.list_jobs(project.id)] == ["maybe"]


def test_unreachable_host_is_a_connection_error_within_the_deadline() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = CMLSettings(host=f"http://127.0.0.1:{port}", api_key="k" * 20, retry_deadline=2, timeout=2)
    # How soon it gives up (within the deadline plus one timeout) is benchmarks/bench_deadlines.py.
    with CMLClient(settings) as client, pytest.raises(CMLConnectionError) as info:
        client.list_projects()
    assert not info.value.maybe_applied
    assert f"127.0.0.1:{port}" in str(info.value) and "k" * 20 not in str(info.value)


def test_connection_cut_during_create_is_outcome_unknown(
    client: CMLClient, project: Project, workspace: Any, runtime_id: str
) -> None:
    workspace.set_faults(drop_create_response_rate=1.0, drop_mode="reset", seed=2)
    workspace.reset_counters()
    name = unique("cut")
    with pytest.raises(CreateOutcomeUnknown) as info:
        client.create_application(
            project.id, name=name, subdomain=name, script="app.py", runtime_identifier=runtime_id
        )
    workspace.clear_faults()
    assert info.value.status_code is None and info.value.maybe_applied
    assert count_of(workspace, "POST", "/projects/{project_id}/applications") == 1
    found = [a for a in client.list_applications(project.id, search_filter={"name": name}) if a.name == name]
    for app in found:  # whatever happened, leave nothing running
        client.delete_application(project.id, app.id)


def test_retry_after_is_honoured_until_the_deadline(
    settings: CMLSettings, project: Project, workspace: Any
) -> None:
    workspace.set_faults(error_rate=1.0, statuses=[429], retry_after_seconds=1, seed=4)
    workspace.reset_counters()
    started = time.monotonic()
    short = CMLSettings(host=settings.host, api_key=settings.api_key, retry_deadline=2.5)
    with CMLClient(short) as client, pytest.raises(RateLimited) as info:
        client.get_project(project.id)
    elapsed = time.monotonic() - started
    workspace.clear_faults()
    attempts = count_of(workspace, "GET", "/projects/{project_id}")
    assert attempts == 3, "attempts at 0 s, 1 s and 2 s; a fourth would start after the deadline"
    assert elapsed >= 2.0, "the client did not wait the Retry-After between attempts"
    # That it gives up soon after the deadline (< 3.5 s) is benchmarks/bench_deadlines.py.
    assert "gave up after 3 attempt(s)" in str(info.value)


def test_settings_from_env_inside_a_workload(
    client: CMLClient, project: Project, workspace: Any, runtime_id: str
) -> None:
    """A job uses CMLSettings.from_env() (CDSW_DOMAIN, CDSW_APIV2_KEY, CDSW_PROJECT_ID) to call the API."""
    script = textwrap.dedent(
        """
        from ray_serve_cai.cml import CMLClient, CMLSettings
        settings = CMLSettings.from_env()
        with CMLClient(settings) as client:
            project = client.get_project(settings.project_id)
        open("from-env.txt", "w").write(f"{settings.host} {project.id}")
        """
    )
    job = client.create_job(project.id, name="from-env", script="from_env.py", runtime_identifier=runtime_id)
    (project_dir(workspace, project) / "from_env.py").write_text(script)
    run = client.create_job_run(project.id, job.id)
    done = wait_for(lambda: (r := client.get_job_run(project.id, job.id, run.id)).is_terminal and r)
    assert done.succeeded, done
    host, project_id = (project_dir(workspace, project) / "from-env.txt").read_text().split()
    assert project_id == project.id
    assert host == client.settings.host


def test_settings_from_cml_host_and_key(workspace_env: Any) -> None:
    settings = CMLSettings.from_env()
    assert settings.host == workspace_env.url.rstrip("/")
    with CMLClient() as client:  # no settings: from the environment
        assert isinstance(client.list_runtimes(), list)
    assert workspace_env.api_key not in repr(settings)
