"""Real Ray in pods, as on CML: the suite's 1 + 2 pods cluster, every node in its own pod.

Three distinct pod IPs in `ray.nodes()` (none loopback, none the host's); a session pod connects with
`ray://<head pod IP>:10001` and runs a task on every node; a worker partitioned for 25 s is back
with the same three applications; a worker partitioned for good is replaced by the watch; `down`
removes every pod (and the stored GCS state), and `up` with 200 ms ± 20 ms and 2 % loss on every pod
link ends ready; after `down` no pod is left.

The cluster (`support.pods_cluster`) is shared with test_head_ft_ray.py, whose steps run first and
leave it ready with the same workers; the last test here takes it down.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import textwrap
import time

import pytest
from support.cli import PodsCluster
from support.fakes import wait_until
from support.pods_cluster import HEAD, W0, W1, down_and_check, up_unless_running

pytestmark = [
    pytest.mark.ray,
    pytest.mark.xdist_group("ray-3"),  # with the head-FT module: one cluster (tests/ray/conftest.py)
]

# Run in a session pod: what Ray sees, and one task pinned to every node.
CLIENT = textwrap.dedent(
    """
    import json, os, sys, ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ray.init(sys.argv[1], logging_level="error")
    print("ray.init() done", flush=True)  # CLIENT_CONNECTED (support.cli)
    nodes = [n for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=0)
    def where():
        return ray.get_runtime_context().get_node_id()

    ran = {}
    for node in nodes:
        pinned = where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
        ran[node["NodeID"]] = ray.get(pinned.remote(), timeout=180)
    print(json.dumps({
        "me": os.environ["CDSW_IP_ADDRESS"],
        "nodes": {n["NodeManagerAddress"]: n["NodeName"] for n in nodes},
        "ran": ran,
    }))
    """
)


def host_addresses() -> set[str]:
    listed = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True)
    return {line.split()[3].split("/")[0] for line in listed.stdout.splitlines()} | {
        socket.gethostbyname(socket.gethostname())
    }


@pytest.fixture(scope="module")
def cluster(pods_ray_cluster: PodsCluster) -> PodsCluster:
    return up_unless_running(pods_ray_cluster)


def test_three_pods_three_ips_and_a_session_pod_runs_tasks_on_every_node(cluster: PodsCluster) -> None:
    cluster.ready()
    cidr = ipaddress.ip_network(cluster.workspace.network()["pod_cidr"])
    ips = {name: cluster.pod_ip(name) for name in (HEAD, W0, W1)}
    connect = cluster.cli_json("connect")
    assert connect["address"] == f"ray://{ips[HEAD]}:10001"

    run = cluster.ray_client(CLIENT)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["nodes"] == {ips[HEAD]: HEAD, ips[W0]: W0, ips[W1]: W1}
    assert len(set(seen["nodes"])) == 3
    for ip in seen["nodes"]:
        address = ipaddress.ip_address(ip)
        assert address in cidr and not address.is_loopback and ip not in host_addresses()
    assert seen["me"] not in seen["nodes"] and ipaddress.ip_address(seen["me"]) in cidr  # its own pod
    assert seen["ran"] == {node: node for node in seen["ran"]} and len(seen["ran"]) == 3


def test_a_worker_partitioned_for_25_s_comes_back_with_the_same_apps(cluster: PodsCluster) -> None:
    cluster.ready()
    before = {name: app["id"] for name, app in cluster.apps().items() if name in (HEAD, W0, W1)}
    w0_ip = cluster.pod_ip(W0)
    cluster.workspace.partition([W0], seconds=25)
    wait_until(
        lambda: not cluster.workspace.network()["faults"],
        timeout=120,
        interval=2,
        what="the partition to end",
    )
    cluster.ready()
    after = {name: app["id"] for name, app in cluster.apps().items() if name in (HEAD, W0, W1)}
    assert after == before  # no app replaced, none added
    assert cluster.pod_ip(W0) == w0_ip  # the same pod: Ray marked the node dead and it joined again


def test_a_worker_partitioned_for_good_is_replaced_by_the_watch(cluster: PodsCluster) -> None:
    cluster.ready()
    old_ip, old_id = cluster.pod_ip(W1), cluster.apps()[W1]["id"]
    watch = subprocess.Popen(
        cluster.argv("up", "--watch", "--interval", "5"),
        cwd=cluster.cwd,
        env=cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        cluster.workspace.partition([W1], seconds=0)
        wait_until(
            lambda: cluster.pod_ip(W1) != old_ip,
            timeout=600,
            interval=5,
            what="the watch to replace the worker",
        )
        cluster.ready()
    finally:
        watch.terminate()
        watch.wait(timeout=60)
        cluster.workspace.heal_network()
    assert cluster.apps()[W1]["id"] == old_id  # restarted in a new pod, not a duplicate app
    assert old_ip not in cluster.workspace.network()["pods"]


def test_up_on_slow_lossy_links_ends_ready_and_down_leaves_no_pod(cluster: PodsCluster) -> None:
    down_and_check(cluster)  # the stored GCS state goes too (head fault tolerance)
    cluster.workspace.shape_network(["*"], delay_ms=200, jitter_ms=20, loss_percent=2)
    try:
        started = time.monotonic()
        result = cluster.cli_json("up", "--timeout", "900")
        assert result["status"]["state"] == "ready", result["status"]
        faults = cluster.workspace.network()["faults"]
        assert len([f for f in faults if f["kind"] == "shape" and f["pod_ip"] != "*"]) >= 3
        print(f"up on 200±20 ms, 2 % loss links: {time.monotonic() - started:.0f} s")
    finally:
        cluster.workspace.heal_network()
    down_and_check(cluster)
