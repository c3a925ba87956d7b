"""`deploy`: project → jobs → run the stale part of the chain → follow it → report the cluster.

The seed's Deploy Orchestrator (`cai_integration/deploy_to_cml.py`), done so that it follows the
whole chain, reads the right list keys and statuses, and skips only what is really up to date.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_serve_cai.cluster import ClusterStatus, RayCluster, connect_info
from ray_serve_cai.cluster.applied import ClusterRequest
from ray_serve_cai.cluster.runtimes import choose_runtime
from ray_serve_cai.cml import CMLClient
from ray_serve_cai.config import ClusterSpec, DeploySpec, JobSpec
from ray_serve_cai.deploy.fingerprint import (
    dependency_digest,
    head_commit,
    job_fingerprint,
    tree_digest,
)
from ray_serve_cai.deploy.jobs import (
    FINGERPRINT_VAR,
    JOB_KEY_VAR,
    SUPERVISING,
    DesiredJob,
    JobOutcome,
    ensure_jobs,
    run_and_follow,
)
from ray_serve_cai.deploy.project import ensure_project
from ray_serve_cai.deploy.schedules import ensure_scheduled_runs

# Variables through which the orchestrator tells the job scripts what to do (never secrets).
GIT_URL_VAR = "RAY_CAI_GIT_URL"
GIT_BRANCH_VAR = "RAY_CAI_GIT_BRANCH"
DEPS_DIGEST_VAR = "RAY_CAI_DEPS_DIGEST"
CLUSTER_SPEC_VAR = "RAY_CAI_CLUSTER_SPEC"
# The deployer's config without its env overrides, those overrides and the deployed commit: the
# launch job records them with the applied spec, so a later `up` keeps what was deployed.
CLUSTER_REQUEST_VAR = "RAY_CAI_CLUSTER_REQUEST"

GIT_SYNC, SETUP, LAUNCH = "git_sync", "setup_environment", "launch_ray_cluster"
OK_STATUSES = frozenset({"ENGINE_SUCCEEDED", SUPERVISING})


@dataclass
class DeployOptions:
    repo: Path  # the local git checkout being deployed
    git_url: str | None = None  # what CML clones (default: derived by the caller)
    branch: str | None = None
    force: bool = False
    gh_pat: str | None = None  # used for the clone only; never logged, never in a job
    project_timeout: float = 600
    chain_timeout: float = 3600
    poll_interval: float = 2.0


@dataclass
class DeployResult:
    project_id: str
    project_name: str
    project_created: bool
    commit: str
    jobs: list[JobOutcome]
    created_jobs: list[str] = field(default_factory=list)
    updated_jobs: list[str] = field(default_factory=list)
    cluster: ClusterStatus | None = None
    scheduled_runs: dict[str, str] = field(default_factory=dict)  # key → "created" / "updated" / "kept"

    @property
    def succeeded(self) -> bool:
        return all(j.action == "skipped" or j.status in OK_STATUSES for j in self.jobs)

    @property
    def failed_job(self) -> JobOutcome | None:
        return next((j for j in self.jobs if j.action != "skipped" and j.status not in OK_STATUSES), None)

    @property
    def runs_started(self) -> int:
        return sum(1 for j in self.jobs if j.action == "ran")

    def as_dict(self) -> dict[str, Any]:
        return {
            "project_id": self.project_id,
            "project_name": self.project_name,
            "project_created": self.project_created,
            "commit": self.commit,
            "succeeded": self.succeeded,
            "jobs": [j.as_dict() for j in self.jobs],
            "created_jobs": self.created_jobs,
            "updated_jobs": self.updated_jobs,
            "cluster": self.cluster.as_dict() if self.cluster else None,
            "connect": connect_info(self.cluster) if self.cluster else None,
            "scheduled_runs": self.scheduled_runs,
        }


def desired_jobs(
    spec: DeploySpec,
    cluster: ClusterSpec | ClusterRequest,
    *,
    repo: Path,
    commit: str,
    git_url: str | None,
    branch: str | None,
    default_runtime: str | None = None,
) -> dict[str, DesiredJob]:
    """Every job's CML fields and the fingerprint of its inputs."""
    code = tree_digest(repo, commit)
    deps = dependency_digest(repo, commit)
    request = cluster if isinstance(cluster, ClusterRequest) else ClusterRequest(cluster)
    cluster_json = request.spec.model_dump_json()
    result: dict[str, DesiredJob] = {}
    for job in spec.chain_order():
        env = dict(job.environment)
        env[JOB_KEY_VAR] = job.key
        if job.key == GIT_SYNC:
            inputs = code
            if git_url:
                env[GIT_URL_VAR] = git_url
            if branch:
                env[GIT_BRANCH_VAR] = branch
        elif job.key == SETUP:
            inputs = deps
            env[DEPS_DIGEST_VAR] = deps
        elif job.key == LAUNCH:
            inputs = cluster_json
            env[CLUSTER_SPEC_VAR] = cluster_json
            env[CLUSTER_REQUEST_VAR] = launch_request_json(request, commit)
            inputs += env[CLUSTER_REQUEST_VAR]
        else:
            inputs = code
        fields = _job_fields(job, spec, env, default_runtime)
        fingerprint = job_fingerprint(fields, inputs)
        fields["environment"] = {**env, FINGERPRINT_VAR: fingerprint}
        result[job.key] = DesiredJob(spec=job, fields=fields, fingerprint=fingerprint)
    return result


