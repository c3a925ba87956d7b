"""Records the workspace keeps (projects, jobs, job runs, applications) and how they render as CML objects.

Records live in memory in the server process and are written through to SQLite (`store.py`): setting
any attribute of a record reports it to the change hook (`set_change_hook`), so every field, including
one added later, is durable without further code. `to_api()` renders the CML v2 JSON shape of the spec
(`environment` as a JSON string, int64 fields as strings, timestamps not yet reached left out as CML
leaves them out — never `null`). Non-CML extras are documented where they are added (`log_path`,
`failure_reason`, `exit_code` on job runs, `log_path` and `url` on applications, `error_message` on
projects) and declared in `conformance.WORKSPACE_EXTENSIONS`.
"""

from __future__ import annotations

import getpass
import json
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

from ray_serve_cai.workspace.errors import invalid_argument
from ray_serve_cai.workspace.processes import free_port

SUBDOMAIN_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
SUBDOMAIN_MAX_LENGTH = 63
# The spec's documented `template` values (CreateProjectRequest: "Python, R, PySpark, Scala, Churn
# Predictor ... local will create the project but nothing else"); with a `git_url` and no template the
# project is cloned from git.
PROJECT_TEMPLATES = ("Python", "R", "PySpark", "Scala", "Churn Predictor", "local")
ENGINE_TYPES = ("ml_runtime", "legacy_engine")
VISIBILITIES = ("private", "organization", "public")

RUN_ACTIVE_STATUSES = frozenset({"ENGINE_SCHEDULING", "ENGINE_STARTING", "ENGINE_RUNNING", "ENGINE_STOPPING"})
APP_ACTIVE_STATUSES = frozenset({"APPLICATION_STARTING", "APPLICATION_RUNNING", "APPLICATION_STOPPING"})

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_clock_lock = threading.Lock()
_last_timestamp = datetime.min.replace(tzinfo=timezone.utc)


ChangeHook = Callable[[str, str], None]
_change_hook: ChangeHook | None = None


def set_change_hook(hook: ChangeHook | None) -> None:
    """`hook(kind, id)` is called whenever an attribute of a record is set (the store marks it dirty)."""
    global _change_hook
    _change_hook = hook


