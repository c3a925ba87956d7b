"""Reliability under injected faults: `up`, `scale` (up and down), `down` and `deploy`, many seeded runs.

The workspace fails 20% of API requests (500/502/503/429 or a reset connection) and loses 10% of create
responses after the create took effect. A run may fail with an error (a 500 is not retried); the test
then runs it again, as a user would, under new faults, until it succeeds. After every run, with the
faults cleared, the project must hold exactly the desired applications (no duplicate, no leaked app,
no lock left) and, for deploy, exactly the jobs of the jobs spec. A summary line gives the figures.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.fakes import (
    FAULTS,
    client_for,
    desired_names,
    fake_cluster_spec,
    fake_project,
    inventory,
    job_duplicates,
    list_apps,
)

from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.cluster.errors import LockHeld
from ray_serve_cai.cluster.lock import cluster_lock, lock_app_name
from ray_serve_cai.cml import ServerError
from ray_serve_cai.config import DeploySpec, parse_deploy_spec
from ray_serve_cai.deploy.orchestrator import DeployOptions, deploy
from ray_serve_cai.workspace.testing import WorkspaceHandle

CLUSTER_SEEDS = range(1, 7)  # 6 seeds x (up, scale up, scale down, down) = 24 runs
DEPLOY_SEEDS = range(1, 5)  # 4 seeds x (first deploy, forced re-deploy) = 8 runs
MAX_ATTEMPTS = 8
# A run whose lock release failed used to leave the lock app behind for `lock_ttl` (see
# test_lock_is_released_when_its_delete_fails_once). With True, a left lock is counted and removed the
# way the LockHeld message tells a user to, so the other properties are still measured; with False
# (now) a left lock fails the run's check.
KNOWN_LOCK_LEAK = False


@dataclass
class Tally:
    runs: int = 0
    attempts: int = 0
    retries: int = 0
    injected: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    duplicates: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    locks_left: list[str] = field(default_factory=list)

    def line(self) -> str:
        faults = sum(self.injected.values())
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.injected.items()))
        return (
            f"faults summary: runs={self.runs} attempts={self.attempts} retries={self.retries} "
            f"faults_injected={faults} ({kinds}) duplicates={len(self.duplicates)} "
            f"leaked_apps={len(self.leaked)} locks_left={len(self.locks_left)}"
        )


TALLY = Tally()


@pytest.fixture(scope="module")
def tally() -> Iterator[Tally]:
    yield TALLY
    print("\n" + TALLY.line())
    print("errors that made a run fail (then re-run):", dict(TALLY.errors.most_common()))


def run_under_faults(
    workspace: WorkspaceHandle, tally: Tally, seed: int, what: str, run: Callable[[], object]
) -> None:
    """Run `run` under faults; on an error run it again (new faults) until it succeeds."""
    tally.runs += 1
    for attempt in range(1, MAX_ATTEMPTS + 1):
        workspace.set_faults(**FAULTS, seed=seed * 1000 + attempt)
        tally.attempts += 1
        try:
            run()
        except Exception as err:
            tally.errors[f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"] += 1
            if attempt == MAX_ATTEMPTS:
                raise AssertionError(f"{what} did not converge in {MAX_ATTEMPTS} attempts: {err}") from err
            tally.retries += 1
            continue
        finally:
            tally.injected.update(workspace.api_ok("GET", "/_workspace/faults")["injected"])
            workspace.clear_faults()
            if KNOWN_LOCK_LEAK:
                remove_left_locks(workspace, tally, what, attempt)
        return


def remove_left_locks(workspace: WorkspaceHandle, tally: Tally, what: str, attempt: int) -> None:
    for project in workspace.api_ok("GET", "/api/v2/projects", params={"page_size": 1000})["projects"]:
        for app in list_apps(workspace, project["id"]):
            if app["subdomain"].endswith("-lock"):
                tally.locks_left.append(f"{what} attempt {attempt}: {app['subdomain']}")
                workspace.api_ok("DELETE", f"/api/v2/projects/{project['id']}/applications/{app['id']}")


def check_apps(
    workspace: WorkspaceHandle, tally: Tally, project_id: str, cluster: str, expected: list[str], what: str
) -> None:
    found = inventory(workspace, project_id, cluster, expected)
    tally.duplicates += [f"{what}: {d}" for d in found.duplicates]
    tally.leaked += [f"{what}: {x}" for x in found.leaked]
    tally.locks_left += [f"{what}: {x}" for x in found.locks]
    if KNOWN_LOCK_LEAK:
        found.locks = []
    assert found.clean, f"after {what}: {found}"


@pytest.mark.parametrize("seed", CLUSTER_SEEDS)
def test_up_scale_down_converge_under_faults(
    seed: int, controls: WorkspaceHandle, tally: Tally, project_files: Path
) -> None:
    cluster = f"flt{seed}"
    with (
        fake_project(controls, f"faults-cluster-{seed}", project_files) as project,
        client_for(controls) as client,
    ):
        pid = project["id"]

        def converge_to(workers: int) -> Callable[[], object]:
            def run() -> object:
                rc = RayCluster(
                    client, pid, fake_cluster_spec(cluster, workers), poll_interval=0.2, lock_wait=5
                )
                _, status = rc.up(timeout=30)
                assert status.ready, status.as_dict()
                return status

            return run

        for step, workers in enumerate((1, 3, 1)):
            what = f"seed {seed} {'up' if step == 0 else 'scale'} to {workers} workers"
            run_under_faults(controls, tally, seed * 10 + step, what, converge_to(workers))
            expected = desired_names(fake_cluster_spec(cluster, workers))
            check_apps(controls, tally, pid, cluster, expected, what)

        def down() -> object:
            return RayCluster(
                client, pid, fake_cluster_spec(cluster, 1), poll_interval=0.2, lock_wait=5
            ).down()

        run_under_faults(controls, tally, seed * 10 + 9, f"seed {seed} down", down)
        check_apps(controls, tally, pid, cluster, [], f"seed {seed} down")


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.email", "faults@example.invalid"],
        ["config", "user.name", "faults"],
    ):
        subprocess.run(["git", "-C", str(path), *args], check=True)
    (path / "job_quick.py").write_text("print('job ok')\n")
    subprocess.run(["git", "-C", str(path), "add", "."], check=True)
    subprocess.run(["git", "-C", str(path), "commit", "-qm", "tiny"], check=True)
    return path


def tiny_jobs(project: str) -> DeploySpec:
    job = {"script": "job_quick.py", "cpu": 0.5, "memory": 0.5, "timeout": 60}
    return parse_deploy_spec(
        {
            "project": {"name": project},
            "jobs": {
                "first": {"name": "Quick First", **job},
                "second": {"name": "Quick Second", "parent_job_key": "first", **job},
                "third": {"name": "Quick Third", "parent_job_key": "first", **job},
            },
        },
        env={},
    )


@pytest.mark.parametrize("seed", DEPLOY_SEEDS)
def test_deploy_converges_under_faults(
    seed: int, controls: WorkspaceHandle, tally: Tally, project_files: Path, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    name = f"faults-deploy-{seed}"
    spec = tiny_jobs(name)
    job_names = [j.name for j in spec.chain_order()]
    with fake_project(controls, name, project_files) as project, client_for(controls) as client:
        for step, force in enumerate((False, True)):

            def run(force: bool = force) -> object:
                options = DeployOptions(
                    repo=repo, force=force, poll_interval=0.2, project_timeout=30, chain_timeout=60
                )
                result = deploy(client, spec, fake_cluster_spec(f"dpl{seed}", 0), options)
                assert result.succeeded, result.as_dict()
                return result

            what = f"seed {seed} deploy{' --force' if force else ''}"
            run_under_faults(controls, tally, 500 + seed * 10 + step, what, run)
            duplicates, mismatch = job_duplicates(controls, project["id"], job_names)
            tally.duplicates += [f"{what}: job {d}" for d in duplicates]
            assert not duplicates and not mismatch, (
                f"after {what}: duplicates {duplicates}, unexpected {mismatch}"
            )
            check_apps(controls, tally, project["id"], f"dpl{seed}", [], what)


def test_up_in_an_ml_runtime_project(controls: WorkspaceHandle, project_files: Path) -> None:
    """Every app of an ML Runtime project needs a runtime: the lock app too (it had none once)."""
    with (
        fake_project(controls, "faults-ml-runtime", project_files, engine="ml_runtime") as project,
        client_for(controls) as client,
    ):
        rc = RayCluster(client, project["id"], fake_cluster_spec("mlrt", 1), poll_interval=0.2, lock_wait=5)
        _, status = rc.up(timeout=30)
        assert status.ready
        rc.down()


def test_lock_is_released_when_its_delete_fails_once(controls: WorkspaceHandle, project_files: Path) -> None:
    """A release that fails once (a 500 is not retried by the client) must not leave the lock behind:
    the next run that changes something would be locked out until the lock expires."""
    with (
        fake_project(controls, "faults-lock-release", project_files) as project,
        client_for(controls) as client,
    ):
        pid = project["id"]
        try:
            with cluster_lock(client, pid, "rel", ttl=300):
                lock = next(a for a in list_apps(controls, pid) if a["subdomain"] == lock_app_name("rel"))
                # Exactly one 500, on the release DELETE of the lock app.
                controls.set_faults(
                    error_rate=1.0,
                    statuses=[500],
                    max_faults=1,
                    paths=f"/api/v2/projects/{pid}/applications/{lock['id']}",
                )
        except ServerError as err:
            pytest.fail(f"the lock release gave up after one 500: {err}")
        finally:
            controls.clear_faults()
        assert lock_app_name("rel") not in {a["subdomain"] for a in list_apps(controls, pid)}
        try:
            rc = RayCluster(client, pid, fake_cluster_spec("rel", 0), poll_interval=0.2, lock_wait=3)
            rc.up(timeout=20)
            rc.down()
        except LockHeld as err:
            pytest.fail(f"the next run is locked out by the run that failed: {err}")


def test_lock_gives_up_when_every_create_fails(
    controls: WorkspaceHandle, project_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creates that keep failing with 5xx while no lock exists must not be retried forever: the pass
    gives up after its deadline with an error that says what it waited for and the last failure."""
    import time

    from ray_serve_cai.cluster import lock as lock_module
    from ray_serve_cai.cluster.errors import ClusterError

    monkeypatch.setattr(lock_module, "FAILING_CREATE_PATIENCE", 3.0)
    with (
        fake_project(controls, "faults-lock-deadline", project_files) as project,
        client_for(controls) as client,
    ):
        pid = project["id"]
        controls.set_faults(
            error_rate=1.0, statuses=[503], only_creates=True, paths=f"/api/v2/projects/{pid}"
        )
        started = time.monotonic()
        try:
            with pytest.raises(ClusterError) as info, cluster_lock(client, pid, "dl", ttl=60, wait=1.0):
                pytest.fail("the lock was taken although every create failed")
        finally:
            controls.clear_faults()
        elapsed = time.monotonic() - started
        assert not isinstance(info.value, LockHeld)
        message = str(info.value)
        assert "could not take the lock of cluster 'dl' within 3s" in message
        assert "503" in message
        assert elapsed >= 3.0, "gave up before its patience ran out"  # how soon after: bench_deadlines.py
        assert lock_app_name("dl") not in {a["subdomain"] for a in list_apps(controls, pid)}
