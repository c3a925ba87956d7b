"""The reconciler for a Ray cluster made of CML applications.

A pass is a pipeline of values around one `Observation` (`observation.py`), read once:

    observation = cluster.observe()          # one list call + the head's Ray view
    plan = cluster.plan(observation)         # pure (`passes.plan_pass`): actions + the record to write
    cluster.apply(plan, observation)         # the only step that changes anything
    status = cluster.status(observation)     # pure (`passes.cluster_status`)

The verbs of `RayCluster` (one signature each, as SkyPilot's provisioner reads):

- `observe(ray=True) -> Observation`
- `plan(observation=None) -> Plan` and `status(observation=None) -> ClusterStatus` (pure views)
- `up(wait=True, timeout=None, on_progress=None) -> (Plan, ClusterStatus)`: converge, wait, Serve
- `wait_until_ready(timeout=None, on_progress=None) -> ClusterStatus`
- `watch(interval=30, on_pass=None, should_stop=..., max_passes=None)`: heal until stopped
- `down() -> list[str]`: delete every application the cluster owns
- `scaled(replicas, group=None) -> RayCluster`: the same cluster asked for another size

Modules: `plan` (the pure planner: desired nodes + observed apps → actions), `passes` (a whole pass,
pure), `status` (the status value and its conditions), `watch` (what loops remember between
passes), `nodes` (the one create/delete path of a node app, shared with Ray's autoscaler),
`serve` (Serve's plan/apply over the same status), `applied` (the applied-spec record), `lock`,
`runtimes`, `info` (`ray_cluster_info.json`), `reconciler` (`RayCluster`, the I/O shell).
"""

from ray_serve_cai.cluster.errors import ClusterError, LockHeld
from ray_serve_cai.cluster.info import cluster_info, connect_info, write_cluster_info
from ray_serve_cai.cluster.observation import Observation
from ray_serve_cai.cluster.plan import Action, ActionKind, NameTaken, ObservedApp, Plan, plan_changes
from ray_serve_cai.cluster.reconciler import ProgressCallback, RayCluster
from ray_serve_cai.cluster.status import ClusterNode, ClusterStatus

__all__ = [
    "Action",
    "ActionKind",
    "ClusterError",
    "ClusterNode",
    "ClusterStatus",
    "LockHeld",
    "NameTaken",
    "Observation",
    "ObservedApp",
    "Plan",
    "ProgressCallback",
    "RayCluster",
    "cluster_info",
    "connect_info",
    "plan_changes",
    "write_cluster_info",
]
