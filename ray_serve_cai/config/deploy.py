"""The deployment spec: `cai_integration/jobs_config.yaml` + env overrides → DeploySpec.

A project (name, git source, runtime, environment) and a tree of CML jobs chained by
`parent_job_key`: exactly one root, parents before children. Optionally `scheduled_runs`: Ray jobs
that `deploy` turns into CML jobs with CML's cron `schedule`, each running `ray-cai run` (a cluster
brought up for the job and torn down after it).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ray_serve_cai.config._common import env_value, environment_problems, is_relative_script, load_yaml
from ray_serve_cai.config.errors import (
    ConfigError,
    Problem,
    lenient_validate,
    problems_from_validation,
    suggest,
)

DEFAULT_JOBS_FILE = "cai_integration/jobs_config.yaml"
DEFAULT_DESCRIPTION = "Ray cluster on Cloudera AI Workbench, deployed by ray-serve-cai"
_JOB_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_GITHUB_REPOSITORY = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_GIT_URL = re.compile(r"^(https?://|ssh://|git@)[^\s]+$")
_CREDENTIALS_IN_URL = re.compile(r"^[a-z+]+://[^/@\s]+@")

_STRICT = ConfigDict(strict=True, extra="forbid")
Positive = Annotated[float, Field(gt=0)]


class ProjectSpec(BaseModel):
    """The CML project the cluster lives in."""

    model_config = _STRICT

    name: str = Field("ray-serve-cai", description="CML project name (env CML_PROJECT_NAME overrides)")
    description: str = DEFAULT_DESCRIPTION
    git_url: str | None = Field(
        None, description="repository to clone; default from env GITHUB_REPOSITORY (owner/repo)"
    )
    branch: str | None = Field(None, description="branch to sync; None = the repository's default")
    runtime_identifier: str | None = Field(
        None, description="ML Runtime image for the jobs (env RUNTIME_IDENTIFIER overrides)"
    )
    environment: dict[str, str] = Field(default_factory=dict, description="non-secret project env vars")
    visibility: Literal["private", "public", "organization"] = "private"


class _JobFields(BaseModel):
    model_config = _STRICT

    name: str = Field(description="CML job name (unique)")
    script: str = Field(description="project-relative path of the script")
    cpu: Positive = 1
    memory: Positive = Field(2, description="GiB")
    nvidia_gpu: Annotated[int, Field(ge=0)] = 0
    timeout: Annotated[int, Field(ge=0)] = Field(
        3600, description="seconds; 0 = no limit (a supervising launch job)"
    )
    runtime_identifier: str | None = Field(None, description="default: project.runtime_identifier")
    environment: dict[str, str] = Field(default_factory=dict)
    arguments: str = ""
    parent_job_key: str | None = Field(None, description="key of the job that triggers this one")
    kernel: str | None = None


class JobFile(_JobFields):
    """One entry of `jobs:` (its key is the mapping key)."""


class JobSpec(_JobFields):
    """A CML job of the deployment chain."""

    key: str


_CRON_FIELD = re.compile(r"^[A-Za-z0-9*/,?#LW-]+$")
SCHEDULED_RUN_SCRIPT = "cai_integration/scheduled_run.py"


class ScheduledRunFile(BaseModel):
    """One entry of `scheduled_runs:`: a Ray job run on its own cluster at the times CML's cron names."""

    model_config = _STRICT

    name: str = Field(description="CML job name (unique among all jobs)")
    command: str = Field(description="the command the Ray job runs, a shell command line (in the project)")
    schedule: str = Field(description="CML's five-field cron expression, e.g. '0 2 * * *'")
    timezone: str = Field("", description="IANA time zone of the schedule, e.g. 'Europe/Berlin' (UTC)")
    cluster_config: str = Field(
        "ray_cluster_config.yaml", description="project-relative cluster config the run's cluster comes from"
    )
    cluster: str | None = Field(
        None, description="name of the run's cluster (default: the config's; a cluster already up is reused "
        "and never torn down)"
    )  # fmt: skip
    max_retries: Annotated[int, Field(ge=0)] = 0
    timeout: Annotated[int, Field(ge=0)] = Field(0, description="the Ray job's deadline in seconds; 0 = none")
    runtime_env: str | None = Field(None, description="project-relative runtime_env YAML/JSON file")
    keep: bool = Field(False, description="leave the cluster up after the job")
    cpu: Positive = Field(1, description="vCPU of the CML job that drives the run (not of the cluster)")
    memory: Positive = Field(2, description="GiB of the CML job that drives the run")
    runtime_identifier: str | None = Field(None, description="default: project.runtime_identifier")
    environment: dict[str, str] = Field(default_factory=dict)


