"""ray_serve_cai.node with real Ray: a head and a worker app started as CML would start them.

One cluster per module (starting Ray nodes is the slow part on a 2-core machine); the tests run in
file order: form + secrets, dashboard proxy, client auth, head restart + rejoin, worker stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from ray_serve_cai.node import client_env, node_logs_dir, read_rendezvous, read_token, token_path
from ray_serve_cai.node.launcher import MAX_START_ATTEMPTS
from ray_serve_cai.node.ports import pick_free_ports
from ray_serve_cai.node.process_tree import end_node
from ray_serve_cai.node.ray_node import node_tag

REPO = Path(__file__).resolve().parents[2]
CLUSTER = "demo"
HEAD_NAME = f"ray-{CLUSTER}-head"
WORKER_NAME = f"ray-{CLUSTER}-cpu-0"


@dataclass
class NodeApp:
    """One launcher process, started like the local workspace starts an application."""

    name: str
    role: str
    project: Path
    app_port: int
    process: subprocess.Popen[bytes]
    output: Path
    seen_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    def remember_tree(self) -> None:
        """Record every pid of this node now (launcher, `ray start` tree, tagged Ray workers)."""
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            self.seen_pids |= {root.pid, *(child.pid for child in root.children(recursive=True))}

    def alive_seen_pids(self) -> list[psutil.Process]:
        alive = []
        for pid in self.seen_pids:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
        return alive

    def terminate(self, timeout: float = 15.0) -> int:
        self.remember_tree()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill_everything(self) -> None:
        """Finalizer: whatever state the test left, nothing of this node survives."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=12)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        end_node(None, node_tag(self.project, CLUSTER, self.name), grace_seconds=0)
        for process in self.alive_seen_pids():
            with contextlib.suppress(psutil.Error):
                process.kill()


@dataclass
class Cluster:
    project: Path
    nodes: list[NodeApp] = field(default_factory=list)
    head: NodeApp | None = None
    worker: NodeApp | None = None

    def start(self, role: str, name: str, **extra_env: str) -> NodeApp:
        app_port = pick_free_ports(1)[0]
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "CDSW_"))}
        env |= {
            "CDSW_IP_ADDRESS": "127.0.0.1",
            "CDSW_APP_PORT": str(app_port),
            "RAY_CAI_SHARED_HOST": "1",  # every node of this harness shares this host (no pods)
            "RAY_CAI_CLUSTER": CLUSTER,
            "RAY_CAI_ROLE": role,
            "RAY_CAI_GROUP": "head" if role == "head" else "cpu",
            "RAY_CAI_NODE_NAME": name,
            "RAY_CAI_NUM_CPUS": "1",
            "RAY_CAI_NUM_GPUS": "0",
            "RAY_CAI_MEMORY_GB": "1",
            "RAY_CAI_GCS_PORT": "0",
            "RAY_CAI_CLIENT_PORT": "0",
            "RAY_CAI_DASHBOARD_PORT": "0",
            "RAY_CAI_JOIN_TIMEOUT": "120",
            **extra_env,
        }
        output = self.project / f"{name}-{len(self.nodes)}.out"
        script = REPO / "cai_integration" / ("ray_head.py" if role == "head" else "ray_worker.py")
        with open(output, "wb") as sink:
            process = subprocess.Popen(
                [sys.executable, str(script)],
                cwd=self.project,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        node = NodeApp(name, role, self.project, app_port, process, output)
        self.nodes.append(node)
        return node

    def stop_all(self) -> None:
        for node in self.nodes:
            node.kill_everything()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if result:
                return result
        except (httpx.HTTPError, ValueError, KeyError) as error:
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error!r})")


def get_json(url: str) -> dict[str, Any]:
    return httpx.get(url, timeout=10).json()


def status_with_alive(head: NodeApp, count: int, names: set[str]) -> dict[str, Any] | None:
    status = get_json(f"{head.url}/ray-cai/status")
    alive = {node["node_name"] for node in status["nodes"] if node["alive"]}
    return status if status["alive_nodes"] == count and names <= alive else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    project = tmp_path_factory.mktemp("node-project")
    handle = Cluster(project)
    try:
        handle.head = handle.start("head", HEAD_NAME)
        # CML polls `/` to decide the app is running: it must answer before Ray is up.
        wait_for(lambda: httpx.get(handle.head.url, timeout=2).status_code == 200, 30, "head app HTTP", 0.2)
        handle.worker = handle.start("worker", WORKER_NAME)
        # A loaded host may fail a `ray start` or two first (see the port-race test): room for them.
        wait_for(lambda: status_with_alive(handle.head, 2, {HEAD_NAME, WORKER_NAME}), 300, "2 alive nodes")
        # `ray start` reports the node started just after the head's GCS lists it.
        worker_health = f"{handle.worker.url}/ray-cai/health"
        wait_for(lambda: get_json(worker_health)["ray_running"], 30, "the worker to say Ray runs", 0.1)
        yield handle
    finally:
        handle.stop_all()


