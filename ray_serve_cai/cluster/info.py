"""`ray_cluster_info.json` (the seed's name) and what a Ray client needs to connect. No secrets."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray_serve_cai.atomic import write_atomically
from ray_serve_cai.cluster.status import ClusterStatus

INFO_FILE = "ray_cluster_info.json"


def _ray_url(address: object) -> str | None:
    """`ray://host:port` whether the head reports the scheme or not."""
    if not address:
        return None
    text = str(address)
    return text if text.startswith("ray://") else f"ray://{text}"


def connect_info(status: ClusterStatus) -> dict[str, Any]:
    """The address and environment a Ray client in the same project needs.

    The token itself is never included: clients read it from its 0600 file in the project.
    """
    ray = status.ray
    client_address = _ray_url(ray.get("client_address"))
    env: dict[str, str] = {}
    if client_address:
        env["RAY_ADDRESS"] = client_address
    if ray.get("auth_mode", "token") == "token" and ray.get("token_path"):
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(ray["token_path"])
    return {
        "cluster": status.cluster,
        "state": status.state,
        "address": env.get("RAY_ADDRESS"),
        "gcs_address": ray.get("gcs_address"),
        "dashboard_url": status.dashboard_url,
        "env": env,
    }


def cluster_info(status: ClusterStatus) -> dict[str, Any]:
    """The content of `ray_cluster_info.json`."""
    ray = status.ray
    workers = [n for n in status.nodes if n.role == "worker"]
    groups: dict[str, int] = {}
    for node in workers:
        groups[node.group] = groups.get(node.group, 0) + 1
    head = next((n for n in status.nodes if n.role == "head"), None)
    return {
        "cluster": status.cluster,
        "project_id": status.project_id,
        "state": status.state,
        "head_address": ray.get("gcs_address"),
        "client_address": _ray_url(ray.get("client_address")),
        "dashboard_url": status.dashboard_url,
        "head_app_id": head.app_id if head else None,
        "app_ids": {n.name: n.app_id for n in status.nodes},
        "node_counts": {"head": 1 if head else 0, "workers": len(workers), "worker_groups": groups},
        "alive_nodes": ray.get("alive_nodes"),
        "resources": ray.get("resources", {}),
        "ray_version": ray.get("ray_version"),
        "python_version": ray.get("python_version"),
        "applied": status.applied,  # what is deployed: sizes, runtimes, origin (commit, overrides)
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_cluster_info(status: ClusterStatus, path: str | Path = INFO_FILE) -> Path:
    """Write `ray_cluster_info.json` atomically (temp file + rename)."""
    target = Path(path)
    write_atomically(target, json.dumps(cluster_info(status), indent=2) + "\n")
    return target
