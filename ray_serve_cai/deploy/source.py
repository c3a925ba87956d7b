"""What a deployment deploys, resolved the same way for the CLI and for Python callers.

The checkout being deployed, the git URL CML clones, the branch, `FORCE_REBUILD` and the project
name each come from an explicit argument, else the config files, else the environment (CI
variables), else the checkout itself::

    from ray_serve_cai.deploy.source import load_deployment, resolve_options
    spec, cluster = load_deployment(project="ray-demo")
    options = resolve_options(spec, local=False)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ray_serve_cai.cluster.applied import ClusterRequest, load_cluster_request
from ray_serve_cai.config import (
    DEFAULT_CLUSTER_FILE,
    DEFAULT_JOBS_FILE,
    DeploySpec,
    load_deploy_spec,
)
from ray_serve_cai.deploy.fingerprint import RepoError, current_branch, repo_root
from ray_serve_cai.deploy.orchestrator import DeployOptions
from ray_serve_cai.errors import BadInput

__all__ = [
    "DeployInputError",
    "checkout_root",
    "env_flag",
    "load_deployment",
    "resolve_branch",
    "resolve_git_url",
    "resolve_options",
]

_TRUE = frozenset({"1", "true", "yes", "on"})


class DeployInputError(BadInput):
    """The deployment cannot start from what was given (no git checkout, no project named): exit 2."""


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """A boolean environment variable (`1`, `true`, `yes`, `on`, any case); unset or other is False."""
    return env.get(name, "").strip().lower() in _TRUE


def load_deployment(
    jobs_file: str | Path = DEFAULT_JOBS_FILE,
    cluster_file: str | Path = DEFAULT_CLUSTER_FILE,
    *,
    project: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[DeploySpec, ClusterRequest]:
    """Both specs, with the environment's overrides (the cluster's as a `ClusterRequest`, which
    keeps the config without them, so the launch job records both); `project` wins over
    `CML_PROJECT_NAME` and the file. Raises ConfigError (bad input) before anything is sent."""
    merged = dict(os.environ if env is None else env)
    if project:
        merged["CML_PROJECT_NAME"] = project
    return load_deploy_spec(jobs_file, env=merged), load_cluster_request(
        cluster_file, env=merged, source="deploy"
    )


def checkout_root(path: str | Path | None = None) -> Path:
    """The top of the git checkout at `path` (default: the working directory)."""
    where = Path.cwd() if path is None else Path(path)
    try:
        return repo_root(where)
    except RepoError as err:
        raise DeployInputError(f"deploy must run inside the git checkout being deployed: {err}") from None


def resolve_git_url(spec: DeploySpec, repo: Path, *, local: bool, git_url: str | None = None) -> str | None:
    """What CML clones: `git_url`, else this checkout for the local workspace, else the file's
    `project.git_url` (which `GITHUB_REPOSITORY` fills when the file has none)."""
    return git_url or (str(repo) if local else spec.project.git_url)


def resolve_branch(
    spec: DeploySpec, repo: Path, *, branch: str | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """The branch to deploy: `branch`, else the file's `project.branch`, else `GITHUB_REF_NAME`
    (GitHub Actions), else the checked-out branch (None on a detached HEAD: the remote's default)."""
    env = os.environ if env is None else env
    return branch or spec.project.branch or env.get("GITHUB_REF_NAME") or current_branch(repo)


def resolve_options(
    spec: DeploySpec,
    *,
    local: bool,
    checkout: str | Path | None = None,
    git_url: str | None = None,
    branch: str | None = None,
    force: bool = False,
    env: Mapping[str, str] | None = None,
    project_timeout: float = 600,
    chain_timeout: float = 3600,
) -> DeployOptions:
    """Everything `deploy()` needs to know about the source: checkout, URL, branch, force, GH_PAT.

    `force` or `FORCE_REBUILD=true` re-runs every job; `GH_PAT` (for a private repository's clone)
    is read from `env` and never logged.
    """
    env = os.environ if env is None else env
    repo = checkout_root(checkout)
    return DeployOptions(
        repo=repo,
        git_url=resolve_git_url(spec, repo, local=local, git_url=git_url),
        branch=resolve_branch(spec, repo, branch=branch, env=env),
        force=force or env_flag(env, "FORCE_REBUILD"),
        gh_pat=env.get("GH_PAT") or None,
        project_timeout=project_timeout,
        chain_timeout=chain_timeout,
    )