def test_cluster_forms_and_the_token_stays_secret(cluster: Cluster) -> None:
    head, worker = cluster.head, cluster.worker
    assert head is not None and worker is not None
    status = get_json(f"{head.url}/ray-cai/status")
    rendezvous = read_rendezvous(cluster.project, CLUSTER)
    assert rendezvous is not None and status["head_id"] == rendezvous.head_id
    assert status["resources"]["CPU"] == 2.0 and status["python_version"] == rendezvous.python_version
    # Where Serve will run once something deploys (it starts on demand): on this shared host the head's
    # loopback, on a port of its own, none of Ray's.
    assert status["serve_proxy_location"] == "HeadOnly", status
    assert status["serve_http_port"] not in (rendezvous.gcs_port, rendezvous.client_port, head.app_port)
    assert httpx.get(f"{head.url}/serve/", timeout=10).status_code == 503  # no Serve yet
    health = get_json(f"{worker.url}/ray-cai/health")
    assert health["role"] == "worker" and health["ray_running"] and health["head_id"] == rendezvous.head_id
    assert get_json(f"{head.url}/ray-cai/health")["node_name"] == HEAD_NAME
    assert httpx.get(worker.url, timeout=5).status_code == 200

    assert stat.S_IMODE(token_path(cluster.project, CLUSTER).stat().st_mode) == 0o600
    token = read_token(cluster.project, CLUSTER)
    head_json = (cluster.project / ".ray-cai" / CLUSTER / "head.json").read_text()
    assert (
        token not in head_json
        and {"ip", "gcs_port", "client_port", "head_id"} <= json.loads(head_json).keys()
    )
    checked = 0
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            assert token not in " ".join(process.cmdline()), f"token in argv of pid {process.pid}"
            checked += 1
    assert checked > 10
    for node in (head, worker):
        node.remember_tree()
        assert token not in node.output.read_text(errors="replace")
        for pid in node.seen_pids:
            with contextlib.suppress(psutil.Error):
                assert "RAY_AUTH_TOKEN" not in psutil.Process(pid).environ()


