"""The pure core of the reconciler: desired nodes + observed applications → a plan of actions.

No I/O here. `plan_changes` is a function of its arguments only, so it is tested as a table.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from ray_serve_cai.cluster.applied import AppliedRecord
from ray_serve_cai.cml import APPLICATION_FAILED, APPLICATION_STOPPED, APPLICATION_STOPPING
from ray_serve_cai.config import (
    ClusterSpec,
    NodeSpec,
    desired_nodes,
    worker_index_of,
    worker_node,
)
from ray_serve_cai.config.node_env import CLUSTER_VARIABLE, GROUP_VARIABLE, ROLE_VARIABLE, SPEC_HASH_VARIABLE

# The cluster's Serve gateway (cluster.serve owns it): owned (`down` removes it) but no Ray node.
GATEWAY_ROLE = "gateway"
# Application statuses are CML's (`ray_serve_cai.cml.APPLICATION_*`); anything but running, stopped
# or failed is "in progress".
DEAD_STATUSES = frozenset({APPLICATION_STOPPED, APPLICATION_FAILED})


@dataclass(frozen=True)
class ObservedApp:
    """What the reconciler needs to know of one application, read from one list call."""

    id: str
    name: str
    subdomain: str
    status: str
    environment: Mapping[str, str] = field(default_factory=dict)

    @property
    def cluster(self) -> str | None:
        return self.environment.get(CLUSTER_VARIABLE)

    @property
    def spec_hash(self) -> str | None:
        return self.environment.get(SPEC_HASH_VARIABLE)

    def owned_by(self, cluster: str) -> bool:
        return self.cluster == cluster

    @property
    def is_gateway(self) -> bool:
        """The cluster's Serve gateway: Serve's pass keeps it, the nodes' pass leaves it alone."""
        return self.environment.get(ROLE_VARIABLE) == GATEWAY_ROLE


