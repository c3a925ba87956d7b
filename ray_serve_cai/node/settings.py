"""Node settings: everything a launcher needs, read only from the application's environment.

The `RAY_CAI_*` variables are parsed by the one typed definition `config` writes them with
(`ray_serve_cai.config.node_env.NodeEnvironment`: names, types, defaults); the node adds what CML
gives the pod (`CDSW_IP_ADDRESS`, `CDSW_APP_PORT`) and where the project is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ray_serve_cai.config.node_env import (
    DEFAULT_CLIENT_PORT,
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_GCS_PORT,
    DEFAULT_JOIN_TIMEOUT_SECONDS,
    DEFAULT_START_GRACE_SECONDS,
    NodeEnvironment,
)
from ray_serve_cai.errors import BadInput
from ray_serve_cai.node.ports import on_shared_host

Role = Literal["head", "worker"]
AuthMode = Literal["token", "disabled"]

__all__ = [
    "DEFAULT_CLIENT_PORT",
    "DEFAULT_DASHBOARD_PORT",
    "DEFAULT_GCS_PORT",
    "DEFAULT_JOIN_TIMEOUT_SECONDS",
    "DEFAULT_START_GRACE_SECONDS",
    "NodeSettings",
    "SettingsError",
]


class SettingsError(BadInput):
    """The environment does not describe a valid node; the message lists every problem."""


class NodeSettings(BaseModel):
    """What one Ray node of a cluster is, as the application environment describes it."""

    model_config = ConfigDict(frozen=True)

    role: Role
    cluster: str
    group: str
    node_name: str
    num_cpus: int | None
    num_gpus: int
    memory_gb: float | None
    gcs_port: int
    client_port: int
    dashboard_port: int
    auth: AuthMode
    join_timeout: float
    start_grace: float = DEFAULT_START_GRACE_SECONDS
    node_ip: str
    app_port: int = Field(ge=1, le=65535)
    project_dir: Path
    # Autoscaling (ray_serve_cai.node.autoscaling): the head runs Ray's autoscaler; a node's
    # NODE_ID_AS_RESOURCE, by which the autoscaler matches its application to its Ray node.
    autoscaler: bool = False
    node_id_resource: int | None = None
    # Head fault tolerance (RAY_CAI_HEAD_FT=1): see ray_serve_cai.node.gcs_storage / head_lease / gcs_relay.
    head_ft: bool = False

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory_gb is None else int(self.memory_gb * 1024**3)

    @classmethod
    def from_env(cls, role: str | None = None, environ: Mapping[str, str] | None = None) -> NodeSettings:
        """Read the RAY_CAI_* and CDSW_* variables; raise `SettingsError` naming every bad one."""
        env = os.environ if environ is None else environ
        problems: list[str] = []
        node_env = _node_environment(env, problems)

        env_role = node_env.role if node_env else None
        chosen_role = (role or env_role or "").strip()
        if chosen_role not in ("head", "worker"):
            problems.append(f"role must be 'head' or 'worker' (got {chosen_role!r})")
        elif env_role and role and env_role != role:
            problems.append(f"RAY_CAI_ROLE={env_role!r} contradicts the requested role {role!r}")
        node_name = node_env.node_name if node_env else None
        if node_env and node_name is None and chosen_role == "head":
            node_name = f"ray-{node_env.cluster}-head"
        if node_env and node_name is None:
            problems.append("RAY_CAI_NODE_NAME is not set")
        num_cpus = node_env.num_cpus if node_env else None
        if num_cpus is not None and not float(num_cpus).is_integer():
            problems.append(f"RAY_CAI_NUM_CPUS={num_cpus:g} is not an integer (ray start --num-cpus)")
        node_ip = env.get("CDSW_IP_ADDRESS", "").strip()
        if not node_ip:
            problems.append("CDSW_IP_ADDRESS is not set (the node's IP address)")
        app_port = _app_port(env, problems)
        project_dir = Path(env.get("RAY_CAI_PROJECT_DIR", "").strip() or os.getcwd())
        if not project_dir.is_dir():
            problems.append(f"project directory {project_dir} does not exist")

        if problems or node_env is None:
            raise SettingsError("; ".join(problems))
        return cls(
            role=chosen_role,  # type: ignore[arg-type]
            cluster=node_env.cluster,
            group=node_env.group or ("head" if chosen_role == "head" else "workers"),
            node_name=node_name or "",
            num_cpus=None if num_cpus is None else int(num_cpus),
            num_gpus=node_env.num_gpus,
            memory_gb=node_env.memory_gb,
            gcs_port=node_env.gcs_port,
            client_port=node_env.client_port,
            dashboard_port=node_env.dashboard_port,
            auth=node_env.auth,
            join_timeout=node_env.join_timeout,
            start_grace=node_env.start_grace,
            node_ip=node_ip,
            app_port=app_port,
            project_dir=project_dir.resolve(),
            autoscaler=node_env.autoscaler,
            node_id_resource=node_env.node_id_resource,
            # Off on a shared host (the workspace's fallback without pods): there a worker's Ray
            # reached through the relay failed to start repeatedly on a loaded machine (its agents
            # missed Ray's start window) where it started at once without; the relay is for pods.
            head_ft=node_env.head_ft and not on_shared_host(env),
        )


def _node_environment(env: Mapping[str, str], problems: list[str]) -> NodeEnvironment | None:
    """The typed RAY_CAI_* variables, or None with one problem per bad variable (named)."""
    try:
        return NodeEnvironment.from_env(env)
    except ValidationError as error:
        for item in error.errors():
            variable = str(item["loc"][0]) if item["loc"] else "environment"
            raw = env.get(variable)
            if item["type"] == "missing":
                problems.append(f"{variable} is not set")
            elif item["type"] == "string_pattern_mismatch" or "max_length" in item["type"]:
                problems.append(
                    f"{variable}={raw!r} is not a valid name (lowercase a-z, 0-9 and '-', max 63)"
                )
            else:
                problems.append(f"{variable}={raw!r}: {item['msg']}")
        return None


def _app_port(env: Mapping[str, str], problems: list[str]) -> int:
    raw = env.get("CDSW_APP_PORT", "").strip()
    if not raw:
        problems.append("CDSW_APP_PORT is not set")
        return 0
    try:
        port = int(raw)
    except ValueError:
        problems.append(f"CDSW_APP_PORT={raw!r} is not a port number")
        return 0
    if not 1 <= port <= 65535:
        problems.append(f"CDSW_APP_PORT={port} is not a valid port")
    return port
