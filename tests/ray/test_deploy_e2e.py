"""End to end: `ray-cai deploy --local` from a git repository the test makes, on a local workspace.

Project created from git, the three chained jobs, the chain followed to its end, a real Ray cluster,
then idempotency (a second deploy starts no run), a config change (only the launch re-runs), an
override, FORCE_REBUILD (everything re-runs); then, on the same cluster, the commands a person runs next
and a crash of the workspace, after which no secret may be found anywhere; a failing setup job, and
bad input.

Secrets stay secret through the whole local flow. The deployment's workspace is the module's own (it
is killed): it keeps a recognisable API key (set in its state file before it starts), every command
runs with a recognisable GH_PAT in the environment, and the Ray token is read from
`.ray-cai/<cluster>/auth_token`. Login codes (printed by `dashboard` only) are secrets too. None may
appear in any (other) stdout/stderr of the module's commands, any file under the workspace's logs,
`ray_cluster_info.json`, the project's `.ray-cai/`, any job or application `environment` the API
returns, or an error message; the token file is 0600.

The same cluster is where a ready real-Ray cluster survives a crash of the workspace: `kill -9` of the
server, then `ray-cai workspace start`: `status` shows the same ready cluster with the same apps and
the same raylets, and `down` leaves no process of the workspace's. The workspace-only crash cases are
in tests/workspace/test_workspace_crash.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.fakes import SMALL_CLUSTER_YAML, clone_with_small_cluster, git, run_cli, wait_until

from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace, workspace_info
from ray_serve_cai.workspace.processes import WORKSPACE_MARKER, processes_with_marker
from ray_serve_cai.workspace.statefile import read_state, write_state
from ray_serve_cai.workspace.testing import WorkspaceHandle

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS_ROUTE = "POST /api/v2/projects/{project_id}/jobs/{job_id}/runs"
CLUSTER = "e2edeploy"
PROJECT = "ray-cai-e2e-deploy"
TARGET = ("--local", "-p", PROJECT, "-c", "ray_cluster_config.yaml")


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
    return run_cli(["deploy", "--local", "--json", *args], cwd=repo, env=env, timeout=timeout)


def actions(result: dict[str, Any]) -> dict[str, str]:
    return {job["key"]: job["action"] for job in result["jobs"]}


def run_posts(workspace: WorkspaceHandle) -> int:
    return int(workspace.counters()["counts"].get(RUNS_ROUTE, 0))


@dataclass
class Deployment:
    """The module's deployment: its repository, environment (with GH_PAT), workspace and secrets, and
    every output of its commands (scanned for secrets at the end)."""

    repo: Path
    env: dict[str, str]
    workspace: WorkspaceHandle
    api_key: str
    gh_pat: str
    first: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)

    def run(
        self, *args: str, timeout: float = 900, record: bool = True, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        """`ray-cai ARGS...` in the repository; its output kept for the scan unless `record` is False."""
        proc = run_cli(list(args), cwd=self.repo, env={**self.env, **extra}, timeout=timeout)
        if record:
            self.outputs.extend([proc.stdout, proc.stderr])
        return proc

    def deploy_ok(self, **extra: str) -> dict[str, Any]:
        proc = self.run("deploy", "--local", "--json", **extra)
        assert proc.returncode == 0, f"deploy failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
        return dict(json.loads(proc.stdout))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(*args, "--local", timeout=300)

    def project_dir(self) -> Path:
        return self.workspace.project_dir(self.first["project_id"])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("deploy")
    home = tmp / "ws-home"
    api_key = f"APIKEY-{secrets.token_hex(12)}-MARK"
    write_state(home, {"api_key": api_key, "home": str(home)})  # the workspace keeps a key it finds
    workspace = WorkspaceHandle(start_workspace(home, app_restart=False))
    repo = make_repo(tmp, "app-repo", CLUSTER, workers=1)
    gh_pat = f"ghp_PATMARK{secrets.token_hex(12)}"
    env = {**clean_env(workspace, PROJECT), "GH_PAT": gh_pat}
    deployment = Deployment(repo, env, workspace, api_key, gh_pat)
    try:
        assert workspace.api_key == api_key
        started = time.monotonic()
        deployment.first = deployment.deploy_ok()
        deployment.seconds = time.monotonic() - started
        yield deployment
    finally:
        deployment.run("down", "--local", timeout=300)
        deployment.workspace.close()
        stop_workspace(home)


def test_first_deploy_creates_project_jobs_and_a_ready_cluster(deployed: Deployment) -> None:
    result, workspace = deployed.first, deployed.workspace
    print(f"first deploy took {deployed.seconds:.1f}s")
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
    # The workspace's runtime has this package's build backend: the editable install is built in place.
    setup = by_name["Setup Environment"]["id"]
    runs = workspace.api_ok("GET", f"/api/v2/projects/{project_id}/jobs/{setup}/runs")["job_runs"]
    setup_log = Path(
        workspace.wait_for_run(project_id, setup, runs[0]["id"], timeout=60)["log_path"]
    ).read_text()
    assert "built in place" in setup_log, setup_log[-2000:]

    cluster = result["cluster"]
    assert cluster["state"] == "ready"
    assert cluster["ray"]["alive_nodes"] == 2
    assert [n["name"] for n in cluster["nodes"]] == ["ray-e2edeploy-head", "ray-e2edeploy-worker-0"]
    assert result["connect"]["address"].startswith("ray://")

    info = json.loads((deployed.project_dir() / "ray_cluster_info.json").read_text())
    assert info["node_counts"]["workers"] == 1 and info["ray_version"].startswith("2.60")
    assert git(deployed.project_dir(), "rev-parse", "HEAD") == git(deployed.repo, "rev-parse", "HEAD")


def test_second_deploy_starts_no_job_run(deployed: Deployment) -> None:
    deployed.deploy_ok()  # whatever ran before: now everything is deployed
    before = run_posts(deployed.workspace)
    started = time.monotonic()
    result = deployed.deploy_ok()
    print(f"no-change deploy took {time.monotonic() - started:.1f}s")
    assert set(actions(result).values()) == {"skipped"}
    assert run_posts(deployed.workspace) == before
    assert result["cluster"]["state"] == "ready"


def test_config_change_reruns_only_the_launch(deployed: Deployment) -> None:
    repo = deployed.repo
    deployed.deploy_ok()  # whatever ran before: now everything is deployed
    config = repo / "ray_cluster_config.yaml"
    one_worker = SMALL_CLUSTER_YAML.format(name=CLUSTER, workers=1)
    workers = 2 if config.read_text() == one_worker else 1  # a change, whichever test ran before
    config.write_text(SMALL_CLUSTER_YAML.format(name=CLUSTER, workers=workers))
    git(repo, "commit", "-qam", f"{workers} workers")
    before = run_posts(deployed.workspace)
    result = deployed.deploy_ok()  # the file changed the size: asked for explicitly
    assert actions(result) == {
        "git_sync": "skipped",
        "setup_environment": "skipped",
        "launch_ray_cluster": "ran",
    }
    assert run_posts(deployed.workspace) == before + 1
    assert result["cluster"]["ray"]["alive_nodes"] == 1 + workers


def test_a_deploy_with_an_override_is_what_status_plan_and_up_see(deployed: Deployment) -> None:
    """`RAY_NUM_WORKERS=1 ray-cai deploy` with a file that says 2: then `status` is ready (exit 0),
    `plan` is empty and a plain `up` changes nothing — the applied spec is recorded with the cluster."""
    repo, workspace = deployed.repo, deployed.workspace
    config = repo / "ray_cluster_config.yaml"
    wanted = SMALL_CLUSTER_YAML.format(name=CLUSTER, workers=2)
    if config.read_text() != wanted:
        config.write_text(wanted)
        git(repo, "commit", "-qam", "two workers")
    result = deployed.deploy_ok(RAY_NUM_WORKERS="1")
    assert result["cluster"]["state"] == "ready" and result["cluster"]["ray"]["alive_nodes"] == 2
    applied = result["cluster"]["applied"]
    assert applied["workers"] == {"worker": 1}
    assert applied["origin"]["overrides"] == {"RAY_NUM_WORKERS": "1"}
    assert applied["origin"]["commit"] == git(repo, "rev-parse", "HEAD")

    status = deployed.cli("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["differences"] == []
    plan = deployed.cli("plan", "--json")
    assert plan.returncode == 0 and json.loads(plan.stdout)["actions"] == [], plan.stdout
    workspace.reset_counters()
    up = deployed.cli("up", "--json")
    assert up.returncode == 0, up.stderr
    assert json.loads(up.stdout)["plan"]["actions"] == []
    changing = {k: v for k, v in workspace.counters()["counts"].items() if not k.startswith("GET")}
    assert changing == {}, changing
    info = json.loads((deployed.project_dir() / "ray_cluster_info.json").read_text())
    assert info["applied"]["origin"]["overrides"] == {"RAY_NUM_WORKERS": "1"}


def test_force_rebuild_reruns_every_job(deployed: Deployment) -> None:
    result = deployed.deploy_ok(FORCE_REBUILD="true")
    assert actions(result) == {"git_sync": "ran", "setup_environment": "ran", "launch_ray_cluster": "ran"}
    assert result["cluster"]["state"] == "ready"


def environments(handle: WorkspaceHandle, project_id: str) -> list[str]:
    """The raw `environment` of every job and application, as the API returns them."""
    found = []
    base = f"/api/v2/projects/{project_id}"
    for kind in ("jobs", "applications"):
        for item in handle.api_ok("GET", f"{base}/{kind}", params={"page_size": 1000})[kind]:
            found.append(json.dumps(item.get("environment")))
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tagged(tag: str, name: str | None = None) -> set[int]:
    """Live processes started by the workspace with this tag (only those called `name`, if given)."""
    found = set()
    for process in processes_with_marker(WORKSPACE_MARKER, tag):
        with contextlib.suppress(psutil.Error):
            if (name is None or process.name() == name) and process.status() != psutil.STATUS_ZOMBIE:
                found.add(process.pid)
    return found


def survive_a_crash(deployed: Deployment) -> None:
    """`kill -9` of the workspace server under the ready cluster, then `ray-cai workspace start`: the
    same ready cluster, the same apps, the same raylets. The deployment gets the restarted workspace's
    handle."""
    handle, home = deployed.workspace, deployed.workspace.home
    apps_path = f"/api/v2/projects/{deployed.first['project_id']}/applications"
    before = {a["subdomain"]: a["id"] for a in handle.api_ok("GET", apps_path)["applications"]}
    tag = read_state(home)["workspace_tag"]
    status = deployed.run("status", *TARGET, "--json")
    nodes = json.loads(status.stdout)["ray"]["alive_nodes"]
    raylets = _tagged(tag, "raylet")
    assert len(raylets) == nodes, (raylets, status.stdout)
    pid = handle.info.pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _alive(pid), timeout=10, what="the killed server to be gone")
    handle.close()
    assert _tagged(tag, "raylet") == raylets  # the cluster does not notice

    started = deployed.run("workspace", "start", timeout=60)
    assert started.returncode == 0, started.stderr
    status = deployed.run("status", *TARGET, "--json")
    assert status.returncode == 0, f"{status.stderr}\n{status.stdout}"
    described = json.loads(status.stdout)
    assert described["state"] == "ready" and described["ray"]["alive_nodes"] == nodes, described
    info = workspace_info(home)
    assert info is not None and info.pid != pid
    deployed.workspace = WorkspaceHandle(info)
    after = {a["subdomain"]: a["id"] for a in deployed.workspace.api_ok("GET", apps_path)["applications"]}
    assert after == before
    assert _tagged(tag, "raylet") == raylets


def test_no_secret_leaks_through_the_local_flow_nor_a_workspace_crash(deployed: Deployment) -> None:
    """After every deploy above: the commands a person runs next, a crash of the workspace, `down`;
    then none of the secrets in any output, log, file or environment. (Was tests/ray/test_secrets.py.)"""
    project_id = deployed.first["project_id"]
    project_dir = deployed.project_dir()
    token_path = project_dir / ".ray-cai" / CLUSTER / "auth_token"
    token = token_path.read_text().strip()
    assert len(token) >= 16
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    for args in (("status",), ("status", "--json"), ("connect",), ("connect", "--json")):
        proc = deployed.run(*args, *TARGET)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
    # `dashboard` is the one command that prints a login code: none may show up anywhere else.
    login_codes = []
    for args in (("dashboard", "--json"), ("dashboard",)):
        proc = deployed.run(*args, *TARGET, record=False)
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
        url = json.loads(proc.stdout)["url"] if "--json" in args else proc.stdout.splitlines()[-1]
        login_codes.append(url.split("code=", 1)[1])
        assert deployed.api_key not in proc.stdout + proc.stderr
        assert deployed.gh_pat not in proc.stdout + proc.stderr
    assert len(login_codes[0]) >= 32 and login_codes[0] != login_codes[1]
    for args, code in (
        (("job", "submit", *TARGET, "--submission-id", "secret-job", "--", "python", "-c", "print(1)"), 0),
        (("job", "status", "secret-job", *TARGET, "--json"), 0),
        (("job", "logs", "secret-job", *TARGET), 0),
        (("job", "list", *TARGET, "--json"), 0),
        (("job", "status", "no-such-job", *TARGET), 1),
        (("logs", *TARGET, "--list", "--json"), 0),
        (("logs", *TARGET, "--tail", "200"), 0),
        (("up", "--local", "-p", PROJECT, "-c", "missing.yaml"), 2),  # an error message too
    ):
        proc = deployed.run(*args)
        assert proc.returncode == code, f"{args}: {proc.stderr}"
    env_texts = environments(deployed.workspace, project_id)

    survive_a_crash(deployed)
    home = deployed.workspace.home
    tag = read_state(home)["workspace_tag"]
    down = deployed.run("down", *TARGET)
    assert down.returncode == 0, down.stderr
    wait_until(lambda: not _tagged(tag), timeout=30, what="every process of the cluster to end")
    env_texts += environments(deployed.workspace, project_id)

    places: dict[str, str] = {f"output {i}": text for i, text in enumerate(deployed.outputs)}
    places |= {f"environment {i}": text for i, text in enumerate(env_texts)}
    for log in [*sorted((home / "logs").rglob("*")), home / "server.log"]:
        if log.is_file():
            places[str(log)] = log.read_text(errors="replace")
    places["ray_cluster_info.json"] = (project_dir / "ray_cluster_info.json").read_text()
    for log in sorted((project_dir / ".ray-cai").rglob("*")):
        if log.is_file() and log.name != "auth_token" and log.stat().st_size < 5_000_000:
            places[str(log)] = log.read_text(errors="replace")
    found = [
        f"{name} in {where}"
        for where, text in places.items()
        for name, secret in (
            ("API key", deployed.api_key),
            ("GH_PAT", deployed.gh_pat),
            ("Ray token", token),
            *(("login code", code) for code in login_codes),
        )
        if secret in text
    ]
    print(f"secrets: checked {len(places)} places, {len(found)} secrets found")
    assert not found, found


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
    proc = run_cli(["deploy"], cwd=REPO_ROOT, env=env, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "CML_API_KEY" in lines[0]
    assert "Traceback" not in proc.stderr


def test_unreachable_host_fails_clearly_within_the_deadline() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_"))}
    env.update(CML_HOST="http://127.0.0.1:9", CML_API_KEY="not-a-real-key-123")
    # How soon it gives up is measured by benchmarks/bench_deadlines.py; here: that it does, clearly.
    proc = run_cli(["deploy"], cwd=REPO_ROOT, env=env, timeout=180)
    assert proc.returncode == 1
    assert "127.0.0.1:9" in proc.stderr and "Traceback" not in proc.stderr
    assert "not-a-real-key-123" not in proc.stderr + proc.stdout