class ActionKind(str, Enum):
    CREATE = "create"  # no application of that name: create (and so start) it
    UPDATE = "update"  # spec drift: PATCH the application's fields, then restart it
    RESTART = "restart"  # stopped or failed with the right spec: restart it
    DELETE = "delete"  # owned but no longer desired: stop and delete it


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    name: str
    node: NodeSpec | None = None  # the desired node (create/update/restart)
    app: ObservedApp | None = None  # the observed app (update/restart/delete)
    reason: str = ""

    def describe(self) -> str:
        return f"{self.kind.value:8} {self.name}" + (f"  ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class NameTaken:
    """A desired name taken by an application this cluster does not own; it is never touched."""

    name: str
    app_id: str
    owner: str | None

    def describe(self) -> str:
        owner = f"cluster {self.owner!r}" if self.owner else "no ray-cai cluster"
        return (
            f"application {self.name!r} (id {self.app_id}) already exists and belongs to {owner}; "
            "rename the cluster or remove that application"
        )


@dataclass(frozen=True)
class Plan:
    """What one pass changes: the actions, the nodes left as they are, the names taken by apps of
    someone else, and the applied-spec record to write (None: the recorded one is current).
    `head_runtime` is the runtime the lock application runs (ML Runtime projects need one)."""

    actions: tuple[Action, ...]
    unchanged: tuple[str, ...]
    conflicts: tuple[NameTaken, ...] = ()
    record: AppliedRecord | None = None
    head_runtime: str | None = None

    @property
    def is_noop(self) -> bool:
        """No application changes (a record to write is not one: it is a PATCH, no restart)."""
        return not self.actions and not self.conflicts

    def of_kind(self, kind: ActionKind) -> list[Action]:
        return [a for a in self.actions if a.kind is kind]

    def summary(self) -> dict[str, int]:
        counts = {kind.value: len(self.of_kind(kind)) for kind in ActionKind}
        counts["unchanged"] = len(self.unchanged)
        return counts


def owned_apps(cluster: str, apps: Iterable[ObservedApp]) -> list[ObservedApp]:
    """The applications carrying this cluster's marker: the only ones the reconciler may touch."""
    return [app for app in apps if app.owned_by(cluster)]


def plan_changes(cluster: str, desired: Sequence[NodeSpec], observed: Iterable[ObservedApp]) -> Plan:
    """Compare the desired nodes with the observed applications and list what must change.

    - a desired node without an application is created;
    - an owned application whose spec hash differs is updated in place (PATCH + restart), so a
      scale change never touches unchanged nodes;
    - an owned application that stopped or failed is restarted;
    - an owned application that is no longer desired is deleted;
    - an application without this cluster's marker is never touched; if it holds a desired name,
      that is reported as a conflict.
    """
    by_name = {app.subdomain: app for app in observed}
    desired_names = {node.name for node in desired}

    actions: list[Action] = []
    unchanged: list[str] = []
    conflicts: list[NameTaken] = []
    for node in desired:
        app = by_name.get(node.name)
        if app is None:
            actions.append(Action(ActionKind.CREATE, node.name, node=node, reason="missing"))
        elif not app.owned_by(cluster):
            conflicts.append(NameTaken(node.name, app.id, app.cluster))
        elif app.spec_hash != node.spec_hash:
            reason = f"spec changed ({app.spec_hash} → {node.spec_hash})"
            actions.append(Action(ActionKind.UPDATE, node.name, node=node, app=app, reason=reason))
        elif app.status in DEAD_STATUSES:
            reason = app.status.removeprefix("APPLICATION_").lower()
            actions.append(Action(ActionKind.RESTART, node.name, node=node, app=app, reason=reason))
        else:
            unchanged.append(node.name)

    for app in owned_apps(cluster, by_name.values()):
        if app.subdomain not in desired_names and not app.is_gateway:
            actions.append(Action(ActionKind.DELETE, app.name, app=app, reason="not desired"))

    return Plan(actions=tuple(actions), unchanged=tuple(unchanged), conflicts=tuple(conflicts))


def worker_index(cluster: str, group: str, app: ObservedApp) -> int | None:
    """The index of a worker app of ``group`` (from its name `ray-<cluster>-<group>-<index>`), else None."""
    if not app.owned_by(cluster) or app.environment.get(GROUP_VARIABLE) != group:
        return None
    return worker_index_of(cluster, group, app.subdomain)


def free_indices(taken: Collection[int]) -> Iterator[int]:
    """Worker indices no app (nor a reserved name) holds, lowest first: the one rule for new names."""
    index = 0
    while True:
        if index not in taken:
            yield index
        index += 1


def taken_indices(cluster: str, group: str, names: Iterable[str]) -> set[int]:
    """The indices of `group` that application names (listed or reserved) hold."""
    found = (worker_index_of(cluster, group, name) for name in names)
    return {i for i in found if i is not None}


def desired_for(spec: ClusterSpec, observed: Iterable[ObservedApp]) -> list[NodeSpec]:
    """The desired nodes given what exists: one owner per number.

    A fixed group wants indices 0..replicas-1. An autoscaled group is sized by Ray's autoscaler
    once the cluster exists: its live apps (not stopping, stopped or failed) stay desired — up to
    max_replicas, the lowest indices first — and missing ones are added at the lowest free indices
    up to min_replicas. A new cluster (no head app yet) starts the group at `replicas`. Apps of the
    group that are not desired (dead ones, those above max) are then deleted by `plan_changes`; an
    index held by any observed app is never reused in the same pass."""
    apps = [app for app in observed if app.owned_by(spec.name)]
    nodes = desired_nodes(spec)
    head_exists = any(app.subdomain == nodes[0].name for app in apps)
    autoscaled = {g.name for g in spec.autoscaled_groups}
    nodes = [n for n in nodes if n.group not in autoscaled]
    for group in spec.autoscaled_groups:
        assert group.min_replicas is not None and group.max_replicas is not None
        indexed = [(worker_index(spec.name, group.name, app), app.status) for app in apps]
        taken = {i for i, _ in indexed if i is not None}
        live = sorted(i for i, status in indexed if i is not None and status not in _NOT_LIVE)
        keep = live[: group.max_replicas]
        wanted = group.min_replicas if head_exists else group.replicas
        free = free_indices(taken)
        while len(keep) < wanted:
            keep.append(next(free))
        nodes += [worker_node(spec, group.name, i) for i in sorted(keep)]
    return nodes


_NOT_LIVE = DEAD_STATUSES | {APPLICATION_STOPPING}


def group_sizes(
    spec: ClusterSpec, owned: Iterable[ObservedApp], desired: Sequence[NodeSpec]
) -> list[dict[str, object]]:
    """Per worker group: apps that exist now (`current`), `desired`, and the bounds of an autoscaled group."""
    apps = list(owned)
    rows: list[dict[str, object]] = []
    for group in spec.worker_groups:
        current = sum(1 for app in apps if worker_index(spec.name, group.name, app) is not None)
        rows.append(
            {
                "group": group.name,
                "current": current,
                "desired": sum(1 for node in desired if node.group == group.name),
                "min": group.min_replicas if group.autoscaled else group.replicas,
                "max": group.max_replicas if group.autoscaled else group.replicas,
                "autoscaled": group.autoscaled,
            }
        )
    return rows
