"""`cai_integration/quick_start.sh` driven by answers on stdin, against the local workspace."""

from __future__ import annotations

from support.cli import quick_start_env, run_quick_start

from ray_serve_cai.workspace.testing import WorkspaceHandle


def test_cml_answers_test_the_connection_and_stop_before_deploying(workspace: WorkspaceHandle) -> None:
    env = quick_start_env(workspace)
    proc = run_quick_start(["cml", workspace.url, workspace.api_key, "3", "0", "no"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "API key accepted" in proc.stdout
    assert "Not deploying" in proc.stdout
    assert workspace.api_key not in proc.stdout + proc.stderr  # read without echo, never printed


def test_bad_answers_exit_2_with_a_clear_message(workspace: WorkspaceHandle) -> None:
    env = quick_start_env(workspace)
    proc = run_quick_start(["mars"], env)
    assert proc.returncode == 2
    assert "answer 'cml' or 'local', not 'mars'" in proc.stderr

    proc = run_quick_start(["local", "two"], env)
    assert proc.returncode == 2
    assert "the number of workers must be a whole number, not 'two'" in proc.stderr


def test_a_wrong_api_key_stops_at_the_connection_test(workspace: WorkspaceHandle) -> None:
    env = quick_start_env(workspace)
    proc = run_quick_start(["cml", workspace.url, "not-the-key"], env)
    assert proc.returncode == 1
    assert "CML rejected the API key (401)" in proc.stderr
    assert "cannot reach the workspace" in proc.stderr
