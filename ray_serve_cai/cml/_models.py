"""Typed CML objects (what the API returns) and create requests (what we send).

Returned objects keep every field CML sends, known or not (``model_extra``), so nothing is lost when
the server is newer than this client. ``environment`` comes back as a JSON string and is parsed into a
``dict[str, str]``. Statuses are normalised to upper case (``ENGINE_FAILED``), the form CML documents.
Create requests forbid unknown fields: CML silently ignores a misspelled field (``gpu``, ``num_gpus``),
so we refuse it before sending.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

__all__ = [
    "ACTIVE_RUN_STATUSES",
    "APPLICATION_FAILED",
    "APPLICATION_RUNNING",
    "APPLICATION_STARTING",
    "APPLICATION_STOPPED",
    "APPLICATION_STOPPING",
    "ENGINE_FAILED",
    "ENGINE_RUNNING",
    "ENGINE_SCHEDULING",
    "ENGINE_SKIPPED",
    "ENGINE_STARTING",
    "ENGINE_STOPPED",
    "ENGINE_STOPPING",
    "ENGINE_SUCCEEDED",
    "ENGINE_TIMEDOUT",
    "ENGINE_UNKNOWN",
    "PROJECT_TEMPLATES",
    "TERMINAL_RUN_STATUSES",
    "Application",
    "CMLObject",
    "CreateApplication",
    "CreateJob",
    "FileInfo",
    "Job",
    "JobRun",
    "Project",
    "Runtime",
    "environment_json",
    "parse_environment",
    "parse_timestamp",
]

# Job run statuses: the spec's `EngineStatus` enum. `ENGINE_SKIPPED` (a run CML did not start, e.g. a
# dependent job whose run was skipped) has ended; `ENGINE_UNKNOWN` is neither ended nor active: CML
# does not know, so a follower gives it a bounded grace (deploy/jobs.py).
ENGINE_SCHEDULING = "ENGINE_SCHEDULING"
ENGINE_STARTING = "ENGINE_STARTING"
ENGINE_RUNNING = "ENGINE_RUNNING"
ENGINE_STOPPING = "ENGINE_STOPPING"
ENGINE_STOPPED = "ENGINE_STOPPED"
ENGINE_UNKNOWN = "ENGINE_UNKNOWN"
ENGINE_SUCCEEDED = "ENGINE_SUCCEEDED"
ENGINE_FAILED = "ENGINE_FAILED"
ENGINE_TIMEDOUT = "ENGINE_TIMEDOUT"
ENGINE_SKIPPED = "ENGINE_SKIPPED"
TERMINAL_RUN_STATUSES = frozenset(
    {ENGINE_SUCCEEDED, ENGINE_FAILED, ENGINE_STOPPED, ENGINE_TIMEDOUT, ENGINE_SKIPPED}
)
ACTIVE_RUN_STATUSES = frozenset({ENGINE_SCHEDULING, ENGINE_STARTING, ENGINE_RUNNING, ENGINE_STOPPING})

# `CreateProjectRequest.template` values the spec documents ("local" creates the project and nothing
# else). A project from git sends `git_url` (and `git_ref`) without a template.
PROJECT_TEMPLATES = ("Python", "R", "PySpark", "Scala", "Churn Predictor", "local")

# Application statuses: the spec's `ApplicationStatus` enum.
APPLICATION_STARTING = "APPLICATION_STARTING"
APPLICATION_RUNNING = "APPLICATION_RUNNING"
APPLICATION_STOPPING = "APPLICATION_STOPPING"
APPLICATION_STOPPED = "APPLICATION_STOPPED"
APPLICATION_FAILED = "APPLICATION_FAILED"
APPLICATION_UNKNOWN = "APPLICATION_UNKNOWN"


def parse_environment(value: Any) -> dict[str, str]:
    """``environment`` as a dict: CML returns a JSON string (``""``/null when unset); creates take a dict."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError("environment is not a JSON object") from err
    if not isinstance(value, dict):
        raise ValueError("environment must be a JSON object of strings")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def environment_json(value: Any) -> str:
    """The JSON string CML expects for ``environment`` in a PATCH body; values must be strings."""
    env = parse_environment(value) if isinstance(value, str) else value
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise TypeError("environment must map str to str (convert numbers and booleans yourself)")
    return json.dumps(env, sort_keys=True)


