"""Shared helpers for the reliability tests: projects of fake Ray nodes, specs, and convergence checks.

A fake project holds `fake_ray_node.py` (tests/support/apps), the lock script and trivial job scripts, so the
reconciler and the orchestrator run their real code paths against the workspace without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_serve_cai.cluster.lock import LOCK_MARKER, lock_app_name
from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.config import ClusterSpec, desired_nodes, validate_cluster_spec
from ray_serve_cai.workspace.testing import WorkspaceHandle
from support import cli_fork

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_APPS = Path(__file__).parent / "apps"
FAKE_NODE_SCRIPT = "fake_ray_node.py"
RAY_CAI = cli_fork.EXECUTABLE

# Faults of the brief: 20% of API requests fail (500/502/503/429 or a reset connection), 10% of
# create responses are lost after the create took effect.
FAULTS = {
    "error_rate": 0.16,
    "reset_rate": 0.04,
    "statuses": [500, 502, 503, 429],
    "drop_create_response_rate": 0.1,
    "retry_after_seconds": 0,
}


def write_fake_project_files(dest: Path) -> Path:
    """A directory to copy into a project: the fake node, the lock script, trivial job scripts."""
    (dest / "cai_integration").mkdir(parents=True, exist_ok=True)
    shutil.copy(TEST_APPS / FAKE_NODE_SCRIPT, dest / FAKE_NODE_SCRIPT)
    shutil.copy(REPO_ROOT / "cai_integration" / "ray_lock.py", dest / "cai_integration" / "ray_lock.py")
    (dest / "job_quick.py").write_text("print('job ok')\n")
    return dest


def fake_cluster_data(name: str, workers: int, *, startup_timeout: float = 60) -> dict[str, Any]:
    """The YAML mapping of a cluster of fake nodes (tiny resources, ports picked at start)."""
    return {
        "ray_cluster": {
            "name": name,
            "num_workers": workers,
            "head_cpu": 0.5,
            "head_memory": 0.5,
            "worker_cpu": 0.5,
            "worker_memory": 0.5,
            "ports": {"gcs": 0, "client": 0, "dashboard": 0},
            "startup_timeout": startup_timeout,
            "cml_restart_wait": 0,  # the test workspace runs with CML's automatic restarts off
            "head_script": FAKE_NODE_SCRIPT,
            "worker_script": FAKE_NODE_SCRIPT,
        }
    }


def fake_cluster_yaml(name: str, workers: int, *, startup_timeout: float = 60) -> str:
    from io import StringIO

    from ruamel.yaml import YAML

    out = StringIO()
    YAML(typ="safe", pure=True).dump(fake_cluster_data(name, workers, startup_timeout=startup_timeout), out)
    return out.getvalue()


def fake_cluster_spec(name: str, workers: int, *, startup_timeout: float = 60) -> ClusterSpec:
    return validate_cluster_spec(
        {
            "name": name,
            "head": {"cpu": 0.5, "memory": 0.5},
            "worker_groups": [{"name": "worker", "replicas": workers, "cpu": 0.5, "memory": 0.5}],
            "ports": {"gcs": 0, "client": 0, "dashboard": 0},
            "startup_timeout": startup_timeout,
            "cml_restart_wait": 0,  # the test workspace runs with CML's automatic restarts off
            "head_script": FAKE_NODE_SCRIPT,
            "worker_script": FAKE_NODE_SCRIPT,
        }
    )


def desired_names(spec: ClusterSpec) -> list[str]:
    return [n.name for n in desired_nodes(spec)]


def client_for(workspace: WorkspaceHandle, *, retry_deadline: float = 20.0) -> CMLClient:
    return CMLClient(
        CMLSettings(host=workspace.url, api_key=workspace.api_key, retry_deadline=retry_deadline)
    )


def list_apps(workspace: WorkspaceHandle, project_id: str) -> list[dict[str, Any]]:
    return list(
        workspace.api_ok("GET", f"/api/v2/projects/{project_id}/applications", params={"page_size": 1000})[
            "applications"
        ]
    )


def list_jobs(workspace: WorkspaceHandle, project_id: str) -> list[dict[str, Any]]:
    return list(
        workspace.api_ok("GET", f"/api/v2/projects/{project_id}/jobs", params={"page_size": 1000})["jobs"]
    )


def app_environment(app: dict[str, Any]) -> dict[str, str]:
    """An app's `environment` (the API returns it as a JSON string, as CML does)."""
    raw = app.get("environment") or {}
    return dict(json.loads(raw) if isinstance(raw, str) else raw)


@dataclass
class Inventory:
    """What a project holds compared with what it should hold."""

    duplicates: list[str] = field(default_factory=list)  # names or subdomains held by several apps
    leaked: list[str] = field(default_factory=list)  # apps of the cluster that are not desired
    missing: list[str] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.leaked or self.missing or self.locks)


