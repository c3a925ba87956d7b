"""What was deployed is what everyone sees: the applied spec recorded on the head application.

Pure merge rules as a table, then real passes against the local workspace with fake nodes: a
deploy with an override followed by a plain `up` (nothing changes), the runtime chosen once (a newer
runtime and a caller with another Python change nothing), an old cluster without a record, a
checkout at another commit, and a secrets scan of the record.
"""

from __future__ import annotations

import json
import subprocess
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support.fakes import client_for, fake_cluster_spec, fake_project, list_apps

from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.cluster import runtimes as runtimes_module
from ray_serve_cai.cluster.applied import (
    APPLIED_SPEC_VAR,
    AppliedRecord,
    ClusterRequest,
    merge_request,
    new_record,
)
from ray_serve_cai.config import ClusterSpec, validate_cluster_spec
from ray_serve_cai.workspace.testing import WorkspaceHandle

CHANGING = ("POST", "DELETE", "PATCH", ":restart", ":stop")


def spec_with(workers: int, **head: Any) -> ClusterSpec:
    data = fake_cluster_spec("ap", workers).model_dump(mode="json")
    data["head"].update(head)
    return validate_cluster_spec(data)


def record_of(
    applied: ClusterSpec, base: ClusterSpec, overrides: dict[str, str] | None = None
) -> AppliedRecord:
    request = ClusterRequest(applied, base, overrides or {}, source="deploy")
    return new_record(applied, {"head": "rt"}, request, commit="abc")


# ------------------------------------------------------------------------------ pure merge rules


def test_a_recorded_override_stays_when_the_caller_does_not_ask() -> None:
    record = record_of(spec_with(1), spec_with(2), {"RAY_NUM_WORKERS": "1"})
    merged = merge_request(record, ClusterRequest(spec_with(2), spec_with(2)))
    assert merged.worker_groups[0].replicas == 1


def test_a_field_the_callers_file_changes_is_applied() -> None:
    record = record_of(spec_with(1), spec_with(2), {"RAY_NUM_WORKERS": "1"})
    merged = merge_request(record, ClusterRequest(spec_with(2, cpu=1.0), spec_with(2, cpu=1.0)))
    assert merged.head.cpu == 1.0  # changed in the caller's file
    assert merged.worker_groups[0].replicas == 1  # not asked for: stays as deployed


def test_an_override_is_explicit_even_when_it_equals_the_file() -> None:
    record = record_of(spec_with(1), spec_with(2), {"RAY_NUM_WORKERS": "1"})
    request = ClusterRequest(spec_with(2), spec_with(2), {"RAY_NUM_WORKERS": "2"})
    assert merge_request(record, request).worker_groups[0].replicas == 2


def test_a_new_size_from_scale_is_explicit() -> None:
    record = record_of(spec_with(1), spec_with(2), {"RAY_NUM_WORKERS": "1"})
    request = ClusterRequest(spec_with(2), spec_with(2)).with_replicas(2, None)
    assert merge_request(record, request).worker_groups[0].replicas == 2


def test_without_a_record_the_request_is_the_target() -> None:
    assert merge_request(None, ClusterRequest(spec_with(3))).worker_groups[0].replicas == 3


def test_a_group_added_by_someone_else_is_kept() -> None:
    data = spec_with(1).model_dump(mode="json")
    data["worker_groups"].append({**data["worker_groups"][0], "name": "extra"})
    with_extra = validate_cluster_spec(data)
    record = record_of(with_extra, with_extra)
    merged = merge_request(record, ClusterRequest(spec_with(1)))  # this caller's file lacks it
    assert [g.name for g in merged.worker_groups] == ["worker"]  # the base had it: the caller removed it
    record = record_of(with_extra, spec_with(1))  # added by another caller's explicit ask
    merged = merge_request(record, ClusterRequest(spec_with(1)))
    assert [g.name for g in merged.worker_groups] == ["worker", "extra"]


# ------------------------------------------------------------------------------ against the workspace


def changing_calls(workspace: WorkspaceHandle) -> Counter[str]:
    counts = workspace.counters()["counts"]
    return Counter({k: v for k, v in counts.items() if any(m in k for m in CHANGING)})


def head_env(workspace: WorkspaceHandle, project_id: str, cluster: str) -> dict[str, str]:
    head = next(a for a in list_apps(workspace, project_id) if a["subdomain"] == f"ray-{cluster}-head")
    env = head["environment"]
    return json.loads(env) if isinstance(env, str) else env