def _job_fields(
    job: JobSpec, spec: DeploySpec, env: dict[str, str], default_runtime: str | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": job.name,
        "script": job.script,
        "cpu": job.cpu,
        "memory": job.memory,
        "nvidia_gpu": job.nvidia_gpu,
        "timeout": job.timeout,
        "arguments": job.arguments,
        "environment": dict(env),
    }
    runtime = job.runtime_identifier or spec.project.runtime_identifier or default_runtime
    if runtime:
        fields["runtime_identifier"] = runtime
    if job.kernel:
        fields["kernel"] = job.kernel
    return fields


def launch_request_json(request: ClusterRequest, commit: str) -> str:
    """The deployer's config without overrides, the overrides and the commit, for the launch job."""
    base = request.base if request.base is not None else request.spec
    data = {"base": base.model_dump(mode="json"), "overrides": dict(request.overrides), "commit": commit}
    return json.dumps(data, sort_keys=True)


def launch_request(spec_json: str, request_json: str) -> ClusterRequest:
    """The launch job's `ClusterRequest`, from the variables `desired_jobs` gave it."""
    spec = ClusterSpec.model_validate_json(spec_json)
    if not request_json:
        return ClusterRequest(spec, source="deploy")
    data = json.loads(request_json)
    base = ClusterSpec.model_validate_json(json.dumps(data["base"]))
    overrides = dict(data.get("overrides") or {})
    return ClusterRequest(spec, base, overrides, source="deploy", commit=data.get("commit"))