def test_dashboard_answers_through_the_proxy_only(cluster: Cluster) -> None:
    head = cluster.head
    assert head is not None
    rendezvous = read_rendezvous(cluster.project, CLUSTER)
    assert rendezvous is not None
    direct = f"http://127.0.0.1:{rendezvous.dashboard_port}"
    assert httpx.get(f"{direct}/api/v0/nodes", timeout=10).status_code == 401
    page = httpx.get(f"{head.url}/", timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()
    # CML's own credentials must not reach Ray: the proxy drops Authorization and sets its own header.
    nodes = httpx.get(f"{head.url}/api/v0/nodes", headers={"Authorization": "Bearer cml-key"}, timeout=10)
    assert nodes.status_code == 200 and nodes.json()["data"]["result"]["total"] == 2


CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys, ray
    if sys.argv[1] == "refused":
        import ray.util
        try:
            ray.util.connect(sys.argv[2], connection_retries=0)
        except Exception as error:
            print(json.dumps({"refused": type(error).__name__}))
            sys.exit(0)
        print(json.dumps({"refused": None}))
        sys.exit(0)
    ray.init(logging_level="error")

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    pinned = where.options(label_selector={"ray-cai.node-name": sys.argv[2]})
    print(json.dumps({"node_id": ray.get(pinned.remote(), timeout=60)}))
    """
)


def run_client(args: list[str], env: dict[str, str], timeout: float = 120) -> dict[str, Any]:
    base = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "CDSW_"))}
    for _attempt in range(2):
        result = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT, *args],
            env=base | env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        # Ray Client's proxier now and then loses the per-client server it just forked on a busy
        # 2-core machine (a gRPC fork check fails); a user would simply connect again.
        if result.returncode == 0 or "Starting Ray client server failed" not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_ray_client_needs_the_token_and_reaches_the_worker(cluster: Cluster) -> None:
    head = cluster.head
    assert head is not None
    env = client_env(cluster.project, CLUSTER)
    assert set(env) == {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"}
    address = env["RAY_ADDRESS"].removeprefix("ray://")
    refused = run_client(["refused", address], {"RAY_AUTH_MODE": "disabled"})
    assert refused["refused"] is not None
    worker_ids = [
        node["node_id"]
        for node in get_json(f"{head.url}/ray-cai/status")["nodes"]
        if node["node_name"] == WORKER_NAME
    ]
    assert run_client(["pinned", WORKER_NAME], env)["node_id"] in worker_ids


def test_head_restart_gets_a_new_head_id_and_the_worker_rejoins(cluster: Cluster) -> None:
    old_head, worker = cluster.head, cluster.worker
    assert old_head is not None and worker is not None
    old = read_rendezvous(cluster.project, CLUSTER)
    assert old is not None
    # A clean exit on SIGTERM; that it fits in the workspace's 10 s grace is benchmarks/bench_node_stop.py.
    assert old_head.terminate() == 0
    assert read_rendezvous(cluster.project, CLUSTER) is None, "a stopped head withdraws its rendezvous"
    assert not old_head.alive_seen_pids(), "processes of the stopped head survive"
    head_logs = node_logs_dir(cluster.project, CLUSTER, HEAD_NAME)
    assert (head_logs / "gcs_server.out").exists() and (head_logs / "raylet.out").exists()

    cluster.head = new_head = cluster.start("head", HEAD_NAME)
    status = wait_for(
        lambda: status_with_alive(new_head, 2, {HEAD_NAME, WORKER_NAME}), 150, "the worker to rejoin"
    )
    assert status["head_id"] != old.head_id
    assert get_json(f"{worker.url}/ray-cai/health")["head_id"] == status["head_id"]
    assert worker.process.poll() is None, "the worker launcher rejoined by itself, without a restart"


def test_worker_stop_copies_logs_and_leaves_no_process(cluster: Cluster) -> None:
    worker = cluster.worker
    assert worker is not None
    worker.remember_tree()
    assert len(worker.seen_pids) >= 3
    assert worker.terminate() == 0
    assert not worker.alive_seen_pids()
    assert not [
        p for p in psutil.process_iter() if _tagged(p, node_tag(cluster.project, CLUSTER, WORKER_NAME))
    ]
    logs = node_logs_dir(cluster.project, CLUSTER, WORKER_NAME)
    assert (logs / "raylet.out").exists()


def test_a_port_taken_before_ray_binds_it_does_not_keep_the_node_out(cluster: Cluster) -> None:
    """The race seen on a busy host: another process takes a port between the launcher's choice and
    Ray's bind (here the metrics export port, as in the bug). That `ray start` fails; the next ones
    use freshly chosen ports, never the taken one, and the node joins; its health page kept the error,
    and its polling endpoint failed while Ray was down past the start grace (5 s here).

    A failed `ray start` takes ~30 s (Ray's own wait for the node to register) and on a loaded 2-core
    host a later attempt may fail too, for a reason of its own: this Ray's raylet gives its dashboard
    agent a fixed 15 s to write its port files, and the agent's imports alone can take longer (seen:
    27 s). So the join may take more than two attempts (at most `MAX_START_ATTEMPTS`), and the
    deadline covers them."""
    head = cluster.head
    assert head is not None
    name = f"ray-{CLUSTER}-cpu-1"
    # The nodes alive before (the head, and the first worker when this test runs alone): one more joins.
    alive_before = get_json(f"{head.url}/ray-cai/status")["alive_nodes"]
    node = cluster.start("worker", name, RAY_CAI_START_GRACE="5")
    polled: list[tuple[int, dict[str, Any]]] = []

    def joined() -> dict[str, Any] | None:
        if node.process.poll() is not None:  # it gave up (MAX_START_ATTEMPTS failed starts): say why
            tail = node.output.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{name} exited with code {node.process.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.get(f"{node.url}/ray-cai/healthz", timeout=5)
            polled.append((answer.status_code, answer.json()))
        return status_with_alive(head, alive_before + 1, {HEAD_NAME, name})

    def attempt_ports(output: str) -> dict[int, int]:
        """The metrics export port of each `ray start` attempt, by attempt number."""
        found = re.findall(r"attempt (\d+)\):.* metrics_export=(\d+)", output)
        return {int(attempt): int(port) for attempt, port in found}

    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        port = wait_for(
            lambda: attempt_ports(node.output.read_text(errors="replace")).get(1),
            60,
            "the first attempt's ports",
            0.02,
        )
        holder.bind(("", port))  # fails if Ray was faster: then this test cannot reproduce the race
        holder.listen()
        status = wait_for(joined, 30 + MAX_START_ATTEMPTS * 75, f"{name} to join", 0.5)
        assert status["alive_nodes"] == alive_before + 1
        failing = [body for code, body in polled if code == 503]
        assert failing and not failing[-1]["healthy"] and failing[-1]["ray_down_for_s"] > 5, polled[-5:]
        errors = [body["last_error"] for body in failing if body["last_error"]]
        assert any("Address already in use" in error for error in errors), errors[-3:]
        health = wait_for(
            # `ray start` says the node runs a moment after Ray answers: wait for both.
            lambda: (
                (body := get_json(f"{node.url}/ray-cai/health"))["ray_running"]
                and body["phase"] == "running"
                and body
            ),
            30,
            "the node to say Ray runs",
            0.1,
        )
        assert health["phase"] == "running" and health["healthy"]
        assert health["start_attempts"] >= 2 and health["last_error"], health
        output = node.output.read_text(errors="replace")
        ports = attempt_ports(output)
        later = [ports[attempt] for attempt in range(2, health["start_attempts"] + 1)]
        assert len(later) == health["start_attempts"] - 1 and port not in later, output[-3000:]
        assert httpx.get(f"{node.url}/ray-cai/healthz", timeout=5).status_code == 200
    finally:
        holder.close()
    assert node.terminate() == 0
    assert not node.alive_seen_pids()


def test_head_exits_nonzero_when_ray_dies_and_leaves_no_process(cluster: Cluster) -> None:
    head = cluster.head
    assert head is not None
    head.remember_tree()
    ray_start = [
        child
        for child in psutil.Process(head.process.pid).children()
        if "ray.scripts.scripts" in " ".join(child.cmdline())
    ]
    assert len(ray_start) == 1
    ray_start[0].kill()
    assert head.process.wait(timeout=20) == 1
    wait_for(lambda: not head.alive_seen_pids(), 10, "the dead head's processes to end", 0.5)
    assert "exited with code" in head.output.read_text()


def _tagged(process: psutil.Process, tag: str) -> bool:
    try:
        return process.environ().get("RAY_CAI_NODE_TAG") == tag
    except psutil.Error:
        return False


def test_worker_without_rendezvous_fails_after_its_join_timeout(tmp_path: Path) -> None:
    lonely = Cluster(tmp_path)
    try:
        node = lonely.start("worker", WORKER_NAME, RAY_CAI_JOIN_TIMEOUT="3")
        assert node.process.wait(timeout=60) == 1  # how soon: benchmarks/bench_deadlines.py
        output = node.output.read_text()
        assert "no head rendezvous" in output and "RAY_CAI_JOIN_TIMEOUT" in output
    finally:
        lonely.stop_all()


def test_worker_refuses_a_head_with_another_ray_version(tmp_path: Path) -> None:
    from ray_serve_cai.node.files import Rendezvous, write_rendezvous

    write_rendezvous(
        tmp_path,
        CLUSTER,
        Rendezvous("127.0.0.1", 1, 2, 3, "0.0.1", "3.0.0", "f" * 32, "2026-01-01T00:00:00+00:00"),
    )
    lonely = Cluster(tmp_path)
    try:
        node = lonely.start("worker", WORKER_NAME)
        assert node.process.wait(timeout=60) == 1
        assert "version mismatch" in node.output.read_text()
    finally:
        lonely.stop_all()


def test_a_sigkilled_launcher_leaves_no_ray_process(tmp_path: Path) -> None:
    """The workspace SIGKILLs an app that ignores SIGTERM for 10 s: the guardian cleans up."""
    lonely = Cluster(tmp_path)
    try:
        head = lonely.start("head", HEAD_NAME)
        wait_for(lambda: read_rendezvous(tmp_path, CLUSTER), 120, "the head rendezvous")
        head.remember_tree()
        assert len(head.seen_pids) > 5
        os.killpg(head.process.pid, signal.SIGKILL)
        head.process.wait(timeout=10)
        wait_for(lambda: not head.alive_seen_pids(), 15, "Ray processes of the killed launcher to end", 0.5)
    finally:
        lonely.stop_all()
