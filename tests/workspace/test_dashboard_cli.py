"""`ray-cai dashboard` without Ray: a stand-in head application in the real local workspace, and the
CML case (no `url` field) against a recorded CML answer."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.fakes import cli_env, run_cli

from ray_serve_cai.access import DashboardError, dashboard_url, find_head_application
from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.workspace.testing import WorkspaceHandle

CLUSTER = "dash"
HEAD = f"ray-{CLUSTER}-head"


@pytest.fixture(scope="module")
def project(workspace: WorkspaceHandle, test_apps_dir: Path) -> Iterator[dict[str, Any]]:
    project = workspace.create_project(f"dash-{uuid.uuid4().hex[:8]}", files_from=test_apps_dir)
    try:
        yield project
    finally:
        workspace.api_ok("DELETE", f"/api/v2/projects/{project['id']}")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dash") / "ray_cluster_config.yaml"
    path.write_text(f"ray_cluster:\n  name: {CLUSTER}\n  num_workers: 0\n")
    return path


def test_without_a_head_it_fails_in_one_line(
    workspace: WorkspaceHandle, project: dict[str, Any], config: Path, tmp_path: Path
) -> None:
    proc = run_cli(
        ["dashboard", "--local", "-p", project["name"], "-c", str(config)],
        cwd=tmp_path,
        env=cli_env(workspace),
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"no head application {HEAD!r}" in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_config_is_bad_input(workspace: WorkspaceHandle, tmp_path: Path) -> None:
    proc = run_cli(
        ["dashboard", "--local", "-c", str(tmp_path / "nope.yaml")], cwd=tmp_path, env=cli_env(workspace)
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_local_link_logs_in_once_and_open_hands_it_to_the_browser(
    workspace: WorkspaceHandle, project: dict[str, Any], config: Path, tmp_path: Path
) -> None:
    head = workspace.api_ok(
        "POST",
        f"/api/v2/projects/{project['id']}/applications",
        json={
            "name": HEAD,
            "subdomain": HEAD,
            "script": "http_app.py",
            "runtime_identifier": workspace.runtime_identifier(),
        },
    )
    head = workspace.wait_for_app(project["id"], head["id"], {"APPLICATION_RUNNING"})
    opened = tmp_path / "opened.txt"
    recorder = tmp_path / "browser.py"
    recorder.write_text("import sys, pathlib\npathlib.Path(sys.argv[1]).write_text(sys.argv[2])\n")
    env = cli_env(workspace, BROWSER=f"{sys.executable} {recorder} {opened} %s")
    target = ["--local", "-p", project["name"], "-c", str(config)]

    shown = run_cli(["dashboard", *target, "--json", "--open"], cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    url = json.loads(shown.stdout)["url"]
    assert url.startswith(f"{head['url']}/_workspace/login?code=")
    assert opened.read_text() == url  # --open gave the browser the same link
    plain = run_cli(["dashboard", *target], cwd=tmp_path, env=cli_env(workspace))
    second = plain.stdout.strip().splitlines()[-1]
    assert plain.returncode == 0 and second != url and second.startswith(head["url"])

    with httpx.Client(trust_env=False) as browser:
        landed = browser.get(url, follow_redirects=True)
        assert landed.status_code == 200 and str(landed.url) == f"{head['url']}/"
        assert landed.json()["path"] == "/" and "authorization" not in landed.json()["headers"]
        assert browser.get(url).status_code == 401  # used
    with httpx.Client(trust_env=False) as other:
        assert other.get(second, follow_redirects=True).status_code == 200  # each link once, any browser


def test_on_cml_it_is_the_app_url_and_no_login_link_is_asked_for() -> None:
    calls: list[str] = []

    def cml(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        app = {"id": "a1", "name": HEAD, "subdomain": HEAD, "status": "APPLICATION_RUNNING"}
        return httpx.Response(200, json={"applications": [app], "next_page_token": ""})

    settings = CMLSettings(host="https://ml.example.cloudera.site", api_key="k" * 20)
    with CMLClient(settings, transport=httpx.MockTransport(cml)) as client:
        head = find_head_application(client, "p1", CLUSTER)
        assert dashboard_url(client, head) == f"https://{HEAD}.ml.example.cloudera.site/"
        with pytest.raises(DashboardError, match="no head application 'ray-other-head'"):
            find_head_application(client, "p1", "other")
    assert calls == ["/api/v2/projects/p1/applications"] * 2