def deploy(
    client: CMLClient,
    spec: DeploySpec,
    cluster: ClusterSpec | ClusterRequest,
    options: DeployOptions,
    *,
    progress: Callable[[str], None] | None = None,
) -> DeployResult:
    """Run the whole flow. Raises on what prevents following the chain; a failed job is a result."""
    say = progress or (lambda _msg: None)
    commit = head_commit(options.repo)
    git_url = options.git_url or spec.project.git_url
    branch = options.branch or spec.project.branch

    say(f"project {spec.project.name!r}: looking it up")
    last_wait = [0.0]

    def on_wait(status: str, elapsed: float) -> None:
        if elapsed - last_wait[0] >= 10:
            say(f"project {spec.project.name!r}: creation_status {status or '?'} ({elapsed:.0f}s)")
            last_wait[0] = elapsed

    project, created = ensure_project(
        client,
        spec.project.name,
        git_url=git_url,
        git_ref=spec.project.branch,
        description=spec.project.description,
        gh_pat=options.gh_pat,
        timeout=options.project_timeout,
        on_wait=on_wait,
    )
    say(f"project {project.name!r} ({project.id}) {'created from git' if created else 'found'}")

    default_runtime = None
    unpinned = [j.runtime_identifier for j in spec.chain_order()]
    unpinned += [r.runtime_identifier for r in spec.scheduled_runs.values()]
    if any(not (runtime or spec.project.runtime_identifier) for runtime in unpinned):
        default_runtime = choose_runtime(client.list_runtimes(), gpu=False)
    desired = desired_jobs(
        spec,
        cluster,
        repo=options.repo,
        commit=commit,
        git_url=git_url,
        branch=branch,
        default_runtime=default_runtime,
    )
    state = ensure_jobs(client, project.id, spec, desired, force=options.force)
    if state.created or state.updated:
        say(f"jobs created: {state.created or '-'}; updated: {state.updated or '-'}")
    if not state.stale:
        say("every job is up to date: nothing to run")
    started = time.monotonic()
    done_while_running: dict[str, Callable[[], bool]] = {}
    launch = spec.jobs.get(LAUNCH)
    if launch is not None and supervises(launch.arguments):
        # The launch job stays to supervise: its work is done once the cluster is ready.
        # One RayCluster for every poll, so its runtime choice (a list call) is made once.
        supervised = RayCluster(client, project.id, _cluster_spec(cluster))
        done_while_running[LAUNCH] = lambda: supervised.status().ready
    outcomes = run_and_follow(
        client,
        project.id,
        spec,
        state,
        timeout=options.chain_timeout,
        poll_interval=options.poll_interval,
        progress=say,
        done_while_running=done_while_running,
    )
    say(f"job chain finished in {time.monotonic() - started:.0f}s")
    result = DeployResult(
        project_id=project.id,
        project_name=project.name,
        project_created=created,
        commit=commit,
        jobs=list(outcomes.values()),
        created_jobs=state.created,
        updated_jobs=state.updated,
    )
    if result.succeeded:
        result.cluster = RayCluster(client, project.id, _cluster_spec(cluster)).status()
        # Scheduled runs last: their first run finds the code and the environment the chain made.
        scheduled = ensure_scheduled_runs(client, project.id, spec, default_runtime)
        for key, run in spec.scheduled_runs.items():
            state_of = (
                "created" if key in scheduled.created else "updated" if key in scheduled.updated else "kept"
            )
            result.scheduled_runs[key] = state_of
            say(f"scheduled run {run.name!r} ({run.schedule} {run.timezone or 'UTC'}): {state_of}")
    return result


def _cluster_spec(cluster: ClusterSpec | ClusterRequest) -> ClusterSpec:
    return cluster.spec if isinstance(cluster, ClusterRequest) else cluster


def supervises(arguments: str) -> bool:
    """Whether a launch job's arguments ask it to keep supervising (`--watch [SECONDS]`)."""
    return "--watch" in arguments.split()


def summary_markdown(result: DeployResult) -> str:
    """A Markdown table for `$GITHUB_STEP_SUMMARY`."""
    lines = ["| job | action | status | duration |", "|---|---|---|---|"]
    for job in result.jobs:
        duration = "-" if job.duration is None else f"{job.duration:.0f}s"
        lines.append(f"| {job.name} | {job.action} | {job.status} | {duration} |")
    if result.cluster:
        c = result.cluster
        alive = c.ray.get("alive_nodes", 0)
        lines += ["", f"**Cluster** `{c.cluster}`: {c.state}, {alive}/{len(c.nodes)} nodes alive in Ray"]
        if c.dashboard_url:
            lines.append(f"**Dashboard**: {c.dashboard_url}")
    return "\n".join(lines) + "\n"