def test_override_deploy_then_plain_up_keeps_what_was_deployed(
    controls: WorkspaceHandle, project_files: Path
) -> None:
    """RAY_NUM_WORKERS=1 deploys 1 + 1; a plain caller (its file says 2) sees it ready, plans
    nothing and its `up` changes nothing. A secrets scan of the record finds nothing."""
    file_spec = fake_cluster_spec("ap", 2)
    deployed = file_spec.with_replicas(1)
    with fake_project(controls, "applied-override", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        first = RayCluster(
            client, pid, ClusterRequest(deployed, file_spec, {"RAY_NUM_WORKERS": "1"}, source="deploy")
        )
        first.poll_interval = 0.2
        _, status = first.up(timeout=60)
        assert status.ready and len(status.nodes) == 2

        record = json.loads(head_env(controls, pid, "ap")[APPLIED_SPEC_VAR])
        assert record["origin"]["overrides"] == {"RAY_NUM_WORKERS": "1"}
        assert record["origin"]["source"] == "deploy"
        assert controls.api_key not in json.dumps(record)

        plain = RayCluster(client, pid, ClusterRequest(file_spec, file_spec, {}, source="up"))
        plain.poll_interval = 0.2
        apps = plain.observe()
        assert plain.plan(apps).is_noop
        assert plain.differences(apps) == []
        status = plain.status(apps)
        assert status.ready, status.progress_line()
        assert status.applied is not None and status.applied["workers"] == {"worker": 1}

        controls.reset_counters()
        plan, status = plain.up(timeout=30)
        assert plan.is_noop and status.ready
        assert changing_calls(controls) == Counter()

        # A caller asking explicitly (an override) does change it, and says so first.
        explicit = RayCluster(client, pid, ClusterRequest(file_spec, file_spec, {"RAY_NUM_WORKERS": "2"}))
        apps = explicit.observe()
        assert [a.name for a in explicit.plan(apps).actions] == ["ray-ap-worker-1"]
        assert any("replicas: deployed 1, your config 2" in line for line in explicit.differences(apps))
        first.down()


def test_runtime_chosen_once(
    controls: WorkspaceHandle, project_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `up`, a newer runtime appears and a caller with another Python plans: nothing changes."""
    runtimes_file = controls.home / "runtimes.json"
    offered = controls.api_ok("GET", "/api/v2/runtimes", params={"page_size": 100})["runtimes"]
    with fake_project(controls, "applied-runtime", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        spec = fake_cluster_spec("rt", 1)
        cluster = RayCluster(client, pid, spec, poll_interval=0.2)
        _, status = cluster.up(timeout=60)
        assert status.ready
        chosen = {a["subdomain"]: a["runtime_identifier"] for a in list_apps(controls, pid)}
        try:
            newer = [
                {
                    **r,
                    "image_identifier": r["image_identifier"].replace("2025.09.1-b5", "2026.11.1-b1"),
                    "full_version": "2026.11.1-b1",
                }
                for r in offered
            ]
            other_python = [
                {
                    **r,
                    "image_identifier": r["image_identifier"].replace("python3.", "python9."),
                    "kernel": "Python 9.9",
                }
                for r in offered
            ]
            runtimes_file.write_text(json.dumps(offered + newer + other_python))
            listed = controls.api_ok("GET", "/api/v2/runtimes", params={"page_size": 100})["runtimes"]
            assert len(listed) == 3 * len(offered)
            monkeypatch.setattr(
                runtimes_module,
                "sys",
                types.SimpleNamespace(version_info=types.SimpleNamespace(major=9, minor=9)),
            )
            later = RayCluster(client, pid, spec, poll_interval=0.2)
            apps = later.observe()
            assert later.plan(apps).is_noop
            assert later.status(apps).ready
            assert {a["subdomain"]: a["runtime_identifier"] for a in list_apps(controls, pid)} == chosen
        finally:
            runtimes_file.unlink(missing_ok=True)
            cluster.down()


def test_an_old_cluster_without_a_record_works_and_gets_one(
    controls: WorkspaceHandle, project_files: Path
) -> None:
    with fake_project(controls, "applied-old", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        cluster = RayCluster(client, pid, fake_cluster_spec("old", 1), poll_interval=0.2)
        assert cluster.up(timeout=60)[1].ready
        head = next(a for a in list_apps(controls, pid) if a["subdomain"] == "ray-old-head")
        env = head_env(controls, pid, "old")
        env.pop(APPLIED_SPEC_VAR)  # as the previous version left it
        controls.api_ok(
            "PATCH",
            f"/api/v2/projects/{pid}/applications/{head['id']}",
            json={"environment": json.dumps(env)},
        )

        again = RayCluster(client, pid, fake_cluster_spec("old", 1), poll_interval=0.2)
        status = again.status()
        assert status.ready and status.applied is None
        controls.reset_counters()
        plan, status = again.up(timeout=30)
        assert plan.is_noop and status.ready and status.applied is not None
        assert APPLIED_SPEC_VAR in head_env(controls, pid, "old")
        calls = changing_calls(controls)
        assert sum(calls.values()) == 1 and all("PATCH" in k for k in calls), calls  # the record only
        again.down()


def test_a_checkout_at_another_commit_sees_the_difference(
    controls: WorkspaceHandle, project_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "checkout"
    repo.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "one")
    monkeypatch.chdir(repo)
    with fake_project(controls, "applied-commit", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        cluster = RayCluster(client, pid, fake_cluster_spec("cm", 1), poll_interval=0.2)
        assert cluster.up(timeout=60)[1].ready
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "two")
        wider = RayCluster(client, pid, fake_cluster_spec("cm", 2))
        lines = wider.differences(wider.observe())
        assert any(
            line.startswith("worker_groups.worker.replicas: deployed 1, your config 2") for line in lines
        )
        assert any("your checkout is at" in line for line in lines), lines
        assert any(line.startswith("deployed: ") and "by " in line for line in lines)
        cluster.down()
