"""End to end, in pods: Ray Serve on a real local cluster, reached through its Serve endpoint — the
example from its README after `ray-cai deploy --local`, changes applied in place, new code rolled out
under steady traffic, a head restart and a broken rollout that the old replicas ride through.

One module-scoped cluster (head + 1 worker, each in its own pod) deployed by `ray-cai deploy --local`
from a clone whose `ray_cluster_config.yaml` names `examples/serve/serve_config.yaml`:

- the README, as written: `ray-cai serve status --local --json` gives the URL (the Serve gateway's
  application), `POST ${URL}iris/predict` answers — the setup job installed scikit-learn from the
  project's `requirements.txt`; 20 concurrent requests are batched by `@serve.batch`, a stream
  arrives token by token, WebSockets pass; `serve status` counts the running replicas;
- a second `up` makes no Serve PUT (Serve's own `last_deployed_time_s` does not move); a
  `num_replicas`/`user_config` change is applied in place: no application created or deleted, the
  running replicas are kept;
- a commit that changes the application's code, deployed while ~20 requests/s go through the
  endpoint: Serve replaces the replicas (new ids) and the new code answers; failed requests are counted
  (0 is the goal) and the p99 printed;
- the head killed under the same load while `up --watch` supervises, with head fault tolerance
  (issue 23: workers ride through a head restart; skipped while the cluster has none): the endpoint
  keeps answering from the worker, and Serve's recovered controller is not re-applied
  (`last_deployed_time_s` unchanged);
- a commit whose replicas fail to start, deployed under the same load: the deploy fails, the old
  replicas keep answering, `serve status` shows Serve's message and exits 1, and `ray-cai status`
  is not ready and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.cli import APP_CREATE_DELETE_ROUTES, local_env
from support.fakes import RAY_CAI, clone_with_small_cluster, git, run_cli, wait_until

from ray_serve_cai.workspace.testing import WorkspaceHandle

CLUSTER = "roll"
PROJECT = "ray-cai-serve-rollout"
HEAD = f"ray-{CLUSTER}-head"
SAMPLE = {"features": [5.1, 3.5, 1.4, 0.2]}  # a setosa
VIRGINICA = {"features": [6.7, 3.0, 5.2, 2.3]}
IRIS = Path("examples/serve/iris.py")
RATE_PER_SECOND = 20.0

pytestmark = pytest.mark.xdist_group("ray-3")  # with the head-FT and pods modules (tests/ray/conftest.py)


@dataclass
class Deployed:
    repo: Path
    env: dict[str, str]
    workspace: WorkspaceHandle

    def ray_cai(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return run_cli(list(args), cwd=self.repo, env=self.env, timeout=timeout)

    def serve_status(self) -> dict[str, Any]:
        """`ray-cai serve status --local --json`, as the README runs it (exit 1 allowed: a failed app)."""
        proc = self.ray_cai("serve", "status", "--local", "--json", timeout=120)
        assert proc.returncode in (0, 1), proc.stderr
        return dict(json.loads(proc.stdout))

    def cli_json(self, *args: str, code: int | None = 0) -> dict[str, Any]:
        """`ray-cai <args> --local --json` from the clone (exit `code` asserted unless None)."""
        proc = self.ray_cai(*args, "--local", "--json")
        assert code is None or proc.returncode == code, (
            f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        )
        return dict(json.loads(proc.stdout))

    def commit(self, message: str, edit: Any) -> None:
        path = self.repo / IRIS
        path.write_text(edit(path.read_text()))
        git(self.repo, "commit", "-qam", message)

    def apps(self) -> dict[str, dict[str, Any]]:
        projects = self.workspace.api_ok("GET", "/api/v2/projects")["projects"]
        project = next(p for p in projects if p["name"] == PROJECT)
        listed = self.workspace.api_ok("GET", f"/api/v2/projects/{project['id']}/applications")
        return {app["subdomain"]: app for app in listed["applications"]}

    def http(self, url: str) -> httpx.Client:
        return httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {self.workspace.api_key}"},
            timeout=60,
            trust_env=False,
        )

    def details(self) -> dict[str, Any]:
        """Serve's own view of the iris application (GET /api/serve/applications/ through the head's
        app URL)."""
        with self.http(self.apps()[HEAD]["url"]) as client:
            response = client.get("/api/serve/applications/")
        response.raise_for_status()
        return dict(response.json()["applications"]["iris"])

    def replicas(self) -> dict[str, str]:
        """The iris replicas' ids and states, as Serve gives them."""
        return {
            r["replica_id"]: r["state"] for r in self.details()["deployments"]["IrisClassifier"]["replicas"]
        }