_RFC3339 = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}(?::\d{2})?)"
    r"(?:[.,](?P<fraction>\d+))?\s*(?P<offset>[Zz]|[+-]\d{2}(?::?\d{2})?)?$"
)


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 timestamp as an aware datetime, on every supported Python.

    CML documents ``YYYY-MM-DDThh:mm:ss.uuZ`` and its protobuf JSON may send 0 to 9 fractional
    digits; Python 3.10's ``fromisoformat`` takes only 3 or 6 and no ``Z``. The fraction is cut to
    microseconds; a missing offset means UTC. Raises ValueError for anything else."""
    match = _RFC3339.match(text.strip())
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    clock = match["time"] if match["time"].count(":") == 2 else match["time"] + ":00"
    fraction = (match["fraction"] or "")[:6].ljust(6, "0")
    offset = match["offset"] or "Z"
    if offset in ("Z", "z"):
        offset = "+00:00"
    elif len(offset) == 3:
        offset += ":00"
    elif ":" not in offset:
        offset = f"{offset[:3]}:{offset[3:]}"
    moment = datetime.fromisoformat(f"{match['date']}T{clock}.{fraction}{offset}")
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _timestamp(value: Any) -> Any:
    """RFC 3339 → datetime; empty → None; anything unparseable is kept as the raw string."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return parse_timestamp(value)
        except ValueError:
            return value
    return value


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _none_if_blank(value: Any) -> Any:
    return None if value == "" else value


Timestamp = Annotated[datetime | str | None, BeforeValidator(_timestamp)]
Status = Annotated[str, BeforeValidator(_upper)]
OptionalId = Annotated[str | None, BeforeValidator(_none_if_blank)]
Environment = Annotated[dict[str, str], BeforeValidator(parse_environment)]


