"""Table tests of the pure planner: desired nodes + observed apps → actions."""

from __future__ import annotations

from typing import Any

import pytest

from ray_serve_cai.cluster.plan import ActionKind, ObservedApp, plan_changes
from ray_serve_cai.cml import APPLICATION_FAILED as FAILED
from ray_serve_cai.cml import APPLICATION_RUNNING as RUNNING
from ray_serve_cai.cml import APPLICATION_STARTING as STARTING
from ray_serve_cai.cml import APPLICATION_STOPPED as STOPPED
from ray_serve_cai.config import NodeSpec, desired_nodes, parse_cluster_spec

CLUSTER = "demo"


def spec(**ray_cluster: Any) -> list[NodeSpec]:
    data = {"name": CLUSTER, "head_cpu": 1, "head_memory": 2, "worker_cpu": 1, "worker_memory": 2}
    data.update(ray_cluster)
    return desired_nodes(parse_cluster_spec({"ray_cluster": data}, env={}))


def running(nodes: list[NodeSpec], status: str = RUNNING) -> list[ObservedApp]:
    return [
        ObservedApp(
            id=f"id-{n.name}", name=n.name, subdomain=n.name, status=status, environment=n.environment
        )
        for n in nodes
    ]


def kinds(plan: Any) -> list[tuple[str, str]]:
    return sorted((a.kind.value, a.name) for a in plan.actions)


def test_fresh_cluster_creates_head_and_every_worker() -> None:
    plan = plan_changes(CLUSTER, spec(num_workers=2), [])
    assert kinds(plan) == [
        ("create", "ray-demo-head"),
        ("create", "ray-demo-worker-0"),
        ("create", "ray-demo-worker-1"),
    ]
    assert not plan.unchanged and not plan.conflicts


@pytest.mark.parametrize("status", [RUNNING, STARTING])
def test_converged_cluster_is_a_noop(status: str) -> None:
    nodes = spec(num_workers=2)
    plan = plan_changes(CLUSTER, nodes, running(nodes, status))
    assert plan.is_noop
    assert sorted(plan.unchanged) == sorted(n.name for n in nodes)


def test_scale_up_creates_only_the_new_workers() -> None:
    before = spec(num_workers=1)
    plan = plan_changes(CLUSTER, spec(num_workers=3), running(before))
    assert kinds(plan) == [("create", "ray-demo-worker-1"), ("create", "ray-demo-worker-2")]
    assert sorted(plan.unchanged) == ["ray-demo-head", "ray-demo-worker-0"]


def test_scale_down_deletes_only_the_surplus_workers() -> None:
    before = spec(num_workers=3)
    plan = plan_changes(CLUSTER, spec(num_workers=1), running(before))
    assert kinds(plan) == [("delete", "ray-demo-worker-1"), ("delete", "ray-demo-worker-2")]
    assert sorted(plan.unchanged) == ["ray-demo-head", "ray-demo-worker-0"]


def test_spec_drift_updates_the_workers_but_not_the_head() -> None:
    before = spec(num_workers=2)
    plan = plan_changes(CLUSTER, spec(num_workers=2, worker_cpu=2), running(before))
    assert kinds(plan) == [("update", "ray-demo-worker-0"), ("update", "ray-demo-worker-1")]
    assert plan.unchanged == ("ray-demo-head",)
    assert all(a.app is not None and a.node is not None for a in plan.actions)


@pytest.mark.parametrize("status", [FAILED, STOPPED])
def test_failed_or_stopped_app_is_restarted(status: str) -> None:
    nodes = spec(num_workers=2)
    observed = running(nodes)
    observed[1] = ObservedApp(
        id="x", name=nodes[1].name, subdomain=nodes[1].name, status=status, environment=nodes[1].environment
    )
    plan = plan_changes(CLUSTER, nodes, observed)
    assert kinds(plan) == [("restart", "ray-demo-worker-0")]


def test_foreign_apps_are_never_touched() -> None:
    nodes = spec(num_workers=1)
    foreign = [
        ObservedApp(id="f1", name="my-notebook-app", subdomain="my-notebook-app", status=RUNNING),
        ObservedApp(
            id="f2",
            name="ray-other-head",
            subdomain="ray-other-head",
            status=FAILED,
            environment={"RAY_CAI_CLUSTER": "other", "RAY_CAI_SPEC_HASH": "x"},
        ),
    ]
    plan = plan_changes(CLUSTER, nodes, running(nodes) + foreign)
    assert plan.is_noop


def test_a_foreign_app_holding_a_desired_name_is_a_conflict_not_an_action() -> None:
    nodes = spec(num_workers=1)
    squatter = ObservedApp(id="s", name="ray-demo-head", subdomain="ray-demo-head", status=RUNNING)
    plan = plan_changes(CLUSTER, nodes, [squatter])
    assert kinds(plan) == [("create", "ray-demo-worker-0")]
    assert [c.name for c in plan.conflicts] == ["ray-demo-head"]
    assert "ray-demo-head" in plan.conflicts[0].describe()


def test_worker_groups_scale_independently() -> None:
    groups = [
        {"name": "cpu", "replicas": 2, "cpu": 1, "memory": 2},
        {"name": "gpu", "replicas": 1, "cpu": 4, "memory": 8, "gpus": 1},
    ]
    before = desired_nodes(
        parse_cluster_spec(
            {"ray_cluster": {"name": CLUSTER, "head_cpu": 1, "head_memory": 2, "worker_groups": groups}},
            env={},
        )
    )
    groups[1] = {**groups[1], "replicas": 2}
    after = desired_nodes(
        parse_cluster_spec(
            {"ray_cluster": {"name": CLUSTER, "head_cpu": 1, "head_memory": 2, "worker_groups": groups}},
            env={},
        )
    )
    plan = plan_changes(CLUSTER, after, running(before))
    assert kinds(plan) == [("create", "ray-demo-gpu-1")]
    assert {"ray-demo-cpu-0", "ray-demo-cpu-1", "ray-demo-gpu-0", "ray-demo-head"} == set(plan.unchanged)


def test_removing_a_whole_group_deletes_its_apps_only() -> None:
    groups = [
        {"name": "cpu", "replicas": 1, "cpu": 1, "memory": 2},
        {"name": "gpu", "replicas": 2, "cpu": 4, "memory": 8, "gpus": 1},
    ]
    base = {"name": CLUSTER, "head_cpu": 1, "head_memory": 2}
    before = desired_nodes(parse_cluster_spec({"ray_cluster": {**base, "worker_groups": groups}}, env={}))
    after = desired_nodes(parse_cluster_spec({"ray_cluster": {**base, "worker_groups": groups[:1]}}, env={}))
    plan = plan_changes(CLUSTER, after, running(before))
    assert kinds(plan) == [("delete", "ray-demo-gpu-0"), ("delete", "ray-demo-gpu-1")]
    assert plan.of_kind(ActionKind.CREATE) == []
