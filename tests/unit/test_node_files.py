"""ray_serve_cai.node without Ray processes: settings from env, token, rendezvous, client env."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ray_serve_cai.node import (
    Rendezvous,
    RendezvousNotFound,
    client_env,
    ensure_token,
    read_rendezvous,
    read_token,
    rendezvous_path,
)
from ray_serve_cai.node.files import remove_rendezvous, write_rendezvous
from ray_serve_cai.node.http_app import summarize_nodes
from ray_serve_cai.node.settings import NodeSettings, SettingsError


def sample_rendezvous(head_id: str = "a" * 32, auth: str = "token") -> Rendezvous:
    return Rendezvous(
        ip="10.0.0.5",
        gcs_port=6379,
        client_port=10001,
        dashboard_port=8265,
        ray_version="2.60.0",
        python_version="3.11.7",
        head_id=head_id,
        started_at="2026-01-01T00:00:00+00:00",
        auth=auth,
    )


def test_token_is_created_once_with_mode_0600_even_when_racing(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda _: ensure_token(tmp_path, "demo"), range(16)))
    assert len(set(paths)) == 1
    path = paths[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = read_token(tmp_path, "demo")
    assert len(token) == 64 and int(token, 16) >= 0
    assert ensure_token(tmp_path, "demo") == path and read_token(tmp_path, "demo") == token


def test_rendezvous_round_trip_atomic_write_and_guarded_remove(tmp_path: Path) -> None:
    assert read_rendezvous(tmp_path, "demo") is None
    write_rendezvous(tmp_path, "demo", sample_rendezvous())
    assert read_rendezvous(tmp_path, "demo") == sample_rendezvous()
    assert [p.name for p in rendezvous_path(tmp_path, "demo").parent.iterdir()] == ["head.json"]
    assert not remove_rendezvous(tmp_path, "demo", head_id="b" * 32)
    assert remove_rendezvous(tmp_path, "demo", head_id="a" * 32)
    assert read_rendezvous(tmp_path, "demo") is None


def test_client_env_names_address_and_token_path_never_the_token(tmp_path: Path) -> None:
    with pytest.raises(RendezvousNotFound):
        client_env(tmp_path, "demo")
    token_file = ensure_token(tmp_path, "demo")
    write_rendezvous(tmp_path, "demo", sample_rendezvous())
    env = client_env(tmp_path, "demo")
    assert env == {
        "RAY_ADDRESS": "ray://10.0.0.5:10001",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
    }
    assert read_token(tmp_path, "demo") not in repr(env)
    write_rendezvous(tmp_path, "demo", sample_rendezvous(auth="disabled"))
    assert client_env(tmp_path, "demo") == {
        "RAY_ADDRESS": "ray://10.0.0.5:10001",
        "RAY_AUTH_MODE": "disabled",
    }


def base_env(tmp_path: Path) -> dict[str, str]:
    return {
        "RAY_CAI_CLUSTER": "demo",
        "RAY_CAI_NODE_NAME": "ray-demo-cpu-0",
        "CDSW_IP_ADDRESS": "127.0.0.1",
        "CDSW_APP_PORT": "8100",
        "RAY_CAI_PROJECT_DIR": str(tmp_path),
    }


def test_settings_defaults_and_every_problem_reported(tmp_path: Path) -> None:
    settings = NodeSettings.from_env("worker", base_env(tmp_path) | {"RAY_CAI_MEMORY_GB": "2"})
    assert settings.role == "worker" and settings.auth == "token" and settings.num_gpus == 0
    assert settings.memory_bytes == 2 * 1024**3 and settings.gcs_port == 6379
    bad = base_env(tmp_path) | {
        "RAY_CAI_NUM_CPUS": "many",
        "RAY_CAI_AUTH": "maybe",
        "RAY_CAI_GCS_PORT": "70000",
    }
    del bad["CDSW_APP_PORT"]
    with pytest.raises(SettingsError) as error:
        NodeSettings.from_env("worker", bad)
    for name in ("RAY_CAI_NUM_CPUS", "RAY_CAI_AUTH", "RAY_CAI_GCS_PORT", "CDSW_APP_PORT"):
        assert name in str(error.value)
    with pytest.raises(SettingsError, match="RAY_CAI_NODE_NAME"):
        NodeSettings.from_env("worker", base_env(tmp_path) | {"RAY_CAI_NODE_NAME": "../etc"})


def test_status_summary_counts_alive_nodes_and_sums_their_resources() -> None:
    rows = [
        {"node_id": "h", "node_ip": "10.0.0.5", "state": "ALIVE", "is_head_node": True,
         "node_name": "x", "labels": {"ray-cai.node-name": "ray-demo-head"},
         "resources_total": {"CPU": 1.0, "node:10.0.0.5": 1.0}},
        {"node_id": "w", "node_ip": "10.0.0.6", "state": "ALIVE", "node_name": "ray-demo-cpu-0",
         "resources_total": {"CPU": 2.0, "GPU": 1.0}},
        {"node_id": "d", "node_ip": "10.0.0.7", "state": "DEAD", "resources_total": {"CPU": 8.0}},
    ]  # fmt: skip
    summary = summarize_nodes(rows)
    assert summary["alive_nodes"] == 2
    assert summary["resources"] == {"CPU": 3.0, "GPU": 1.0}
    assert [node["node_name"] for node in summary["nodes"]] == ["ray-demo-head", "ray-demo-cpu-0", None]


def test_the_environment_config_writes_is_what_the_node_reads(tmp_path: Path) -> None:
    """One typed definition (config.node_env): what `up` writes on the apps parses back unchanged."""
    from ray_serve_cai.config import desired_nodes, validate_cluster_spec

    spec = validate_cluster_spec(
        {
            "name": "demo",
            "head": {"cpu": 2, "memory": 4},
            "worker_groups": [{"name": "cpu", "replicas": 1, "cpu": 3, "memory": 1.5, "gpus": 1}],
            "ports": {"gcs": 7000, "client": 0, "dashboard": 8300},
            "join_timeout": 90,
        }
    )
    head, worker = desired_nodes(spec)
    cdsw = {"CDSW_IP_ADDRESS": "10.0.0.7", "CDSW_APP_PORT": "8100", "RAY_CAI_PROJECT_DIR": str(tmp_path)}
    on_head = NodeSettings.from_env(None, head.environment | cdsw)
    assert (on_head.role, on_head.node_name, on_head.group, on_head.num_cpus) == (
        "head",
        "ray-demo-head",
        "head",
        2,
    )
    assert (on_head.gcs_port, on_head.client_port, on_head.dashboard_port) == (7000, 0, 8300)
    on_worker = NodeSettings.from_env(None, worker.environment | cdsw)
    assert (on_worker.role, on_worker.node_name, on_worker.group) == ("worker", "ray-demo-cpu-0", "cpu")
    assert (on_worker.num_cpus, on_worker.num_gpus, on_worker.memory_gb, on_worker.join_timeout) == (
        3,
        1,
        1.5,
        90,
    )
    assert head.environment["CDSW_APP_POLLING_ENDPOINT"] == worker.environment["CDSW_APP_POLLING_ENDPOINT"]
    assert head.environment["CDSW_APP_POLLING_ENDPOINT"] == "/ray-cai/healthz"
