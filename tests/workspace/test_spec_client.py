"""A client written from CML's spec alone (plain httpx, no ray_serve_cai code) tried as a new user
would: validate the key, upload a file, list and download it, run an application from it, list the
workloads and filter applications by `status: running`. Its requests are checked against the spec by
the conformance plugin too (its User-Agent starts with `ray-serve-cai`)."""

from __future__ import annotations

import json
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from ray_serve_cai.workspace.testing import WorkspaceHandle

APP = textwrap.dedent(
    """
    import os
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", int(os.environ["CDSW_APP_PORT"])), Handler).serve_forever()
    """
)


@pytest.fixture
def spec_client(workspace: WorkspaceHandle) -> Iterator[httpx.Client]:
    headers = {
        "Authorization": f"Bearer {workspace.api_key}",
        "User-Agent": "ray-serve-cai-spec-client-test/1",
    }
    with httpx.Client(
        base_url=f"{workspace.url}/api/v2", headers=headers, timeout=60, trust_env=False
    ) as client:
        yield client


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, f"{response.request.method} {response.request.url}: {response.text}"
    return response.json() if response.content else None


def file_segment(path: str) -> str:
    """`{path}` is one path segment: `/` travels as %2F; `.` (the root) as %2E, which httpx keeps."""
    return "%2E" if path == "." else quote(path, safe="")


def test_a_client_written_from_the_spec_works_against_the_workspace(
    workspace: WorkspaceHandle, spec_client: httpx.Client
) -> None:
    # ValidateAPIKey: POST /auth/validate_key
    key = ok(spec_client.post("/auth/validate_key", json={}))
    assert key["valid"] is True and key["username"]

    # CreateProject (local: "create the project but nothing else, files must be uploaded separately")
    project = ok(
        spec_client.post("/projects", json={"name": f"spec-{uuid.uuid4().hex[:8]}", "template": "local"})
    )
    pid = project["id"]
    try:
        deadline = time.monotonic() + 30
        while ok(spec_client.get(f"/projects/{pid}"))["creation_status"] != "success":
            assert time.monotonic() < deadline, "project creation did not finish"
            time.sleep(0.1)

        # UploadFile: multipart, the form-field name is the destination relative to /home/cdsw
        ok(spec_client.post(f"/projects/{pid}/files", files={"app/serve.py": ("serve.py", APP.encode())}))
        # ListProjectFiles
        root = ok(spec_client.get(f"/projects/{pid}/files/{file_segment('.')}"))["files"]
        assert {"path": "app", "is_dir": True} in root
        listed = ok(spec_client.get(f"/projects/{pid}/files/{file_segment('app')}"))["files"]
        assert listed == [{"path": "app/serve.py", "is_dir": False, "file_size": str(len(APP.encode()))}]
        # DownloadProjectFile: POST …/files/{path}:download
        downloaded = spec_client.post(f"/projects/{pid}/files/{file_segment('app/serve.py')}:download")
        assert downloaded.status_code == 200 and downloaded.content == APP.encode()

        runtime = ok(
            spec_client.get("/runtimes", params={"search_filter": json.dumps({"edition": "Standard"})})
        )
        app = ok(
            spec_client.post(
                f"/projects/{pid}/applications",
                json={
                    "name": "spec-app",
                    "subdomain": f"spec-{uuid.uuid4().hex[:8]}",
                    "script": "app/serve.py",
                    "runtime_identifier": runtime["runtimes"][0]["image_identifier"],
                },
            )
        )

        def apps_with(status: str) -> list[str]:
            query = {"search_filter": json.dumps({"status": status}), "page_size": 100}
            return [
                a["id"]
                for a in ok(spec_client.get(f"/projects/{pid}/applications", params=query))["applications"]
            ]

        deadline = time.monotonic() + 60
        while app["id"] not in apps_with("running"):
            assert time.monotonic() < deadline, "the application never showed up under status running"
            time.sleep(0.2)
        assert app["id"] not in apps_with("stopped")

        # ListWorkloadExecutions, filtered as the spec documents
        query = {"search_filter": json.dumps({"status": "running"}), "page_size": 1000}
        workloads = ok(spec_client.get("/workloads/executions", params=query))
        crns = {w["workload_crn"] for w in workloads["workloads"]}
        assert any(app["id"] in crn for crn in crns)
        assert all(e["status"] == "running" for e in workloads["executions"])
        assert "running" in ok(spec_client.get("/workloadstatus"))["workload_status"]

        ok(spec_client.post(f"/projects/{pid}/applications/{app['id']}:stop"))
        ok(spec_client.delete(f"/projects/{pid}/applications/{app['id']}"))
    finally:
        ok(spec_client.delete(f"/projects/{pid}"))
