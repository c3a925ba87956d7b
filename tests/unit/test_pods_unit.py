"""Pure parts of pods: the pod CIDR option, names per workspace home, and Ray's ports in a pod."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ray_serve_cai.node.ports import SHARED_HOST_VARIABLE, on_shared_host
from ray_serve_cai.node.ray_node import GRPC_FORK_VARIABLE, NodePorts, RayNode
from ray_serve_cai.node.settings import NodeSettings
from ray_serve_cai.workspace.pods import PodNetwork, parse_pod_cidr


def test_pod_cidr_must_be_an_ipv4_network_between_a_8_and_a_24() -> None:
    assert parse_pod_cidr(" 100.70.0.0/16 ") == ipaddress.IPv4Network("100.70.0.0/16")
    for bad, says in (("100.70.0.1/16", "host bits"), ("10.0.0.0/28", "/24"), ("fd00::/64", "IPv4"),
                      ("nonsense", "nonsense")):  # fmt: skip
        with pytest.raises(ValueError, match="--pod-cidr") as error:
            parse_pod_cidr(bad)
        assert says.lower() in str(error.value).lower()


def test_names_are_per_home_and_fit_linux_limits(tmp_path: Path) -> None:
    first = PodNetwork(tmp_path / "a", ipaddress.IPv4Network("100.64.0.0/16"))
    second = PodNetwork(tmp_path / "b", ipaddress.IPv4Network("100.64.0.0/16"))
    assert first.netns_prefix != second.netns_prefix and first.bridge != second.bridge
    last = first._pod_at(65534)
    assert last.ip == "100.64.255.254" and len(last.veth) <= 15 and len(first.bridge) <= 15
    assert last.netns.startswith(first.netns_prefix) and last.veth.startswith(first.veth_prefix)
    assert first._pod_at(2).veth != first._pod_at(3).veth


def pod_settings(tmp_path: Path, role: str) -> NodeSettings:
    env = {
        "RAY_CAI_CLUSTER": "demo",
        "RAY_CAI_NODE_NAME": f"ray-demo-{role}",
        "CDSW_IP_ADDRESS": "100.64.0.7",
        "CDSW_APP_PORT": "8100",
        "RAY_CAI_PROJECT_DIR": str(tmp_path),
    }
    return NodeSettings.from_env(role, env)


def test_in_a_pod_ray_uses_its_default_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHARED_HOST_VARIABLE, raising=False)
    assert not on_shared_host() and on_shared_host({SHARED_HOST_VARIABLE: "1"})
    head = NodePorts.choose(pod_settings(tmp_path, "head"))
    assert (head.gcs, head.client, head.dashboard, head.worker_ports) == (6379, 10001, 8265, None)
    command = RayNode(pod_settings(tmp_path, "head"), head, {}).start_command()
    assert "--port=6379" in command and "--node-ip-address=100.64.0.7" in command
    assert not [arg for arg in command if arg.startswith(("--node-manager-port", "--min-worker-port"))]
    worker = NodePorts.choose(pod_settings(tmp_path, "worker"))
    assert worker == NodePorts()
    command = RayNode(pod_settings(tmp_path, "worker"), worker, {}).start_command("100.64.0.3:6379")
    assert "--address=100.64.0.3:6379" in command
    assert not [arg for arg in command if "port" in arg]


def test_ray_runs_without_grpc_fork_handlers_unless_the_app_sets_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(GRPC_FORK_VARIABLE, raising=False)
    head = RayNode(pod_settings(tmp_path, "head"), NodePorts.choose(pod_settings(tmp_path, "head")), {})
    assert head.environment()[GRPC_FORK_VARIABLE] == "false"
    monkeypatch.setenv(GRPC_FORK_VARIABLE, "true")  # the app's environment says otherwise: kept
    assert head.environment()[GRPC_FORK_VARIABLE] == "true"
