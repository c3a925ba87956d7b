"""The cluster's status as a value: derived from one observation, no I/O (`derive_status`).

`state` is the one word (`absent`, `failed`, `pending`, `ready`); `conditions` say why, one per
aspect, as KubeRay reports them. `AppsProvisioned` is latched the KubeRay way: once the cluster was
ready (recorded with the applied spec), it stays true; `Ready` is always now.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ray_serve_cai.cluster.conditions import Condition
from ray_serve_cai.cluster.plan import ObservedApp, owned_apps
from ray_serve_cai.cml import APPLICATION_FAILED, APPLICATION_RUNNING, Application
from ray_serve_cai.config import NodeSpec
from ray_serve_cai.config.node_env import HEAD_FT_VARIABLE


@dataclass
class ClusterNode:
    """One desired node of the status: its application (if any) and whether Ray sees it."""

    name: str
    role: str
    group: str
    app_id: str | None = None
    app_status: str | None = None
    spec_current: bool = False
    in_ray: bool = False
    log_hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "group": self.group,
            "app_id": self.app_id,
            "app_status": self.app_status,
            "spec_current": self.spec_current,
            "in_ray": self.in_ray,
        }


@dataclass
class ClusterStatus:
    """Apps plus Ray's own view. `state` is `ready` only when every owned app runs with the
    desired spec, nothing surplus remains, and Ray reports every node alive."""

    cluster: str
    project_id: str
    state: str
    nodes: list[ClusterNode]
    surplus: list[str] = field(default_factory=list)
    ray: dict[str, Any] = field(default_factory=dict)
    dashboard_url: str | None = None
    problems: list[str] = field(default_factory=list)
    # What is deployed (the applied spec's summary and origin) and how the caller's config differs.
    applied: dict[str, Any] | None = None
    differences: list[str] = field(default_factory=list)
    # Per worker group: current (apps of the group), desired, min, max (None unless autoscaled).
    groups: list[dict[str, Any]] = field(default_factory=list)
    # Serve's applications (`ray-cai serve status` shape) when the spec has `serve:`; see cluster/serve.py.
    serve: dict[str, Any] | None = None
    # Why the state is what it is, one condition per aspect (see `derive_status`).
    conditions: list[Condition] = field(default_factory=list)
    # autostop (#22): the setting, the head's idle view, the stopped mark (see cluster/autostop.py).
    autostop: dict[str, Any] | None = None
    desired: list[NodeSpec] = field(default_factory=list, repr=False)  # the nodes it was derived for

    @property
    def autoscaler(self) -> dict[str, Any] | None:
        """The autoscaler's last decision, as the head's status endpoint reports it."""
        return self.ray.get("autoscaler") or None

    @property
    def head_fault_tolerance(self) -> dict[str, Any] | None:
        """The head's fault-tolerance state as it reports it (enabled, storage, epoch, the last
        failover); while the head does not answer, what its spec says (epoch unknown)."""
        reported = self.ray.get("head_fault_tolerance")
        if reported:
            return dict(reported)
        head = next((node for node in self.desired if node.role == "head"), None)
        if head is None:
            return None
        enabled = head.environment.get(HEAD_FT_VARIABLE) == "1"
        return {"enabled": enabled, "storage": "rocksdb" if enabled else "memory", "epoch": None}

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def progress_line(self) -> str:
        """One line for progress displays: `<state>: a/n apps running, b/n nodes alive in Ray`."""
        total = len(self.nodes)
        running = sum(1 for n in self.nodes if n.app_status == APPLICATION_RUNNING)
        in_ray = sum(1 for n in self.nodes if n.in_ray)
        line = f"{self.state}: {running}/{total} apps running, {in_ray}/{total} nodes alive in Ray"
        return line + (f", {len(self.surplus)} surplus" if self.surplus else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "project_id": self.project_id,
            "state": self.state,
            "nodes": [n.as_dict() for n in self.nodes],
            "surplus": self.surplus,
            "ray": self.ray,
            "dashboard_url": self.dashboard_url,
            "problems": self.problems,
            "applied": self.applied,
            "differences": self.differences,
            "groups": self.groups,
            "autoscaler": self.autoscaler,
            "serve": self.serve,
            "conditions": [c.as_dict() for c in self.conditions],
            "autostop": self.autostop,
            "head_fault_tolerance": self.head_fault_tolerance,
        }


def observed_app(app: Application) -> ObservedApp:
    """What the planner needs of one listed application."""
    return ObservedApp(
        id=app.id,
        name=app.name,
        subdomain=app.key,
        status=app.status or "",
        environment=dict(app.environment or {}),
    )


def log_hint(app: Application | None) -> str:
    """Where an application's log is: the local workspace's file, else CML's UI."""
    if app is None:
        return ""
    local_log = getattr(app, "log_path", None) or (app.model_extra or {}).get("log_path")
    if local_log:
        return f"logs: {local_log}"
    return f"logs: CML UI → Applications → {app.name} → Logs"


def _nodes(
    cluster: str, desired: Sequence[NodeSpec], apps: Sequence[Application]
) -> tuple[list[ClusterNode], list[str]]:
    """The status row of every desired node, and the owned apps no node wants (surplus)."""
    by_key = {a.key: a for a in apps}
    mine = {o.subdomain: o for o in owned_apps(cluster, [observed_app(a) for a in apps])}
    nodes: list[ClusterNode] = []
    for node in desired:
        app = by_key.get(node.name) if node.name in mine else None
        nodes.append(
            ClusterNode(
                name=node.name,
                role=node.role,
                group=node.group,
                app_id=app.id if app else None,
                app_status=app.status if app else None,
                spec_current=bool(app) and mine[node.name].spec_hash == node.spec_hash,
                log_hint=log_hint(app),
            )
        )
    desired_names = {n.name for n in desired}
    return nodes, sorted(name for name in mine if name not in desired_names and not mine[name].is_gateway)