class CMLObject(BaseModel):
    """Base of returned objects: unknown fields are kept (``model_extra``), ``id`` is an opaque string."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


class Project(CMLObject):
    """A CML project (``/api/v2/projects``)."""

    name: str
    description: str = ""
    visibility: str | None = None
    default_engine_type: str | None = None
    creation_status: str | None = None
    environment: Environment = Field(default_factory=dict)
    owner: dict[str, Any] | None = None
    creator: dict[str, Any] | None = None
    created_at: Timestamp = None
    updated_at: Timestamp = None


class FileInfo(BaseModel):
    """A project file or directory (``FileInfo``): ``path`` relative to the project root."""

    model_config = ConfigDict(extra="allow")

    path: str
    is_dir: bool = False
    file_size: int | None = None  # an int64 string on the wire; unset for directories


class Runtime(BaseModel):
    """An ML Runtime; pass ``image_identifier`` as ``runtime_identifier``."""

    model_config = ConfigDict(extra="allow")

    image_identifier: str
    editor: str | None = None
    kernel: str | None = None
    edition: str | None = None
    description: str | None = None
    full_version: str | None = None
    status: Status | None = None

    @property
    def is_enabled(self) -> bool:
        """True when CML offers this runtime for new workloads."""
        return self.status == "ENABLED"


class Job(CMLObject):
    """A job. ``parent_id`` is the parent job (``""`` from CML becomes None)."""

    name: str
    script: str = ""
    cpu: float | None = None
    memory: float | None = None
    nvidia_gpu: int | None = None
    parent_id: OptionalId = None
    environment: Environment = Field(default_factory=dict)
    arguments: str | None = None
    timeout: int | None = None  # an int64 string on the wire
    kill_on_timeout: bool | None = None
    schedule: str | None = None
    paused: bool | None = None
    kernel: str | None = None
    runtime_identifier: str | None = None
    type: str | None = None  # manual, cron or dependent
    created_at: Timestamp = None
    updated_at: Timestamp = None


class JobRun(CMLObject):
    """One run of a job."""

    job_id: str | None = None
    project_id: str | None = None
    status: Status = ENGINE_UNKNOWN
    arguments: str | None = None
    environment: Environment = Field(default_factory=dict)
    failure_reason: str | None = None
    created_at: Timestamp = None
    scheduling_at: Timestamp = None
    starting_at: Timestamp = None
    running_at: Timestamp = None
    finished_at: Timestamp = None

    @property
    def is_terminal(self) -> bool:
        """The run has ended (succeeded, failed, stopped, timed out or skipped)."""
        return self.status in TERMINAL_RUN_STATUSES

    @property
    def skipped(self) -> bool:
        """CML skipped the run (``ENGINE_SKIPPED``): it never ran."""
        return self.status == ENGINE_SKIPPED

    @property
    def is_active(self) -> bool:
        """The run is scheduled, starting, running or stopping (a job has at most one)."""
        return self.status in ACTIVE_RUN_STATUSES

    @property
    def succeeded(self) -> bool:
        """The run ended with ``ENGINE_SUCCEEDED``."""
        return self.status == ENGINE_SUCCEEDED


class Application(CMLObject):
    """An application: a long-running workload served at ``<scheme>://<subdomain>.<domain>``."""

    name: str
    subdomain: str = ""
    description: str = ""
    script: str = ""
    status: Status = ""
    cpu: float | None = None
    memory: float | None = None
    nvidia_gpu: int | None = None
    kernel: str | None = None
    runtime_identifier: str | None = None
    bypass_authentication: bool | None = None
    environment: Environment = Field(default_factory=dict)
    created_at: Timestamp = None
    updated_at: Timestamp = None
    starting_at: Timestamp = None
    running_at: Timestamp = None
    stopped_at: Timestamp = None

    @property
    def key(self) -> str:
        """The application's key: its subdomain (unique in a workspace), else its name."""
        return self.subdomain or self.name

    @property
    def is_running(self) -> bool:
        return self.status == APPLICATION_RUNNING

    @property
    def is_stopped(self) -> bool:
        return self.status == APPLICATION_STOPPED

    @property
    def is_failed(self) -> bool:
        return "FAILED" in self.status

    @property
    def is_transitioning(self) -> bool:
        """Starting, stopping or another in-between state."""
        return not (self.is_running or self.is_stopped or self.is_failed)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def body(self) -> dict[str, Any]:
        """The JSON body: unset optional fields are left out so CML applies its own defaults."""
        return self.model_dump(exclude_none=True)


class CreateJob(_Request):
    """Body of ``POST /projects/{id}/jobs`` (``CreateJobRequest``). The parent is ``parent_id``; the
    spec keeps ``parent_job_id`` only as a deprecated alias, so it is not offered here."""

    name: str
    script: str
    cpu: float = 1.0
    memory: float = 1.0
    nvidia_gpu: int = 0
    parent_id: str | None = None
    environment: dict[str, str] | None = None
    arguments: str | None = None
    timeout: int | None = None
    kill_on_timeout: bool | None = None
    schedule: str | None = None
    timezone: str | None = None
    paused: bool | None = None
    kernel: str | None = None
    runtime_identifier: str | None = None
    runtime_addon_identifiers: list[str] | None = None


class CreateApplication(_Request):
    """Body of ``POST /projects/{id}/applications`` (creating also starts the app)."""

    name: str
    subdomain: str
    script: str
    description: str | None = None
    cpu: float = 1.0
    memory: float = 1.0
    nvidia_gpu: int = 0
    environment: dict[str, str] | None = None
    runtime_identifier: str | None = None
    runtime_addon_identifiers: list[str] | None = None
    bypass_authentication: bool = False
    kernel: str | None = None
