"""Scheduled Ray runs: the CML jobs `deploy` keeps for `scheduled_runs:` of the jobs config.

Each becomes a CML job (not in the chain, never started by `deploy`) with CML's cron `schedule` and
`timezone`, whose script (`cai_integration/scheduled_run.py`) runs `ray-cai run` from inside the
project: the run's cluster comes up, the command runs as a Ray job (retries, deadline), the cluster
goes. What to run travels in the job's environment (`RAY_CAI_RUN_*`, never a secret); the CML job
itself has no timeout (the run has its own deadline and always tears its cluster down).
A scheduled run removed from the config is left in CML (delete it there; jobs are never deleted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray_serve_cai.cml import AmbiguousName, CMLClient, Job, create_or_find
from ray_serve_cai.cml._models import CreateJob
from ray_serve_cai.config import DeploySpec, ScheduledRunSpec
from ray_serve_cai.config.deploy import SCHEDULED_RUN_SCRIPT
from ray_serve_cai.deploy.jobs import JOB_KEY_VAR

# The run's settings, read by `ray_serve_cai.deploy.steps.scheduled_run`.
RUN_COMMAND_VAR = "RAY_CAI_RUN_COMMAND"
RUN_CONFIG_VAR = "RAY_CAI_RUN_CONFIG"
RUN_CLUSTER_VAR = "RAY_CAI_RUN_CLUSTER"
RUN_MAX_RETRIES_VAR = "RAY_CAI_RUN_MAX_RETRIES"
RUN_TIMEOUT_VAR = "RAY_CAI_RUN_TIMEOUT"
RUN_RUNTIME_ENV_VAR = "RAY_CAI_RUN_RUNTIME_ENV"
RUN_KEEP_VAR = "RAY_CAI_RUN_KEEP"
COMPARED_FIELDS = (
    "script",
    "cpu",
    "memory",
    "timeout",
    "schedule",
    "timezone",
    "environment",
    "runtime_identifier",
)


@dataclass
class ScheduleOutcome:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    jobs: dict[str, Job] = field(default_factory=dict)


def scheduled_job_fields(
    run: ScheduledRunSpec, spec: DeploySpec, default_runtime: str | None
) -> dict[str, Any]:
    """The CML job of one scheduled run: its script, schedule and the run's settings as variables."""
    env = dict(run.environment)
    env.update(
        {
            JOB_KEY_VAR: run.key,
            RUN_COMMAND_VAR: run.command,
            RUN_CONFIG_VAR: run.cluster_config,
            RUN_MAX_RETRIES_VAR: str(run.max_retries),
            RUN_TIMEOUT_VAR: str(run.timeout),
            RUN_KEEP_VAR: "1" if run.keep else "0",
        }
    )
    if run.cluster:
        env[RUN_CLUSTER_VAR] = run.cluster
    if run.runtime_env:
        env[RUN_RUNTIME_ENV_VAR] = run.runtime_env
    fields: dict[str, Any] = {
        "name": run.name,
        "script": SCHEDULED_RUN_SCRIPT,
        "cpu": run.cpu,
        "memory": run.memory,
        "timeout": 0,
        "schedule": run.schedule,
        "timezone": run.timezone,
        "environment": env,
    }
    runtime = run.runtime_identifier or spec.project.runtime_identifier or default_runtime
    if runtime:
        fields["runtime_identifier"] = runtime
    return fields


def _drift(job: Job, fields: Mapping[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {}
    for name in COMPARED_FIELDS:
        if name not in fields:
            continue
        want, have = fields[name], getattr(job, name, None)
        if name in ("cpu", "memory"):
            same = have is not None and abs(float(have) - float(want)) < 1e-9
        elif name == "timezone":
            same = (have or "") == (want or "")
        else:
            same = have == want
        if not same:
            patch[name] = want
    return patch


def ensure_scheduled_runs(
    client: CMLClient, project_id: str, spec: DeploySpec, default_runtime: str | None
) -> ScheduleOutcome:
    """Create the missing scheduled-run jobs and update drifted ones (by exact name). Never runs them."""
    outcome = ScheduleOutcome()
    if not spec.scheduled_runs:
        return outcome
    existing: dict[str, list[Job]] = {}
    for job in client.list_jobs(project_id):
        existing.setdefault(job.name, []).append(job)
    for run in spec.scheduled_runs.values():
        fields = scheduled_job_fields(run, spec, default_runtime)
        matches = existing.get(run.name, [])
        if len(matches) > 1:
            ids = ", ".join(j.id for j in matches)
            raise AmbiguousName(f"several jobs are named {run.name!r} ({ids}); delete the extra ones")
        if not matches:
            request = CreateJob(**fields)
            job = create_or_find(
                lambda request=request: client.create_job(project_id, request),
                lambda name=run.name: client.find_job_by_name(project_id, name),
                what=f"scheduled job {run.name!r}",
            )
            outcome.created.append(run.key)
        else:
            job = matches[0]
            patch = _drift(job, fields)
            if patch:
                job = client.update_job(project_id, job.id, **patch)
                outcome.updated.append(run.key)
        outcome.jobs[run.key] = job
    return outcome


__all__ = ["ScheduleOutcome", "ensure_scheduled_runs", "scheduled_job_fields"]