@pytest.fixture(scope="module")
def deployed(pods_workspace: WorkspaceHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    repo = clone_with_small_cluster(tmp_path_factory.mktemp("rollout") / "repo", CLUSTER, workers=1)
    config = repo / "ray_cluster_config.yaml"
    config.write_text(config.read_text() + "  serve: {config: examples/serve/serve_config.yaml}\n")
    git(repo, "commit", "-qam", "e2e: a cluster with Serve")
    env = local_env(pods_workspace, CML_PROJECT_NAME=PROJECT, FORCE_REBUILD="false")
    cluster = Deployed(repo, env, pods_workspace)
    try:
        started = time.monotonic()
        proc = cluster.ray_cai("deploy", "--local", "--json")
        assert proc.returncode == 0, f"deploy failed:\n{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}"
        print(f"\ndeploy --local with Serve: {time.monotonic() - started:.1f}s")
        yield cluster
    finally:
        cluster.ray_cai("down", "--local", timeout=300)


class Load:
    """Requests at a steady rate through the endpoint, in a thread; each outcome kept with its time."""

    def __init__(self, url: str, api_key: str, rate: float = RATE_PER_SECOND) -> None:
        self.url, self.rate = url + "iris/predict", rate
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.results: list[tuple[float, float, str]] = []  # (sent at, seconds, "ok" or what failed)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(headers=self.headers, timeout=30, trust_env=False) as client:
            next_at = time.monotonic()
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(self.url, json=SAMPLE)
                    ok = response.status_code == 200 and response.json().get("species") == "setosa"
                    outcome = "ok" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
                except (httpx.HTTPError, ValueError) as error:
                    outcome = f"{type(error).__name__}: {error}"
                self.results.append((sent, time.monotonic() - sent, outcome))
                next_at += 1.0 / self.rate
                self.stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def report(self, what: str) -> list[str]:
        """Print the window's figures; the failures (what each was)."""
        failed = [outcome for _, _, outcome in self.results if outcome != "ok"]
        times = sorted(seconds for _, seconds, _ in self.results)
        p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))] if times else float("nan")
        span = self.results[-1][0] - self.results[0][0] if len(self.results) > 1 else 0.0
        rate = len(self.results) / max(span, 1)
        print(
            f"{what}: {len(self.results)} requests in {span:.0f}s ({rate:.1f}/s), {len(failed)} failed,"
            f" p50 {statistics.median(times) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
        )
        return failed


