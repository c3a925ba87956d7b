"""Table tests of one owner per number: for an autoscaled group the planner keeps what exists
(the autoscaler's choice) within min/max; config validation and `scale` refuse what would fight it."""

from __future__ import annotations

from typing import Any

import pytest

from ray_serve_cai.cluster.plan import ObservedApp, desired_for, group_sizes, plan_changes
from ray_serve_cai.cml import APPLICATION_FAILED as FAILED
from ray_serve_cai.cml import APPLICATION_RUNNING as RUNNING
from ray_serve_cai.cml import APPLICATION_STARTING as STARTING
from ray_serve_cai.cml import APPLICATION_STOPPED as STOPPED
from ray_serve_cai.cml import APPLICATION_STOPPING as STOPPING
from ray_serve_cai.config import (
    NODE_ID_RESOURCE_VARIABLE,
    ClusterSpec,
    ConfigError,
    desired_nodes,
    parse_cluster_spec,
    worker_node,
)
from ray_serve_cai.config.autoscaling import ray_autoscaling_config

CLUSTER = "auto"


def spec(**ray_cluster: Any) -> ClusterSpec:
    data: dict[str, Any] = {"name": CLUSTER, "head_cpu": 1, "head_memory": 2}
    if "worker_groups" not in ray_cluster:
        data.update(worker_cpu=1, worker_memory=2)
    data.update(ray_cluster)
    return parse_cluster_spec({"ray_cluster": data}, env={})


def apps(cluster: ClusterSpec, workers: dict[int, str], group: str = "worker") -> list[ObservedApp]:
    """The head (running) plus workers of `group` at the given indices with the given statuses."""
    nodes = [desired_nodes(cluster)[0]] + [worker_node(cluster, group, i) for i in workers]
    statuses = [RUNNING, *workers.values()]
    return [
        ObservedApp(id=f"id-{n.name}", name=n.name, subdomain=n.name, status=s, environment=n.environment)
        for n, s in zip(nodes, statuses, strict=True)
    ]


def actions(cluster: ClusterSpec, observed: list[ObservedApp]) -> list[tuple[str, str]]:
    plan = plan_changes(CLUSTER, desired_for(cluster, observed), observed)
    return sorted((a.kind.value, a.name.removeprefix(f"ray-{CLUSTER}-")) for a in plan.actions)


AUTO = {"min_workers": 1, "max_workers": 3}


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        # What the autoscaler chose stays: any count between min and max, any indices.
        ({0: RUNNING}, []),
        ({0: RUNNING, 1: STARTING, 2: RUNNING}, []),
        ({1: RUNNING, 4: RUNNING}, []),
        # Below min: create at the lowest free index.
        ({}, [("create", "worker-0")]),
        ({0: STOPPING}, [("create", "worker-1"), ("delete", "worker-0")]),
        # Dead apps of an autoscaled group are removed, not restarted (the autoscaler may have
        # stopped it; it creates again if there is demand); min still holds.
        ({0: RUNNING, 1: FAILED}, [("delete", "worker-1")]),
        ({0: STOPPED}, [("create", "worker-1"), ("delete", "worker-0")]),
        # Above max (max lowered in the config): the highest indices go.
        (
            {0: RUNNING, 1: RUNNING, 2: RUNNING, 3: RUNNING, 5: STARTING},
            [("delete", "worker-3"), ("delete", "worker-5")],
        ),
    ],
)
def test_autoscaled_group_keeps_the_observed_set_within_bounds(
    workers: dict[int, str], expected: list[tuple[str, str]]
) -> None:
    cluster = spec(**AUTO)
    assert actions(cluster, apps(cluster, workers)) == expected


def test_up_of_a_new_autoscaled_cluster_creates_the_starting_size_only() -> None:
    assert actions(spec(min_workers=0, max_workers=2), []) == [("create", "head")]
    assert actions(spec(min_workers=0, max_workers=4, num_workers=2), []) == [
        ("create", "head"),
        ("create", "worker-0"),
        ("create", "worker-1"),
    ]
    # Once it exists, the starting size no longer matters: the autoscaler's 0 workers stay 0.
    started = spec(min_workers=0, max_workers=4, num_workers=2)
    assert actions(started, apps(started, {})) == []


