"""End to end: `ray-cai deploy --local` from a git repository the test makes, on the local workspace.

Project created from git, the three chained jobs, the chain followed to its end, a real Ray cluster,
then idempotency (a second deploy starts no run), a config change (only the launch re-runs),
FORCE_REBUILD (everything re-runs), a failing setup job, and bad input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fakes import SMALL_CLUSTER_YAML, clone_with_small_cluster, git

from ray_serve_cai.workspace.testing import WorkspaceHandle

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY_CAI = [sys.executable, "-m", "ray_serve_cai.cli.main"]
RUNS_ROUTE = "POST /api/v2/projects/{project_id}/jobs/{job_id}/runs"


def make_repo(tmp: Path, name: str, cluster: str, workers: int) -> Path:
    return clone_with_small_cluster(tmp / name, cluster, workers)


def clean_env(workspace: WorkspaceHandle, project: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_", "GITHUB_"))}
    env.update(
        RAY_CAI_WORKSPACE_HOME=str(workspace.home),
        CML_PROJECT_NAME=project,
        FORCE_REBUILD="false",
        COLUMNS="200",
    )
    env.pop("GH_PAT", None)
    return env


def deploy(
    repo: Path, env: dict[str, str], *args: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RAY_CAI, "deploy", "--local", "--json", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def deploy_ok(repo: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = deploy(repo, env, *args)
    assert proc.returncode == 0, f"deploy failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
    return json.loads(proc.stdout)


def actions(result: dict[str, Any]) -> dict[str, str]:
    return {job["key"]: job["action"] for job in result["jobs"]}


def run_posts(workspace: WorkspaceHandle) -> int:
    return int(workspace.counters()["counts"].get(RUNS_ROUTE, 0))


def down(repo: Path, env: dict[str, str]) -> None:
    subprocess.run([*RAY_CAI, "down", "--local"], cwd=repo, env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def deployed(
    workspace: WorkspaceHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, str], dict[str, Any], float]]:
    repo = make_repo(tmp_path_factory.mktemp("deploy"), "app-repo", "e2edeploy", workers=1)
    env = clean_env(workspace, "ray-cai-e2e-deploy")
    started = time.monotonic()
    try:
        result = deploy_ok(repo, env)
        yield repo, env, result, time.monotonic() - started
    finally:
        down(repo, env)


def test_first_deploy_creates_project_jobs_and_a_ready_cluster(
    deployed: tuple[Path, dict[str, str], dict[str, Any], float], workspace: WorkspaceHandle
) -> None:
    repo, _env, result, seconds = deployed
    print(f"first deploy took {seconds:.1f}s")
    assert result["succeeded"] and result["project_created"]
    assert actions(result) == {"git_sync": "ran", "setup_environment": "ran", "launch_ray_cluster": "ran"}
    assert all(job["status"] == "ENGINE_SUCCEEDED" for job in result["jobs"])

    project_id = result["project_id"]
    jobs = workspace.api_ok("GET", f"/api/v2/projects/{project_id}/jobs", params={"page_size": 100})["jobs"]
    by_name = {j["name"]: j for j in jobs}
    assert set(by_name) == {"Git Sync", "Setup Environment", "Launch Ray Cluster"}
    assert not by_name["Git Sync"]["parent_id"]
    assert by_name["Setup Environment"]["parent_id"] == by_name["Git Sync"]["id"]
    assert by_name["Launch Ray Cluster"]["parent_id"] == by_name["Setup Environment"]["id"]

    cluster = result["cluster"]
    assert cluster["state"] == "ready"
    assert cluster["ray"]["alive_nodes"] == 2
    assert [n["name"] for n in cluster["nodes"]] == ["ray-e2edeploy-head", "ray-e2edeploy-worker-0"]
    assert result["connect"]["address"].startswith("ray://")

    project_dir = workspace.project_dir(project_id)
    info = json.loads((project_dir / "ray_cluster_info.json").read_text())
    assert info["node_counts"]["workers"] == 1 and info["ray_version"].startswith("2.60")
    assert git(project_dir, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")


def test_second_deploy_starts_no_job_run(
    deployed: tuple[Path, dict[str, str], dict[str, Any], float], workspace: WorkspaceHandle
) -> None:
    repo, env, _first, _ = deployed
    deploy_ok(repo, env)  # whatever ran before: now everything is deployed
    before = run_posts(workspace)
    started = time.monotonic()
    result = deploy_ok(repo, env)
    print(f"no-change deploy took {time.monotonic() - started:.1f}s")
    assert set(actions(result).values()) == {"skipped"}
    assert run_posts(workspace) == before
    assert result["cluster"]["state"] == "ready"


def test_config_change_reruns_only_the_launch(
    deployed: tuple[Path, dict[str, str], dict[str, Any], float], workspace: WorkspaceHandle
) -> None:
    repo, env, _first, _ = deployed
    deploy_ok(repo, env)  # whatever ran before: now everything is deployed
    config = repo / "ray_cluster_config.yaml"
    one_worker = SMALL_CLUSTER_YAML.format(name="e2edeploy", workers=1)
    workers = 2 if config.read_text() == one_worker else 1  # a change, whichever test ran before
    config.write_text(SMALL_CLUSTER_YAML.format(name="e2edeploy", workers=workers))
    git(repo, "commit", "-qam", f"{workers} workers")
    before = run_posts(workspace)
    result = deploy_ok(repo, env)  # the file changed the size: asked for explicitly
    assert actions(result) == {
        "git_sync": "skipped",
        "setup_environment": "skipped",
        "launch_ray_cluster": "ran",
    }
    assert run_posts(workspace) == before + 1
    assert result["cluster"]["ray"]["alive_nodes"] == 1 + workers


def cli(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RAY_CAI, *args, "--local"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )


def test_a_deploy_with_an_override_is_what_status_plan_and_up_see(
    deployed: tuple[Path, dict[str, str], dict[str, Any], float], workspace: WorkspaceHandle
) -> None:
    """`RAY_NUM_WORKERS=1 ray-cai deploy` with a file that says 2: then `status` is ready (exit 0),
    `plan` is empty and a plain `up` changes nothing — the applied spec is recorded with the cluster."""
    repo, env, _first, _ = deployed
    config = repo / "ray_cluster_config.yaml"
    wanted = SMALL_CLUSTER_YAML.format(name="e2edeploy", workers=2)
    if config.read_text() != wanted:
        config.write_text(wanted)
        git(repo, "commit", "-qam", "two workers")
    result = deploy_ok(repo, {**env, "RAY_NUM_WORKERS": "1"})
    assert result["cluster"]["state"] == "ready" and result["cluster"]["ray"]["alive_nodes"] == 2
    applied = result["cluster"]["applied"]
    assert applied["workers"] == {"worker": 1}
    assert applied["origin"]["overrides"] == {"RAY_NUM_WORKERS": "1"}
    assert applied["origin"]["commit"] == git(repo, "rev-parse", "HEAD")

    status = cli(repo, env, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["differences"] == []
    plan = cli(repo, env, "plan", "--json")
    assert plan.returncode == 0 and json.loads(plan.stdout)["actions"] == [], plan.stdout
    workspace.reset_counters()
    up = cli(repo, env, "up", "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["plan"]["actions"] == []
    changing = {k: v for k, v in workspace.counters()["counts"].items() if not k.startswith("GET")}
    assert changing == {}, changing
    info = json.loads((workspace.project_dir(result["project_id"]) / "ray_cluster_info.json").read_text())
    assert info["applied"]["origin"]["overrides"] == {"RAY_NUM_WORKERS": "1"}


def test_force_rebuild_reruns_every_job(
    deployed: tuple[Path, dict[str, str], dict[str, Any], float], workspace: WorkspaceHandle
) -> None:
    repo, env, _first, _ = deployed
    result = deploy_ok(repo, {**env, "FORCE_REBUILD": "true"})
    assert actions(result) == {"git_sync": "ran", "setup_environment": "ran", "launch_ray_cluster": "ran"}
    assert result["cluster"]["state"] == "ready"


def test_failing_setup_job_stops_the_chain_and_names_the_job(
    workspace: WorkspaceHandle, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, "broken-repo", "e2ebroken", workers=1)
    (repo / "cai_integration" / "setup_environment.py").write_text(
        "import sys\nprint('simulated install failure', file=sys.stderr)\nsys.exit(3)\n"
    )
    git(repo, "commit", "-qam", "break the setup job")
    env = clean_env(workspace, "ray-cai-e2e-broken")
    proc = deploy(repo, env)
    assert proc.returncode == 1, proc.stderr
    assert "Setup Environment" in proc.stderr and "ENGINE_FAILED" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)
    assert actions(result)["launch_ray_cluster"] == "not run"
    launch = next(j for j in result["jobs"] if j["key"] == "launch_ray_cluster")
    runs = workspace.api_ok("GET", f"/api/v2/projects/{result['project_id']}/jobs/{launch['job_id']}/runs")[
        "job_runs"
    ]
    assert runs == []


def test_missing_api_key_is_bad_input_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_"))}
    env["CML_HOST"] = "https://ml.example.invalid"
    proc = subprocess.run(
        [*RAY_CAI, "deploy"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "CML_API_KEY" in lines[0]
    assert "Traceback" not in proc.stderr


def test_unreachable_host_fails_clearly_within_the_deadline() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_"))}
    env.update(CML_HOST="http://127.0.0.1:9", CML_API_KEY="not-a-real-key-123")
    # How soon it gives up is measured by benchmarks/bench_deadlines.py; here: that it does, clearly.
    proc = subprocess.run(
        [*RAY_CAI, "deploy"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 1
    assert "127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr
    assert "not-a-real-key-123" not in proc.stderr + proc.stdout
