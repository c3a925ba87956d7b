"""Input fingerprints of the deployment jobs, read from the local git checkout being deployed.

A job whose latest run succeeded with the same fingerprint is skipped. What each job depends on:

- `git_sync` (and custom jobs): the deployed tree, except `ray_cluster_config.yaml` (the cluster spec
  reaches the launch job through its own environment, so a config-only change re-runs only the launch);
- `setup_environment`: the dependency set (`pyproject.toml` and the project's `requirements.txt`);
- `launch_ray_cluster`: the validated cluster spec.
Every fingerprint also covers the job's own definition.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from ray_serve_cai.config import spec_digest
from ray_serve_cai.errors import OperationFailed

CLUSTER_CONFIG_FILE = "ray_cluster_config.yaml"
DEPENDENCY_FILES = ("pyproject.toml", "requirements.txt")  # steps.PROJECT_REQUIREMENTS


class RepoError(OperationFailed):
    """The local checkout could not be read (not a git repository, git missing, ...)."""


def _git(repo: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True)
    except FileNotFoundError as err:
        raise RepoError("git is not installed") from err
    except subprocess.CalledProcessError as err:
        raise RepoError(f"git {' '.join(args)} failed in {repo}: {err.stderr.strip()}") from err
    return out.stdout.strip()


def repo_root(path: Path) -> Path:
    return Path(_git(path, "rev-parse", "--show-toplevel"))


def head_commit(repo: Path) -> str:
    return _git(repo, "rev-parse", "HEAD")


def current_branch(repo: Path) -> str | None:
    branch = _git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    return None if branch == "HEAD" else branch


def tree_digest(repo: Path, commit: str, exclude: tuple[str, ...] = (CLUSTER_CONFIG_FILE,)) -> str:
    """Digest of every blob of `commit` except `exclude`: content-addressed, not commit-addressed."""
    listing = _git(repo, "ls-tree", "-r", commit)
    kept = [line for line in listing.splitlines() if line.split("\t", 1)[-1] not in exclude]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def dependency_digest(repo: Path, commit: str) -> str:
    """Digest of the files that define the dependency set, as committed."""
    parts = []
    for name in DEPENDENCY_FILES:
        try:
            parts.append(_git(repo, "show", f"{commit}:{name}"))
        except RepoError:
            parts.append("")
    return hashlib.sha256("\n\0".join(parts).encode()).hexdigest()[:16]


def job_fingerprint(definition: dict[str, object], depends_on: str) -> str:
    return spec_digest({"definition": definition, "inputs": depends_on})