class ScheduledRunSpec(ScheduledRunFile):
    key: str


class DeploySpec(BaseModel):
    """Project + jobs, the jobs ordered so every parent comes before its children; scheduled runs."""

    model_config = _STRICT

    project: ProjectSpec = Field(default_factory=ProjectSpec)
    jobs: dict[str, JobSpec]
    scheduled_runs: dict[str, ScheduledRunSpec] = Field(default_factory=dict)

    def root_job(self) -> JobSpec:
        """The one job without a parent (the chain's start)."""
        return next(job for job in self.jobs.values() if job.parent_job_key is None)

    def children(self, key: str) -> list[JobSpec]:
        """Jobs triggered by ``key``, in file order."""
        return [job for job in self.jobs.values() if job.parent_job_key == key]

    def chain_order(self) -> list[JobSpec]:
        """Every job, depth first from the root, children in file order (= the order of ``jobs``)."""
        return list(self.jobs.values())

    def runtime_of(self, key: str) -> str | None:
        """The runtime a job runs on: its own, else the project's."""
        job = self.jobs[key]
        own = job.runtime_identifier
        return own if own is not None else self.project.runtime_identifier


class DeployFile(BaseModel):
    """`cai_integration/jobs_config.yaml`."""

    model_config = ConfigDict(
        strict=True, extra="forbid", title="ray-serve-cai deployment (cai_integration/jobs_config.yaml)"
    )

    project: ProjectSpec = Field(default_factory=ProjectSpec)
    jobs: dict[str, JobFile]
    scheduled_runs: dict[str, ScheduledRunFile] = Field(
        default_factory=dict, description="Ray jobs on their own cluster at CML cron times (`ray-cai run`)"
    )


