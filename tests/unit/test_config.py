"""ray_serve_cai.config: parsing, env overrides, defaults, nodes and spec hashes, schema."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from ray_serve_cai.config import (
    ClusterSpec,
    ConfigError,
    HeadSpec,
    NodeSpec,
    Problem,
    WorkerGroupSpec,
    cluster_json_schema,
    desired_nodes,
    head_app_name,
    jobs_json_schema,
    load_cluster_spec,
    load_deploy_spec,
    parse_cluster_spec,
    parse_deploy_spec,
    spec_digest,
    worker_app_name,
)

ROOT = Path(__file__).resolve().parents[2]
SEED = {
    "ray_cluster": {
        "num_workers": 1,
        "head_cpu": 4,
        "head_memory": 16,
        "worker_cpu": 8,
        "worker_memory": 32,
        "worker_gpus": 1,
    }
}
GROUPS = {
    "ray_cluster": {
        "name": "mixed",
        "runtime_identifier": "img-python3.11-standard:1",
        "worker_groups": [
            {"name": "cpu", "replicas": 3, "cpu": 4, "memory": 16},
            {
                "name": "gpu",
                "replicas": 1,
                "cpu": 8,
                "memory": 32,
                "gpus": 2,
                "runtime_identifier": "img-python3.11-cuda:1",
            },
        ],
    }
}
PY311 = (
    "docker.repository.cloudera.com/cloudera/cdsw/ml-runtime-pbj-jupyterlab-python3.11-standard:2025.09.1-b5"
)


def cluster(data: dict[str, Any], **env: str) -> ClusterSpec:
    return parse_cluster_spec(data, env=env)


def groups_of(spec: ClusterSpec) -> list[tuple[str, int, float, float, int, str | None]]:
    return [(g.name, g.replicas, g.cpu, g.memory, g.gpus, g.runtime_identifier) for g in spec.worker_groups]


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("data", "env", "expected_groups", "head"),
    [
        pytest.param(SEED, {}, [("worker", 1, 8, 32, 1, None)], (4, 16, 0), id="seed-keys"),
        pytest.param({"ray_cluster": {}}, {}, [("worker", 1, 2, 8, 0, None)], (2, 8, 0), id="defaults"),
        pytest.param({}, {}, [("worker", 1, 2, 8, 0, None)], (2, 8, 0), id="no-section"),
        pytest.param(
            {"ray_cluster": None}, {}, [("worker", 1, 2, 8, 0, None)], (2, 8, 0), id="empty-section"
        ),
        pytest.param(
            {"ray_cluster": {"num_workers": 0, "head_gpus": 1}},
            {},
            [("worker", 0, 2, 8, 0, None)],
            (2, 8, 1),
            id="head-only",
        ),
        pytest.param(
            GROUPS,
            {},
            [("cpu", 3, 4, 16, 0, None), ("gpu", 1, 8, 32, 2, "img-python3.11-cuda:1")],
            (2, 8, 0),
            id="worker-groups",
        ),
        pytest.param(
            SEED,
            {"RAY_NUM_WORKERS": "4", "RAY_WORKER_GPUS": "0"},
            [("worker", 4, 8, 32, 0, None)],
            (4, 16, 0),
            id="env-overrides-flat",
        ),
        pytest.param(
            GROUPS,
            {"RAY_WORKER_GPUS": "1"},
            [("cpu", 3, 4, 16, 1, None), ("gpu", 1, 8, 32, 1, "img-python3.11-cuda:1")],
            (2, 8, 0),
            id="env-gpus-every-group",
        ),
        pytest.param(
            {"ray_cluster": {"worker_groups": [{"name": "w", "replicas": 1, "cpu": 1, "memory": 2}]}},
            {"RAY_NUM_WORKERS": " 5 "},
            [("w", 5, 1, 2, 0, None)],
            (2, 8, 0),
            id="env-num-workers-single-group",
        ),
        pytest.param(
            SEED, {"RAY_NUM_WORKERS": ""}, [("worker", 1, 8, 32, 1, None)], (4, 16, 0), id="empty-env"
        ),
    ],
)
def test_parse_cluster(
    data: dict[str, Any], env: dict[str, str], expected_groups: list[Any], head: tuple[int, int, int]
) -> None:
    spec = cluster(data, **env)
    assert groups_of(spec) == expected_groups
    assert (spec.head.cpu, spec.head.memory, spec.head.gpus) == head
    assert spec.total_workers == sum(g[1] for g in expected_groups)


def test_cluster_defaults() -> None:
    spec = cluster({"ray_cluster": {}})
    assert spec.name == "default"
    assert spec.auth_token is True
    assert (spec.ports.gcs, spec.ports.client, spec.ports.dashboard) == (6379, 10001, 8265)
    assert spec.startup_timeout == 600 and spec.join_timeout == 600
    assert spec.head_script == "cai_integration/ray_head.py"
    assert spec.worker_script == "cai_integration/ray_worker.py"
    assert spec.runtime_identifier is None and spec.environment == {}


def test_all_optional_keys() -> None:
    spec = cluster(
        {
            "ray_cluster": {
                "name": "demo",
                "runtime_identifier": PY311,
                "head_runtime_identifier": PY311 + "-head",
                "worker_runtime_identifier": PY311.replace("standard", "cuda"),
                "head_ray_cpus": 0,
                "ports": {"gcs": 0, "client": 0, "dashboard": 0},
                "auth": {"token": False},
                "startup_timeout": 120,
                "join_timeout": 30.5,
                "environment": {
                    "OMP_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": "src",
                },
            }
        }
    )
    assert spec.head.ray_cpus == 0
    assert spec.runtime_of(None) == PY311 + "-head"
    assert spec.runtime_of("worker") == PY311.replace("standard", "cuda")
    assert spec.ports.gcs == 0 and spec.auth_token is False
    assert spec.join_timeout == 30.5
    assert spec.environment["PYTHONPATH"] == "src"


@pytest.mark.parametrize(
    ("file_runtime", "env", "head_expected", "worker_expected"),
    [
        (None, {"RUNTIME_IDENTIFIER": "env-img"}, "env-img", "env-img"),
        ("file-img", {"RUNTIME_IDENTIFIER": "env-img"}, "env-img", "env-img"),
        ("file-img", {}, "file-img", "file-img"),
        ("file-img", {"RUNTIME_IDENTIFIER": ""}, "file-img", "file-img"),
    ],
)
def test_runtime_identifier_override(
    file_runtime: str | None, env: dict[str, str], head_expected: str, worker_expected: str
) -> None:
    data = {"ray_cluster": {"runtime_identifier": file_runtime}}
    spec = cluster(data, **env)
    assert spec.runtime_of(None) == head_expected
    assert spec.runtime_of("worker") == worker_expected


def test_runtime_override_keeps_node_specific_runtimes() -> None:
    data = {"ray_cluster": {"worker_runtime_identifier": "gpu-img"}}
    spec = cluster(data, RUNTIME_IDENTIFIER="env-img")
    assert spec.runtime_of(None) == "env-img"
    assert spec.runtime_of("worker") == "gpu-img"


def test_cluster_name_override() -> None:
    assert cluster(SEED, RAY_CLUSTER_NAME="prod").name == "prod"


def test_env_none_means_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_NUM_WORKERS", "7")
    assert parse_cluster_spec(SEED).total_workers == 7
    assert parse_cluster_spec(SEED, env={}).total_workers == 1


def test_parse_does_not_mutate_input() -> None:
    data = json.loads(json.dumps(GROUPS))
    cluster(data, RAY_WORKER_GPUS="3")
    assert data == GROUPS


def test_multiple_problems_reported_at_once() -> None:
    data = {
        "ray_cluster": {
            "name": "Bad_Name",
            "num_worker": 2,
            "head_cpu": -1,
            "worker_gpus": 1.5,
            "ports": {"gcs": 8265},
            "environment": {"GH_PAT": "x"},
        }
    }
    with pytest.raises(ConfigError) as caught:
        cluster(data, RAY_NUM_WORKERS="many")
    fields = {p.field for p in caught.value.problems}
    assert fields >= {
        "RAY_NUM_WORKERS",
        "ray_cluster.name",
        "ray_cluster.num_worker",
        "ray_cluster.head_cpu",
        "ray_cluster.worker_gpus",
        "ray_cluster.ports.dashboard",
        "ray_cluster.environment.GH_PAT",
    }
    assert len(str(caught.value).splitlines()) == len(caught.value.problems)


def test_cross_field_rules_still_run_next_to_type_errors() -> None:
    data = {
        "ray_cluster": {
            "runtime_identifier": "img-python3.11",
            "worker_groups": [
                {"name": "cpu", "replicas": 1, "cpu": 2, "memory": 4},
                {"name": "cpu", "replicas": "2", "cpu": 2, "memory": 4, "runtime_identifier": "x-python3.10"},
                {"replicas": 1},
            ],
        }
    }
    with pytest.raises(ConfigError) as caught:
        cluster(data)
    problems = caught.value.problems
    assert (
        Problem("ray_cluster.worker_groups[1].replicas", "must be a whole number, got '2' (str)") in problems
    )
    assert any(p.field == "ray_cluster.worker_groups[2].name" and "required" in p.message for p in problems)
    assert any(p.field == "ray_cluster.worker_groups[1].name" and "duplicate" in p.message for p in problems)
    assert any(
        p.field == "ray_cluster.worker_groups[1].runtime_identifier" and "Python 3.10" in p.message
        for p in problems
    )


def test_config_error_format() -> None:
    error = ConfigError([Problem("a.b", "is wrong"), Problem("c", "too")], "f.yaml")
    assert str(error) == "f.yaml: a.b: is wrong\nf.yaml: c: too"
    assert isinstance(error, ValueError)
    assert error.source == "f.yaml"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.problems, copy.source, str(copy)) == (error.problems, error.source, str(error))


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_cluster_spec(missing, env={})


def test_load_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_cluster_spec(env={})
    assert caught.value.source == "ray_cluster_config.yaml"
    (tmp_path / "ray_cluster_config.yaml").write_text("ray_cluster:\n  num_workers: 3\n")
    assert load_cluster_spec(env={}).total_workers == 3


def test_shipped_default_files_load() -> None:
    spec = load_cluster_spec(ROOT / "ray_cluster_config.yaml", env={})
    assert spec.name == "default"
    assert groups_of(spec) == [("worker", 2, 2, 4, 0, None)]
    assert (spec.head.cpu, spec.head.memory) == (2, 4)
    deploy = load_deploy_spec(ROOT / "cai_integration" / "jobs_config.yaml", env={})
    assert [
        (j.key, j.name, j.script, j.cpu, j.memory, j.timeout, j.parent_job_key) for j in deploy.chain_order()
    ] == [
        ("git_sync", "Git Sync", "cai_integration/git_sync.py", 1, 2, 600, None),
        (
            "setup_environment",
            "Setup Environment",
            "cai_integration/setup_environment.py",
            2,
            4,
            3600,
            "git_sync",
        ),
        (
            "launch_ray_cluster",
            "Launch Ray Cluster",
            "cai_integration/launch_ray_cluster.py",
            1,
            2,
            1800,
            "setup_environment",
        ),
    ]


# ----------------------------------------------------------------------------- ClusterSpec API


def test_direct_construction_is_validated() -> None:
    spec = ClusterSpec(
        head=HeadSpec(), worker_groups=[WorkerGroupSpec(name="w", replicas=2, cpu=1, memory=2)]
    )
    assert spec.total_workers == 2
    with pytest.raises(ValueError, match="duplicate group name"):
        ClusterSpec(
            worker_groups=[
                WorkerGroupSpec(name="w", replicas=1, cpu=1, memory=2),
                WorkerGroupSpec(name="w", replicas=1, cpu=1, memory=2),
            ]
        )


def test_group_lookup() -> None:
    spec = cluster(GROUPS)
    assert spec.group("gpu").gpus == 2
    with pytest.raises(KeyError, match="no worker group"):
        spec.group("tpu")


def test_with_replicas() -> None:
    spec = cluster(SEED)
    bigger = spec.with_replicas(5)
    assert bigger.total_workers == 5 and spec.total_workers == 1
    mixed = cluster(GROUPS)
    assert groups_of(mixed.with_replicas(0, "cpu"))[0][1] == 0
    with pytest.raises(ConfigError, match="name the worker group"):
        mixed.with_replicas(2)
    with pytest.raises(ConfigError, match="did you mean 'gpu'"):
        mixed.with_replicas(2, "gpus")
    with pytest.raises(ConfigError, match="0 or more"):
        spec.with_replicas(-1)
    long_name = cluster({"ray_cluster": {"name": "a" * 50, "num_workers": 9}})
    with pytest.raises(ConfigError, match="limit is 63"):
        long_name.with_replicas(11)


# ----------------------------------------------------------------------------- nodes and hashes


def test_app_names() -> None:
    assert head_app_name("demo") == "ray-demo-head"
    assert worker_app_name("demo", "gpu", 3) == "ray-demo-gpu-3"


def test_desired_nodes_names_and_environment() -> None:
    spec = cluster(GROUPS)
    nodes = desired_nodes(spec)
    assert [n.name for n in nodes] == [
        "ray-mixed-head",
        "ray-mixed-cpu-0",
        "ray-mixed-cpu-1",
        "ray-mixed-cpu-2",
        "ray-mixed-gpu-0",
    ]
    head, gpu = nodes[0], nodes[-1]
    assert (head.role, head.group, head.index) == ("head", "head", 0)
    assert (gpu.role, gpu.group, gpu.index, gpu.gpus) == ("worker", "gpu", 0, 2)
    assert head.environment == {
        "RAY_CAI_CLUSTER": "mixed",
        "RAY_CAI_SPEC_HASH": head.spec_hash,
        "RAY_CAI_ROLE": "head",
        "RAY_CAI_GROUP": "head",
        "RAY_CAI_NODE_NAME": "ray-mixed-head",
        "RAY_CAI_NUM_CPUS": "2",
        "RAY_CAI_NUM_GPUS": "0",
        "RAY_CAI_MEMORY_GB": "8",
        "RAY_CAI_GCS_PORT": "6379",
        "RAY_CAI_CLIENT_PORT": "10001",
        "RAY_CAI_DASHBOARD_PORT": "8265",
        "RAY_CAI_AUTH": "token",
        "CDSW_APP_POLLING_ENDPOINT": "/ray-cai/healthz",
        "RAY_CAI_HEAD_FT": "1",
    }
    assert gpu.environment == {
        "RAY_CAI_CLUSTER": "mixed",
        "RAY_CAI_SPEC_HASH": gpu.spec_hash,
        "RAY_CAI_ROLE": "worker",
        "RAY_CAI_GROUP": "gpu",
        "RAY_CAI_NODE_NAME": "ray-mixed-gpu-0",
        "RAY_CAI_NUM_CPUS": "8",
        "RAY_CAI_NUM_GPUS": "2",
        "RAY_CAI_MEMORY_GB": "32",
        "RAY_CAI_AUTH": "token",
        "RAY_CAI_JOIN_TIMEOUT": "600",
        "CDSW_APP_POLLING_ENDPOINT": "/ray-cai/healthz",
        "RAY_CAI_HEAD_FT": "1",
    }
    assert gpu.runtime_identifier == "img-python3.11-cuda:1"
    assert nodes[1].runtime_identifier == "img-python3.11-standard:1"
    assert head.script == "cai_integration/ray_head.py" and gpu.script == "cai_integration/ray_worker.py"
    assert all(isinstance(n, NodeSpec) for n in nodes)


def test_head_ray_cpus_user_env_and_auth_disabled() -> None:
    spec = cluster(
        {
            "ray_cluster": {
                "head_ray_cpus": 0,
                "head_memory": 1.5,
                "auth": {"token": False},
                "environment": {"FOO": "bar"},
            }
        }
    )
    head, worker = desired_nodes(spec)[:2]
    assert head.cpu == 2 and head.environment["RAY_CAI_NUM_CPUS"] == "0"
    assert head.environment["RAY_CAI_MEMORY_GB"] == "1.5"
    assert head.environment["RAY_CAI_AUTH"] == worker.environment["RAY_CAI_AUTH"] == "disabled"
    assert head.environment["FOO"] == worker.environment["FOO"] == "bar"


def hashes(spec: ClusterSpec) -> dict[str, str]:
    return {n.group: n.spec_hash for n in desired_nodes(spec)}


def test_scale_change_keeps_hashes() -> None:
    base = cluster(GROUPS)
    scaled = base.with_replicas(7, "cpu")
    assert hashes(scaled) == hashes(base)
    one_worker = cluster(SEED)
    assert hashes(cluster(SEED, RAY_NUM_WORKERS="9")) == hashes(one_worker)


def test_head_hash_independent_of_worker_replicas() -> None:
    base = desired_nodes(cluster(SEED))[0].spec_hash
    assert desired_nodes(cluster(SEED, RAY_NUM_WORKERS="0"))[0].spec_hash == base
    assert desired_nodes(cluster(SEED, RAY_NUM_WORKERS="12"))[0].spec_hash == base


def test_cpu_change_changes_that_group_only() -> None:
    base = hashes(cluster(GROUPS))
    changed = json.loads(json.dumps(GROUPS))
    changed["ray_cluster"]["worker_groups"][0]["cpu"] = 6
    after = hashes(cluster(changed))
    assert after["cpu"] != base["cpu"]
    assert after["gpu"] == base["gpu"]
    assert after["head"] == base["head"]


@pytest.mark.parametrize(
    ("change", "changes_head", "changes_workers"),
    [
        ({"head_cpu": 3}, True, False),
        ({"ports": {"dashboard": 8266}}, True, False),
        ({"head_ray_cpus": 0}, True, False),
        ({"join_timeout": 60}, False, True),
        ({"worker_memory": 64}, False, True),
        ({"runtime_identifier": "other"}, True, True),
        ({"environment": {"A": "b"}}, True, True),
        ({"auth": {"token": False}}, True, True),
        ({"name": "other"}, True, True),
        ({"startup_timeout": 5}, False, False),
        ({"num_workers": 3}, False, False),
    ],
)
def test_what_changes_a_hash(change: dict[str, Any], changes_head: bool, changes_workers: bool) -> None:
    base = hashes(cluster(SEED))
    after = hashes(cluster({"ray_cluster": {**SEED["ray_cluster"], **change}}))
    assert (after["head"] != base["head"]) is changes_head
    assert (after["worker"] != base["worker"]) is changes_workers


def test_whole_numbers_hash_the_same() -> None:
    as_int = cluster({"ray_cluster": {"worker_cpu": 2}})
    as_float = cluster({"ray_cluster": {"worker_cpu": 2.0}})
    assert hashes(as_int) == hashes(as_float)


def test_spec_digest() -> None:
    assert spec_digest({"b": 1, "a": [1, 2]}) == spec_digest({"a": [1, 2], "b": 1})
    assert spec_digest({"a": 2}) == spec_digest({"a": 2.0})
    assert spec_digest({"a": 1}) != spec_digest({"a": 2})
    assert len(spec_digest("x")) == 16 and int(spec_digest("x"), 16) >= 0
    assert spec_digest(HeadSpec()) == spec_digest(HeadSpec().model_dump())


# ----------------------------------------------------------------------------- deploy spec


JOBS = {
    "jobs": {
        "git_sync": {"name": "Git Sync", "script": "cai_integration/git_sync.py"},
        "custom_job": {"name": "Custom", "script": "custom.py", "parent_job_key": "setup_environment"},
        "setup_environment": {
            "name": "Setup Environment",
            "script": "cai_integration/setup_environment.py",
            "parent_job_key": "git_sync",
        },
        "launch_ray_cluster": {
            "name": "Launch Ray Cluster",
            "script": "cai_integration/launch_ray_cluster.py",
            "parent_job_key": "setup_environment",
            "nvidia_gpu": 0,
            "environment": {"X": "1"},
            "arguments": "--verbose",
        },
    }
}


def test_deploy_order_and_tree() -> None:
    deploy = parse_deploy_spec(JOBS, env={})
    assert list(deploy.jobs) == ["git_sync", "setup_environment", "custom_job", "launch_ray_cluster"]
    assert [j.key for j in deploy.chain_order()] == list(deploy.jobs)
    assert deploy.root_job().key == "git_sync"
    assert [j.key for j in deploy.children("setup_environment")] == ["custom_job", "launch_ray_cluster"]
    job = deploy.jobs["launch_ray_cluster"]
    assert (job.cpu, job.memory, job.timeout, job.arguments, job.environment) == (
        1,
        2,
        3600,
        "--verbose",
        {"X": "1"},
    )


def test_deploy_defaults_and_env() -> None:
    deploy = parse_deploy_spec(JOBS, env={})
    assert deploy.project.name == "ray-serve-cai"
    assert deploy.project.git_url is None and deploy.project.visibility == "private"
    deploy = parse_deploy_spec(
        JOBS,
        env={"GITHUB_REPOSITORY": "acme/ray-serve-cai", "RUNTIME_IDENTIFIER": "img", "CML_PROJECT_NAME": "p"},
    )
    assert deploy.project.git_url == "https://github.com/acme/ray-serve-cai.git"
    assert deploy.project.runtime_identifier == "img"
    assert deploy.project.name == "p"
    assert deploy.runtime_of("git_sync") == "img"


def test_deploy_git_url_in_file_wins_over_github_repository() -> None:
    data = {**JOBS, "project": {"git_url": "https://example.com/x.git"}}
    deploy = parse_deploy_spec(data, env={"GITHUB_REPOSITORY": "acme/other"})
    assert deploy.project.git_url == "https://example.com/x.git"


def test_deploy_multiple_problems() -> None:
    data = {
        "project": {"visibility": "world"},
        "jobs": {
            "a": {"name": "A", "script": "/abs.py", "cpu": 0},
            "b": {"name": "A", "script": "b.py", "parent_job_key": "zz"},
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_deploy_spec(data, env={})
    fields = {p.field for p in caught.value.problems}
    assert fields >= {
        "project.visibility",
        "jobs.a.cpu",
        "jobs.a.script",
        "jobs.b.name",
        "jobs.b.parent_job_key",
    }


# ----------------------------------------------------------------------------- schema


def test_cluster_json_schema() -> None:
    schema = cluster_json_schema()
    text = json.dumps(schema)
    json.loads(text)
    props = schema["properties"]["ray_cluster"]
    assert "ray_cluster" in schema["properties"]
    for key in (
        "num_workers",
        "head_cpu",
        "head_memory",
        "worker_cpu",
        "worker_memory",
        "worker_gpus",
        "worker_groups",
        "ports",
        "auth",
        "runtime_identifier",
        "environment",
        "join_timeout",
    ):
        assert key in text, key
    assert props is not None
    assert schema["$schema"].startswith("https://json-schema.org/")


def test_jobs_json_schema() -> None:
    text = json.dumps(jobs_json_schema())
    for key in ("parent_job_key", "nvidia_gpu", "git_url", "timeout", "script"):
        assert key in text


def test_lenient_pass_checks_the_rest_without_inventing_problems() -> None:
    # A job without a name is left out of the cross-field rules: its child is not "orphaned".
    jobs = {
        "a": {"name": "A", "script": "a.py"},
        "b": {"script": "b.py", "parent_job_key": "a"},
        "c": {"name": "A", "script": "/abs.py", "parent_job_key": "b"},
    }
    with pytest.raises(ConfigError) as caught:
        parse_deploy_spec({"jobs": jobs}, env={})
    assert sorted(caught.value.problems) == sorted(
        [
            Problem("jobs.b.name", "is required"),
            Problem("jobs.c.name", "duplicate job name 'A' (also jobs.a)"),
            Problem("jobs.c.script", "must be a path relative to the project root, not an absolute path"),
        ]
    )
    # A group without a usable name is left out too; later groups keep the user's indices.
    data = {
        "ray_cluster": {
            "worker_groups": [
                {"name": 7, "replicas": 1, "cpu": 1, "memory": 1},
                {"name": "Bad", "replicas": 1, "cpu": "x", "memory": 1},
            ]
        }
    }
    with pytest.raises(ConfigError) as caught:
        cluster(data)
    fields = sorted(p.field for p in caught.value.problems)
    assert fields == [
        "ray_cluster.worker_groups[0].name",
        "ray_cluster.worker_groups[1].cpu",
        "ray_cluster.worker_groups[1].name",
    ], caught.value.problems