# A node is in Ray when Ray has an alive node of its name that started no earlier than this before
# the node's application did (CML's `starting_at`): an older one is a previous incarnation's raylet,
# which Ray counts alive until its health checks give up on it (seconds after its pod is gone). The
# margin covers clock skew between CML and the pods.
INCARNATION_SKEW_SECONDS = 10.0


def alive_in_ray(ray_view: dict[str, Any], name: str, app_started: datetime | str | None) -> bool:
    """Whether Ray has an alive node `name` of this incarnation of its application (any, when either
    start time is unknown: a head of an older version does not give Ray's)."""
    since = app_started.timestamp() - INCARNATION_SKEW_SECONDS if isinstance(app_started, datetime) else None
    for node in ray_view.get("nodes", []):
        if node.get("alive") and node.get("node_name") == name:
            started = node.get("started_at")
            if since is None or not isinstance(started, (int, float)) or started >= since:
                return True
    return False


def _why(items: list[str], text: str) -> str:
    return f"{text}: {', '.join(items)}" if items else ""


def derive_status(
    cluster: str,
    desired: Sequence[NodeSpec],
    apps: Sequence[Application],
    ray_view: dict[str, Any],
    ray_problem: str | None = None,
    *,
    provisioned_at: str | None = None,
) -> ClusterStatus:
    """The cluster's status from one observation and Ray's own view (pure: no I/O).

    `state` is the one word (`absent`, `failed`, `pending`, `ready`); `conditions` say why, one
    per aspect (KubeRay-style): AppsProvisioned (every desired app exists with the desired spec and
    nothing surplus remains — latched: true from `provisioned_at` on, the time the cluster was first
    ready), HeadReady (the head runs and answers with Ray's view), RayNodesAlive (Ray sees every
    node), Ready (all of it now)."""
    nodes, surplus = _nodes(cluster, desired, apps)
    started = {a.key: a.starting_at for a in apps}
    for node_status in nodes:
        app_started = started.get(node_status.name) if node_status.app_id else None
        node_status.in_ray = alive_in_ray(ray_view, node_status.name, app_started)

    problems = [ray_problem] if ray_problem else []
    problems += [
        f"{n.name}: {n.app_status}; {n.log_hint}" for n in nodes if n.app_status == APPLICATION_FAILED
    ]
    missing = [n.name for n in nodes if not n.app_id]
    outdated = [n.name for n in nodes if n.app_id and not n.spec_current]
    provisioned_now = not missing and not outdated and not surplus
    head = next((n for n in nodes if n.role == "head"), None)
    head_ready = (
        head is not None and head.app_status == APPLICATION_RUNNING and bool(ray_view) and not ray_problem
    )
    not_in_ray = [n.name for n in nodes if not n.in_ray]
    all_alive = not not_in_ray and ray_view.get("alive_nodes") == len(nodes)
    running = all(n.app_status == APPLICATION_RUNNING for n in nodes)
    owned = any(n.app_id for n in nodes) or bool(surplus)
    if not owned:
        state = "absent"
    elif any(n.app_status == APPLICATION_FAILED for n in nodes):
        state = "failed"
    elif provisioned_now and running and all_alive:
        state = "ready"
    else:
        state = "pending"

    not_running = [f"{n.name} ({(n.app_status or 'missing').removeprefix('APPLICATION_').lower()})"
                   for n in nodes if n.app_id and n.app_status != APPLICATION_RUNNING]  # fmt: skip
    now = _why(missing, "no application") or _why(outdated, "outdated spec") or _why(surplus, "surplus")
    latched = provisioned_at is not None and owned
    provisioned = provisioned_now or latched
    conditions = [
        Condition(
            "AppsProvisioned",
            provisioned,
            "" if provisioned else ("Missing" if missing else "Outdated" if outdated else "Surplus"),
            f"provisioned at {provisioned_at}; now {now}" if latched and now else now,
        ),
        Condition(
            "HeadReady",
            head_ready,
            "" if head_ready else ("NoHead" if head is None or not head.app_id else "HeadNotAnswering"),
            ray_problem or ("" if head_ready or head is None else f"head application {head.app_status}"),
        ),
        Condition(
            "RayNodesAlive",
            all_alive,
            "" if all_alive else "NotInRay",
            _why(not_in_ray, f"{len(nodes) - len(not_in_ray)}/{len(nodes)} alive in Ray; not yet"),
        ),
        Condition(
            "Ready",
            state == "ready",
            "" if state == "ready" else state.capitalize(),
            _why(not_running, "not running") if state != "ready" else "",
        ),
    ]
    return ClusterStatus(
        cluster=cluster,
        project_id="",
        state=state,
        nodes=nodes,
        surplus=surplus,
        ray=ray_view,
        problems=problems,
        conditions=conditions,
        desired=list(desired),
    )


def describe_failure(headline: str, status: ClusterStatus) -> str:
    """A failure message naming every node that is not running in Ray and where its log is."""
    lines = [f"{headline} (cluster {status.cluster!r}, state {status.state}):"]
    for node in status.nodes:
        if node.app_status == APPLICATION_RUNNING and node.in_ray:
            continue
        where = (
            "not in Ray yet"
            if node.app_status == APPLICATION_RUNNING
            else (node.app_status or "no application")
        )
        hint = f"; {node.log_hint}" if node.log_hint else ""
        lines.append(f"  {node.name}: {where}{hint}")
    lines.extend(f"  {p}" for p in status.problems if "logs:" not in p)
    return "\n".join(lines)
