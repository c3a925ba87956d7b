"""`cai_integration/quick_start.sh` answered for a local deploy: a real Ray cluster comes up. The
answers that stop before deploying are in tests/workspace/test_quick_start.py."""

from __future__ import annotations

import subprocess

import pytest
from support.cli import quick_start_env, run_quick_start
from support.fakes import REPO_ROOT

from ray_serve_cai.workspace.testing import WorkspaceHandle

pytestmark = pytest.mark.xdist_group("ray-2")  # with the cluster, autoscaler and autostop modules


def test_local_answers_deploy_a_cluster(workspace: WorkspaceHandle) -> None:
    env = quick_start_env(workspace)
    try:
        proc = run_quick_start(["local", "0", "0", "yes"], env)  # a head only: the flow is the point
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Ray cluster 'default': ready" in proc.stdout
        assert "dashboard: http://127.0.0.1:" in proc.stdout  # the head app's own loopback listener
    finally:
        subprocess.run(
            ["ray-cai", "down", "--local"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=300
        )