def restore_clock(last_timestamp: str | None) -> None:
    """Timestamps made after a restart sort after every stored one (the clock is strictly increasing)."""
    global _last_timestamp
    if not last_timestamp:
        return
    try:
        moment = datetime.strptime(last_timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return
    with _clock_lock:
        _last_timestamp = max(_last_timestamp, moment)


def last_timestamp() -> str:
    with _clock_lock:
        return _last_timestamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Record:
    """Base of the stored records: reports every attribute change to the change hook."""

    KIND: ClassVar[str] = ""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        hook = _change_hook
        record_id = self.__dict__.get("id")
        if hook is not None and record_id is not None:
            hook(self.KIND, record_id)


def new_id() -> str:
    """An id shaped like CML's public identifiers (`abcd-1234-efgh-5678`)."""
    return "-".join("".join(secrets.choice(_ID_ALPHABET) for _ in range(4)) for _ in range(4))


def now_timestamp() -> str:
    """RFC 3339 UTC, strictly increasing within the process so sorting by time is total."""
    global _last_timestamp
    with _clock_lock:
        moment = datetime.now(timezone.utc)
        if moment <= _last_timestamp:
            moment = _last_timestamp + timedelta(microseconds=1)
        _last_timestamp = moment
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _set(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields that are set: CML leaves out a timestamp not yet reached (the spec has no null)."""
    return {key: value for key, value in fields.items() if value is not None}


def current_user() -> dict[str, str]:
    try:
        username = getpass.getuser()
    except (KeyError, OSError):
        username = "cdsw"
    return {"username": username, "name": username, "email": f"{username}@localhost"}


# ---------------------------------------------------------------- single-field checks (bodies.py: the bodies)


def validate_subdomain(subdomain: str) -> None:
    if len(subdomain) > SUBDOMAIN_MAX_LENGTH:
        raise invalid_argument(f"Problem with field Subdomain: longer than {SUBDOMAIN_MAX_LENGTH} characters")
    if not SUBDOMAIN_PATTERN.match(subdomain):
        raise invalid_argument("Problem with field Subdomain: invalid pattern (^[a-z0-9]+(-[a-z0-9]+)*$)")


def validate_script_path(script: str) -> None:
    path = Path(script)
    if path.is_absolute() or ".." in path.parts:
        raise invalid_argument("script must be a path relative to the project root")


# ---------------------------------------------------------------- records


@dataclass
class Project(Record):
    KIND: ClassVar[str] = "project"

    id: str
    name: str
    description: str
    visibility: str
    default_engine_type: str
    template: str
    directory: Path
    environment: dict[str, str] = field(default_factory=dict)
    shared_memory_limit: int = 64
    creation_status: str = "creating"
    error_message: str = ""
    collaborators: dict[str, str] = field(default_factory=dict)  # username → permission
    owner: dict[str, str] = field(default_factory=current_user)
    created_at: str = field(default_factory=now_timestamp)
    updated_at: str = ""

    def __post_init__(self) -> None:
        self.updated_at = self.updated_at or self.created_at

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "owner": dict(self.owner),
            "creator": dict(self.owner),
            "visibility": self.visibility,
            "default_engine_type": self.default_engine_type,
            "creation_status": self.creation_status,
            "error_message": self.error_message,
            "permissions": {"admin": True, "inherit": False, "read": True, "write": True},
            "shared_memory_limit": self.shared_memory_limit,
            "environment": json.dumps(self.environment),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass
class Job(Record):
    KIND: ClassVar[str] = "job"

    id: str
    project_id: str
    name: str
    script: str
    cpu: float = 1.0
    memory: float = 1.0
    nvidia_gpu: int = 0
    environment: dict[str, str] = field(default_factory=dict)
    arguments: str = ""
    timeout: int = 0
    kill_on_timeout: bool = True
    parent_id: str = ""
    schedule: str = ""
    timezone: str = ""
    paused: bool = False
    kernel: str = ""
    runtime_identifier: str = ""
    runtime_addon_identifiers: list[str] = field(default_factory=list)
    description: str = ""
    creator: dict[str, str] = field(default_factory=current_user)
    created_at: str = field(default_factory=now_timestamp)
    updated_at: str = ""

    def __post_init__(self) -> None:
        self.updated_at = self.updated_at or self.created_at

    def to_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": {"public_identifier": self.project_id},
            "name": self.name,
            "script": self.script,
            "cpu": self.cpu,
            "memory": self.memory,
            "nvidia_gpu": self.nvidia_gpu,
            "environment": json.dumps(self.environment),
            "arguments": self.arguments,
            "timeout": str(self.timeout),  # int64: a string in CML's JSON
            "kill_on_timeout": self.kill_on_timeout,
            "parent_id": self.parent_id,
            "type": "dependent" if self.parent_id else ("cron" if self.schedule else "manual"),
            "schedule": self.schedule,
            "timezone": self.timezone,
            "paused": self.paused,
            "kernel": self.kernel,
            "runtime_identifier": self.runtime_identifier,
            "runtime_addon_identifiers": list(self.runtime_addon_identifiers),
            "engine_image_id": "0",  # runtimes, not legacy engines
            "creator": dict(self.creator),
            "owner": dict(self.creator),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    def to_api_with_project(self, project: Project) -> dict[str, Any]:
        """The job as the cross-project `ListAllJobs` shows it: with its `project` (ShortProject)."""
        return {
            **self.to_api(),
            "project": {
                "public_identifier": self.project_id,
                "name": project.name,
                "default_project_engine": project.default_engine_type,
            },
        }


@dataclass
class JobRun(Record):
    KIND: ClassVar[str] = "run"

    id: str
    project_id: str
    job_id: str
    arguments: str
    environment: dict[str, str]
    job_snapshot: dict[str, Any]
    log_path: Path
    status: str = "ENGINE_SCHEDULING"
    failure_reason: str = ""
    exit_code: int | None = None
    created_at: str = field(default_factory=now_timestamp)
    scheduling_at: str | None = None
    starting_at: str | None = None
    running_at: str | None = None
    finished_at: str | None = None
    stop_requested: bool = False
    # Not in the API: the run's process (group leader) and its start time, to re-adopt it after a restart.
    pid: int | None = None
    process_started: float | None = None
    pod_ip: str | None = None  # not in the API: the workload's pod (pods.py), kept for re-adoption

    @property
    def active(self) -> bool:
        return self.status in RUN_ACTIVE_STATUSES

    def to_api(self) -> dict[str, Any]:
        return _set(
            {
                "id": self.id,
                "project_id": self.project_id,
                "job_id": self.job_id,
                "status": self.status,
                "arguments": self.arguments,
                "environment": json.dumps(self.environment),
                "cpu": self.job_snapshot.get("cpu"),
                "memory": self.job_snapshot.get("memory"),
                "nvidia_gpu": self.job_snapshot.get("nvidia_gpu"),
                "kernel": self.job_snapshot.get("kernel", ""),
                "runtime_identifier": self.job_snapshot.get("runtime_identifier", ""),
                "creator": self.job_snapshot.get("creator", {}),
                "created_at": self.created_at,
                "scheduling_at": self.scheduling_at,
                "starting_at": self.starting_at,
                "running_at": self.running_at,
                "finished_at": self.finished_at,
                # Not CML fields (CML shows a failure reason only through ListWorkloadExecutions):
                # why the run failed, its script's exit code, where its stdout/stderr are kept.
                "failure_reason": self.failure_reason,
                "exit_code": self.exit_code,
                "log_path": str(self.log_path),
            }
        )


@dataclass
class Application(Record):
    KIND: ClassVar[str] = "app"

    id: str
    project_id: str
    name: str
    subdomain: str
    script: str
    log_path: Path
    description: str = ""
    cpu: float = 1.0
    memory: float = 1.0
    nvidia_gpu: int = 0
    kernel: str = ""
    runtime_identifier: str = ""
    runtime_addon_identifiers: list[str] = field(default_factory=list)
    bypass_authentication: bool = False
    environment: dict[str, str] = field(default_factory=dict)
    status: str = "APPLICATION_STARTING"
    creator: dict[str, str] = field(default_factory=current_user)
    created_at: str = field(default_factory=now_timestamp)
    updated_at: str = ""
    running_at: str | None = None
    stopped_at: str | None = None
    started_at: str | None = None
    app_port: int | None = None
    readonly_port: int | None = None
    # The port of the app's own loopback listener (its URL), chosen once for the app's whole life.
    url_port: int = field(default_factory=free_port)
    # Not in the API: the app's process (group leader) and its start time, to re-adopt it after a
    # restart; automatic restarts used since the last start by a user.
    pid: int | None = None
    process_started: float | None = None
    pod_ip: str | None = None  # not in the API: the workload's pod (pods.py), kept for re-adoption
    restart_attempts: int = 0

    def __post_init__(self) -> None:
        self.updated_at = self.updated_at or self.created_at

    def to_api(self) -> dict[str, Any]:
        return _set(
            {
                "id": self.id,
                "name": self.name,
                "subdomain": self.subdomain,
                "description": self.description,
                "script": self.script,
                "status": self.status,
                "cpu": self.cpu,
                "memory": self.memory,
                "nvidia_gpu": self.nvidia_gpu,
                "kernel": self.kernel,
                "runtime_identifier": self.runtime_identifier,
                "runtime_addon_identifiers": list(self.runtime_addon_identifiers),
                "bypass_authentication": self.bypass_authentication,
                "environment": json.dumps(self.environment),
                "creator": dict(self.creator),
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "running_at": self.running_at,
                "stopped_at": self.stopped_at,
                "starting_at": self.started_at,  # the spec's name; the record keeps `started_at`
                # Not a CML field: where this application's stdout/stderr go (appended across restarts).
                "log_path": str(self.log_path),
                # Not a CML field: the application's URL (CML's is https://<subdomain>.<domain>).
                "url": f"http://127.0.0.1:{self.url_port}",
            }
        )
