"""The environment of one node application (`RAY_CAI_*`, plus the polling endpoint), typed once.

`config` writes it (`head_node`/`worker_node` → `NodeEnvironment(...).to_env()`), the cluster layer
reads its markers (`CLUSTER_VARIABLE`, `SPEC_HASH_VARIABLE`, `GROUP_VARIABLE`), and the node parses
it back (`NodeEnvironment.from_env`, in `ray_serve_cai.node.settings`) with the same names, types
and defaults. Imports nothing else of the package but `config._common`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ray_serve_cai.config._common import format_number

CLUSTER_VARIABLE = "RAY_CAI_CLUSTER"
SPEC_HASH_VARIABLE = "RAY_CAI_SPEC_HASH"
ROLE_VARIABLE = "RAY_CAI_ROLE"
GROUP_VARIABLE = "RAY_CAI_GROUP"
NODE_NAME_VARIABLE = "RAY_CAI_NODE_NAME"
AUTOSCALER_VARIABLE = "RAY_CAI_AUTOSCALER"  # "1" on the head of a cluster with autoscaled groups
NODE_ID_RESOURCE_VARIABLE = "RAY_CAI_NODE_ID_RESOURCE"  # Ray's NODE_ID_AS_RESOURCE of the node
HEAD_FT_VARIABLE = "RAY_CAI_HEAD_FT"  # "1": head fault tolerance (GCS state in the project, lease, relay)
POLLING_ENDPOINT_VARIABLE = "CDSW_APP_POLLING_ENDPOINT"
# What CML polls on every node app: fails once the node's Ray has been down past its start grace.
NODE_POLLING_ENDPOINT = "/ray-cai/healthz"

NAME_PATTERN = r"^[a-z0-9]+(-[a-z0-9]+)*$"
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_JOIN_TIMEOUT_SECONDS = 600.0
DEFAULT_START_GRACE_SECONDS = 120.0

Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(ge=0)]


class NodeEnvironment(BaseModel):
    """One node's `RAY_CAI_*` variables (field aliases are the variable names)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    cluster: Name = Field(alias=CLUSTER_VARIABLE)
    role: Literal["head", "worker"] | None = Field(None, alias=ROLE_VARIABLE)
    spec_hash: str | None = Field(None, alias=SPEC_HASH_VARIABLE)
    group: Name | None = Field(None, alias=GROUP_VARIABLE)
    node_name: Name | None = Field(None, alias=NODE_NAME_VARIABLE)
    # CPUs the node advertises (the node requires a whole number: `ray start --num-cpus`)
    num_cpus: Annotated[float, Field(ge=0)] | None = Field(None, alias="RAY_CAI_NUM_CPUS")
    num_gpus: Annotated[int, Field(ge=0)] = Field(0, alias="RAY_CAI_NUM_GPUS")
    memory_gb: Annotated[float, Field(ge=0.1)] | None = Field(None, alias="RAY_CAI_MEMORY_GB")
    gcs_port: Port = Field(DEFAULT_GCS_PORT, alias="RAY_CAI_GCS_PORT")
    client_port: Port = Field(DEFAULT_CLIENT_PORT, alias="RAY_CAI_CLIENT_PORT")
    dashboard_port: Port = Field(DEFAULT_DASHBOARD_PORT, alias="RAY_CAI_DASHBOARD_PORT")
    auth: Literal["token", "disabled"] = Field("token", alias="RAY_CAI_AUTH")
    join_timeout: Annotated[float, Field(ge=0)] = Field(
        DEFAULT_JOIN_TIMEOUT_SECONDS, alias="RAY_CAI_JOIN_TIMEOUT"
    )
    start_grace: Annotated[float, Field(ge=0)] = Field(
        DEFAULT_START_GRACE_SECONDS, alias="RAY_CAI_START_GRACE"
    )
    autoscaler: bool = Field(False, alias=AUTOSCALER_VARIABLE)
    node_id_resource: Annotated[int, Field(ge=1)] | None = Field(None, alias=NODE_ID_RESOURCE_VARIABLE)
    polling_endpoint: str = Field(NODE_POLLING_ENDPOINT, alias=POLLING_ENDPOINT_VARIABLE)
    # Off when unset (a node started by hand); `ray_cluster.head_fault_tolerance` (default on) sets it.
    head_ft: bool = Field(False, alias=HEAD_FT_VARIABLE)

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return value.strip() or None if isinstance(value, str) else value

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> NodeEnvironment:
        """Parse the variables that are set (blank = unset); raises pydantic's ValidationError."""
        names = {field.alias for field in cls.model_fields.values()}
        present = {key: value for key, value in environ.items() if key in names and value.strip()}
        return cls.model_validate(present)

    def to_env(self, *keys: str) -> dict[str, str]:
        """The variables as an application's environment. With `keys` (field names), only those,
        in that order; else every field that has a value."""
        fields = type(self).model_fields
        chosen = keys or tuple(fields)
        env: dict[str, str] = {}
        for key in chosen:
            value = getattr(self, key)
            if value is None:
                continue
            alias = fields[key].alias or key
            if isinstance(value, bool):
                env[alias] = "1" if value else "0"
            elif isinstance(value, float | int):
                env[alias] = format_number(value)
            else:
                env[alias] = str(value)
        return env
