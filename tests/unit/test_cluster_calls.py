"""What `RayCluster` asks of CML, counted against a scripted API (pure: httpx's MockTransport, no
process, no socket): a no-op `up` is one list call, and `wait_until_ready` makes exactly one list
call per poll — also on the path where it replaces a node that runs but never joins Ray.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import pytest
from support.fakes import fake_cluster_spec

from ray_serve_cai.cluster import ClusterError, RayCluster
from ray_serve_cai.cluster.applied import APPLIED_SPEC_VAR, ClusterRequest, new_record
from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.config import desired_nodes

RUNTIME = "docker.example/ml-runtime-pbj-workbench-python3.11-standard:2025.09.1-b5"
APPS = "/api/v2/projects/p1/applications"


class ScriptedCML:
    """The CML API for one project, as far as a pass uses it, plus each app's status pages."""

    def __init__(self, workers: int, *, in_ray: set[str], provisioned: bool = True) -> None:
        spec = fake_cluster_spec("calls", workers, startup_timeout=2)
        self.request = ClusterRequest(spec, spec, source="up", commit="c" * 40, by="t@h")
        effective = spec.model_copy(
            update={
                "head": spec.head.model_copy(update={"runtime_identifier": RUNTIME}),
                "worker_groups": [
                    g.model_copy(update={"runtime_identifier": RUNTIME}) for g in spec.worker_groups
                ],
            }
        )
        runtimes = {"head": RUNTIME, **{g.name: RUNTIME for g in spec.worker_groups}}
        at = "2026-12-06T07:00:00+00:00"
        record = new_record(spec, runtimes, self.request, at=at, provisioned_at=at if provisioned else None)
        self.apps: dict[str, dict[str, Any]] = {}
        for node in desired_nodes(effective):
            env = dict(node.environment)
            if node.role == "head":
                env[APPLIED_SPEC_VAR] = record.encode()
            self.apps[node.name] = {
                "id": f"id-{node.name}",
                "name": node.name,
                "subdomain": node.name,
                "status": "APPLICATION_RUNNING",
                "runtime_identifier": RUNTIME,
                "environment": json.dumps(env),
            }
        self.in_ray = in_ray
        self.calls: Counter[str] = Counter()

    def handle(self, request: httpx.Request) -> httpx.Response:
        host, path, method = request.url.host, request.url.path, request.method
        if host != "h.example":  # an application URL: https://<subdomain>.h.example
            subdomain = host.split(".")[0]
            self.calls[f"{method} app {path}"] += 1
            if path == "/ray-cai/status":
                nodes = [{"node_name": n, "alive": True} for n in sorted(self.in_ray)]
                return httpx.Response(
                    200, json={"ray_running": True, "alive_nodes": len(nodes), "nodes": nodes}
                )
            return httpx.Response(
                200, json={"role": "worker", "node_name": subdomain, "last_error": "bind failed"}
            )
        self.calls[f"{method} {path}"] += 1
        if method == "GET" and path == APPS:
            return httpx.Response(200, json={"applications": list(self.apps.values()), "next_page_token": ""})
        if method == "POST" and path == APPS:  # the lock
            body = json.loads(request.content)
            app = {**body, "id": f"id-{body['subdomain']}", "status": "APPLICATION_STARTING"}
            app["environment"] = json.dumps(body.get("environment") or {})
            self.apps[body["subdomain"]] = app
            return httpx.Response(200, json=app)
        if method == "DELETE" and path.startswith(APPS + "/"):
            app_id = path.rsplit("/", 1)[1]
            self.apps = {k: v for k, v in self.apps.items() if v["id"] != app_id}
            return httpx.Response(200, json={})
        if method == "PATCH" and path.startswith(APPS + "/"):
            app = next(a for a in self.apps.values() if a["id"] == path.rsplit("/", 1)[1])
            app.update(
                {
                    k: v if isinstance(v, str) else json.dumps(v) if k == "environment" else v
                    for k, v in json.loads(request.content).items()
                }
            )
            return httpx.Response(200, json=app)
        if method == "POST" and path.endswith(":restart"):
            return httpx.Response(200, json={})
        return httpx.Response(404, json={"message": f"not scripted: {method} {path}"})

    def list_calls(self) -> int:
        return self.calls[f"GET {APPS}"]


def cluster_of(cml: ScriptedCML, **options: Any) -> RayCluster:
    settings = CMLSettings(host="https://h.example", api_key="k" * 20, retry_deadline=1)
    client = CMLClient(settings, transport=httpx.MockTransport(cml.handle))
    return RayCluster(client, "p1", cml.request, **options)


ALL_IN_RAY = {"ray-calls-head", "ray-calls-worker-0", "ray-calls-worker-1"}


def test_a_no_op_up_is_one_list_call_and_no_change() -> None:
    cml = ScriptedCML(2, in_ray=ALL_IN_RAY)
    plan, status = cluster_of(cml).up(timeout=5)
    assert plan.is_noop and status.ready
    assert cml.list_calls() == 1, cml.calls
    assert not [call for call in cml.calls if not call.startswith("GET")], cml.calls


def test_the_first_ready_latches_provisioned_with_one_patch_once() -> None:
    cml = ScriptedCML(2, in_ray=ALL_IN_RAY, provisioned=False)
    _, status = cluster_of(cml).up(timeout=5)
    assert status.ready and cml.calls[f"PATCH {APPS}/id-ray-calls-head"] == 1
    assert cml.list_calls() == 1, cml.calls
    head_env = json.loads(cml.apps["ray-calls-head"]["environment"])
    assert json.loads(head_env[APPLIED_SPEC_VAR])["provisioned_at"]
    cml.calls.clear()
    _, status = cluster_of(cml).up(timeout=5)
    assert status.ready and not [call for call in cml.calls if not call.startswith("GET")], cml.calls


def test_wait_lists_once_per_poll_also_when_it_replaces_a_node_outside_ray() -> None:
    cml = ScriptedCML(1, in_ray={"ray-calls-head"})
    polls: list[str] = []
    cluster = cluster_of(cml, poll_interval=0.05, lock_wait=1)
    with pytest.raises(ClusterError) as failure:
        cluster.wait_until_ready(timeout=1.0, on_progress=lambda status: polls.append(status.state))
    assert "ray-calls-worker-0: running but not in Ray" in str(failure.value)
    assert "bind failed" in str(failure.value)
    assert cml.calls[f"POST {APPS}/id-ray-calls-worker-0:restart"] == 1  # replaced once, half-way
    assert cml.calls[f"POST {APPS}"] == 1 and "ray-calls-lock" not in cml.apps  # the lock, released
    assert cml.list_calls() == len(polls), (cml.list_calls(), len(polls), cml.calls)
