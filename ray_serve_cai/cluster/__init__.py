"""The reconciler for a Ray cluster made of CML applications: observe, plan, apply, wait, verify.

`plan` is the pure core (desired nodes + observed apps → actions); `reconciler` is the I/O shell
(`RayCluster` with the verbs plan/up/status/scale/down); `info` writes `ray_cluster_info.json`.
"""

from ray_serve_cai.cluster.errors import ClusterError, LockHeld
from ray_serve_cai.cluster.info import cluster_info, connect_info, write_cluster_info
from ray_serve_cai.cluster.plan import Action, ActionKind, ObservedApp, Plan, plan_changes
from ray_serve_cai.cluster.reconciler import ClusterStatus, NodeStatus, RayCluster

__all__ = [
    "Action",
    "ActionKind",
    "ClusterError",
    "ClusterStatus",
    "LockHeld",
    "NodeStatus",
    "ObservedApp",
    "Plan",
    "RayCluster",
    "cluster_info",
    "connect_info",
    "plan_changes",
    "write_cluster_info",
]