def predict(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("iris/predict", json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_the_example_answers_as_its_readme_says_batches_streams_and_passes_websockets(
    deployed: Deployed,
) -> None:
    status = deployed.serve_status()
    url = status["url"]
    assert url.endswith("/serve/") and HEAD not in url, url
    iris = status["applications"]["iris"]
    assert (iris["status"], iris["route_prefix"]) == ("RUNNING", "/iris"), iris
    assert iris["deployments"]["IrisClassifier"]["replicas"] == {"RUNNING": 2}
    response = httpx.post(  # the README's request, as written
        url + "iris/predict",
        json=SAMPLE,
        headers={"Authorization": f"Bearer {deployed.workspace.api_key}", "content-type": "application/json"},
        timeout=60,
        trust_env=False,
    )
    assert response.status_code == 200, response.text
    assert response.json()["species"] == "setosa"

    with deployed.http(url) as client:
        bodies = [SAMPLE if i % 2 else VIRGINICA for i in range(20)]
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda b: predict(client, b), bodies))
        assert [a["species"] for a in answers] == ["setosa" if i % 2 else "virginica" for i in range(20)]
        print(f"\n20 concurrent requests: batch sizes {sorted(a['batch_size'] for a in answers)}")
        assert max(a["batch_size"] for a in answers) > 1, "@serve.batch never batched concurrent requests"

        # A token stream arrives token by token: chunks spread over the generation time.
        arrivals: list[tuple[float, bytes]] = []
        started = time.monotonic()
        with client.stream("POST", "iris/stream", json=VIRGINICA) as streamed:
            assert streamed.status_code == 200
            for chunk in streamed.iter_raw():
                arrivals.append((time.monotonic() - started, chunk))
        text = b"".join(c for _, c in arrivals).decode()
        assert text.startswith("This flower is most likely virginica"), text
        first, last = arrivals[0][0], arrivals[-1][0]
        print(f"stream: {len(arrivals)} chunks, first after {first:.2f}s, last after {last:.2f}s")
        assert len(arrivals) >= 4 and last - first >= 0.15, f"the stream arrived at once: {arrivals}"

    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {deployed.workspace.api_key}"}
    with connect(
        url.replace("http://", "ws://") + "iris/ws", additional_headers=headers, open_timeout=30
    ) as ws:
        for body, species in ((SAMPLE, "setosa"), (VIRGINICA, "virginica")):
            ws.send(json.dumps(body))
            assert json.loads(ws.recv(timeout=30))["species"] == species


def test_second_up_makes_no_serve_put_and_a_replica_change_applies_in_place(deployed: Deployed) -> None:
    before = deployed.details()
    again = deployed.cli_json("up")
    assert again["plan"]["actions"] == []
    assert deployed.details()["last_deployed_time_s"] == before["last_deployed_time_s"], (
        "an unchanged config was PUT again"
    )

    replicas_before = set(deployed.replicas())
    # A copy outside the application's directory (a file in it is part of the code: a new digest would
    # replace the replicas), named by the cluster config; both uncommitted: `up` reads the working tree.
    example = (deployed.repo / "examples/serve/serve_config.yaml").read_text()
    scaled = deployed.repo / "serve_scaled.yaml"
    scaled.write_text(
        example.replace("num_replicas: 2", "num_replicas: 3").replace(
            "token_delay_s: 0.05", "token_delay_s: 0.02"
        )
    )
    config = deployed.repo / "ray_cluster_config.yaml"
    original = config.read_text()
    config.write_text(original.replace("examples/serve/serve_config.yaml", scaled.name))
    try:
        deployed.workspace.reset_counters()
        applied = deployed.cli_json("up")
        counts = deployed.workspace.counters()["counts"]
        assert sum(int(counts.get(route, 0)) for route in APP_CREATE_DELETE_ROUTES) == 0, counts
        assert applied["plan"]["actions"] == []
        assert deployed.details()["last_deployed_time_s"] > before["last_deployed_time_s"]
        wait_until(
            lambda: list(deployed.replicas().values()).count("RUNNING") == 3,
            timeout=120,
            interval=1,
            what="3 running replicas",
        )
        now = set(deployed.replicas())
        assert replicas_before <= now, f"replicas were replaced, not added: {replicas_before} → {now}"
    finally:
        config.write_text(original)
        scaled.unlink()
    restored = deployed.cli_json("up")
    iris = restored["status"]["serve"]["applications"]["iris"]
    assert iris["deployments"]["IrisClassifier"]["target_num_replicas"] == 2, iris