def test_fixed_groups_are_planned_as_before_next_to_an_autoscaled_one() -> None:
    groups = [
        {"name": "cpu", "replicas": 2, "cpu": 1, "memory": 2},
        {"name": "gpu", "min_replicas": 0, "max_replicas": 2, "cpu": 1, "memory": 2},
    ]
    cluster = spec(worker_groups=groups)
    observed = apps(cluster, {0: RUNNING}, group="gpu") + apps(cluster, {0: STOPPED}, group="cpu")[1:]
    assert actions(cluster, observed) == [("create", "cpu-1"), ("restart", "cpu-0")]
    sizes = {row["group"]: row for row in group_sizes(cluster, observed, desired_for(cluster, observed))}
    assert sizes["gpu"] == {
        "group": "gpu",
        "current": 1,
        "desired": 1,
        "min": 0,
        "max": 2,
        "autoscaled": True,
    }
    assert sizes["cpu"]["desired"] == 2 and not sizes["cpu"]["autoscaled"]
    # Every node advertises NODE_ID_AS_RESOURCE, fixed ones too: Ray's autoscaler counts their capacity.
    assert all(NODE_ID_RESOURCE_VARIABLE in n.environment for n in desired_for(cluster, observed))


def test_a_group_becoming_autoscaled_replaces_its_workers_and_the_head() -> None:
    """Their `ray start` changes (NODE_ID_AS_RESOURCE; the head runs the autoscaler); bounds alone do not."""
    fixed, auto = spec(num_workers=1), spec(num_workers=1, min_workers=0, max_workers=2)
    assert desired_nodes(fixed)[0].spec_hash != desired_nodes(auto)[0].spec_hash
    assert desired_nodes(fixed)[1].spec_hash != desired_nodes(auto)[1].spec_hash
    wider = spec(num_workers=1, min_workers=0, max_workers=5, autoscaling={"idle_timeout": 5})
    assert [n.spec_hash for n in desired_nodes(auto)] == [n.spec_hash for n in desired_nodes(wider)]


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"min_workers": 3, "max_workers": 2}, "ray_cluster.min_workers", "must be at most max_workers (2)"),
        ({"min_workers": 1, "max_workers": 2, "num_workers": 3}, "ray_cluster.num_workers", "between"),
        ({"min_workers": 2, "max_workers": 4, "num_workers": 1}, "ray_cluster.num_workers", "between"),
        ({"max_workers": 2}, "ray_cluster.min_workers", "is required with max_workers"),
        ({"min_workers": -1, "max_workers": 2}, "ray_cluster.min_workers", "must be 0 or more"),
        ({"autoscaling": {"idle_timeout": 0}}, "ray_cluster.autoscaling.idle_timeout", "greater than 0"),
        ({"autoscaling": {"idle_timout": 5}}, "ray_cluster.autoscaling.idle_timout", ""),
        (
            {"worker_groups": [{"name": "g", "cpu": 1, "memory": 1, "min_replicas": 2, "max_replicas": 1}]},
            "ray_cluster.worker_groups[0].min_replicas",
            "must be at most max_replicas (1)",
        ),
        (
            {"worker_groups": [{"name": "g", "cpu": 1, "memory": 1}]},
            "ray_cluster.worker_groups[0].replicas",
            "is required",
        ),
    ],
)
def test_bounds_are_validated_with_the_field_to_edit(data: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        spec(**data)
    assert any(p.field == field and message in p.message for p in caught.value.problems), caught.value


def test_replicas_default_to_min_and_scale_refuses_an_autoscaled_group() -> None:
    cluster = spec(worker_groups=[{"name": "g", "cpu": 1, "memory": 1, "min_replicas": 2, "max_replicas": 3}])
    assert cluster.group("g").replicas == 2 and cluster.group("g").autoscaled
    with pytest.raises(ConfigError) as caught:
        cluster.with_replicas(3, "g")
    assert "min_replicas/max_replicas" in str(caught.value) and "autoscaled" in str(caught.value)


def test_ray_autoscaling_config_is_valid_for_ray_and_holds_no_secret() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = spec(
        min_workers=0,
        max_workers=2,
        head_ray_cpus=0,
        autoscaling={"idle_timeout": 20, "upscaling_speed": 2},
        environment={"AUTOSCALER_UPDATE_INTERVAL_S": "1"},
    )
    config = ray_autoscaling_config(cluster, project_dir="/project")
    validate_config(prepare_config(config))
    worker = config["available_node_types"]["worker"]
    assert worker["min_workers"] == 0 and worker["max_workers"] == 2
    assert worker["resources"] == {"CPU": 1, "memory": 2 * 1024**3}
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert config["idle_timeout_minutes"] == pytest.approx(20 / 60) and config["upscaling_speed"] == 2
    assert config["provider"]["use_node_id_as_ip"] is True
    assert "KEY" not in str(config).upper().replace("KEYS", "")
