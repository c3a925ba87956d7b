"""The node's HTTP contracts, typed once: what `/ray-cai/status` (head) and `/ray-cai/health`
(every node) answer. The node's server writes them, the cluster layer and the test fake read or
write the same models. Pydantic only: importable where Ray is not installed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

STATUS_PATH = "/ray-cai/status"
HEALTH_PATH = "/ray-cai/health"
# The polling endpoint every node app declares (`CDSW_APP_POLLING_ENDPOINT`).
HEALTHZ_PATH = "/ray-cai/healthz"


class RayNodeView(BaseModel):
    """One node as Ray's GCS sees it."""

    model_config = ConfigDict(extra="ignore")

    node_id: str | None = None
    node_name: str | None = None  # the ray-cai node name (its label), else Ray's node name
    ip: str | None = None
    alive: bool = False
    is_head: bool = False
    resources: dict[str, float] = Field(default_factory=dict)
    started_at: float | None = None  # when its raylet started (wall clock, s): tells incarnations apart


class HeadStatus(BaseModel):
    """`GET /ray-cai/status` on the head: Ray's own view of the cluster plus how to connect.

    Answered with HTTP 503 and `error` while Ray is not running (or its GCS does not answer).
    Keys other helpers add (e.g. `autoscaler`) are kept.
    """

    model_config = ConfigDict(extra="allow")

    head_id: str | None = None
    ray_version: str | None = None
    python_version: str | None = None
    ray_running: bool = False
    alive_nodes: int = 0
    nodes: list[RayNodeView] = Field(default_factory=list)
    resources: dict[str, float] = Field(default_factory=dict)
    error: str | None = None
    # once the head published its rendezvous: addresses, auth mode, token *path* (never the token)
    gcs_address: str | None = None
    client_address: str | None = None
    auth_mode: str | None = None
    token_path: str | None = None
    # autostop (#22): what the head measures — idle_seconds, busy reasons, the setting it acts on
    autostop: dict[str, Any] | None = None

    def alive_names(self) -> set[str]:
        return {node.node_name for node in self.nodes if node.alive and node.node_name}

    def body(self) -> dict[str, Any]:
        """The JSON body (None-valued connect facts left out, as before they were known)."""
        data = self.model_dump(mode="json")
        for key in ("gcs_address", "client_address", "auth_mode", "token_path", "error", "autostop"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class NodeHealth(BaseModel):
    """`GET /ray-cai/health` (and `/ray-cai/healthz`, 200 when `healthy` else 503) on every node."""

    model_config = ConfigDict(extra="allow")

    role: str
    node_name: str
    cluster: str | None = None
    group: str | None = None
    ray_running: bool = False
    phase: str = "starting"  # starting | waiting for the head | running | restarting
    healthy: bool = True
    ray_down_for_s: float = 0.0
    start_grace_s: float | None = None
    start_attempts: int = 0
    last_error: str | None = None  # the last error from the node's Ray log
    head_id: str | None = None
    ray_version: str | None = None
    python_version: str | None = None
