"""One reconcile pass as pure functions of an `Observation` and a `ClusterRequest`.

- `desired_spec(observation, request)`: the spec the pass aims at (the request merged onto what is
  deployed, or the deployed spec itself) with a runtime for every part;
- `plan_pass(observation, request)`: the `Plan` — actions plus the applied-spec record to write;
- `cluster_status(observation, request)`: the `ClusterStatus` — always "as deployed".

No I/O here: no git, no API call, no clock (records carry the observation's time). The I/O shell
around them is `RayCluster` (`reconciler.py`); table tests drive them with recorded observations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ray_serve_cai.cluster.applied import (
    AppliedRecord,
    ClusterRequest,
    merge_request,
    new_record,
    observed_runtimes,
    same_applied,
    spec_differences,
)
from ray_serve_cai.cluster.autostop import apply_to_status as apply_autostop
from ray_serve_cai.cluster.errors import CatalogNeeded, ClusterError
from ray_serve_cai.cluster.observation import Observation
from ray_serve_cai.cluster.plan import Action, Plan, desired_for, group_sizes, plan_changes
from ray_serve_cai.cluster.runtimes import HEAD, RuntimeChoiceError, resolve_runtimes
from ray_serve_cai.cluster.status import ClusterStatus, derive_status
from ray_serve_cai.cml import APPLICATION_RUNNING, Runtime
from ray_serve_cai.config import ClusterSpec


@dataclass(frozen=True)
class DesiredSpec:
    """What a pass aims at: the spec as configured (merged onto what is deployed), the same with a
    runtime for every part, and those runtimes by part (`head`, every group)."""

    configured: ClusterSpec
    effective: ClusterSpec
    runtimes: dict[str, str]


def desired_spec(observation: Observation, request: ClusterRequest, *, deployed: bool = False) -> DesiredSpec:
    """The spec this caller converges to: its request merged onto the applied spec recorded with the
    cluster (`deployed=True`: the recorded spec itself), with the runtimes chosen once and kept (the
    observation's catalog only for a part that has none yet)."""
    record = observation.record
    configured = merge_request(record, request)
    if record is not None and deployed:
        configured = record.cluster_spec()
    groups = [g.name for g in configured.worker_groups]
    known = observed_runtimes(observation.apps, observation.cluster, groups)
    if record is not None:
        known.update(record.runtimes)

    def catalog() -> Sequence[Runtime]:
        if observation.runtimes is None:
            raise CatalogNeeded
        return observation.runtimes

    try:
        effective, runtimes = resolve_runtimes(configured, known, catalog)
    except RuntimeChoiceError as err:
        raise ClusterError(str(err)) from None
    return DesiredSpec(configured, effective, runtimes)


def needs_catalog(observation: Observation, request: ClusterRequest) -> bool:
    """True when a pass over `observation` must choose a runtime (a part has none yet)."""
    try:
        desired_spec(observation, request)
        desired_spec(observation, request, deployed=True)
    except CatalogNeeded:
        return True
    return False


def plan_pass(
    observation: Observation,
    request: ClusterRequest,
    *,
    deployed: bool = False,
    extra: Sequence[Action] = (),
    defer: Callable[[Action], bool] | None = None,
) -> Plan:
    """The pass's plan: the planner's actions (without those `defer` leaves for later), then the
    `extra` ones the planner cannot see in one observation (apps stuck in STARTING, nodes outside
    Ray) for names the planner does not already act on, and the record to write when what is
    recorded is not what this pass applies. `deployed=True` heals towards what is recorded."""
    desired = desired_spec(observation, request, deployed=deployed)
    nodes = desired_for(desired.effective, observation.observed)
    plan = plan_changes(observation.cluster, nodes, observation.observed)
    actions = [a for a in plan.actions if defer is None or not defer(a)]
    busy = {a.name for a in actions}
    actions += [a for a in extra if a.name not in busy]
    return Plan(
        actions=tuple(actions),
        unchanged=plan.unchanged,
        conflicts=plan.conflicts,
        record=record_to_write(observation, request, desired),
        head_runtime=desired.runtimes.get(HEAD),
    )


def record_to_write(
    observation: Observation, request: ClusterRequest, desired: DesiredSpec
) -> AppliedRecord | None:
    """A new record when the recorded one does not say `desired` (None: nothing to write). It keeps
    when the cluster was first provisioned (the latch), or sets it when the cluster is ready now."""
    record = observation.record
    if same_applied(record, desired.configured, desired.runtimes):
        return None
    provisioned_at = record.provisioned_at if record is not None else None
    if provisioned_at is None and cluster_status(observation, request).ready:
        provisioned_at = observation.at  # ready already (a cluster made before records): latch now
    return new_record(
        desired.configured, desired.runtimes, request, at=observation.at, provisioned_at=provisioned_at,
        cluster_uid=record.cluster_uid if record is not None else None,
    )  # fmt: skip


def provisioned_record(observation: Observation, status: ClusterStatus) -> AppliedRecord | None:
    """The record with the latch set, when the cluster is ready for the first time (else None)."""
    record = observation.record
    if record is None or record.provisioned_at is not None or not status.ready:
        return None
    return record.model_copy(update={"provisioned_at": observation.at})


def differences(observation: Observation, request: ClusterRequest) -> list[str]:
    """How this caller's request differs from what is deployed (empty without a record)."""
    record = observation.record
    if record is None:
        return []
    lines = spec_differences(record.cluster_spec(), merge_request(record, request))
    if lines:
        lines.append(f"deployed: {record.origin.describe()}")
    commit = request.commit
    if record.origin.commit and commit and commit != record.origin.commit:
        lines.append(f"deployed from commit {record.origin.commit[:12]}; your checkout is at {commit[:12]}")
    return lines


def cluster_status(observation: Observation, request: ClusterRequest) -> ClusterStatus:
    """The cluster's status "as deployed" (ready means the recorded spec runs), from one observation."""
    desired = desired_spec(observation, request, deployed=True)
    record = observation.record
    head = observation.head
    viewed = head is not None and head.status == APPLICATION_RUNNING
    ray_view, ray_problem = (observation.ray, observation.ray_problem) if viewed else ({}, None)
    status = derive_status(
        observation.cluster,
        desired_for(desired.effective, observation.observed),
        observation.apps,
        ray_view,
        ray_problem,
        provisioned_at=record.provisioned_at if record is not None else None,
    )
    status.project_id = observation.project_id
    status.dashboard_url = observation.head_url + "/" if head is not None and observation.head_url else None
    status.applied = record.summary() if record is not None else None
    status.differences = differences(observation, request)
    status.groups = group_sizes(desired.effective, observation.owned, status.desired)
    apply_autostop(status, observation.apps, record)  # the state `stopped`, the head's idle view
    return status


__all__ = [
    "DesiredSpec",
    "cluster_status",
    "desired_spec",
    "differences",
    "needs_catalog",
    "plan_pass",
    "provisioned_record",
    "record_to_write",
]
