"""End to end: Ray Serve on a real local cluster, reached through its Serve endpoint.

One module-scoped cluster (head + 1 worker) deployed by `ray-cai up` from a clone whose
`ray_cluster_config.yaml` names `examples/serve/serve_config.yaml`:
- the endpoint (`<gateway app URL>/serve/` in pods, `<head app URL>/serve/` on a shared host; what
  `serve status` says) answers the example correctly, also under 20 concurrent
  requests (batched by `@serve.batch`), streams token by token, passes WebSockets;
- a second `up` makes no Serve PUT (Serve's own `last_deployed_time_s` does not move);
- a `num_replicas`/`user_config` change is applied in place: no application created or deleted, the
  running replicas are kept;
- a broken import path: `serve status` shows DEPLOY_FAILED with Serve's message and exits 1, and
  `ray-cai status` is not ready;
- the head killed: the supervising watch heals it and Serve answers again (the outage is printed;
  on a shared host the endpoint, the head's, goes down meanwhile).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from support.cli import APP_CREATE_DELETE_ROUTES, LocalCluster
from support.fakes import clone_with_small_cluster, git, wait_until

from ray_serve_cai.workspace.testing import WorkspaceHandle

# The second real-Ray group: a worker of its own beside the shared cluster (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("ray-2")

CLUSTER = "srv"
PROJECT = "ray-cai-serve-e2e"
HEAD = f"ray-{CLUSTER}-head"
GATEWAY = f"ray-{CLUSTER}-serve"  # the Serve gateway application (clusters in pods)
SAMPLE = {"features": [5.1, 3.5, 1.4, 0.2]}  # a setosa
VIRGINICA = {"features": [6.7, 3.0, 5.2, 2.3]}


def with_replicas(text: str, replicas: int, delay: float) -> str:
    return text.replace("num_replicas: 2", f"num_replicas: {replicas}").replace(
        "token_delay_s: 0.05", f"token_delay_s: {delay}"
    )


class ServeCluster(LocalCluster):
    """The Serve cluster, run from its clone (whose config names the Serve file), and Serve's views."""

    def head(self) -> dict[str, Any]:
        return self.apps()[HEAD]

    @property
    def serve_url(self) -> str:
        """The Serve endpoint: `<gateway app URL>/serve` where the cluster has its Serve gateway (in
        pods: proxies on every node), else `<head app URL>/serve`."""
        apps = self.apps()
        return str(apps.get(GATEWAY, apps[HEAD])["url"]) + "/serve"

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.serve_url,
            headers={"Authorization": f"Bearer {self.workspace.api_key}"},
            timeout=60,
            trust_env=False,
        )

    def details(self) -> dict[str, Any]:
        """Serve's own view (GET /api/serve/applications/ through the head's app URL)."""
        response = httpx.get(
            self.head()["url"] + "/api/serve/applications/",
            headers={"Authorization": f"Bearer {self.workspace.api_key}"},
            timeout=60,
            trust_env=False,
        )
        response.raise_for_status()
        return dict(response.json())


@pytest.fixture(scope="module")
def cluster(workspace: WorkspaceHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeCluster]:
    repo = clone_with_small_cluster(tmp_path_factory.mktemp("serve") / "repo", CLUSTER, workers=1)
    config = repo / "ray_cluster_config.yaml"
    config.write_text(config.read_text() + "  serve: {config: examples/serve/serve_config.yaml}\n")
    example = (repo / "examples/serve/serve_config.yaml").read_text()
    (repo / "serve_scaled.yaml").write_text(with_replicas(example, 3, 0.02))
    (repo / "serve_broken.yaml").write_text(
        example.replace("examples.serve.iris:app", "examples.serve.iris:no_such_app")
    )
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "e2e: a cluster with Serve")
    env = ServeCluster(workspace, PROJECT, cwd=repo, timeout=600)
    try:
        started = time.monotonic()
        result = env.up()
        print(f"\nup with Serve: {time.monotonic() - started:.1f}s")
        assert result["status"]["state"] == "ready", result["status"]
        assert result["status"]["serve"]["applications"]["iris"]["status"] == "RUNNING"
        yield env
    finally:
        down = env.down()
        assert down.returncode == 0, down.stderr
        if env.project_id:
            workspace.api("DELETE", f"/api/v2/projects/{env.project_id}", timeout=120)


def predict(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/iris/predict", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_endpoint_answers_batches_streams_and_passes_websockets(cluster: ServeCluster) -> None:
    with cluster.http() as client:
        assert predict(client, SAMPLE)["species"] == "setosa"
        assert predict(client, VIRGINICA)["species"] == "virginica"
        bodies = [SAMPLE if i % 2 else VIRGINICA for i in range(20)]
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda b: predict(client, b), bodies))
        assert [a["species"] for a in answers] == ["setosa" if i % 2 else "virginica" for i in range(20)]
        print(f"\n20 concurrent requests: batch sizes {sorted(a['batch_size'] for a in answers)}")
        assert max(a["batch_size"] for a in answers) > 1, "@serve.batch never batched concurrent requests"

        # A token stream arrives token by token: chunks spread over the generation time.
        arrivals: list[tuple[float, bytes]] = []
        started = time.monotonic()
        with client.stream("POST", "/iris/stream", json=VIRGINICA) as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                arrivals.append((time.monotonic() - started, chunk))
        text = b"".join(c for _, c in arrivals).decode()
        assert text.startswith("This flower is most likely virginica"), text
        first, last = arrivals[0][0], arrivals[-1][0]
        print(f"stream: {len(arrivals)} chunks, first after {first:.2f}s, last after {last:.2f}s")
        assert len(arrivals) >= 4 and last - first >= 0.15, f"the stream arrived at once: {arrivals}"

    from websockets.sync.client import connect

    ws_url = cluster.serve_url.replace("http://", "ws://") + "/iris/ws"
    headers = {"Authorization": f"Bearer {cluster.workspace.api_key}"}
    with connect(ws_url, additional_headers=headers, open_timeout=30) as ws:
        for body, species in ((SAMPLE, "setosa"), (VIRGINICA, "virginica")):
            ws.send(json.dumps(body))
            assert json.loads(ws.recv(timeout=30))["species"] == species

    status = cluster.cli_json("serve", "status")
    assert status["url"] == cluster.serve_url + "/"
    iris = status["applications"]["iris"]
    assert (iris["status"], iris["route_prefix"]) == ("RUNNING", "/iris")
    assert iris["deployments"]["IrisClassifier"]["replicas"] == {"RUNNING": 2}


