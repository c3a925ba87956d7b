"""`cai_integration/quick_start.sh` driven by answers on stdin, against the local workspace."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ray_serve_cai.workspace.testing import WorkspaceHandle

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "cai_integration" / "quick_start.sh"


def run_quick_start(
    answers: list[str], env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)],
        input="\n".join(answers) + "\n",
        cwd=SCRIPT.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def base_env(workspace: WorkspaceHandle) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_", "GITHUB_"))}
    env.update(
        RAY_CAI_WORKSPACE_HOME=str(workspace.home), CML_PROJECT_NAME="ray-cai-quick-start", COLUMNS="200"
    )
    return env


def test_cml_answers_test_the_connection_and_stop_before_deploying(workspace: WorkspaceHandle) -> None:
    env = base_env(workspace)
    proc = run_quick_start(["cml", workspace.url, workspace.api_key, "3", "0", "no"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "API key accepted" in proc.stdout
    assert "Not deploying" in proc.stdout
    assert workspace.api_key not in proc.stdout + proc.stderr  # read without echo, never printed


def test_bad_answers_exit_2_with_a_clear_message(workspace: WorkspaceHandle) -> None:
    env = base_env(workspace)
    proc = run_quick_start(["mars"], env)
    assert proc.returncode == 2
    assert "answer 'cml' or 'local', not 'mars'" in proc.stderr

    proc = run_quick_start(["local", "two"], env)
    assert proc.returncode == 2
    assert "the number of workers must be a whole number, not 'two'" in proc.stderr


def test_a_wrong_api_key_stops_at_the_connection_test(workspace: WorkspaceHandle) -> None:
    env = base_env(workspace)
    proc = run_quick_start(["cml", workspace.url, "not-the-key"], env)
    assert proc.returncode == 1
    assert "CML rejected the API key (401)" in proc.stderr
    assert "cannot reach the workspace" in proc.stderr


@pytest.mark.ray
def test_local_answers_deploy_a_cluster(workspace: WorkspaceHandle) -> None:
    env = base_env(workspace)
    try:
        proc = run_quick_start(["local", "1", "0", "yes"], env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Ray cluster 'default': ready" in proc.stdout
        assert "dashboard: http://127.0.0.1:" in proc.stdout  # the head app's own loopback listener
    finally:
        subprocess.run(
            ["ray-cai", "down", "--local"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=300
        )
