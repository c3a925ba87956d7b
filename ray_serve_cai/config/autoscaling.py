"""Ray's autoscaling config (the file `ray start --head --autoscaling-config` reads) for a ClusterSpec.

Pure: a function of the spec. The head launcher writes it when the cluster has autoscaled groups;
the node provider rewrites it when the applied spec changes (Ray's autoscaler re-reads the file on
every update, so new bounds or idle timeouts take effect without restarting the head). No secrets
go in it: the provider finds the API key in the workload's environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_serve_cai.atomic import write_json_atomically
from ray_serve_cai.config.cluster import ClusterSpec, head_app_name, node_id_resource

PROVIDER_MODULE = "ray_serve_cai.autoscale.CMLNodeProvider"
HEAD_NODE_TYPE = "head"  # never a group name: "head" is reserved
AUTOSCALING_FILE_NAME = "autoscaling.json"
DECISION_FILE_NAME = "autoscaler.json"


def autoscaling_config_path(project_dir: Path | str, cluster: str) -> Path:
    """`<project>/.ray-cai/<cluster>/autoscaling.json`."""
    return Path(project_dir) / ".ray-cai" / cluster / AUTOSCALING_FILE_NAME


def decision_path(project_dir: Path | str, cluster: str) -> Path:
    """`<project>/.ray-cai/<cluster>/autoscaler.json`: the node provider's last decision."""
    return Path(project_dir) / ".ray-cai" / cluster / DECISION_FILE_NAME


def _resources(cpu: float, gpus: int, memory_gib: float | None) -> dict[str, int]:
    resources = {"CPU": int(cpu)}
    if gpus:
        resources["GPU"] = gpus
    if memory_gib is not None:
        resources["memory"] = int(memory_gib * 1024**3)  # what the node passes as `ray start --memory`
    return resources


def ray_autoscaling_config(spec: ClusterSpec, *, project_dir: Path | str) -> dict[str, Any]:
    """The autoscaling config: one node type per worker group (autoscaled groups with their
    bounds, fixed groups pinned at their size so Ray counts their capacity), the head, the idle
    timeout and upscaling speed, and the external provider `ray_serve_cai.autoscale.CMLNodeProvider`.

    Provider nodes are matched to Ray nodes by `use_node_id_as_ip`: every node advertises
    `NODE_ID_AS_RESOURCE` (see `node_id_resource`), as Ray on Spark does."""
    head_cpus = spec.head.ray_cpus if spec.head.ray_cpus is not None else spec.head.cpu
    node_types: dict[str, Any] = {
        HEAD_NODE_TYPE: {
            "resources": _resources(head_cpus, spec.head.gpus, None),
            "node_config": {},
            "min_workers": 0,
            "max_workers": 0,
        }
    }
    for group in spec.worker_groups:
        low = group.min_replicas if group.autoscaled else group.replicas
        high = group.max_replicas if group.autoscaled else group.replicas
        node_types[group.name] = {
            "resources": _resources(group.cpu, group.gpus, group.memory),
            "node_config": {},
            "min_workers": low,
            "max_workers": high,
        }
    return {
        "cluster_name": spec.name,
        "max_workers": sum(group.most_replicas for group in spec.worker_groups),
        "upscaling_speed": spec.autoscaling.upscaling_speed,
        "idle_timeout_minutes": spec.autoscaling.idle_timeout / 60.0,
        "provider": {
            "type": "external",
            "module": PROVIDER_MODULE,
            # BatchingNodeProvider's requirements; CML starts the apps, nobody ssh-es into them.
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "foreground_node_launch": True,
            # A worker app that starts slowly must not be killed for a missing heartbeat.
            "worker_liveness_check": False,
            "use_node_id_as_ip": True,
            "ray_cai_cluster": spec.name,
            "project_dir": str(project_dir),
            "config_path": str(autoscaling_config_path(project_dir, spec.name)),
            "head_node_id_resource": node_id_resource(head_app_name(spec.name)),
        },
        "auth": {},
        "available_node_types": node_types,
        "head_node_type": HEAD_NODE_TYPE,
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def write_autoscaling_config(path: Path, config: dict[str, Any]) -> bool:
    """Write ``config`` atomically (temp file + rename) unless the file already holds it; True if written."""
    return write_json_atomically(path, config)


__all__ = [
    "AUTOSCALING_FILE_NAME",
    "DECISION_FILE_NAME",
    "HEAD_NODE_TYPE",
    "PROVIDER_MODULE",
    "autoscaling_config_path",
    "decision_path",
    "ray_autoscaling_config",
    "write_autoscaling_config",
]
