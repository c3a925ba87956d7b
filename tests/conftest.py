"""Shared fixtures: a real local CML workspace daemon for the whole test session.

* `workspace` (session): a `WorkspaceHandle` with `.url`, `.api_key`, `.home`, `.api(method, path, **kw)`,
  `.counters()`, `.reset_counters()`, `.set_faults(**kw)`, `.clear_faults()`, `.set_latency(**kw)` and
  waiting helpers. Tests stop every workload they start and reset the controls they change.
* `workspace_env` (function): `CML_HOST` / `CML_API_KEY` pointing at that workspace.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace
from ray_serve_cai.workspace.testing import WorkspaceHandle

TEST_APPS_DIR = Path(__file__).parent / "support" / "apps"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkspaceHandle]:
    home = tmp_path_factory.mktemp("workspace-home")
    # CML's automatic restart of failed apps is off here, so an app a test leaves failed is not
    # started again minutes later under another test; a test of it turns it on with
    # `workspace.set_restart_policy(enabled=True, delay_seconds=...)` (`controls` resets it).
    # The default of `ray-cai workspace start` (shared-host for now); RAY_CAI_TEST_PODS=1 runs the
    # whole suite with pods (root on Linux), =0 forces shared-host. tests/*/test_pods.py make pods
    # of their own when this one has none (`pods_workspace`).
    wanted = os.environ.get("RAY_CAI_TEST_PODS", "").strip()
    pods = {"0": False, "1": True}.get(wanted)
    info = start_workspace(home, app_restart=False, pods=pods)
    handle = WorkspaceHandle(info)
    try:
        yield handle
    finally:
        handle.close()
        stop_workspace(home)


@pytest.fixture(scope="session")
def pods_workspace(
    workspace: WorkspaceHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkspaceHandle]:
    """A workspace whose workloads run in pods: the session one when it has them, else one of its own
    (skipped where pods cannot be made: not root, not Linux)."""
    if workspace.pods:
        yield workspace
        return
    from ray_serve_cai.workspace.pods import pods_possible

    possible, why = pods_possible()
    if not possible:
        pytest.skip(f"pods cannot be made here: {why}")
    home = tmp_path_factory.mktemp("pods-workspace-home")
    handle = WorkspaceHandle(start_workspace(home, app_restart=False, pods=True))
    try:
        yield handle
    finally:
        handle.close()
        stop_workspace(home)


@pytest.fixture
def workspace_env(workspace: WorkspaceHandle, monkeypatch: pytest.MonkeyPatch) -> WorkspaceHandle:
    monkeypatch.setenv("CML_HOST", workspace.url)
    monkeypatch.setenv("CML_API_KEY", workspace.api_key)
    return workspace


@pytest.fixture
def controls(workspace: WorkspaceHandle) -> Iterator[WorkspaceHandle]:
    """The shared workspace with its test controls (faults, latency) reset before and after."""
    workspace.reset_controls()
    try:
        yield workspace
    finally:
        workspace.reset_controls()


@pytest.fixture(scope="module")
def project_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files to copy into a project: the fake Ray node app, the lock script, trivial job scripts."""
    from support.fakes import write_fake_project_files

    return write_fake_project_files(tmp_path_factory.mktemp("fake-files"))


@pytest.fixture(scope="session")
def test_apps_dir() -> Path:
    return TEST_APPS_DIR
