"""CMLNodeProvider against the real local workspace, driven the way Ray's autoscaler drives it
(`non_terminated_nodes` → `create_node`/`terminate_node` → `post_process`), without Ray running.

The cluster's head and workers are fake nodes (tests/support/apps/fake_ray_node.py): the provider only talks
to the CML API, so Ray is not the point here; tests/ray/test_autoscale_e2e.py runs the real thing.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE
from support.fakes import FAKE_NODE_SCRIPT, FAULTS, app_environment, client_for, fake_project

from ray_serve_cai.autoscale import CMLNodeProvider, workload_settings
from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.cml import CMLClient, CMLError, CMLSettings
from ray_serve_cai.config import (
    ConfigError,
    node_id_resource,
    validate_cluster_spec,
    worker_node,
)
from ray_serve_cai.config.autoscaling import decision_path, ray_autoscaling_config
from ray_serve_cai.workspace.testing import WorkspaceHandle

CLUSTER = "prov"
LIST = "GET /api/v2/projects/{project_id}/applications"
CREATE = "POST /api/v2/projects/{project_id}/applications"


def autoscaled_spec(max_replicas: int = 2) -> Any:
    return validate_cluster_spec(
        {
            "name": CLUSTER,
            "head": {"cpu": 1, "memory": 1, "ray_cpus": 0},
            "worker_groups": [
                {
                    "name": "worker",
                    "replicas": 0,
                    "min_replicas": 0,
                    "max_replicas": max_replicas,
                    "cpu": 1,
                    "memory": 1,
                }
            ],
            "ports": {"gcs": 0, "client": 0, "dashboard": 0},
            "head_script": FAKE_NODE_SCRIPT,
            "worker_script": FAKE_NODE_SCRIPT,
            "autoscaling": {"idle_timeout": 20},
        }
    )


class Env:
    def __init__(self, workspace: WorkspaceHandle, project_id: str) -> None:
        self.workspace = workspace
        self.project_id = project_id
        self.spec = autoscaled_spec()
        self.project_dir = workspace.project_dir(project_id)
        self.effective = self.spec

    def provider(self, *, retry_deadline: float = 5.0) -> CMLNodeProvider:
        settings = CMLSettings(
            host=self.workspace.url,
            api_key=self.workspace.api_key,
            project_id=self.project_id,
            retry_deadline=retry_deadline,
        )
        config = ray_autoscaling_config(self.spec, project_dir=self.project_dir)
        return CMLNodeProvider(config["provider"], CLUSTER, client=CMLClient(settings))

    def apps(self) -> list[dict[str, Any]]:
        """Every app of the project; retried, because faults may be on."""
        path = f"/api/v2/projects/{self.project_id}/applications"
        for _ in range(100):
            try:
                response = self.workspace.api("GET", path, params={"page_size": 1000})
            except httpx.TransportError:  # an injected reset
                continue
            if response.status_code == 200:
                return list(response.json()["applications"])
        raise AssertionError("could not list the apps")

    def workers(self) -> list[str]:
        return sorted(
            a["subdomain"] for a in self.apps() if a["subdomain"].startswith(f"ray-{CLUSTER}-worker-")
        )


@pytest.fixture
def env(controls: WorkspaceHandle, project_files: Path) -> Iterator[Env]:
    with (
        fake_project(controls, "autoscale-provider", project_files) as project,
        client_for(controls) as client,
    ):
        environment = Env(controls, project["id"])
        cluster = RayCluster(client, project["id"], environment.spec, poll_interval=0.2)
        cluster.up(timeout=60)
        environment.effective = cluster.effective_spec()  # runtimes chosen: what the head applied
        yield environment


def update(provider: CMLNodeProvider, create: int = 0, delete: list[str] | None = None) -> list[str]:
    """One autoscaler update as StandardAutoscaler runs it; returns the node ids it read."""
    nodes = provider.non_terminated_nodes({})
    if provider.safe_to_scale():
        if create:
            provider.create_node({}, {TAG_RAY_USER_NODE_TYPE: "worker"}, create)
        for node_id in delete or []:
            provider.terminate_node(node_id)
    provider.post_process()
    return nodes


def worker_ids(provider: CMLNodeProvider) -> dict[str, str]:
    """name → node id of the workers the provider reports."""
    return {
        provider._apps[node_id].subdomain or "": node_id
        for node_id in provider.non_terminated_nodes({})
        if provider.node_tags(node_id)[TAG_RAY_NODE_KIND] != NODE_KIND_HEAD
    }


def test_provider_creates_apps_as_up_does_reads_once_per_update_and_deletes_at_once(env: Env) -> None:
    provider = env.provider()
    workspace = env.workspace

    workspace.reset_counters()
    nodes = update(provider)
    counts = workspace.counters()["counts"]
    assert counts == {LIST: 1}, counts  # one list call, nothing else, when nothing changes
    (head,) = nodes
    assert provider.node_tags(head)[TAG_RAY_NODE_KIND] == NODE_KIND_HEAD
    assert provider.internal_ip(head) == str(node_id_resource(f"ray-{CLUSTER}-head"))

    # The autoscaler asks for 3 workers of a group with max 2: exactly 2 apps, created as `up` would.
    update(provider, create=3)
    assert env.workers() == ["ray-prov-worker-0", "ray-prov-worker-1"]
    by_name = {a["subdomain"]: a for a in env.apps()}
    for index in (0, 1):
        node = worker_node(env.effective, "worker", index)
        app = by_name[node.name]
        assert app_environment(app) == node.environment
        assert (app["script"], float(app["cpu"]), float(app["memory"])) == (
            node.script,
            node.cpu,
            node.memory,
        )
    decision = provider.decision
    assert decision["desired"] == {"worker": 2} and decision["created"] == [
        "ray-prov-worker-0",
        "ray-prov-worker-1",
    ]
    assert decision_path(env.project_dir, CLUSTER).is_file()

    # Both are nodes of type `worker`, matched to Ray by NODE_ID_AS_RESOURCE; more demand adds none.
    ids = worker_ids(provider)
    assert {provider.internal_ip(i) for i in ids.values()} == {str(node_id_resource(n)) for n in ids}
    assert all(provider.node_tags(i)[TAG_RAY_USER_NODE_TYPE] == "worker" for i in ids.values())
    workspace.reset_counters()
    update(provider, create=1)
    assert env.workers() == ["ray-prov-worker-0", "ray-prov-worker-1"]
    assert CREATE not in workspace.counters()["counts"]

    # `up` meanwhile keeps the autoscaler's two workers (min 0 would allow none).
    with client_for(workspace) as client:
        assert RayCluster(client, env.project_id, env.spec).plan().is_noop
        with pytest.raises(ConfigError, match="autoscaled"):
            env.spec.with_replicas(1)

    # A deleted worker is gone from the very next read; the next create takes the lowest free index.
    provider.non_terminated_nodes({})
    provider.terminate_node(ids["ray-prov-worker-0"])
    provider.post_process()
    assert ids["ray-prov-worker-0"] not in provider.non_terminated_nodes({})
    assert env.workers() == ["ray-prov-worker-1"]
    update(provider, create=1)
    assert env.workers() == ["ray-prov-worker-0", "ray-prov-worker-1"]

    ids = worker_ids(provider)
    update(provider, delete=list(ids.values()))
    assert env.workers() == [] and worker_ids(provider) == {}


def test_a_failed_create_backs_off_and_a_failed_list_decides_nothing(env: Env) -> None:
    provider = env.provider(retry_deadline=0.5)
    workspace = env.workspace
    every_call_fails = {"error_rate": 1.0, "statuses": [503], "paths": f"/api/v2/projects/{env.project_id}/"}

    # A failed list: nothing is decided on old data.
    workspace.set_faults(**every_call_fails)
    try:
        provider.non_terminated_nodes({})
    finally:
        workspace.clear_faults()
    assert not provider.safe_to_scale()

    # The create fails (503: its outcome is unknown) and so does the look that would settle it.
    provider.non_terminated_nodes({})
    assert provider.safe_to_scale()
    provider.create_node({}, {TAG_RAY_USER_NODE_TYPE: "worker"}, 1)
    workspace.set_faults(**every_call_fails)
    try:
        provider.post_process()
    finally:
        workspace.clear_faults()
    assert env.workers() == []
    assert provider.decision["created"] == [] and "ray-prov-worker-0" in provider.decision["errors"][0]

    # Right after, the group backs off instead of hammering the API.
    workspace.reset_counters()
    update(provider, create=1)
    assert CREATE not in workspace.counters()["counts"]
    assert "backing off" in " ".join(provider.decision["errors"])

    # After the backoff the create goes through. worker-0 may have been created: its name stayed
    # reserved until a list showed it was not (observe before repeating), then it is reused.
    provider._backoff["worker"].not_before = 0.0
    update(provider, create=1)
    assert env.workers() == ["ray-prov-worker-0"]


def test_under_injected_faults_no_duplicate_no_leak_never_above_max(env: Env) -> None:
    """20 % of the API requests fail (plus lost create answers); the autoscaler keeps asking for
    more and fewer workers. At every step the group holds at most max apps, names are unique; at the
    end, once it asks for none, none is left."""
    provider = env.provider(retry_deadline=2.0)
    workspace = env.workspace
    workspace.set_faults(**FAULTS, seed=12)
    seen_max = 0
    try:
        for step in range(24):
            if step % 6 < 3:
                update(provider, create=2)
            else:
                ids = worker_ids(provider) if provider.safe_to_scale() else {}
                update(provider, delete=list(ids.values())[:1])
            names = [a["subdomain"] for a in env.apps()]
            counts = Counter(names)
            assert all(n == 1 for n in counts.values()), counts
            workers = [n for n in names if n.startswith(f"ray-{CLUSTER}-worker-")]
            assert len(workers) <= 2, workers
            seen_max = max(seen_max, len(workers))
        injected = workspace.api_ok("GET", "/_workspace/faults")["injected"]
    finally:
        workspace.clear_faults()
    assert sum(injected.values()) >= 5, injected  # the faults really happened
    assert seen_max == 2
    # Faults off: the autoscaler removes every worker it sees; nothing leaks.
    deadline = time.monotonic() + 60
    while env.workers() and time.monotonic() < deadline:
        ids = worker_ids(provider)
        update(provider, delete=list(ids.values()))
        time.sleep(0.2)
    assert env.workers() == []


def test_workload_settings_take_only_the_workloads_own_key() -> None:
    env = {
        "CDSW_API_URL": "http://127.0.0.1:9/api/v1",
        "CDSW_APIV2_KEY": "workload-key",
        "CDSW_PROJECT_ID": "p1",
        "CML_HOST": "https://elsewhere.example",
        "CML_API_KEY": "user-key",
    }
    settings = workload_settings(env)
    assert (settings.host, settings.api_key.get_secret_value(), settings.project_id) == (
        "http://127.0.0.1:9",
        "workload-key",
        "p1",
    )
    with pytest.raises(CMLError, match="CDSW_APIV2_KEY") as caught:
        workload_settings({"CDSW_DOMAIN": "ml.example", "CDSW_PROJECT_ID": "p"})
    assert "workload-key" not in str(caught.value)


def test_new_bounds_from_up_reach_the_provider_and_rays_config_without_a_restart(env: Env) -> None:
    provider = env.provider()
    update(provider)
    config_file = env.project_dir / ".ray-cai" / CLUSTER / "autoscaling.json"
    head_id = next(a["id"] for a in env.apps() if a["subdomain"] == f"ray-{CLUSTER}-head")

    # `up` with max 3: the applied spec on the head changes, nothing restarts.
    with client_for(env.workspace) as client:
        plan, _ = RayCluster(client, env.project_id, autoscaled_spec(max_replicas=3)).up(wait=False)
    assert plan.actions == ()
    assert next(a for a in env.apps() if a["subdomain"] == f"ray-{CLUSTER}-head")["id"] == head_id

    update(provider, create=5)
    assert env.workers() == [f"ray-{CLUSTER}-worker-{i}" for i in range(3)]
    ray_config = json.loads(config_file.read_text())
    assert ray_config["available_node_types"]["worker"]["max_workers"] == 3 and ray_config["max_workers"] == 3