def test_second_up_makes_no_serve_put_and_a_replica_change_applies_in_place(cluster: ServeCluster) -> None:
    before = cluster.details()["applications"]["iris"]
    cluster.workspace.reset_counters()
    again = cluster.cli_json("up")
    assert again["plan"]["actions"] == []
    assert (
        cluster.details()["applications"]["iris"]["last_deployed_time_s"] == before["last_deployed_time_s"]
    ), "an unchanged config was PUT again"

    replicas_before = {r["replica_id"] for r in before["deployments"]["IrisClassifier"]["replicas"]}
    config = cluster.cwd / "ray_cluster_config.yaml"
    original = config.read_text()
    config.write_text(original.replace("examples/serve/serve_config.yaml", "serve_scaled.yaml"))
    try:
        cluster.workspace.reset_counters()
        scaled = cluster.cli_json("up")
        assert cluster.calls(APP_CREATE_DELETE_ROUTES) == 0, cluster.workspace.counters()["counts"]
        assert scaled["plan"]["actions"] == []
        after = cluster.details()["applications"]["iris"]
        assert after["last_deployed_time_s"] > before["last_deployed_time_s"]
        wait_until(
            lambda: (
                cluster.details()["applications"]["iris"]["deployments"]["IrisClassifier"]["replicas"]
                and sum(
                    r["state"] == "RUNNING"
                    for r in cluster.details()["applications"]["iris"]["deployments"]["IrisClassifier"][
                        "replicas"
                    ]
                )
                == 3
            ),
            timeout=120,
            interval=1,
            what="3 running replicas",
        )
        now = {
            r["replica_id"]
            for r in cluster.details()["applications"]["iris"]["deployments"]["IrisClassifier"]["replicas"]
        }
        assert replicas_before <= now, f"replicas were replaced, not added: {replicas_before} → {now}"
        with cluster.http() as client:
            assert predict(client, SAMPLE)["species"] == "setosa"
    finally:
        config.write_text(original)
    restored = cluster.cli_json("up")
    assert (
        restored["status"]["serve"]["applications"]["iris"]["deployments"]["IrisClassifier"][
            "target_num_replicas"
        ]
        == 2
    )


def test_a_broken_import_path_shows_deploy_failed_with_serves_message(cluster: ServeCluster) -> None:
    broken = cluster.cli("serve", "deploy", "serve_broken.yaml", "--timeout", "300")
    assert broken.returncode == 1, broken.stderr + broken.stdout
    status = cluster.cli_json("serve", "status", code=1)
    iris = status["applications"]["iris"]
    print(f"\nbroken import path: {iris['status']}: {iris['message'][-200:]}")
    assert iris["status"] == "DEPLOY_FAILED"
    assert "no_such_app" in iris["message"], iris["message"]
    cluster_status = cluster.cli("status")
    assert cluster_status.returncode == 1
    assert "no_such_app" in cluster_status.stdout + cluster_status.stderr
    healed = cluster.cli_json("up")  # the cluster config still names the good file
    assert healed["status"]["serve"]["applications"]["iris"]["status"] == "RUNNING"


def test_head_killed_the_watch_brings_serve_back(cluster: ServeCluster) -> None:
    watch = cluster.popen("up", "--watch", "--interval", "2", stdout=subprocess.DEVNULL)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(watch.stderr or []), daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: any("watching" in line for line in stderr), timeout=300, interval=0.5, what="watch"
        )
        head = cluster.head()
        processes = cluster.workspace.api_ok("GET", "/_workspace/processes")["processes"]
        pids = [int(p["pid"]) for p in processes if p["workload_id"] == head["id"]]
        assert pids
        gateway = GATEWAY in cluster.apps()
        killed = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # killing a pod's init ends its other processes
                os.kill(pid, signal.SIGKILL)

        def answers() -> bool:
            try:
                with cluster.http() as client:
                    response = client.post("/iris/predict", json=SAMPLE, timeout=5)
                return response.status_code == 200 and response.json()["species"] == "setosa"
            except (httpx.HTTPError, ValueError, StopIteration):
                return False

        if gateway:  # proxies on every node behind the gateway: the worker's replicas may keep answering
            wait_until(lambda: cluster.cli_json("status", code=None)["state"] == "ready", timeout=400,
                       interval=2, what="the head to be back")  # fmt: skip
        else:  # the head's `/serve` is the only door
            wait_until(lambda: not answers(), timeout=30, interval=0.2, what="the endpoint to go down")
        wait_until(answers, timeout=400, interval=0.5, what="Serve to answer again after the head was killed")
        outage = time.monotonic() - killed
        print(f"\nhead killed: Serve answered again after {outage:.1f}s (watch interval 2s)")
    finally:
        watch.send_signal(signal.SIGTERM)
        try:
            watch.wait(timeout=60)
        except subprocess.TimeoutExpired:
            watch.kill()
            watch.wait()
    assert watch.returncode == 0, "".join(stderr)
