"""`ray-cai run -- COMMAND...`: a cluster for one job — up, submit, follow, down.

Like KubeRay's RayJob with `shutdownAfterJobFinishes` or SkyPilot's managed jobs: the cluster the
config describes (named as the config says, or `--cluster NAME`) is brought up, the command runs on
it as a Ray job (with `--max-retries` and a `--timeout` deadline, as `job submit`), its logs are
followed, and the cluster is torn down afterwards — also when the job fails, the deadline passes, or
the user presses Ctrl-C (the job is stopped first) or the tool gets SIGTERM (a CML job's stop or
timeout). The job's record and the nodes' logs stay in the project. `--keep` leaves the cluster up.

Re-running the same command after the tool itself was killed re-attaches to the run in progress: a
run is identified by a hash of its command and config, and `.ray-cai/<cluster>/runs/<run id>.json` in
the project (written through CML's project-file API before anything starts) holds its job's id and
whether the run created the cluster. A cluster that was already up before the run is used, never
torn down.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.markup import escape

from ray_serve_cai.access.head import head_endpoint
from ray_serve_cai.access.jobs import (
    FAILED,
    STOPPED,
    JobInputError,
    JobPolicy,
    JobsClient,
    JobSubmission,
    ManagedJob,
    Outcome,
    who_submits,
)
from ray_serve_cai.cli.cluster import Progress
from ray_serve_cai.cli.cluster_open import check_serve_config
from ray_serve_cai.cli.cluster_open import project_dir as serve_project_dir
from ray_serve_cai.cli.common import (
    DEFAULT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    ConfigPath,
    LocalFlag,
    ProjectName,
    err_console,
    open_target,
    print_json,
    run_command,
)
from ray_serve_cai.cli.job import (
    DeadlineOption,
    DriverOnOption,
    MaxRetriesOption,
    build_submission,
    cluster_name,
    follow_managed,
    print_outcome,
    with_packages,
)
from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.cluster.applied import load_cluster_request
from ray_serve_cai.cml import CMLClient, CMLError, NotFound
from ray_serve_cai.config.cluster import head_app_name
from ray_serve_cai.config.history import cluster_dir
from ray_serve_cai.errors import OperationFailed

RUNS_DIR = "runs"


def run_id_of(config_text: str, cluster: str, entrypoint: str, runtime_env: str, policy: JobPolicy) -> str:
    """The run's identity: the same command with the same config is the same run (12 hex digits)."""
    key = json.dumps(
        {
            "config": config_text,
            "cluster": cluster,
            "entrypoint": entrypoint,
            "runtime_env": runtime_env,
            "max_retries": policy.max_retries,
            "timeout": policy.timeout,
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass
class RunMarker:
    """A run in progress, as recorded in the project (no secrets: ids, names, flags)."""

    run_id: str
    cluster: str
    record_id: str
    created_cluster: bool
    keep: bool
    submitter: str
    started_at: float

    @staticmethod
    def path(cluster: str, run_id: str) -> str:
        return f"{cluster_dir(cluster)}/{RUNS_DIR}/{run_id}.json"

    @classmethod
    def read(cls, client: CMLClient, project_id: str, cluster: str, run_id: str) -> RunMarker | None:
        try:
            data = json.loads(client.download_project_file(project_id, cls.path(cluster, run_id)))
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # damaged: a new run

    def write(self, client: CMLClient, project_id: str) -> None:
        content = json.dumps(asdict(self), indent=2).encode()
        client.upload_project_file(project_id, self.path(self.cluster, self.run_id), content)

    def remove(self, client: CMLClient, project_id: str) -> None:
        with contextlib.suppress(NotFound):
            client.delete_project_file(project_id, self.path(self.cluster, self.run_id))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cluster_exists(cluster: RayCluster) -> bool:
    return cluster.observe(ray=False).app(head_app_name(cluster.spec.name)) is not None


def _teardown(cluster: RayCluster, marker: RunMarker) -> None:
    if marker.keep:
        err_console.print(f"--keep: cluster {marker.cluster!r} stays up (`ray-cai down` removes it)")
        return
    if not marker.created_cluster:
        err_console.print(f"cluster {marker.cluster!r} was up before this run: it stays up")
        return
    started = time.monotonic()
    removed = cluster.down()
    err_console.print(
        f"tore down cluster {marker.cluster!r} ({len(removed)} application(s), "
        f"{time.monotonic() - started:.0f}s); its job record and node logs stay in the project "
        f"(.ray-cai/{marker.cluster}/)"
    )


def run(
    command: list[str] = typer.Argument(
        ...,
        metavar="COMMAND",
        help="The command to run on the cluster, after `--` (one quoted word is a whole shell command line).",
    ),
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    cluster: str | None = typer.Option(
        None, "--cluster", help="Name of the run's cluster (default: the name in --config)."
    ),
    keep: bool = typer.Option(False, "--keep", help="Leave the cluster up after the job ends."),
    max_retries: int = MaxRetriesOption,
    timeout: float | None = DeadlineOption,
    runtime_env: Path | None = typer.Option(
        None, "--runtime-env", help="YAML or JSON file with Ray's runtime_env (as `job submit`)."
    ),
    driver_on: str = DriverOnOption,
    json_out: bool = typer.Option(
        False, "--json", help="The outcome as JSON on stdout (the job's output then goes to stderr)."
    ),
) -> None:
    """Bring up a cluster from the config, run COMMAND on it as a Ray job, follow it, and tear the
    cluster down afterwards (also on failure, at the deadline, on Ctrl-C or SIGTERM: the job is stopped
    first). The job's record and the node logs stay in the project. Running the same command again
    after the tool was killed re-attaches to the run in progress. Exit 0 when the job SUCCEEDED, 1 when
    it FAILED (after its retries, or at the deadline) or was STOPPED, 2 on bad input."""

    def go() -> None:
        policy = JobPolicy(max_retries=max_retries, timeout=timeout)
        policy.validate()
        request, env = build_submission(command, runtime_env=runtime_env, driver_on=driver_on)
        name = cluster_name(config, cluster)
        overrides = {"RAY_CLUSTER_NAME": name} if cluster else {}
        cluster_request = load_cluster_request(config, env={**os.environ, **overrides}, source="up")
        check_serve_config(cluster_request.spec)
        try:
            config_text = config.read_text(encoding="utf-8")
        except OSError as err:
            raise JobInputError(f"--config: {config}: cannot read it ({type(err).__name__})") from None
        env_text = runtime_env.read_text(encoding="utf-8") if runtime_env is not None else ""
        run_id = run_id_of(config_text, name, request.entrypoint, env_text, policy)
        with open_target(local, project, create=True) as target, sigterm_as_interrupt():
            ray_cluster = RayCluster(
                target.client, target.project_id, cluster_request, project_dir=serve_project_dir()
            )
            outcome, marker = _run(
                ray_cluster, target.client, target.project_id, run_id, request, env, policy, keep, json_out
            )
        if json_out:
            print_json(
                {**outcome.as_dict(), "run_id": run_id, "cluster": marker.cluster, "kept": marker.keep}
            )
        print_outcome(outcome, json_out=False)
        raise typer.Exit(EXIT_OK if outcome.succeeded else EXIT_FAILED)

    run_command(go)


def _run(
    cluster: RayCluster,
    client: CMLClient,
    project_id: str,
    run_id: str,
    request: JobSubmission,
    env: dict[str, Any] | None,
    policy: JobPolicy,
    keep: bool,
    json_out: bool,
) -> tuple[Outcome, RunMarker]:
    name = cluster.spec.name
    marker, reattaching = _open_marker(cluster, client, project_id, run_id, keep)
    marker.keep = marker.keep or keep
    outcome: Outcome | None = None
    try:
        managed = (
            _attached(client, project_id, name, request, policy, run_id, marker) if reattaching else None
        )
        heal = managed is not None  # re-attached at once: what died meanwhile is replaced while it runs
        if managed is None:
            managed = _up_and_submit(cluster, client, project_id, run_id, request, env, policy, marker)
        try:
            if heal and (plan := cluster.up(wait=False)[0]).actions:
                healed = ", ".join(action.describe().strip() for action in plan.actions)
                err_console.print(f"healing the cluster meanwhile: {escape(healed)}")
            outcome = follow_managed(managed, json_out)
        except KeyboardInterrupt:
            err_console.print(f"\ninterrupted: stopping job {managed.current} before the teardown")
            managed.stop()
            message = "stopped by the user (Ctrl-C or SIGTERM)"
            outcome = Outcome(marker.record_id, STOPPED, message, tuple(managed.attempts))
        finally:
            managed.jobs.close()
    except KeyboardInterrupt:
        err_console.print("\ninterrupted before the job started")
        outcome = Outcome(marker.record_id, STOPPED, "interrupted before the job started", ())
    finally:
        try:
            with _no_interrupts():
                _teardown(cluster, marker)
                marker.remove(client, project_id)
        except (CMLError, OperationFailed) as err:
            err_console.print(f"[red]the teardown of cluster {name!r} failed: {escape(str(err))}[/]")
            if outcome is not None and outcome.succeeded:
                outcome = Outcome(outcome.record_id, FAILED, f"teardown failed: {err}", outcome.attempts)
    assert outcome is not None
    return outcome, marker


def _open_marker(
    cluster: RayCluster, client: CMLClient, project_id: str, run_id: str, keep: bool
) -> tuple[RunMarker, bool]:
    """The run's marker in the project: the one a killed run left (True: re-attaching), else a new
    one, written before anything starts so that a re-run after a kill finds it."""
    name = cluster.spec.name
    marker = RunMarker.read(client, project_id, name, run_id)
    if marker is not None:
        err_console.print(
            f"re-attaching to run {run_id} in progress (job {marker.record_id}, started by "
            f"{marker.submitter} at {time.strftime('%H:%M:%S', time.localtime(marker.started_at))})"
        )
        return marker, True
    marker = RunMarker(
        run_id=run_id,
        cluster=name,
        record_id=f"run-{run_id}-{secrets.token_hex(3)}",
        created_cluster=not _cluster_exists(cluster),
        keep=keep,
        submitter=who_submits(),
        started_at=time.time(),
    )
    marker.write(client, project_id)
    what = "bringing up" if marker.created_cluster else "using the running"
    err_console.print(f"run {run_id}: {what} cluster {name!r} for job {marker.record_id}")
    return marker, False


def _up_and_submit(
    cluster: RayCluster,
    client: CMLClient,
    project_id: str,
    run_id: str,
    request: JobSubmission,
    env: dict[str, Any] | None,
    policy: JobPolicy,
    marker: RunMarker,
) -> ManagedJob:
    """Bring the cluster up (waiting until ready), then submit the run's job — or follow it when Ray
    already has it (a re-run that found the cluster but not yet its job)."""
    name = cluster.spec.name
    _plan, status = cluster.up(wait=True, on_progress=Progress())
    if not status.ready:
        problems = "; ".join(status.problems or [status.state])
        raise OperationFailed(f"cluster {name!r} did not become ready: {problems}")
    endpoint = head_endpoint(client, project_id, name)
    request = replace(with_packages(endpoint, request, env), submission_id=marker.record_id)
    managed = ManagedJob(JobsClient(endpoint), request, policy, run_id=run_id)
    if managed.attach():
        err_console.print(f"following job {managed.current} (attempt {len(managed.attempts)})")
    else:
        managed.submit()
        err_console.print(f"submitted job {managed.current} to cluster {name!r}")
    return managed


def _attached(
    client: CMLClient,
    project_id: str,
    name: str,
    request: JobSubmission,
    policy: JobPolicy,
    run_id: str,
    marker: RunMarker,
) -> ManagedJob | None:
    """The run's job when the head still answers and Ray knows it (followed at once; the caller heals
    the cluster without waiting for it). None: the cluster must be brought up first."""
    try:
        endpoint = head_endpoint(client, project_id, name)
    except OperationFailed:
        return None
    jobs = JobsClient(endpoint)
    managed = ManagedJob(jobs, replace(request, submission_id=marker.record_id), policy, run_id=run_id)
    try:
        found = managed.attach()
    except OperationFailed:
        found = False
    if not found:
        jobs.close()
        return None
    err_console.print(f"following job {managed.current} (attempt {len(managed.attempts)})")
    return managed


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """A second Ctrl-C (or SIGTERM) must not leave a half-removed cluster: the teardown finishes."""
    previous_int = signal.signal(signal.SIGINT, lambda *_: err_console.print("[dim]tearing down; wait[/]"))
    previous_term = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


def register(app: typer.Typer) -> None:
    app.command("run", context_settings={"allow_interspersed_args": False})(run)


__all__ = ["RunMarker", "register", "run", "run_id_of"]
