"""One real Ray cluster in pods for the two modules that need a 1 + 2 cluster of their own in pods:
tests/ray/test_head_ft_ray.py (head fault tolerance) and tests/ray/test_pods_ray.py (pod IPs, a session
pod, partitions, lossy links). A bring-up costs about a minute of the suite, so they share one.

Both modules are in the `ray-3` xdist group (one worker, so one session fixture) and run in this order
(collection order): the head-FT steps first — a head replaced in a new pod, head processes restarted
in place, a second head refused; each leaves the cluster ready with the same workers — then the
pods steps — three pod IPs and a session pod, a worker partitioned for 25 s (back in the same pod), a
worker partitioned for good (replaced by the watch in a new pod), and last `down` (the stored GCS
state and every pod go: `down_and_check`) followed by `up` on slow lossy links and `down` again.
So the cluster is down after the last of them; the fixture's teardown only covers a run that stops
early or selects a part. Each module's own `cluster` fixture brings it up again if it is down (the
modules given in the other order: `up_unless_running`).

A plugin of the suite (`pytest_plugins` in tests/conftest.py): fixture `pods_ray_cluster`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_serve_cai.workspace.pods import leftovers_of, pod_names
from ray_serve_cai.workspace.testing import WorkspaceHandle
from support.cli import PodsCluster
from support.fakes import wait_until

CLUSTER = "pods"
PROJECT = "ray-cai-pods"
HEAD, W0, W1 = "ray-pods-head", "ray-pods-worker-0", "ray-pods-worker-1"
# Ray's default ports (no `ports:`), as on CML. `head_ray_cpus: 0`: the head runs no actor or task, so
# what a head-FT step puts on the cluster is on a worker. `startup_timeout` is how long the watch
# lets a running worker stay outside Ray before it replaces it (the head-FT steps never run the
# watch and give `up` a timeout of their own); `join_timeout` how long a worker waits for a head.
CONFIG = """\
ray_cluster:
  name: pods
  num_workers: 2
  head_cpu: 1
  head_memory: 1
  head_ray_cpus: 0
  worker_cpu: 1
  worker_memory: 1
  startup_timeout: 45
  cml_restart_wait: 0
  join_timeout: 300
"""


def gcs_state_dir(cluster: PodsCluster) -> Path:
    """Where the head keeps Ray's GCS state (head fault tolerance) in the project."""
    return cluster.project_dir / ".ray-cai" / CLUSTER / "gcs"


def down_and_check(cluster: PodsCluster) -> None:
    """`down` of a cluster that has run: it exits 0, the stored GCS state goes with it, and no pod of
    the cluster is left (namespace, link, address); the workspace's bridge stays. Other modules of the
    session workspace may have pods of their own: only this cluster's are looked at."""
    gcs = gcs_state_dir(cluster)
    assert gcs.is_dir() and any(p.is_dir() and p.name != "epochs" for p in gcs.iterdir())
    ips = {cluster.pod_ip(name) for name in (HEAD, W0, W1)}
    workspace = cluster.workspace
    network = workspace.network()
    names = {pod_names(workspace.home, network["pod_cidr"], ip) for ip in ips}
    down = cluster.down(timeout=600)
    assert down.returncode == 0, down.stderr[-3000:]
    assert not gcs.exists()
    wait_until(
        lambda: not ips & set(workspace.network()["pods"]), timeout=120, what=f"the pods {sorted(ips)} to go"
    )
    namespaces, links = leftovers_of(workspace.home)
    assert not {netns for netns, _ in names} & set(namespaces), (names, namespaces)
    assert not {veth for _, veth in names} & set(links), (names, links)
    assert network["bridge"] in links


def up_unless_running(cluster: PodsCluster) -> PodsCluster:
    """The cluster, brought up again when a test took it down (modules selected in another order)."""
    if not {HEAD, W0, W1} <= set(cluster.apps()):
        cluster.up("--timeout", "900", timeout=900)
    return cluster


@pytest.fixture(scope="session")
def pods_ray_cluster(
    pods_workspace: WorkspaceHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PodsCluster]:
    """A 1 + 2 real Ray cluster, every node in its own pod, `up` and ready (see the module docstring)."""
    config = tmp_path_factory.mktemp("pods-cluster") / "ray_cluster_config.yaml"
    config.write_text(CONFIG)
    cluster = PodsCluster(pods_workspace, PROJECT, config=config, nodes=3)
    try:
        cluster.up("--timeout", "900", timeout=900)
        yield cluster
    finally:
        pods_workspace.heal_network()
        pods_workspace.api_ok("DELETE", "/_workspace/restart-policy")
        cluster.down(timeout=600)
