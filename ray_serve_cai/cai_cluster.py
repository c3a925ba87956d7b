"""The "CAI cluster manager" the seed names: one object for one Ray cluster on CML applications.

A thin facade, not a second implementation: it holds the connection (CML or the local workspace),
the project and the cluster spec, and each method is one call of `ray_serve_cai.cluster.RayCluster`
(or of the deploy layer's project lookup). Use it from a notebook, a script or a CML job::

    from ray_serve_cai.cai_cluster import CAIClusterManager

    with CAIClusterManager.open("ray_cluster_config.yaml", project="ray-demo") as manager:
        plan, status = manager.up()          # create or converge, wait until Ray sees every node
        print(status.state, manager.connect_info()["address"])
        manager.scale(3)                     # 3 workers (only the new ones are created)
        manager.down()                       # delete every app of the cluster

`open(..., local=True)` uses the local workspace (started when needed) and, like `ray-cai up
--local`, creates the project from the git checkout when it does not exist yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray_serve_cai.cluster import (
    ClusterStatus,
    Plan,
    ProgressCallback,
    RayCluster,
    connect_info,
    write_cluster_info,
)
from ray_serve_cai.cluster.applied import ClusterRequest, load_cluster_request
from ray_serve_cai.cluster.info import INFO_FILE
from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.config import DEFAULT_CLUSTER_FILE, ClusterSpec
from ray_serve_cai.config.edit import save_replicas
from ray_serve_cai.deploy.project import resolve_project

__all__ = ["CAIClusterManager", "local_workspace_settings"]


def local_workspace_settings(home: str | Path | None = None) -> CMLSettings:
    """Connection settings for the local workspace of `home` (default: $RAY_CAI_WORKSPACE_HOME or
    the user data directory), starting it when it is not running. Needs the `workspace` extra."""
    from ray_serve_cai.workspace.daemon import ensure_workspace

    info = ensure_workspace(home)
    return CMLSettings(host=info.url, api_key=info.api_key)


class CAIClusterManager:
    """A Ray cluster (head + worker groups as CML applications) of one project.

    Every verb converges to the spec and is safe to repeat; errors derive from
    `ray_serve_cai.errors.BadInput` (invalid input, nothing done) or `OperationFailed`.
    """

    def __init__(
        self,
        client: CMLClient,
        project_id: str,
        spec: ClusterSpec | ClusterRequest,
        *,
        config_path: str | Path | None = None,
        owns_client: bool = False,
        **cluster_options: Any,
    ) -> None:
        """`cluster_options` go to `RayCluster` (`poll_interval`, `max_parallel`, `lock_wait`);
        `config_path` is the file `scale` saves the new size in (None: nothing is saved)."""
        self.client = client
        self.project_id = project_id
        self.config_path = Path(config_path) if config_path is not None else None
        self._owns_client = owns_client
        self.cluster = RayCluster(client, project_id, spec, **cluster_options)

    @classmethod
    def open(
        cls,
        config: str | Path = DEFAULT_CLUSTER_FILE,
        *,
        project: str | None = None,
        local: bool = False,
        settings: CMLSettings | None = None,
        env: Mapping[str, str] | None = None,
        **cluster_options: Any,
    ) -> CAIClusterManager:
        """The cluster of `config` (validated first, env overrides applied) in `project` (a name or
        an id; default: CDSW_PROJECT_ID inside CML, else the jobs file's project).

        `settings` default to CML_HOST/CML_API_KEY, or the local workspace with `local`.
        """
        request = load_cluster_request(config, env=env, source="python")
        if settings is None:
            settings = local_workspace_settings() if local else CMLSettings.from_env()
        client = CMLClient(settings)
        try:
            found = resolve_project(client, project, local=local, create=local, env=env)
        except BaseException:
            client.close()
            raise
        return cls(client, found.id, request, config_path=config, owns_client=True, **cluster_options)

    # -- the verbs -----------------------------------------------------------------------------
    @property
    def spec(self) -> ClusterSpec:
        return self.cluster.spec

    def plan(self) -> Plan:
        """What `up` would change (one list call, nothing written)."""
        return self.cluster.plan()

    def up(
        self, *, wait: bool = True, timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> tuple[Plan, ClusterStatus]:
        """Create or converge the cluster; with `wait`, until Ray reports every node alive."""
        return self.cluster.up(wait=wait, timeout=timeout, on_progress=on_progress)

    def status(self) -> ClusterStatus:
        """Apps plus Ray's own view, in one list call and one request to the head."""
        return self.cluster.status()

    def scale(
        self,
        replicas: int,
        group: str | None = None,
        *,
        wait: bool = True,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> tuple[Plan, ClusterStatus]:
        """`replicas` workers in `group` (None: the only group); unchanged nodes are not touched.
        The new size is saved in the config file (when there is one), as `ray-cai scale` does: the
        same merge (`RayCluster.scaled`), so only the size is asked for explicitly."""
        self.cluster = self.cluster.scaled(replicas, group)  # BadInput before any API call
        result = self.cluster.up(wait=wait, timeout=timeout, on_progress=on_progress)
        if self.config_path is not None:
            save_replicas(self.config_path, replicas, group)
        return result

    def down(self) -> list[str]:
        """Delete every application of the cluster; returns their names."""
        return self.cluster.down()

    # -- after it is up ------------------------------------------------------------------------
    def connect_info(self, status: ClusterStatus | None = None) -> dict[str, Any]:
        """How to reach the cluster: Ray address, dashboard URL, the env a client needs."""
        return connect_info(status if status is not None else self.status())

    def write_info(self, path: str | Path = INFO_FILE, status: ClusterStatus | None = None) -> Path:
        """Write `ray_cluster_info.json` (no secrets) and return its path."""
        return write_cluster_info(status if status is not None else self.status(), path)

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the client when this manager opened it."""
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> CAIClusterManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CAIClusterManager(cluster={self.spec.name!r}, project={self.project_id!r})"
