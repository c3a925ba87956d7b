"""A job chain where CML skips a step: the child's job already has a run going when its parent
succeeds, so CML records an `ENGINE_SKIPPED` run; the follower reports it as skipped at once instead
of waiting for it until the deadline."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ray_serve_cai.cml import ENGINE_SKIPPED, CMLClient, CMLSettings
from ray_serve_cai.config.deploy import parse_deploy_spec
from ray_serve_cai.deploy.jobs import SKIPPED_BY_CML, ChainState, run_and_follow
from ray_serve_cai.workspace.testing import WorkspaceHandle

HOLD = "import os, time\ntime.sleep(float(os.environ.get('HOLD_SECONDS', '0')))\n"


@pytest.fixture
def project(workspace: WorkspaceHandle, tmp_path: Path) -> Iterator[dict[str, Any]]:
    created = workspace.create_project(f"skip-{uuid.uuid4().hex[:8]}")
    (workspace.project_dir(created["id"]) / "hold.py").write_text(HOLD)
    try:
        yield created
    finally:
        workspace.api("DELETE", f"/api/v2/projects/{created['id']}")


def test_a_skipped_child_is_reported_as_skipped_not_waited_for(
    workspace: WorkspaceHandle, project: dict[str, Any]
) -> None:
    pid = project["id"]
    runtime = workspace.runtime_identifier()
    spec = parse_deploy_spec(
        {
            "project": {"name": project["name"]},
            "jobs": {
                "root": {"name": "root", "script": "hold.py"},
                "child": {"name": "child", "script": "hold.py", "parent_job_key": "root"},
            },
        },
        env={},
    )
    with CMLClient(CMLSettings(host=workspace.url, api_key=workspace.api_key)) as client:
        root = client.create_job(pid, name="root", script="hold.py", runtime_identifier=runtime)
        child = client.create_job(
            pid, name="child", script="hold.py", parent_id=root.id, runtime_identifier=runtime
        )
        # The child's job is busy: a run of its own holds it for a minute.
        busy = client.create_job_run(pid, child.id, environment={"HOLD_SECONDS": "60"})
        try:
            state = ChainState(jobs={"root": root, "child": child}, stale={"root"})
            said: list[str] = []
            # Shorter than the busy run: following the skipped step until it "ends" would time out.
            outcomes = run_and_follow(
                client, pid, spec, state, timeout=50, poll_interval=0.2, progress=said.append
            )
        finally:
            client.stop_job_run(pid, child.id, busy.id)
        assert outcomes["root"].status == "ENGINE_SUCCEEDED"
        assert (outcomes["child"].action, outcomes["child"].status) == (SKIPPED_BY_CML, ENGINE_SKIPPED)
        assert any("skipped" in line for line in said), said
        assert client.get_job_run(pid, child.id, busy.id).id == busy.id
