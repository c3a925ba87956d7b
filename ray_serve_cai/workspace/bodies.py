"""Request bodies of the workspace API as pydantic models: types and defaults stated once.

`parse_body(Model, body)` is the one place where a validation error becomes CML's answer: a 400 with
gRPC code 3 whose message names the field (`cpu must not be negative`, `name is required`). As in
protobuf JSON, a `null` value means the field is not set, and unknown fields are ignored (CML's
grpc-gateway discards them). Checks that need the workspace's state (a known runtime, a free
subdomain, a parent job) stay in `service.py`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo

from ray_serve_cai.workspace.errors import WorkspaceAPIError, invalid_argument
from ray_serve_cai.workspace.model import (
    ENGINE_TYPES,
    PROJECT_TEMPLATES,
    VISIBILITIES,
    validate_script_path,
    validate_subdomain,
)

M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], body: dict[str, Any]) -> M:
    """`body` as `model`, or the CML-shaped 400 naming the first field that is wrong."""
    try:
        return model.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        raise _as_api_error(exc) from None


def _as_api_error(exc: ValidationError) -> WorkspaceAPIError:
    error = exc.errors(include_url=False)[0]
    field = ".".join(str(part) for part in error["loc"]) or "request body"
    if error["type"] == "missing":
        return invalid_argument(f"{field} is required")
    if error["type"] == "value_error":  # our validators' own messages already name the field
        return invalid_argument(str(error["ctx"]["error"]))
    return invalid_argument(f"{field}: {error['msg']}")


# ---------------------------------------------------------------- field types


def _required_string(value: Any, info: ValidationInfo) -> str:
    if isinstance(value, str) and value.strip() == "":
        raise ValueError(f"{info.field_name} is required")
    if not isinstance(value, str):
        raise ValueError(f"{info.field_name} must be a string")
    return value


def _string(value: Any, info: ValidationInfo) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{info.field_name} must be a string")
    return value


def _number(value: Any, info: ValidationInfo) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{info.field_name} must be a number")
    if value < 0:
        raise ValueError(f"{info.field_name} must not be negative")
    return float(value)


def _integer(value: Any, info: ValidationInfo) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # grpc-gateway accepts int64 as strings
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{info.field_name} must be an integer")
    if value < 0:
        raise ValueError(f"{info.field_name} must not be negative")
    return value


def _boolean(value: Any, info: ValidationInfo) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{info.field_name} must be a boolean")
    return value


def _env_map(name: str, value: dict[Any, Any]) -> dict[str, str]:
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise ValueError(f"{name} must map strings to strings (bad entry {key!r})")
    return dict(value)


def _environment_on_create(value: Any, info: ValidationInfo) -> dict[str, str]:
    """On create CML takes `environment` as a JSON object of strings."""
    if not isinstance(value, dict):
        raise ValueError(f"{info.field_name} must be a JSON object of strings on create")
    return _env_map(str(info.field_name), value)


def _environment_on_update(value: Any, info: ValidationInfo) -> dict[str, str]:
    """On update CML takes `environment` as a JSON *string* holding an object; it replaces the map."""
    name = str(info.field_name)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a JSON string on update (e.g. json.dumps of a dict)")
    if value.strip() == "":
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"{name} is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must encode a JSON object")
    return _env_map(name, parsed)


def _string_list(value: Any, info: ValidationInfo) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{info.field_name} must be a list of strings")
    return list(value)


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(value: Any, info: ValidationInfo) -> str:
        if value not in choices:
            raise ValueError(f"{info.field_name} must be one of {', '.join(choices)}")
        return str(value)

    return BeforeValidator(check)


def _script(value: Any, info: ValidationInfo) -> str:
    script = _required_string(value, info)
    try:
        validate_script_path(script)
    except WorkspaceAPIError as exc:
        raise ValueError(exc.message) from None
    return script


def _subdomain(value: Any, info: ValidationInfo) -> str:
    subdomain = _required_string(value, info)
    try:
        validate_subdomain(subdomain)
    except WorkspaceAPIError as exc:
        raise ValueError(exc.message) from None
    return subdomain


RequiredString = Annotated[str, BeforeValidator(_required_string)]
String = Annotated[str, BeforeValidator(_string)]
Number = Annotated[float, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_integer)]
Boolean = Annotated[bool, BeforeValidator(_boolean)]
EnvironmentOnCreate = Annotated[dict[str, str], BeforeValidator(_environment_on_create)]
EnvironmentOnUpdate = Annotated[dict[str, str], BeforeValidator(_environment_on_update)]
StringList = Annotated[list[str], BeforeValidator(_string_list)]
Script = Annotated[str, BeforeValidator(_script)]
Subdomain = Annotated[str, BeforeValidator(_subdomain)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def changes(self) -> dict[str, Any]:
        """The fields the request set (for PATCH: only those change)."""
        return {name: getattr(self, name) for name in self.model_fields_set}


# ---------------------------------------------------------------- projects


class ProjectCreate(_Body):
    """`CreateProjectRequest`. `template` takes the spec's documented values; without one, a `git_url`
    is cloned (at `git_ref` when given) and no `git_url` means `local` (an empty project)."""

    name: RequiredString
    description: String = ""
    git_url: String = ""
    git_ref: String = ""
    parent_project: String = ""
    template: Annotated[str, _one_of(PROJECT_TEMPLATES)] | None = None
    visibility: Annotated[str, _one_of(VISIBILITIES)] = "private"
    default_project_engine_type: Annotated[str, _one_of(ENGINE_TYPES)] = "ml_runtime"
    environment: EnvironmentOnCreate = Field(default_factory=dict)
    shared_memory_limit: Integer = 64


class ProjectUpdate(_Body):
    """`UpdateProject` takes a `Project`: its writable fields change, read-only and unknown ones
    (`project_visibility`, `default_project_engine_type`: not `Project` fields) are ignored as CML does."""

    name: RequiredString | None = None
    description: String | None = None
    visibility: Annotated[str, _one_of(VISIBILITIES)] | None = None
    default_engine_type: Annotated[str, _one_of(ENGINE_TYPES)] | None = None
    shared_memory_limit: Integer | None = None
    environment: EnvironmentOnUpdate | None = None


# ---------------------------------------------------------------- jobs and runs


class JobCreate(_Body):
    name: RequiredString
    script: Script
    cpu: Number = 1.0
    memory: Number = 1.0
    nvidia_gpu: Integer = 0
    environment: EnvironmentOnCreate = Field(default_factory=dict)
    arguments: String = ""
    timeout: Integer = 0
    kill_on_timeout: Boolean = True
    parent_id: String = ""
    parent_job_id: String = ""  # the spec: "deprecated and alias of parent_id"
    schedule: String = ""
    timezone: String = ""
    paused: Boolean = False
    kernel: String = ""
    runtime_identifier: String = ""
    runtime_addon_identifiers: StringList = Field(default_factory=list)


class JobUpdate(_Body):
    """`UpdateJob` takes a `Job`: `paused`, `timezone`, `type`… are read-only there and ignored, as
    is any field the spec does not have (`description`). `timeout` is an int64 (a string on the wire)."""

    name: RequiredString | None = None
    script: Script | None = None
    cpu: Number | None = None
    memory: Number | None = None
    nvidia_gpu: Integer | None = None
    timeout: Integer | None = None
    kill_on_timeout: Boolean | None = None
    arguments: String | None = None
    schedule: String | None = None
    kernel: String | None = None
    runtime_identifier: String | None = None
    runtime_addon_identifiers: StringList | None = None
    parent_id: String | None = None
    environment: EnvironmentOnUpdate | None = None


class RunCreate(_Body):
    environment: EnvironmentOnCreate = Field(default_factory=dict)
    arguments: String = ""  # empty: the job's arguments


# ---------------------------------------------------------------- applications


class AppCreate(_Body):
    name: RequiredString
    subdomain: Subdomain
    script: Script
    description: String = ""
    cpu: Number = 1.0
    memory: Number = 1.0
    nvidia_gpu: Integer = 0
    kernel: String = ""
    runtime_identifier: String = ""
    runtime_addon_identifiers: StringList = Field(default_factory=list)
    bypass_authentication: Boolean = False
    environment: EnvironmentOnCreate = Field(default_factory=dict)


class AppUpdate(_Body):
    name: RequiredString | None = None
    subdomain: Subdomain | None = None
    script: Script | None = None
    description: String | None = None
    kernel: String | None = None
    cpu: Number | None = None
    memory: Number | None = None
    nvidia_gpu: Integer | None = None
    bypass_authentication: Boolean | None = None
    runtime_identifier: String | None = None
    runtime_addon_identifiers: StringList | None = None
    environment: EnvironmentOnUpdate | None = None
