"""The deployment tests the seed names: the CAI cluster manager facade, the deploy layer's choice of
what to deploy (git URL, branch, FORCE_REBUILD, project) and the one error tree, against the real
local workspace with fake Ray nodes (no Ray: fast).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
from pathlib import Path

import pytest
from support.fakes import fake_cluster_yaml, fake_project, list_apps

import ray_serve_cai
from ray_serve_cai.cai_cluster import CAIClusterManager
from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.config import ConfigError, load_cluster_spec, parse_deploy_spec
from ray_serve_cai.deploy.project import ProjectError, ProjectNotGiven, resolve_project
from ray_serve_cai.deploy.source import DeployInputError, load_deployment, resolve_options
from ray_serve_cai.errors import EXIT_BAD_INPUT, EXIT_FAILED, BadInput, OperationFailed, RayCaiError
from ray_serve_cai.workspace.testing import WorkspaceHandle

API_PREFIX = ("GET /api/v2", "POST /api/v2", "PATCH /api/v2", "DELETE /api/v2")


def api_calls(workspace: WorkspaceHandle) -> int:
    counts = workspace.counters()["counts"]
    return sum(n for route, n in counts.items() if route.startswith(API_PREFIX))


def settings_of(workspace: WorkspaceHandle) -> CMLSettings:
    return CMLSettings(host=workspace.url, api_key=workspace.api_key)


def git_repo(path: Path, branch: str = "feature-x") -> Path:
    path.mkdir(parents=True)
    run = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*run[:3], "init", "-q", "-b", branch], check=True)
    subprocess.run([*run, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    return path


# ----------------------------------------------------------------------------- the facade


def test_manager_up_status_scale_down(controls: WorkspaceHandle, project_files: Path, tmp_path: Path) -> None:
    config = tmp_path / "ray_cluster_config.yaml"
    config.write_text("# my cluster\n" + fake_cluster_yaml("facade", 1))
    with fake_project(controls, "cai-facade", project_files) as project:
        manager = CAIClusterManager.open(
            config, project="cai-facade", settings=settings_of(controls), env={}, poll_interval=0.2
        )
        with manager:
            assert manager.project_id == project["id"]
            assert isinstance(manager.cluster, RayCluster)  # the cluster layer itself, not a copy
            plan, status = manager.up(timeout=60)
            assert status.ready, status.as_dict()
            assert [a.name for a in plan.actions] == ["ray-facade-head", "ray-facade-worker-0"]
            assert manager.plan().is_noop

            controls.reset_counters()
            again = manager.status()
            assert again.ready and api_calls(controls) == 1  # one list call; the head is asked over HTTP

            info = manager.write_info(tmp_path / "ray_cluster_info.json", status=again)
            assert info.exists() and manager.connect_info(again)["dashboard_url"] == again.dashboard_url

            plan, status = manager.scale(2, timeout=60)
            assert status.ready and [a.name for a in plan.actions] == ["ray-facade-worker-1"]
            reloaded = load_cluster_spec(config, env={})
            assert reloaded.total_workers == 2  # the file stays the source of truth
            assert config.read_text().startswith("# my cluster\n")  # comments kept

            removed = manager.down()
            assert sorted(removed) == ["ray-facade-head", "ray-facade-worker-0", "ray-facade-worker-1"]
            assert not [
                a for a in list_apps(controls, project["id"]) if a["subdomain"].startswith("ray-facade")
            ]


def test_manager_refuses_bad_input_before_any_api_call(
    controls: WorkspaceHandle, project_files: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray_cluster:\n  num_workers: -1\n")
    controls.reset_counters()
    with pytest.raises(ConfigError) as caught:
        CAIClusterManager.open(bad, project="whatever", settings=settings_of(controls), env={})
    assert caught.value.exit_code == EXIT_BAD_INPUT and "ray_cluster.num_workers" in str(caught.value)
    assert api_calls(controls) == 0

    config = tmp_path / "ok.yaml"
    config.write_text(fake_cluster_yaml("facadebad", 1))
    with (
        fake_project(controls, "cai-facade-bad", project_files),
        CAIClusterManager.open(config, project="cai-facade-bad", settings=settings_of(controls), env={}) as m,
    ):
        controls.reset_counters()
        with pytest.raises(BadInput, match="no worker group 'gpu'"):
            m.scale(2, "gpu")
        assert api_calls(controls) == 0
        assert load_cluster_spec(config, env={}).total_workers == 1  # nothing saved


# ----------------------------------------------------------------------------- what is deployed


JOBS = {
    "project": {"name": "src-test", "git_url": "https://github.com/o/r.git"},
    "jobs": {"only": {"name": "Only", "script": "job.py"}},
}


def test_branch_comes_from_the_flag_then_the_file_then_ci_then_the_checkout(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "repo", branch="feature-x")
    plain = parse_deploy_spec(JOBS, env={})
    pinned = parse_deploy_spec({**JOBS, "project": {**JOBS["project"], "branch": "release"}}, env={})
    ci = {"GITHUB_REF_NAME": "from-ci"}

    def branch(spec: object, env: dict[str, str], flag: str | None = None) -> str | None:
        return resolve_options(spec, local=False, checkout=repo, branch=flag, env=env).branch  # type: ignore[arg-type]

    assert branch(plain, {}) == "feature-x"
    assert branch(plain, ci) == "from-ci"
    assert branch(pinned, ci) == "release"  # the file's `project.branch` is what the docs promise
    assert branch(pinned, ci, flag="hotfix") == "hotfix"


def test_git_url_force_and_token_resolution(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "repo")
    spec = parse_deploy_spec(JOBS, env={})
    remote = resolve_options(spec, local=False, checkout=repo, env={})
    assert remote.git_url == "https://github.com/o/r.git" and remote.force is False and remote.gh_pat is None
    local = resolve_options(spec, local=True, checkout=repo, env={"FORCE_REBUILD": "True", "GH_PAT": "p"})
    assert local.git_url == str(repo) and local.force is True and local.gh_pat == "p"
    explicit = resolve_options(spec, local=True, checkout=repo, git_url="https://x/y.git", env={})
    assert explicit.git_url == "https://x/y.git"
    assert resolve_options(spec, local=False, checkout=repo, force=True, env={"FORCE_REBUILD": "no"}).force


def test_not_a_checkout_is_bad_input(tmp_path: Path) -> None:
    spec = parse_deploy_spec(JOBS, env={})
    with pytest.raises(DeployInputError, match="inside the git checkout") as caught:
        resolve_options(spec, local=False, checkout=tmp_path, env={})
    assert caught.value.exit_code == EXIT_BAD_INPUT


def test_load_deployment_project_flag_wins(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("project: {name: from-file}\njobs:\n  only: {name: Only, script: job.py}\n")
    config = tmp_path / "cluster.yaml"
    config.write_text("ray_cluster: {name: c}\n")
    spec, cluster = load_deployment(jobs, config, env={"CML_PROJECT_NAME": "from-env"})
    assert spec.project.name == "from-env" and cluster.spec.name == "c"
    spec, _ = load_deployment(jobs, config, project="from-flag", env={"CML_PROJECT_NAME": "from-env"})
    assert spec.project.name == "from-flag"


def test_resolve_project(
    workspace: WorkspaceHandle, project_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no jobs file here
    with (
        CMLClient(settings_of(workspace)) as client,
        fake_project(workspace, "cai-resolve", project_files) as p,
    ):
        workspace.reset_counters()
        with pytest.raises(ProjectNotGiven, match="no project given") as caught:
            resolve_project(client, None, local=False, env={})
        assert caught.value.exit_code == EXIT_BAD_INPUT and api_calls(workspace) == 0
        assert resolve_project(client, "cai-resolve", local=False, env={}).id == p["id"]
        assert resolve_project(client, p["id"], local=False, env={}).name == "cai-resolve"
        assert (
            resolve_project(client, None, local=False, env={"CML_PROJECT_NAME": "cai-resolve"}).id == p["id"]
        )
        with pytest.raises(ProjectError, match="not found") as missing:
            resolve_project(client, "cai-resolve-missing", local=False, env={})
        assert missing.value.exit_code == EXIT_FAILED


# ----------------------------------------------------------------------------- one error tree

LIBRARY_PACKAGES = ("config", "cml", "cluster", "deploy")


def _error_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    modules = [importlib.import_module("ray_serve_cai.cai_cluster")]
    for package in LIBRARY_PACKAGES:
        pkg = importlib.import_module(f"ray_serve_cai.{package}")
        modules.append(pkg)
        for info in pkgutil.iter_modules(pkg.__path__):
            modules.append(importlib.import_module(f"{pkg.__name__}.{info.name}"))
    for module in modules:
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("ray_serve_cai."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_every_library_error_is_bad_input_or_a_failed_operation() -> None:
    classes = _error_classes()
    assert len(classes) >= 15
    strays = [c.__name__ for c in classes if not issubclass(c, (BadInput, OperationFailed))]
    assert not strays, f"errors outside the tree: {strays}"
    for cls in classes:
        expected = EXIT_BAD_INPUT if issubclass(cls, BadInput) else EXIT_FAILED
        assert cls.exit_code == expected, cls  # BadInput wins where a class is both (CMLSettingsError)


def test_the_roots_are_exported() -> None:
    assert ray_serve_cai.RayCaiError is RayCaiError
    assert ray_serve_cai.CAIClusterManager is CAIClusterManager