def test_new_code_rolls_out_in_place_while_requests_keep_being_answered(deployed: Deployed) -> None:
    status = deployed.serve_status()
    before = status["applications"]["iris"]["last_deployed_time_s"]
    deployed.commit(
        "iris: answers carry a version",
        lambda text: text.replace('"batch_size": len(samples),', '"batch_size": len(samples), "version": 2,'),
    )
    with Load(status["url"], deployed.workspace.api_key) as load:
        time.sleep(3)
        proc = deployed.ray_cai("deploy", "--local", "--json")
        time.sleep(3)
    failed = load.report("new code rolled out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = deployed.serve_status()
    assert after["applications"]["iris"]["status"] == "RUNNING"
    assert after["applications"]["iris"]["last_deployed_time_s"] > before, "the new code was not applied"
    answer = httpx.post(
        after["url"] + "iris/predict",
        json=SAMPLE,
        headers={"Authorization": f"Bearer {deployed.workspace.api_key}"},
        timeout=60,
        trust_env=False,
    ).json()
    assert answer.get("version") == 2, f"the old code still answers: {answer}"
    assert not failed, f"{len(failed)} requests failed during the rollout: {failed[:5]}"


def test_serve_keeps_answering_while_the_head_restarts(deployed: Deployed) -> None:
    cluster = json.loads(deployed.ray_cai("status", "--local", "--json", timeout=120).stdout or "{}")
    fault_tolerance = (cluster.get("status") or cluster).get("head_fault_tolerance") or {}
    if not fault_tolerance.get("enabled"):
        pytest.skip("needs head fault tolerance (issue 23): without it every worker restarts with the head")
    status = deployed.serve_status()
    before = status["applications"]["iris"]["last_deployed_time_s"]
    deployed.workspace.set_restart_policy(enabled=True, delay_seconds=2)
    watch = subprocess.Popen(
        [*RAY_CAI, "up", "--watch", "--interval", "2", "--local"],
        cwd=deployed.repo,
        env=deployed.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Load(status["url"], deployed.workspace.api_key) as load:
            time.sleep(3)
            projects = deployed.workspace.api_ok("GET", "/api/v2/projects")["projects"]
            project = next(p for p in projects if p["name"] == PROJECT)
            apps = deployed.workspace.api_ok("GET", f"/api/v2/projects/{project['id']}/applications")
            head = next(a for a in apps["applications"] if a["subdomain"] == f"ray-{CLUSTER}-head")
            for process in deployed.workspace.api_ok("GET", "/_workspace/processes")["processes"]:
                if process["workload_id"] == head["id"]:
                    # Killing the pod's init ends every process of the pod: a later one may be gone.
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(process["pid"]), signal.SIGKILL)

            recovered = deployed.cli_json("status", "--wait", "600", code=None)
            assert recovered["state"] == "ready", f"not ready after the head kill: {recovered}"
            time.sleep(5)
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=60)
        deployed.workspace.set_restart_policy(enabled=False)
    failed = load.report("head restart")
    after = deployed.serve_status()["applications"]["iris"]
    assert after["status"] == "RUNNING"
    assert after["last_deployed_time_s"] == before, "Serve's config was applied again after the head restart"
    assert not failed, f"{len(failed)} requests failed while the head restarted: {failed[:5]}"


def test_a_rollout_whose_replicas_fail_keeps_the_old_ones_serving(deployed: Deployed) -> None:
    status = deployed.serve_status()
    deployed.commit(
        "iris: a replica that cannot start",
        lambda text: text.replace(
            "    def __init__(self) -> None:\n",
            '    def __init__(self) -> None:\n        raise RuntimeError("broken on purpose")\n',
        ),
    )
    with Load(status["url"], deployed.workspace.api_key) as load:
        proc = deployed.ray_cai("deploy", "--local", "--json")

        def failed_in_serve() -> bool:
            iris = deployed.serve_status()["applications"]["iris"]
            return iris["status"] in ("DEPLOY_FAILED", "UNHEALTHY")

        wait_until(failed_in_serve, timeout=300, interval=2, what="Serve to give up on the broken replicas")
        time.sleep(3)
    failed = load.report("failing rollout")
    assert proc.returncode != 0, "a deploy whose Serve application failed reported success"
    iris = deployed.serve_status()["applications"]["iris"]
    messages = iris["message"] + " ".join(d["message"] for d in iris["deployments"].values())
    print(f"serve status: {iris['status']}: {messages[-300:]}")
    assert "broken on purpose" in messages, messages
    assert not failed, f"{len(failed)} requests failed while the new replicas failed: {failed[:5]}"
    assert deployed.ray_cai("serve", "status", "--local", timeout=120).returncode == 1
    cluster_status = deployed.ray_cai("status", "--local", timeout=120)
    assert cluster_status.returncode == 1, cluster_status.stdout
    said = cluster_status.stdout + cluster_status.stderr
    assert "serve application 'iris': " in said, said  # the problem, named
