"""Whole reconcile passes from recorded observations: pure, no process, no socket.

An `Observation` is what one pass saw (the project's applications, the head's Ray view, the
runtime catalog when needed); `plan_pass`, `cluster_status`, `Healer` and `OutsideRay` turn it into
the plan, the status and the watch's extra actions. These tables cover what `up`, `wait_until_ready`
and `watch` decide, in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
from support.fakes import fake_cluster_spec

from ray_serve_cai.cluster.applied import APPLIED_SPEC_VAR, AppliedRecord, ClusterRequest, new_record
from ray_serve_cai.cluster.lock import LOCK_EXPIRES, LOCK_MARKER, LOCK_OWNER, lock_app_name
from ray_serve_cai.cluster.observation import Observation
from ray_serve_cai.cluster.passes import (
    cluster_status,
    desired_spec,
    needs_catalog,
    plan_pass,
    provisioned_record,
)
from ray_serve_cai.cluster.plan import Action, ActionKind
from ray_serve_cai.cluster.watch import Healer, OutsideRay
from ray_serve_cai.cml import (
    APPLICATION_FAILED,
    APPLICATION_RUNNING,
    APPLICATION_STARTING,
    Application,
    Runtime,
)
from ray_serve_cai.config import ClusterSpec, NodeSpec, desired_nodes

RUNTIME = "docker.example/ml-runtime-pbj-workbench-python3.11-standard:2025.09.1-b5"
CATALOG = (
    Runtime(
        image_identifier=RUNTIME,
        editor="PBJ Workbench",
        kernel="Python 3.11",
        edition="Standard",
        full_version="2025.09.1-b5",
        status="ENABLED",
    ),
)
AT = "2026-12-06T07:00:00+00:00"
LATER = "2026-12-06T08:00:00+00:00"


def request(workers: int = 1, *, commit: str = "c0ffee" * 7) -> ClusterRequest:
    spec = fake_cluster_spec("pass", workers)
    return ClusterRequest(spec, spec, source="up", commit=commit, by="tester@host")


def effective(spec: ClusterSpec) -> ClusterSpec:
    head = spec.head.model_copy(update={"runtime_identifier": RUNTIME})
    groups = [g.model_copy(update={"runtime_identifier": RUNTIME}) for g in spec.worker_groups]
    return spec.model_copy(update={"head": head, "worker_groups": groups})


def record_for(req: ClusterRequest, *, provisioned_at: str | None = None) -> AppliedRecord:
    runtimes = {"head": RUNTIME, **{g.name: RUNTIME for g in req.spec.worker_groups}}
    return new_record(req.spec, runtimes, req, at=AT, provisioned_at=provisioned_at)


def app(node: NodeSpec, status: str = APPLICATION_RUNNING, **env: str) -> Application:
    return Application(
        id=f"id-{node.name}",
        name=node.name,
        subdomain=node.name,
        status=status,
        runtime_identifier=node.runtime_identifier,
        environment={**node.environment, **env},
    )


def cluster_apps(
    req: ClusterRequest,
    *,
    record: AppliedRecord | None,
    status: dict[str, str] | None = None,
    missing: Iterable[str] = (),
) -> list[Application]:
    """The applications `up` would have made for `req` (with `record` on the head)."""
    apps = []
    for node in desired_nodes(effective(req.spec)):
        if node.name in missing:
            continue
        env = {APPLIED_SPEC_VAR: record.encode()} if node.role == "head" and record is not None else {}
        apps.append(app(node, (status or {}).get(node.name, APPLICATION_RUNNING), **env))
    return apps


def ray_view(*alive: str) -> dict[str, Any]:
    return {"alive_nodes": len(alive), "nodes": [{"node_name": n, "alive": True} for n in alive]}


def observe(
    apps: list[Application],
    *,
    ray: dict[str, Any] | None = None,
    catalog: bool = False,
    at: str = LATER,
) -> Observation:
    return Observation(
        "pass",
        "p1",
        tuple(apps),
        at=at,
        ray=ray or {},
        head_url="https://ray-pass-head.example",
        runtimes=CATALOG if catalog else None,
    )


HEAD, WORKER0, WORKER1 = "ray-pass-head", "ray-pass-worker-0", "ray-pass-worker-1"


# ----------------------------------------------------------------------------------- up's pass


def test_a_new_cluster_plans_every_node_with_the_record_and_the_runtime_from_the_catalog() -> None:
    empty = observe([])
    assert needs_catalog(empty, request())
    plan = plan_pass(observe([], catalog=True), request())
    assert [(a.kind, a.name) for a in plan.actions] == [
        (ActionKind.CREATE, HEAD),
        (ActionKind.CREATE, WORKER0),
    ]
    assert plan.record is not None and plan.record.origin.commit == request().commit
    assert plan.record.origin.at == LATER and plan.record.provisioned_at is None  # the observation's time
    assert plan.head_runtime == RUNTIME
    # A new cluster instance: a uid of its own (its head's GCS store is keyed by it), never an old one's.
    again = plan_pass(observe([], catalog=True), request()).record
    assert plan.record.cluster_uid and again is not None and again.cluster_uid != plan.record.cluster_uid


def test_a_ready_cluster_as_recorded_plans_nothing_and_needs_no_catalog() -> None:
    req = request()
    obs = observe(cluster_apps(req, record=record_for(req)), ray=ray_view(HEAD, WORKER0))
    assert not needs_catalog(obs, req)
    plan = plan_pass(obs, req)
    assert plan.is_noop and plan.record is None and plan.unchanged == (HEAD, WORKER0)
    status = cluster_status(obs, req)
    assert status.ready and status.applied is not None and status.differences == []
    assert status.dashboard_url == "https://ray-pass-head.example/"


def test_an_explicit_size_changes_only_the_new_worker_and_records_it() -> None:
    deployed = request(1)
    recorded = record_for(deployed, provisioned_at=AT)
    obs = observe(cluster_apps(deployed, record=recorded), ray=ray_view(HEAD, WORKER0))
    bigger = request(1)
    bigger = bigger.with_replicas(2, None)
    plan = plan_pass(obs, bigger)
    assert [(a.kind, a.name) for a in plan.actions] == [(ActionKind.CREATE, WORKER1)]
    assert plan.record is not None and plan.record.spec["worker_groups"][0]["replicas"] == 2
    assert plan.record.provisioned_at == AT  # the latch survives a new record
    assert plan.record.cluster_uid == recorded.cluster_uid  # the instance's (its head keeps its GCS store)
    assert plan.record.origin.source == "scale"
    # Healing (a watch's later pass) keeps what is recorded: nothing to do, nothing to write.
    assert plan_pass(obs, bigger, deployed=True).is_noop
    assert plan_pass(obs, bigger, deployed=True).record is None
    # The status is "as deployed": ready, with the caller's difference named.
    status = cluster_status(obs, bigger)
    assert status.ready and any("replicas: deployed 1, your config 2" in d for d in status.differences)


def test_a_file_that_only_repeats_the_base_does_not_undo_an_override() -> None:
    file_spec = fake_cluster_spec("pass", 2)
    deployed = ClusterRequest(
        file_spec.with_replicas(1), file_spec, {"RAY_NUM_WORKERS": "1"}, source="deploy"
    )
    deployed = replace(deployed, commit="a" * 40, by="ci@runner")
    plain = ClusterRequest(file_spec, file_spec, {}, source="up", commit="b" * 40, by="me@laptop")
    obs = observe(
        cluster_apps(deployed, record=record_for(deployed, provisioned_at=AT)), ray=ray_view(HEAD, WORKER0)
    )
    assert plan_pass(obs, plain).is_noop
    status = cluster_status(obs, plain)
    assert status.ready
    assert status.differences == ["deployed from commit aaaaaaaaaaaa; your checkout is at bbbbbbbbbbbb"]


def test_an_old_cluster_without_a_record_gets_one_latched_when_ready() -> None:
    req = request()
    obs = observe(cluster_apps(req, record=None), ray=ray_view(HEAD, WORKER0))
    plan = plan_pass(obs, req)
    assert plan.is_noop and plan.record is not None
    assert plan.record.provisioned_at == LATER  # ready already: latched with the record


def test_a_name_taken_by_someone_else_is_a_conflict_never_an_action() -> None:
    req = request()
    squatter = Application(id="x", name=HEAD, subdomain=HEAD, status=APPLICATION_RUNNING, environment={})
    plan = plan_pass(observe([squatter], catalog=True), req)
    assert [c.name for c in plan.conflicts] == [HEAD] and not plan.is_noop
    assert all(a.name != HEAD for a in plan.actions)


def test_a_stale_lock_is_seen_in_the_observation() -> None:
    lock = Application(
        id="lock",
        name=lock_app_name("pass"),
        subdomain=lock_app_name("pass"),
        status="APPLICATION_STOPPED",
        environment={LOCK_MARKER: "pass", LOCK_OWNER: "someone", LOCK_EXPIRES: "1"},
    )
    obs = observe([lock])
    assert obs.lock is not None and obs.lock.stale and obs.lock.owner == "someone"
    assert observe([]).lock is None


# ------------------------------------------------------------------------ status and the latch


STATUS_CASES: dict[
    str, tuple[dict[str, str], list[str], tuple[str, ...], str | None, str, tuple[bool, str]]
] = {
    # name: (app statuses, missing apps, alive in Ray, provisioned_at, state, AppsProvisioned)
    "ready": ({}, [], (HEAD, WORKER0), AT, "ready", (True, "")),
    "first start, worker missing": ({}, [WORKER0], (HEAD,), None, "pending", (False, "Missing")),
    "provisioned once, worker lost": ({}, [WORKER0], (HEAD,), AT, "pending", (True, "")),
    "worker starting": ({WORKER0: APPLICATION_STARTING}, [], (HEAD,), AT, "pending", (True, "")),
    "worker failed": ({WORKER0: APPLICATION_FAILED}, [], (HEAD,), AT, "failed", (True, "")),
}


@pytest.mark.parametrize("name", sorted(STATUS_CASES))
def test_status_provisioned_latches_ready_is_now(name: str) -> None:
    statuses, missing, alive, provisioned_at, state, apps_provisioned = STATUS_CASES[name]
    req = request()
    record = record_for(req, provisioned_at=provisioned_at)
    obs = observe(cluster_apps(req, record=record, status=statuses, missing=missing), ray=ray_view(*alive))
    status = cluster_status(obs, req)
    conditions = {c.type: c for c in status.conditions}
    assert status.state == state
    assert (conditions["AppsProvisioned"].status, conditions["AppsProvisioned"].reason) == apps_provisioned
    assert conditions["Ready"].status is (state == "ready")
    if provisioned_at and missing:
        assert "now no application" in conditions["AppsProvisioned"].message


def test_the_latch_is_written_once_when_first_ready() -> None:
    req = request()
    fresh = observe(cluster_apps(req, record=record_for(req)), ray=ray_view(HEAD, WORKER0))
    latched = provisioned_record(fresh, cluster_status(fresh, req))
    assert latched is not None and latched.provisioned_at == LATER
    again = observe(cluster_apps(req, record=latched), ray=ray_view(HEAD, WORKER0))
    assert provisioned_record(again, cluster_status(again, req)) is None
    not_ready = observe(cluster_apps(req, record=record_for(req)), ray=ray_view(HEAD))
    assert provisioned_record(not_ready, cluster_status(not_ready, req)) is None


def test_status_ignores_a_ray_view_when_the_head_is_not_running() -> None:
    req = request()
    apps = cluster_apps(req, record=record_for(req), status={HEAD: APPLICATION_STARTING})
    status = cluster_status(observe(apps, ray=ray_view(HEAD, WORKER0)), req)
    assert status.ray == {} and not any(n.in_ray for n in status.nodes)


def test_the_runtime_recorded_wins_over_the_catalog() -> None:
    req = request()
    obs = observe(cluster_apps(req, record=record_for(req)), catalog=True)
    assert desired_spec(obs, req).runtimes == {"head": RUNTIME, "worker": RUNTIME}


# --------------------------------------------------------------------- the watch and the wait


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def no_error(_: str) -> str:
    return ""


def test_the_watch_leaves_a_failed_app_to_cml_then_restarts_it() -> None:
    clock = Clock()
    healer = Healer(startup_timeout=60, cml_restart_wait=30, clock=clock)
    req = request()
    obs = observe(
        cluster_apps(req, record=record_for(req, provisioned_at=AT), status={WORKER0: APPLICATION_FAILED})
    )
    status = cluster_status(obs, req)

    def pass_actions() -> list[Action]:
        return list(
            plan_pass(
                obs, req, deployed=True, extra=healer.actions(obs, status, no_error), defer=healer.left_to_cml
            ).actions
        )

    assert pass_actions() == []  # left to CML's own restart
    clock.now += 29
    assert pass_actions() == []
    clock.now += 2
    assert [(a.kind, a.name, a.reason) for a in pass_actions()] == [(ActionKind.RESTART, WORKER0, "failed")]


def test_the_watch_restarts_an_app_stuck_in_starting_past_the_startup_timeout() -> None:
    clock = Clock()
    healer = Healer(startup_timeout=60, cml_restart_wait=0, clock=clock)
    req = request()
    obs = observe(
        cluster_apps(req, record=record_for(req, provisioned_at=AT), status={WORKER0: APPLICATION_STARTING}),
        ray=ray_view(HEAD),
    )
    status = cluster_status(obs, req)
    assert healer.actions(obs, status, no_error) == []
    clock.now += 61
    actions = healer.actions(obs, status, no_error)
    assert [(a.kind, a.name) for a in actions] == [(ActionKind.RESTART, WORKER0)]
    assert "stuck in STARTING for 61s" in actions[0].reason
    assert healer.actions(obs, status, no_error) == []  # counted afresh after the restart


def test_the_watch_replaces_a_node_running_outside_ray_naming_its_error() -> None:
    clock = Clock()
    healer = Healer(startup_timeout=60, cml_restart_wait=0, clock=clock)
    req = request()
    obs = observe(cluster_apps(req, record=record_for(req, provisioned_at=AT)), ray=ray_view(HEAD))
    status = cluster_status(obs, req)
    assert healer.actions(obs, status, no_error) == []
    clock.now += 61
    actions = healer.actions(obs, status, lambda name: f"{name} cannot reach the GCS")
    assert [(a.kind, a.name) for a in actions] == [(ActionKind.RESTART, WORKER0)]
    assert actions[0].reason == f"running but not in Ray for 61s: {WORKER0} cannot reach the GCS"
    # The planner already restarting a node wins over an extra action for the same name.
    failed = observe(
        cluster_apps(req, record=record_for(req, provisioned_at=AT), status={WORKER0: APPLICATION_FAILED})
    )
    plan = plan_pass(failed, req, extra=actions)
    assert [(a.kind, a.name, a.reason) for a in plan.actions] == [(ActionKind.RESTART, WORKER0, "failed")]


def test_outside_ray_counts_workers_only_while_the_head_reports_rays_view() -> None:
    clock = Clock()
    outside = OutsideRay(clock=clock)
    req = request()
    apps = cluster_apps(req, record=record_for(req, provisioned_at=AT))
    no_view = cluster_status(observe(apps), req)
    assert outside.update(no_view) == {HEAD: 0.0}  # without a view only the head is known outside
    clock.now += 5
    with_view = cluster_status(observe(apps, ray=ray_view(HEAD)), req)
    assert outside.update(with_view) == {WORKER0: 0.0}  # the head joined; the worker counts from now
    clock.now += 5
    assert outside.update(with_view) == {WORKER0: 5.0}
    ready = cluster_status(observe(apps, ray=ray_view(HEAD, WORKER0)), req)
    assert outside.update(ready) == {} and outside.since == {}
