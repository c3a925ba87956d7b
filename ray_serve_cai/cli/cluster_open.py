"""Opening the cluster a command works on: the config file (validated, the Serve config too, before
any API call) in the target project. Shared by the cluster, serve and job commands, so none of
them imports another command module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.markup import escape

from ray_serve_cai.cli.common import err_console, open_target
from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.cluster.applied import load_cluster_request
from ray_serve_cai.config import ClusterSpec
from ray_serve_cai.config.serve import ServeConfig, load_serve_config


def project_dir() -> Path:
    """The project the config's relative paths refer to: the git checkout around the current
    directory (what `--local` clones and CML deploys), else the current directory (/home/cdsw on CML)."""
    from ray_serve_cai.deploy.fingerprint import RepoError, repo_root

    try:
        return repo_root(Path.cwd())
    except RepoError:
        return Path.cwd()


def check_serve_config(spec: ClusterSpec, directory: Path | None = None) -> ServeConfig | None:
    """Validate the cluster's Serve config before any API call (ConfigError → exit 2); say which
    of the user's settings the platform overrides."""
    if spec.serve is None:
        return None
    config = load_serve_config(spec.serve.config, directory or project_dir())
    for line in config.overridden_settings():
        err_console.print(f"[yellow]note: {escape(config.source)}: {escape(line)}[/]")
    return config


@contextmanager
def open_cluster(
    config: Path,
    local: bool,
    project: str | None,
    *,
    replicas: int | None = None,
    group: str | None = None,
    create: bool = False,
) -> Iterator[RayCluster]:
    """The cluster of the config file in the target project. The config (and a new size) is
    validated before any API call. What the caller asks for is merged onto what is deployed (see
    `ray_serve_cai.cluster.applied`): only fields it changes, overrides it sets and flags count
    (`replicas` is the same `ClusterRequest.with_replicas` merge `RayCluster.scaled` makes)."""
    request = load_cluster_request(config, source="scale" if replicas is not None else "up")
    if replicas is not None:
        request = request.with_replicas(replicas, group)
    check_serve_config(request.spec)  # the Serve config file too, before any API call
    with open_target(local, project, create=create) as target:
        yield RayCluster(target.client, target.project_id, request, project_dir=project_dir())


__all__ = ["check_serve_config", "open_cluster", "project_dir"]
