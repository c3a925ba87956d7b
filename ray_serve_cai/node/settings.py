"""Node settings: everything a launcher needs, read only from the application's environment."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["head", "worker"]
AuthMode = Literal["token", "disabled"]

NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_JOIN_TIMEOUT_SECONDS = 600.0
DEFAULT_START_GRACE_SECONDS = 120.0


class SettingsError(ValueError):
    """The environment does not describe a valid node; the message lists every problem."""


@dataclass(frozen=True)
class NodeSettings:
    """What one Ray node of a cluster is, as the application environment describes it."""

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
    start_grace: float
    node_ip: str
    app_port: int
    project_dir: Path
    # Autoscaling (ray_serve_cai.node.autoscaling): the head runs Ray's autoscaler; a node's
    # NODE_ID_AS_RESOURCE, by which the autoscaler matches its application to its Ray node.
    autoscaler: bool = False
    node_id_resource: int | None = None

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory_gb is None else int(self.memory_gb * 1024**3)

    @classmethod
    def from_env(cls, role: str | None = None, environ: Mapping[str, str] | None = None) -> NodeSettings:
        """Read the RAY_CAI_* and CDSW_* variables; raise `SettingsError` naming every bad one."""
        env = os.environ if environ is None else environ
        problems: list[str] = []
        reader = _EnvReader(env, problems)

        env_role = env.get("RAY_CAI_ROLE", "").strip()
        chosen_role = (role or env_role or "").strip()
        if chosen_role not in ("head", "worker"):
            problems.append(f"role must be 'head' or 'worker' (got {chosen_role!r})")
        elif env_role and role and env_role != role:
            problems.append(f"RAY_CAI_ROLE={env_role!r} contradicts the requested role {role!r}")

        cluster = reader.name("RAY_CAI_CLUSTER", default=None)
        default_name = f"ray-{cluster}-head" if cluster and chosen_role == "head" else None
        node_name = reader.name("RAY_CAI_NODE_NAME", default=default_name)
        group = reader.name("RAY_CAI_GROUP", default="head" if chosen_role == "head" else "workers")
        num_cpus = reader.integer("RAY_CAI_NUM_CPUS", default=None, minimum=0)
        num_gpus = reader.integer("RAY_CAI_NUM_GPUS", default=0, minimum=0)
        memory_gb = reader.number("RAY_CAI_MEMORY_GB", default=None, minimum=0.1)
        gcs_port = reader.port("RAY_CAI_GCS_PORT", DEFAULT_GCS_PORT)
        client_port = reader.port("RAY_CAI_CLIENT_PORT", DEFAULT_CLIENT_PORT)
        dashboard_port = reader.port("RAY_CAI_DASHBOARD_PORT", DEFAULT_DASHBOARD_PORT)
        join_timeout = reader.number("RAY_CAI_JOIN_TIMEOUT", default=DEFAULT_JOIN_TIMEOUT_SECONDS, minimum=0)
        start_grace = reader.number("RAY_CAI_START_GRACE", default=DEFAULT_START_GRACE_SECONDS, minimum=0)
        app_port = reader.port("CDSW_APP_PORT", None, allow_zero=False)
        auth = env.get("RAY_CAI_AUTH", "token").strip() or "token"
        if auth not in ("token", "disabled"):
            problems.append(f"RAY_CAI_AUTH must be 'token' or 'disabled' (got {auth!r})")
        node_ip = env.get("CDSW_IP_ADDRESS", "").strip()
        if not node_ip:
            problems.append("CDSW_IP_ADDRESS is not set (the node's IP address)")
        autoscaler = env.get("RAY_CAI_AUTOSCALER", "").strip() == "1"
        node_id_resource = reader.integer("RAY_CAI_NODE_ID_RESOURCE", default=None, minimum=1)
        project_dir = Path(env.get("RAY_CAI_PROJECT_DIR", "").strip() or os.getcwd())
        if not project_dir.is_dir():
            problems.append(f"project directory {project_dir} does not exist")

        if problems:
            raise SettingsError("; ".join(problems))
        return cls(
            role=chosen_role,  # type: ignore[arg-type]
            cluster=cluster or "",
            group=group or "",
            node_name=node_name or "",
            num_cpus=num_cpus,
            num_gpus=num_gpus or 0,
            memory_gb=memory_gb,
            gcs_port=gcs_port or 0,
            client_port=client_port or 0,
            dashboard_port=dashboard_port or 0,
            auth=auth,  # type: ignore[arg-type]
            join_timeout=join_timeout if join_timeout is not None else DEFAULT_JOIN_TIMEOUT_SECONDS,
            start_grace=start_grace if start_grace is not None else DEFAULT_START_GRACE_SECONDS,
            node_ip=node_ip,
            app_port=app_port or 0,
            project_dir=project_dir.resolve(),
            autoscaler=autoscaler,
            node_id_resource=node_id_resource,
        )


class _EnvReader:
    """Parses variables one by one and collects problems instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str], problems: list[str]) -> None:
        self.env = env
        self.problems = problems

    def _raw(self, key: str) -> str | None:
        value = self.env.get(key, "").strip()
        return value or None

    def name(self, key: str, default: str | None) -> str | None:
        value = self._raw(key) or default
        if value is None:
            self.problems.append(f"{key} is not set")
        elif not NAME_PATTERN.match(value) or len(value) > 63:
            self.problems.append(f"{key}={value!r} is not a valid name (lowercase a-z, 0-9 and '-', max 63)")
        return value

    def integer(self, key: str, default: int | None, minimum: int) -> int | None:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{key}={raw!r} is not an integer")
            return default
        if value < minimum:
            self.problems.append(f"{key}={value} must be >= {minimum}")
        return value

    def number(self, key: str, default: float | None, minimum: float) -> float | None:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{key}={raw!r} is not a number")
            return default
        if value < minimum:
            self.problems.append(f"{key}={value} must be >= {minimum}")
        return value

    def port(self, key: str, default: int | None, allow_zero: bool = True) -> int | None:
        raw = self._raw(key)
        if raw is None:
            if default is None:
                self.problems.append(f"{key} is not set")
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{key}={raw!r} is not a port number")
            return default
        if not (0 if allow_zero else 1) <= value <= 65535:
            self.problems.append(f"{key}={value} is not a valid port")
        return value
