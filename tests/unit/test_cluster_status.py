"""`derive_status` is pure: the state word and its conditions from one observation, as a table."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from support.fakes import fake_cluster_spec

from ray_serve_cai.cluster.status import derive_status
from ray_serve_cai.cml import Application
from ray_serve_cai.config import desired_nodes

SPEC = fake_cluster_spec("st", 1)
DESIRED = desired_nodes(SPEC)
HEAD, WORKER = (n.name for n in DESIRED)


def app(name: str, status: str = "APPLICATION_RUNNING", *, spec_hash: str | None = None) -> Application:
    node = next(n for n in DESIRED if n.name == name) if name in (HEAD, WORKER) else None
    env = dict(node.environment) if node else {"RAY_CAI_CLUSTER": "st", "RAY_CAI_SPEC_HASH": "x"}
    if spec_hash is not None:
        env["RAY_CAI_SPEC_HASH"] = spec_hash
    return Application(id=f"id-{name}", name=name, subdomain=name, status=status, environment=env)


def ray(*alive: str) -> dict[str, Any]:
    return {"alive_nodes": len(alive), "nodes": [{"node_name": n, "alive": True} for n in alive]}


def conditions(status: Any) -> dict[str, tuple[bool, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


CASES = {
    "absent": ([], {}, None, "absent", {"AppsProvisioned": (False, "Missing"), "Ready": (False, "Absent")}),
    "ready": (
        [app(HEAD), app(WORKER)],
        ray(HEAD, WORKER),
        None,
        "ready",
        {
            "AppsProvisioned": (True, ""),
            "HeadReady": (True, ""),
            "RayNodesAlive": (True, ""),
            "Ready": (True, ""),
        },
    ),
    "worker missing": (
        [app(HEAD)],
        ray(HEAD),
        None,
        "pending",
        {
            "AppsProvisioned": (False, "Missing"),
            "RayNodesAlive": (False, "NotInRay"),
            "Ready": (False, "Pending"),
        },
    ),
    "worker not in Ray yet": (
        [app(HEAD), app(WORKER)],
        ray(HEAD),
        None,
        "pending",
        {"AppsProvisioned": (True, ""), "HeadReady": (True, ""), "RayNodesAlive": (False, "NotInRay")},
    ),
    "worker failed": (
        [app(HEAD), app(WORKER, "APPLICATION_FAILED")],
        ray(HEAD),
        None,
        "failed",
        {"Ready": (False, "Failed")},
    ),
    "outdated spec": (
        [app(HEAD), app(WORKER, spec_hash="old")],
        ray(HEAD, WORKER),
        None,
        "pending",
        {"AppsProvisioned": (False, "Outdated")},
    ),
    "surplus app": (
        [app(HEAD), app(WORKER), app("ray-st-worker-1")],
        ray(HEAD, WORKER),
        None,
        "pending",
        {"AppsProvisioned": (False, "Surplus")},
    ),
    "head not answering": (
        [app(HEAD), app(WORKER)],
        {},
        "head status endpoint answered HTTP 503",
        "pending",
        {"HeadReady": (False, "HeadNotAnswering"), "RayNodesAlive": (False, "NotInRay")},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_derive_status(name: str) -> None:
    apps, view, problem, state, expected = CASES[name]
    status = derive_status("st", DESIRED, apps, view, problem)
    assert status.state == state
    got = conditions(status)
    assert {k: got[k] for k in expected} == expected
    if problem:
        assert problem in status.problems
        assert any(problem in c.message for c in status.conditions)
    assert [c["type"] for c in status.as_dict()["conditions"]] == [
        "AppsProvisioned",
        "HeadReady",
        "RayNodesAlive",
        "Ready",
    ]


def test_messages_name_what_is_missing() -> None:
    status = derive_status("st", DESIRED, [app(HEAD)], ray(HEAD))
    messages = {c.type: c.message for c in status.conditions}
    assert WORKER in messages["AppsProvisioned"] and WORKER in messages["RayNodesAlive"]
    assert "1/2 alive in Ray" in messages["RayNodesAlive"]


def test_a_previous_incarnations_raylet_does_not_count_for_a_restarted_worker() -> None:
    """Right after a worker's application started again, Ray may still count its old raylet alive
    under the same node name (until its health checks fail): that node started before the app did."""
    started = datetime(2026, 12, 6, 20, 0, 0, tzinfo=timezone.utc)
    worker = app(WORKER).model_copy(update={"starting_at": started})
    at = started.timestamp()

    def view(worker_started: float | None) -> dict[str, Any]:
        nodes = [{"node_name": HEAD, "alive": True, "started_at": at - 600},
                 {"node_name": WORKER, "alive": True, "started_at": worker_started}]  # fmt: skip
        return {"alive_nodes": 2, "nodes": nodes}

    old = derive_status("st", DESIRED, [app(HEAD), worker], view(at - 120))
    assert old.state == "pending" and not next(n for n in old.nodes if n.name == WORKER).in_ray
    assert conditions(old)["RayNodesAlive"] == (False, "NotInRay")
    # This incarnation's raylet (its start a little before CML's `starting_at` is clock skew), or a
    # head that does not give start times: counted.
    for worker_started in (at + 5, at - 3, None):
        assert derive_status("st", DESIRED, [app(HEAD), worker], view(worker_started)).state == "ready"
