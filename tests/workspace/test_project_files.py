"""The project-file operations of CML's spec against the local workspace: upload, list, download,
rename and delete work on the folder the workloads see (a job reads what was uploaded, the API
downloads what the job wrote)."""

from __future__ import annotations

import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ray_serve_cai.cml import BadRequest, CMLClient, CMLSettings, NotFound
from ray_serve_cai.workspace.testing import WorkspaceHandle

READER = textwrap.dedent(
    """
    from pathlib import Path
    text = Path("inputs/data/hello.txt").read_text()
    Path("outputs").mkdir(exist_ok=True)
    Path("outputs/seen.txt").write_text(text.upper())
    """
)


@pytest.fixture
def client(workspace: WorkspaceHandle) -> Iterator[CMLClient]:
    with CMLClient(CMLSettings(host=workspace.url, api_key=workspace.api_key)) as cml:
        yield cml


@pytest.fixture
def project(workspace: WorkspaceHandle) -> Iterator[dict[str, Any]]:
    created = workspace.create_project(f"files-{uuid.uuid4().hex[:8]}")
    try:
        yield created
    finally:
        workspace.api("DELETE", f"/api/v2/projects/{created['id']}")


def test_a_job_reads_an_uploaded_file_and_the_api_downloads_what_it_wrote(
    workspace: WorkspaceHandle, client: CMLClient, project: dict[str, Any]
) -> None:
    pid = project["id"]
    client.upload_project_file(pid, "inputs/data/hello.txt", b"hello from the files api\n")
    client.upload_project_file(pid, "reader.py", READER.encode())

    root = {f.path: f for f in client.list_project_files(pid)}
    assert root["inputs"].is_dir and root["inputs"].file_size is None
    assert root["reader.py"].file_size == len(READER.encode())
    nested = client.list_project_files(pid, "inputs/data")
    assert [(f.path, f.is_dir, f.file_size) for f in nested] == [("inputs/data/hello.txt", False, 25)]

    job = client.create_job(
        pid, name="reader", script="reader.py", runtime_identifier=workspace.runtime_identifier()
    )
    run = client.create_job_run(pid, job.id)
    finished = workspace.wait_for_run(pid, job.id, run.id)
    assert finished["status"] == "ENGINE_SUCCEEDED", finished
    assert client.download_project_file(pid, "outputs/seen.txt") == b"HELLO FROM THE FILES API\n"


def test_rename_replace_and_delete(client: CMLClient, project: dict[str, Any]) -> None:
    pid = project["id"]
    client.upload_project_file(pid, "a/one.bin", bytes(range(256)))
    client.upload_project_file(pid, "a/one.bin", b"replaced")  # an upload replaces the file
    assert client.download_project_file(pid, "a/one.bin") == b"replaced"

    moved = client.rename_project_file(pid, "a/one.bin", "b/two.bin")
    assert (moved.path, moved.is_dir, moved.file_size) == ("b/two.bin", False, 8)
    with pytest.raises(NotFound):
        client.download_project_file(pid, "a/one.bin")
    assert client.download_project_file(pid, "b/two.bin") == b"replaced"

    client.delete_project_file(pid, "b")
    assert "b" not in {f.path for f in client.list_project_files(pid)}
    with pytest.raises(NotFound):
        client.list_project_files(pid, "b")


@pytest.mark.parametrize("path", ["../outside.txt", "a/../../outside.txt"])
def test_paths_stay_inside_the_project(client: CMLClient, project: dict[str, Any], path: str) -> None:
    with pytest.raises(BadRequest, match="inside the project"):
        client.upload_project_file(project["id"], path, b"x")
    with pytest.raises(BadRequest, match="inside the project"):
        client.download_project_file(project["id"], path)


def test_a_directory_is_not_downloaded(client: CMLClient, project: dict[str, Any]) -> None:
    client.upload_project_file(project["id"], "d/f.txt", b"x")
    with pytest.raises(BadRequest, match="is a directory"):
        client.download_project_file(project["id"], "d")