def jobs_json_schema() -> dict[str, Any]:
    """JSON Schema of `cai_integration/jobs_config.yaml`."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **DeployFile.model_json_schema()}


def _apply_env(data: dict[str, Any], env: Mapping[str, str], problems: list[Problem]) -> dict[str, str]:
    overridden: dict[str, str] = {}
    project = data.get("project")
    if project is None:
        project = data["project"] = {}
    if not isinstance(project, dict):
        return overridden
    if (name := env_value(env, "CML_PROJECT_NAME")) is not None:
        project["name"] = name
        overridden["project.name"] = "CML_PROJECT_NAME"
    if (runtime := env_value(env, "RUNTIME_IDENTIFIER")) is not None:
        project["runtime_identifier"] = runtime
        overridden["project.runtime_identifier"] = "RUNTIME_IDENTIFIER"
    repository = env_value(env, "GITHUB_REPOSITORY")
    if repository is not None and not project.get("git_url"):
        if _GITHUB_REPOSITORY.match(repository):
            project["git_url"] = f"https://github.com/{repository}.git"
            overridden["project.git_url"] = "GITHUB_REPOSITORY"
        else:
            problems.append(Problem("GITHUB_REPOSITORY", f"must look like owner/repo, got {repository!r}"))
    return overridden


def _cross_field(file: DeployFile, dropped: set[str], tainted: set[str]) -> tuple[list[Problem], list[str]]:
    """Rules across jobs; returns problems and the job keys in chain order (when valid).

    ``dropped``: jobs left out after field errors; ``tainted``: jobs with any field error (their
    parent_job_key may have been lost, so the root count is not checked).
    """
    jobs = file.jobs
    in_cycle: set[str] = set()
    problems = [
        *_project_problems(file.project),
        *([Problem("jobs", "at least one job is required")] if not jobs and not dropped else []),
        *_job_problems(jobs, dropped),
        *_cycle_problems(jobs, in_cycle),
        *_scheduled_run_problems(file.scheduled_runs, {job.name for job in jobs.values()}),
    ]
    roots = [key for key, job in jobs.items() if job.parent_job_key is None]
    if jobs and not dropped and not tainted:
        if not roots and not in_cycle:
            problems.append(Problem("jobs", "no root job: exactly one job must have no parent_job_key"))
        elif len(roots) > 1:
            message = f"exactly one root job (without parent_job_key) is allowed, found {len(roots)}: "
            problems.append(Problem("jobs", message + ", ".join(roots)))
    return problems, _depth_first(jobs, roots[0]) if len(roots) == 1 else []


def _project_problems(project: ProjectSpec) -> list[Problem]:
    problems: list[Problem] = []
    if not project.name.strip():
        problems.append(Problem("project.name", "must not be empty"))
    if project.git_url is not None and _CREDENTIALS_IN_URL.match(project.git_url):
        message = "must not contain credentials; pass GH_PAT as a secret instead"
        problems.append(Problem("project.git_url", message))
    elif project.git_url is not None and not _GIT_URL.match(project.git_url):
        message = f"must be an https://, ssh:// or git@ URL, got {project.git_url!r}"
        problems.append(Problem("project.git_url", message))
    if project.branch is not None and (not project.branch.strip() or " " in project.branch):
        problems.append(Problem("project.branch", f"not a valid branch name: {project.branch!r}"))
    return problems + environment_problems(project.environment, "project.environment")


def _job_problems(jobs: Mapping[str, JobFile], dropped: set[str]) -> list[Problem]:
    """Per job: key, unique non-empty name, relative script, environment, an existing parent."""
    problems: list[Problem] = []
    names: dict[str, str] = {}
    for key, job in jobs.items():
        path = f"jobs.{key}"
        if not _JOB_KEY.match(key):
            problems.append(Problem(path, "job keys are letters, digits, _ and -, starting with a letter"))
        if not job.name.strip():
            problems.append(Problem(f"{path}.name", "must not be empty"))
        elif job.name in names:
            message = f"duplicate job name {job.name!r} (also jobs.{names[job.name]})"
            problems.append(Problem(f"{path}.name", message))
        else:
            names[job.name] = key
        if why := is_relative_script(job.script):
            problems.append(Problem(f"{path}.script", why))
        problems += environment_problems(job.environment, f"{path}.environment")
        parent = job.parent_job_key
        if parent is not None and parent not in jobs and parent not in dropped:
            message = f"no job with key {parent!r}{suggest(parent, jobs)}"
            problems.append(Problem(f"{path}.parent_job_key", message))
    return problems


def cron_problem(schedule: str) -> str | None:
    """Why `schedule` is not a five-field cron expression (CML's `schedule`), or None."""
    fields = schedule.split()
    if len(fields) != 5:
        return f"must be a five-field cron expression (minute hour day month weekday), got {schedule!r}"
    bad = [f for f in fields if not _CRON_FIELD.match(f)]
    if bad:
        return f"{bad[0]!r} is not a cron field (digits, names, '*', '/', ',', '-')"
    return None


def _scheduled_run_problems(runs: Mapping[str, ScheduledRunFile], job_names: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    names = set(job_names)
    for key, run in runs.items():
        path = f"scheduled_runs.{key}"
        if not _JOB_KEY.match(key):
            problems.append(Problem(path, "keys are letters, digits, _ and -, starting with a letter"))
        if not run.name.strip():
            problems.append(Problem(f"{path}.name", "must not be empty"))
        elif run.name in names:
            problems.append(Problem(f"{path}.name", f"duplicate job name {run.name!r}"))
        names.add(run.name)
        if not run.command.strip():
            problems.append(Problem(f"{path}.command", "must not be empty"))
        if why := cron_problem(run.schedule):
            problems.append(Problem(f"{path}.schedule", why))
        if run.timezone and not re.match(r"^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$|^UTC$", run.timezone):
            problems.append(Problem(f"{path}.timezone", f"not an IANA time zone name: {run.timezone!r}"))
        for field_name in ("cluster_config", "runtime_env"):
            value = getattr(run, field_name)
            if value is not None and (why := is_relative_script(value)):
                problems.append(Problem(f"{path}.{field_name}", why))
        if run.cluster is not None and not re.match(r"^[a-z0-9]+(-[a-z0-9]+)*$", run.cluster):
            message = f"lowercase letters, digits and '-', got {run.cluster!r}"
            problems.append(Problem(f"{path}.cluster", message))
        problems += environment_problems(run.environment, f"{path}.environment")
    return problems


def _cycle_problems(jobs: Mapping[str, JobFile], in_cycle: set[str]) -> list[Problem]:
    """Follow parents from every job; a revisit means a loop (its jobs are added to ``in_cycle``)."""
    problems: list[Problem] = []
    for start in jobs:
        trail: list[str] = []
        key: str | None = start
        while key is not None and key in jobs and key not in trail and key not in in_cycle:
            trail.append(key)
            key = jobs[key].parent_job_key
        if key is not None and key in trail:
            loop = trail[trail.index(key) :]
            in_cycle.update(loop)
            shown = " → ".join([*loop, loop[0]])
            problems.append(Problem(f"jobs.{loop[0]}.parent_job_key", f"parents form a cycle: {shown}"))
    return problems


def _depth_first(jobs: Mapping[str, JobFile], root: str) -> list[str]:
    """Job keys depth first from ``root``, children in file order."""
    order: list[str] = []
    stack = [root]
    while stack:
        key = stack.pop()
        order.append(key)
        stack.extend(reversed([k for k, j in jobs.items() if j.parent_job_key == key]))
    return order


def parse_deploy_spec(
    data: Any, *, env: Mapping[str, str] | None = None, source: str = DEFAULT_JOBS_FILE
) -> DeploySpec:
    """Validate loaded YAML data (env overrides applied first) into a DeploySpec.

    ``env`` None means ``os.environ``; pass ``{}`` for no overrides. Raises ConfigError with every problem.
    """
    env = os.environ if env is None else env
    if data is None:
        raise ConfigError([Problem("", "the file is empty; expected `project:` and `jobs:`")], source)
    if not isinstance(data, dict):
        raise ConfigError(
            [Problem("", f"expected a mapping with `project:` and `jobs:`, got {type(data).__name__}")],
            source,
        )
    data = copy.deepcopy(data)
    problems: list[Problem] = []
    overridden = _apply_env(data, env, problems)
    dropped: set[str] = set()
    tainted: set[str] = set()
    try:
        file: DeployFile | None = DeployFile.model_validate(data)
    except ValidationError as exc:
        problems += problems_from_validation(exc, DeployFile)
        tainted = {str(e["loc"][1]) for e in exc.errors() if e["loc"][0] == "jobs" and len(e["loc"]) > 1}
        given = {str(key) for key in data["jobs"]} if isinstance(data.get("jobs"), dict) else set()
        file = lenient_validate(DeployFile, data, exc, {})
        dropped = given - set(file.jobs) if file is not None else set()
    order: list[str] = []
    if file is not None:
        more, order = _cross_field(file, dropped, tainted)
        problems += more
    if problems:
        renamed = [Problem(overridden.get(p.field, p.field), p.message) for p in problems]
        raise ConfigError(list(dict.fromkeys(renamed)), source)
    assert file is not None
    jobs = {key: JobSpec(key=key, **file.jobs[key].model_dump()) for key in order}
    runs = {key: ScheduledRunSpec(key=key, **run.model_dump()) for key, run in file.scheduled_runs.items()}
    return DeploySpec(project=file.project, jobs=jobs, scheduled_runs=runs)


def load_deploy_spec(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> DeploySpec:
    """Read and validate a jobs file (default ``cai_integration/jobs_config.yaml``)."""
    file_path = Path(path) if path is not None else Path(DEFAULT_JOBS_FILE)
    source = str(path) if path is not None else DEFAULT_JOBS_FILE
    return parse_deploy_spec(load_yaml(file_path, source), env=env, source=source)