def inventory(workspace: WorkspaceHandle, project_id: str, cluster: str, expected: list[str]) -> Inventory:
    """Duplicates, leaked apps, missing apps and lock apps of `cluster` in the project."""
    apps = list_apps(workspace, project_id)
    result = Inventory()
    for key in ("name", "subdomain"):
        counts = Counter(a[key] for a in apps)
        result.duplicates += [f"{key} {v} x{n}" for v, n in counts.items() if n > 1]
    subdomains = {a["subdomain"] for a in apps}
    lock = lock_app_name(cluster)
    for app in apps:
        env = app_environment(app)
        if app["subdomain"] == lock or env.get(LOCK_MARKER) == cluster:
            result.locks.append(app["subdomain"])
        elif env.get("RAY_CAI_CLUSTER") == cluster and app["subdomain"] not in expected:
            result.leaked.append(app["subdomain"])
    result.missing = [n for n in expected if n not in subdomains]
    return result


def job_duplicates(
    workspace: WorkspaceHandle, project_id: str, names: list[str]
) -> tuple[list[str], list[str]]:
    """(duplicated job names, unexpected or missing job names) of the project."""
    counts = Counter(j["name"] for j in list_jobs(workspace, project_id))
    duplicates = [f"{n} x{c}" for n, c in counts.items() if c > 1]
    mismatch = sorted(set(counts) ^ set(names))
    return duplicates, mismatch


def wait_all_running(
    workspace: WorkspaceHandle, project_id: str, names: list[str], timeout: float = 30
) -> None:
    def states() -> dict[str, str]:
        return {a["subdomain"]: a["status"] for a in list_apps(workspace, project_id)}

    workspace.wait_for(
        states,
        lambda s: all(s.get(n) == "APPLICATION_RUNNING" for n in names),
        timeout=timeout,
        interval=0.1,
        what=f"{names} running",
    )


def delete_project(workspace: WorkspaceHandle, project_id: str) -> None:
    workspace.api("DELETE", f"/api/v2/projects/{project_id}", timeout=120)


# Legacy-engine projects (a runtime is optional) keep these tests independent of runtime choice; the
# lock app once lacked a runtime, which ML Runtime projects refuse: `test_up_in_an_ml_runtime_project`
# covers that case.
DEFAULT_ENGINE = "legacy_engine"


@contextmanager
def fake_project(
    workspace: WorkspaceHandle, name: str, files: Path, *, engine: str = DEFAULT_ENGINE
) -> Iterator[dict[str, Any]]:
    """A project holding the fake node files; deleted (with every app and run) afterwards."""
    project = workspace.create_project(name, files_from=files, default_project_engine_type=engine)
    try:
        yield project
    finally:
        delete_project(workspace, project["id"])


def cli_env(workspace: WorkspaceHandle, **extra: str) -> dict[str, str]:
    """An environment for `ray-cai` subprocesses pointed at the workspace, without inherited CML settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_", "GITHUB_"))}
    env.pop("GH_PAT", None)
    env.update(
        CML_HOST=workspace.url,
        CML_API_KEY=workspace.api_key,
        RAY_CAI_WORKSPACE_HOME=str(workspace.home),
        COLUMNS="200",
        NO_COLOR="1",
    )
    env.update(extra)
    return env


def run_cli(
    args: list[str],
    *,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`ray-cai ARGS` run to its end, its output captured as text (a process forked from the
    pytest process's zygote: `support.cli_fork`); `cwd` and `env` default to this process's."""
    return cli_fork.run(args, cwd=cwd, env=env, timeout=timeout)


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


SMALL_CLUSTER_YAML = """\
ray_cluster:
  name: {name}
  num_workers: {workers}
  head_cpu: 1
  head_memory: 1
  worker_cpu: 1
  worker_memory: 1
  ports: {{gcs: 0, client: 0, dashboard: 0}}
  startup_timeout: 300
  cml_restart_wait: 0
  join_timeout: 240
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def clone_with_small_cluster(repo: Path, cluster: str, workers: int) -> Path:
    """A clone of this project's committed files whose config is a small real-Ray cluster (1 CPU, 1 GiB
    nodes, free ports), committed — what the end-to-end deploys clone into the workspace."""
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(repo)], check=True)
    git(repo, "config", "user.email", "e2e@example.invalid")
    git(repo, "config", "user.name", "e2e")
    (repo / "ray_cluster_config.yaml").write_text(SMALL_CLUSTER_YAML.format(name=cluster, workers=workers))
    git(repo, "commit", "-qam", "e2e: small cluster")
    return repo
