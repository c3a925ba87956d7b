"""The cluster spec: `ray_cluster_config.yaml` + env overrides → ClusterSpec → one NodeSpec per app.

Two models describe a cluster. The *file* models (`ClusterFile`) are the YAML format as users write
it (the seed's flat `num_workers`/`worker_cpu`/... keys or `worker_groups`); they give the JSON
Schema and the type/range checks with file paths. `ClusterSpec` is the normalized form the other
layers use. Cross-field rules (names, ports, runtimes, env) run on the normalized form and report
in file paths, so a user always sees where to edit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from ray_serve_cai.config._common import (
    DNS_LABEL,
    MAX_APP_NAME,
    env_int,
    env_value,
    environment_problems,
    is_relative_script,
    load_yaml,
    python_version_of,
    spec_digest,
)
from ray_serve_cai.config.errors import (
    REMOVED,
    ConfigError,
    Problem,
    format_path,
    lenient_validate,
    problems_from_validation,
    suggest,
)
from ray_serve_cai.config.node_env import (
    AUTOSCALER_VARIABLE,
    CLUSTER_VARIABLE,
    NODE_ID_RESOURCE_VARIABLE,
    NodeEnvironment,
)

DEFAULT_CLUSTER_FILE = "ray_cluster_config.yaml"
_HASH_VERSION = 1  # bump when the meaning of a node's environment changes, to replace old apps

_STRICT = ConfigDict(strict=True, extra="forbid")
Cpu = Annotated[float, Field(gt=0, description="vCPU cores of the application")]
MemoryGiB = Annotated[float, Field(gt=0, description="memory of the application in GiB")]
Gpus = Annotated[int, Field(ge=0, description="NVIDIA GPUs of the application")]
Port = Annotated[int, Field(ge=0, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
Environment = dict[str, str]


# --------------------------------------------------------------------------- normalized spec


class HeadSpec(BaseModel):
    """Resources and runtime of the head application."""

    model_config = _STRICT

    cpu: Cpu = 2
    memory: MemoryGiB = 8
    gpus: Gpus = 0
    runtime_identifier: str | None = None
    ray_cpus: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="CPUs Ray advertises on the head (None = cpu; 0 keeps tasks off the head)"
    )


class WorkerGroupSpec(BaseModel):
    """A set of identical worker applications; autoscaled when it has min and max replicas."""

    model_config = _STRICT

    name: str
    replicas: Annotated[int, Field(ge=0)]
    cpu: Cpu
    memory: MemoryGiB
    gpus: Gpus = 0
    runtime_identifier: str | None = None
    min_replicas: Annotated[int, Field(ge=0)] | None = None
    max_replicas: Annotated[int, Field(ge=0)] | None = None

    @property
    def autoscaled(self) -> bool:
        """Ray's autoscaler owns this group's size (between min_replicas and max_replicas)."""
        return self.min_replicas is not None and self.max_replicas is not None

    @property
    def most_replicas(self) -> int:
        """The largest size the group can have: max_replicas when autoscaled, else replicas."""
        return self.max_replicas if self.max_replicas is not None else self.replicas


class AutoscalingSpec(BaseModel):
    """Settings of Ray's autoscaler for the autoscaled worker groups."""

    model_config = _STRICT

    idle_timeout: Annotated[float, Field(gt=0)] = 60
    upscaling_speed: Annotated[float, Field(gt=0)] = 1.0


AUTOSTOP_DEFAULT_CHECK_INTERVAL = 30.0


class AutostopSpec(BaseModel):
    """Autostop: the head stops (or deletes) the cluster once it has been idle for `idle_timeout`
    seconds (see ray_serve_cai.node.autostop). Not part of any node's hash: changing it restarts
    nothing, the head re-reads it from the applied spec every `check_interval` seconds."""

    model_config = _STRICT

    idle_timeout: Annotated[float, Field(gt=0)]
    action: Literal["stop", "down"] = "stop"
    check_interval: Annotated[float, Field(gt=0)] = AUTOSTOP_DEFAULT_CHECK_INTERVAL


class RayPorts(BaseModel):
    """Head ports; 0 = pick a free port when the head starts and publish it in the rendezvous."""

    model_config = _STRICT

    gcs: Port = 6379
    client: Port = 10001
    dashboard: Port = 8265


class ServeSpec(BaseModel):
    """Serve applications the cluster runs: `config` is a project-relative file in Serve's format."""

    model_config = _STRICT

    config: str


class ClusterSpec(BaseModel):
    """A whole Ray cluster: one head and any number of worker groups."""

    model_config = _STRICT

    name: str = "default"
    head: HeadSpec = Field(default_factory=HeadSpec)
    worker_groups: list[WorkerGroupSpec] = Field(default_factory=list)
    runtime_identifier: str | None = None
    ports: RayPorts = Field(default_factory=RayPorts)
    auth_token: bool = True
    startup_timeout: Seconds = 600
    # Seconds the self-healing watch leaves a failed application to CML's automatic restart (on by
    # default: 3 attempts, 5 minutes apart) before restarting it itself; 0 where it is turned off.
    cml_restart_wait: Annotated[float, Field(ge=0)] = 330
    join_timeout: Seconds = 600
    head_script: str = "cai_integration/ray_head.py"
    worker_script: str = "cai_integration/ray_worker.py"
    environment: Environment = Field(default_factory=dict)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    serve: ServeSpec | None = None  # not part of any node's hash: Serve changes apply in place
    autostop: AutostopSpec | None = None  # None = off; not part of any node's hash either
    # GCS state in the project, one GCS per cluster (a lease), workers riding through a head restart
    # (ray_serve_cai.node.gcs_storage, head_lease, gcs_relay). Part of every node's hash.
    head_fault_tolerance: bool = True

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> ClusterSpec:
        if info.context and info.context.get("skip_cross_field"):
            return self
        problems = cluster_problems(self)
        if problems:
            raise ValueError("; ".join(f"{p.field}: {p.message}" for p in problems))
        return self

    def group(self, name: str) -> WorkerGroupSpec:
        """The worker group called ``name``; KeyError if there is none."""
        for group in self.worker_groups:
            if group.name == name:
                return group
        known = ", ".join(g.name for g in self.worker_groups) or "none"
        raise KeyError(f"no worker group {name!r} in cluster {self.name!r} (groups: {known})")

    def with_replicas(self, replicas: int, group: str | None = None) -> ClusterSpec:
        """A validated copy with ``replicas`` workers in ``group`` (None = the only group).

        Raises ConfigError when the group is ambiguous or unknown or the result is invalid.
        """
        source = f"cluster {self.name!r}"
        if group is None:
            if len(self.worker_groups) != 1:
                names = ", ".join(g.name for g in self.worker_groups) or "none"
                raise ConfigError(
                    [Problem("group", f"name the worker group to scale; this cluster has: {names}")], source
                )
            group = self.worker_groups[0].name
        names = [g.name for g in self.worker_groups]
        if group not in names:
            raise ConfigError(
                [Problem("group", f"no worker group {group!r}{suggest(group, names)} (groups: {names})")],
                source,
            )
        index = names.index(group)
        chosen = self.worker_groups[index]
        if chosen.autoscaled:
            raise ConfigError(
                [
                    Problem(
                        "group",
                        f"worker group {group!r} is autoscaled (min_replicas {chosen.min_replicas}, "
                        f"max_replicas {chosen.max_replicas}): Ray's autoscaler sets its size; change "
                        "min_replicas/max_replicas in the config file and run `ray-cai up` instead",
                    )
                ],
                source,
            )
        data = self.model_dump()
        data["worker_groups"][index]["replicas"] = replicas
        return validate_cluster_spec(data, source=source)

    @property
    def total_workers(self) -> int:
        return sum(g.replicas for g in self.worker_groups)

    @property
    def autoscaled_groups(self) -> list[WorkerGroupSpec]:
        """The groups whose size Ray's autoscaler owns."""
        return [g for g in self.worker_groups if g.autoscaled]

    def runtime_of(self, group: str | None = None) -> str | None:
        """The runtime the head (group None) or a worker group runs: its own, else the cluster's."""
        own = self.head.runtime_identifier if group is None else self.group(group).runtime_identifier
        return own if own is not None else self.runtime_identifier


def validate_cluster_spec(data: Any, *, source: str = "cluster spec") -> ClusterSpec:
    """Validate a ClusterSpec-shaped mapping (not the YAML format); every problem in one ConfigError."""
    try:
        spec = ClusterSpec.model_validate(data, context={"skip_cross_field": True})
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, ClusterSpec), source) from None
    problems = cluster_problems(spec)
    if problems:
        raise ConfigError(problems, source)
    return spec


class NodeSpec(BaseModel):
    """One application of the cluster, as the reconciler creates it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str  # = app name = subdomain
    role: Literal["head", "worker"]
    group: str  # "head" for the head
    index: int
    cpu: float
    memory: float
    gpus: int
    runtime_identifier: str | None
    script: str
    spec_hash: str
    environment: dict[str, str]  # the RAY_CAI_* variables, then the cluster's `environment`

    def app_fields(self) -> dict[str, Any]:
        """The CML application fields of this node (create and update), besides name/subdomain."""
        fields: dict[str, Any] = {
            "script": self.script,
            "cpu": self.cpu,
            "memory": self.memory,
            "nvidia_gpu": self.gpus,
            "environment": dict(self.environment),
        }
        if self.runtime_identifier:
            fields["runtime_identifier"] = self.runtime_identifier
        return fields

    @property
    def description(self) -> str:
        cluster = self.environment.get(CLUSTER_VARIABLE)
        return f"Ray {self.role} of ray-cai cluster {cluster!r} (group {self.group})"


_COMMON_VARIABLES = (
    "cluster",
    "spec_hash",
    "role",
    "group",
    "node_name",
    "num_cpus",
    "num_gpus",
    "memory_gb",
)
_HEAD_VARIABLES = (
    *_COMMON_VARIABLES,
    "gcs_port",
    "client_port",
    "dashboard_port",
    "auth",
    "polling_endpoint",
    "head_ft",
)
_WORKER_VARIABLES = (*_COMMON_VARIABLES, "memory_gb", "auth", "join_timeout", "polling_endpoint", "head_ft")


def head_app_name(cluster: str) -> str:
    return f"ray-{cluster}-head"


def worker_app_name(cluster: str, group: str, index: int) -> str:
    return f"ray-{cluster}-{group}-{index}"


# Variables of the autoscaling machinery (see ray_serve_cai.autoscale).
APPLIED_SPEC_VARIABLE = "RAY_CAI_APPLIED_SPEC"  # the spec a pass applied, on the head (cluster/applied.py)


def node_id_resource(app_name: str) -> int:
    """The integer a node advertises as Ray's `NODE_ID_AS_RESOURCE`: stable per app name, unique
    within a cluster in practice (28 bits of a hash; names are unique per project). Ray's
    autoscaler with `use_node_id_as_ip` uses it as the node's "ip", so the provider can match an
    application to its Ray node without knowing the pod's IP (all local nodes share 127.0.0.1)."""
    return int(hashlib.sha256(app_name.encode()).hexdigest()[:7], 16) + 1


def spec_from_applied(value: str | None) -> ClusterSpec | None:
    """The effective spec (runtimes filled in) of an applied-spec record (`RAY_CAI_APPLIED_SPEC`:
    `{"spec": ..., "runtimes": {"head": ..., <group>: ...}, ...}`, see ray_serve_cai.cluster.applied);
    None when absent or unreadable. The runtimes are filled as the reconciler fills them, so apps
    created from it hash as `up` would create them."""
    if not value:
        return None
    try:
        body = json.loads(value)
        spec = validate_cluster_spec(body["spec"], source=APPLIED_SPEC_VARIABLE)
        runtimes = dict(body.get("runtimes") or {})
    except (ValueError, KeyError, TypeError, ConfigError):
        return None
    head = spec.head.model_copy(update={"runtime_identifier": spec.runtime_of(None) or runtimes.get("head")})
    groups = [
        g.model_copy(update={"runtime_identifier": spec.runtime_of(g.name) or runtimes.get(g.name)})
        for g in spec.worker_groups
    ]
    return spec.model_copy(update={"head": head, "worker_groups": groups})


def worker_index_of(cluster: str, group: str, app_name: str) -> int | None:
    """The index in `ray-<cluster>-<group>-<index>`, or None when ``app_name`` is not such a name."""
    prefix = worker_app_name(cluster, group, 0)[:-1]
    suffix = app_name[len(prefix) :] if app_name.startswith(prefix) else ""
    if not suffix.isdigit() or worker_app_name(cluster, group, int(suffix)) != app_name:
        return None
    return int(suffix)


def head_spec_hash(spec: ClusterSpec) -> str:
    """Hash of everything that shapes the head app; worker counts are not part of it."""
    return spec_digest(
        {
            "v": _HASH_VERSION,
            "role": "head",
            "cluster": spec.name,
            "cpu": spec.head.cpu,
            "memory": spec.head.memory,
            "gpus": spec.head.gpus,
            "ray_cpus": spec.head.ray_cpus,
            "runtime": spec.runtime_of(None),
            "ports": spec.ports,
            "auth": spec.auth_token,
            "script": spec.head_script,
            "environment": spec.environment,
            # Only present when true, so hashes of clusters without autoscaling stay as they were.
            # Bounds and idle timeout are not part of it: the autoscaler re-reads them, no restart.
            **({"autoscaler": True} if spec.autoscaled_groups else {}),
            **({"head_ft": True} if spec.head_fault_tolerance else {}),
        }
    )


def worker_spec_hash(spec: ClusterSpec, group: str) -> str:
    """Hash of everything that shapes one worker app of ``group``; replicas and index excluded."""
    g = spec.group(group)
    return spec_digest(
        {
            "v": _HASH_VERSION,
            "role": "worker",
            "cluster": spec.name,
            "group": g.name,
            "cpu": g.cpu,
            "memory": g.memory,
            "gpus": g.gpus,
            "runtime": spec.runtime_of(g.name),
            "script": spec.worker_script,
            "auth": spec.auth_token,
            "join_timeout": spec.join_timeout,
            "environment": spec.environment,
            # Every worker of a cluster with autoscaling advertises NODE_ID_AS_RESOURCE (fixed groups
            # too, so Ray's autoscaler counts their capacity); only present then, as for the head.
            **({"node_id_resource": True} if spec.autoscaled_groups else {}),
            **({"head_ft": True} if spec.head_fault_tolerance else {}),
        }
    )


def head_node(spec: ClusterSpec) -> NodeSpec:
    """The head application of the cluster."""
    auth = "token" if spec.auth_token else "disabled"
    head_name = head_app_name(spec.name)
    head_hash = head_spec_hash(spec)
    head_cpus = spec.head.ray_cpus if spec.head.ray_cpus is not None else spec.head.cpu
    autoscaling: dict[str, str] = {}
    if spec.autoscaled_groups:  # the head reads the applied spec the reconciler records on it
        autoscaling = {
            AUTOSCALER_VARIABLE: "1",
            NODE_ID_RESOURCE_VARIABLE: str(node_id_resource(head_name)),
        }
    return NodeSpec(
        name=head_name,
        role="head",
        group="head",
        index=0,
        cpu=spec.head.cpu,
        memory=spec.head.memory,
        gpus=spec.head.gpus,
        runtime_identifier=spec.runtime_of(None),
        script=spec.head_script,
        spec_hash=head_hash,
        environment={
            **NodeEnvironment(
                cluster=spec.name,
                spec_hash=head_hash,
                role="head",
                group="head",
                node_name=head_name,
                num_cpus=head_cpus,
                num_gpus=spec.head.gpus,
                memory_gb=spec.head.memory,
                gcs_port=spec.ports.gcs,
                client_port=spec.ports.client,
                dashboard_port=spec.ports.dashboard,
                auth=auth,
                head_ft=spec.head_fault_tolerance,
            ).to_env(*_HEAD_VARIABLES),
            **autoscaling,
            **spec.environment,
        },
    )


def worker_node(spec: ClusterSpec, group: str, index: int) -> NodeSpec:
    """Worker ``index`` of ``group``: the application `up` and the autoscaler both create."""
    g = spec.group(group)
    auth = "token" if spec.auth_token else "disabled"
    group_hash = worker_spec_hash(spec, g.name)
    name = worker_app_name(spec.name, g.name, index)
    autoscaling = {NODE_ID_RESOURCE_VARIABLE: str(node_id_resource(name))} if spec.autoscaled_groups else {}
    return NodeSpec(
        name=name,
        role="worker",
        group=g.name,
        index=index,
        cpu=g.cpu,
        memory=g.memory,
        gpus=g.gpus,
        runtime_identifier=spec.runtime_of(g.name),
        script=spec.worker_script,
        spec_hash=group_hash,
        environment={
            **NodeEnvironment(
                cluster=spec.name,
                spec_hash=group_hash,
                role="worker",
                group=g.name,
                node_name=name,
                num_cpus=g.cpu,
                num_gpus=g.gpus,
                memory_gb=g.memory,
                auth=auth,
                join_timeout=spec.join_timeout,
                head_ft=spec.head_fault_tolerance,
            ).to_env(*_WORKER_VARIABLES),
            **autoscaling,
            **spec.environment,
        },
    )


def desired_nodes(spec: ClusterSpec) -> list[NodeSpec]:
    """Every app the cluster should have: head first, then each group's workers, index 0..replicas-1.

    For an autoscaled group `replicas` is only the starting size; the planner
    (`ray_serve_cai.cluster.plan.desired_for`) keeps what the autoscaler chose instead."""
    nodes = [head_node(spec)]
    for group in spec.worker_groups:
        nodes += [worker_node(spec, group.name, index) for index in range(group.replicas)]
    return nodes


def _bounds_problems(group: WorkerGroupSpec, named: Callable[[str], str]) -> list[tuple[str, str]]:
    """0 <= min_replicas <= replicas <= max_replicas, as (field, message) pairs; `named` gives
    the key as the user wrote it (min_workers in the flat form)."""
    low, high = group.min_replicas, group.max_replicas
    if low is None and high is None:
        return []
    if high is None:
        return [("max_replicas", f"is required with {named('min_replicas')} (autoscaling needs both)")]
    if low is None:
        return [("min_replicas", f"is required with {named('max_replicas')} (autoscaling needs both)")]
    if low > high:
        return [("min_replicas", f"must be at most {named('max_replicas')} ({high}), got {low}")]
    if not low <= group.replicas <= high:
        return [
            (
                "replicas",
                f"the starting size must be between {named('min_replicas')} ({low}) and "
                f"{named('max_replicas')} ({high}), got {group.replicas}",
            )
        ]
    return []


_NAME_RULE = "must be lowercase letters, digits and single hyphens, starting and ending with a letter/digit"


def cluster_problems(spec: ClusterSpec, where: Callable[[str], str] = lambda p: p) -> list[Problem]:
    """Cross-field rules of a field-valid spec. ``where`` maps spec paths to the paths users edit."""
    found = [
        *_name_problems(spec, where),
        *_autoscaling_problems(spec, where),
        *_port_problems(spec),
        *_python_problems(spec, where),
        *(
            (field, why)
            for field in ("head_script", "worker_script")
            if (why := is_relative_script(getattr(spec, field)))
        ),
        *((p.field, p.message) for p in environment_problems(spec.environment, "environment")),
        *(
            [("serve.config", why)]
            if spec.serve is not None and (why := is_relative_script(spec.serve.config))
            else []
        ),
    ]
    return [Problem(where(path), message) for path, message in found]


def _name_problems(spec: ClusterSpec, where: Callable[[str], str]) -> Iterator[tuple[str, str]]:
    """App names: the cluster and group names are DNS labels, unique, and short enough."""
    name_ok = bool(DNS_LABEL.match(spec.name))
    if not name_ok:
        yield "name", f"{_NAME_RULE} (it becomes part of every app name and subdomain), got {spec.name!r}"
    elif len(head_app_name(spec.name)) > MAX_APP_NAME:
        name_ok = False  # every worker app name is longer still; one problem is enough
        yield "name", f"app name {head_app_name(spec.name)!r} is longer than {MAX_APP_NAME} characters"
    seen: dict[str, int] = {}
    for i, group in enumerate(spec.worker_groups):
        path = f"worker_groups[{i}].name"
        if not DNS_LABEL.match(group.name):
            yield path, f"{_NAME_RULE}, got {group.name!r}"
            continue
        if group.name == "head":
            yield path, "'head' is reserved for the head node; pick another group name"
        if group.name in seen:
            first = where(f"worker_groups[{seen[group.name]}].name")
            yield path, f"duplicate group name {group.name!r} (also {first})"
        seen.setdefault(group.name, i)
        longest = worker_app_name(spec.name, group.name, max(group.most_replicas - 1, 0))
        if name_ok and len(longest) > MAX_APP_NAME:
            yield (
                path,
                f"app name {longest!r} is {len(longest)} characters; the limit is {MAX_APP_NAME} "
                "(shorten the cluster or group name)",
            )


def _autoscaling_problems(spec: ClusterSpec, where: Callable[[str], str]) -> Iterator[tuple[str, str]]:
    """Bounds of autoscaled groups, named as the user wrote them (min_workers in the flat form)."""
    for i, group in enumerate(spec.worker_groups):
        path = f"worker_groups[{i}]"

        def named(field: str, path: str = path) -> str:
            return where(f"{path}.{field}").rpartition(".")[2]

        for field, message in _bounds_problems(group, named):
            yield f"{path}.{field}", message


def _port_problems(spec: ClusterSpec) -> Iterator[tuple[str, str]]:
    used: dict[int, str] = {}
    for port_name in ("gcs", "client", "dashboard"):
        port = getattr(spec.ports, port_name)
        if port != 0 and port in used:
            yield f"ports.{port_name}", f"port {port} is also the {used[port]} port; ports must be distinct"
        elif port != 0:
            used[port] = port_name


def _python_problems(spec: ClusterSpec, where: Callable[[str], str]) -> Iterator[tuple[str, str]]:
    """Head and workers share the project's venv, so one Python version for all of them."""
    # (path of the runtime's field, identifier); not runtime_of(): group names may repeat here.
    runtimes = [
        (
            "head.runtime_identifier" if spec.head.runtime_identifier is not None else "runtime_identifier",
            spec.runtime_of(None),
        )
    ]
    for i, group in enumerate(spec.worker_groups):
        own = group.runtime_identifier is not None
        path = f"worker_groups[{i}].runtime_identifier" if own else "runtime_identifier"
        runtimes.append((path, group.runtime_identifier if own else spec.runtime_identifier))
    versions = [
        (path, runtime, python_version_of(runtime))
        for path, runtime in runtimes
        if python_version_of(runtime)
    ]
    if not versions:
        return
    first_path, _, first_version = versions[0]
    reported: set[str] = set()
    for path, runtime, version in versions[1:]:
        if version != first_version and path not in reported:
            reported.add(path)
            yield (
                path,
                f"runtime {runtime!r} has Python {version} but {where(first_path)} has Python "
                f"{first_version}; head and workers share one venv and must use one Python version",
            )


# --------------------------------------------------------------------------- the YAML file format

_FILE = ConfigDict(strict=True, extra="forbid")


class PortsFile(BaseModel):
    """`ray_cluster.ports`: head ports (0 = pick a free one at start)."""

    model_config = _FILE

    gcs: Port = Field(6379, description="GCS port (`ray start --port`)")
    client: Port = Field(10001, description="Ray Client server port")
    dashboard: Port = Field(8265, description="dashboard port, served through the head app")


class AuthFile(BaseModel):
    """`ray_cluster.auth`."""

    model_config = _FILE

    token: bool = Field(True, description="Ray token authentication (RAY_AUTH_MODE=token); on by default")


class ServeFile(BaseModel):
    """`ray_cluster.serve`: Serve applications deployed (and kept deployed) on the cluster."""

    model_config = _FILE

    config: str = Field(
        description="project-relative file in Ray Serve's config format (what `serve build` writes)"
    )


class WorkerGroupFile(BaseModel):
    """One entry of `ray_cluster.worker_groups`."""

    model_config = _FILE

    name: str = Field(description="group name; part of the app names ray-<cluster>-<group>-<index>")
    replicas: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="number of worker apps; for an autoscaled group the starting size (default min_replicas)",
    )
    cpu: Cpu
    memory: MemoryGiB
    gpus: Gpus = 0
    runtime_identifier: str | None = Field(None, description="ML Runtime image; default: runtime_identifier")
    min_replicas: Annotated[int, Field(ge=0)] | None = Field(
        None, description="with max_replicas: Ray's autoscaler keeps the group between the two"
    )
    max_replicas: Annotated[int, Field(ge=0)] | None = Field(
        None, description="with min_replicas: the most worker apps the autoscaler may create"
    )


class AutoscalingFile(BaseModel):
    """`ray_cluster.autoscaling`: Ray's autoscaler, for groups with min/max replicas."""

    model_config = _FILE

    idle_timeout: Seconds = Field(60, description="seconds a worker may be idle before it is removed")
    upscaling_speed: Annotated[float, Field(gt=0)] = Field(
        1.0, description="Ray's upscaling_speed: nodes added per update, as a fraction of the group's size"
    )


class AutostopFile(BaseModel):
    """`ray_cluster.autostop`: stop (or delete) the cluster once it has been idle this long."""

    model_config = _FILE

    idle_timeout: Seconds = Field(
        description=(
            "seconds the cluster may be idle (no job pending or running, no task, actor or placement group "
            "waiting for resources, no driver or Ray client connected, no Serve request) before the action"
        )
    )
    action: Literal["stop", "down"] = Field(
        "stop",
        description="stop: stop every application (settings and Serve config kept; `ray-cai up` starts it); "
        "down: delete them as `ray-cai down` does (logs kept)",
    )
    check_interval: Seconds = Field(
        AUTOSTOP_DEFAULT_CHECK_INTERVAL,
        description="seconds between the head's idleness checks (also how soon a changed setting is seen)",
    )


class RayClusterFile(BaseModel):
    """`ray_cluster:` — the seed's flat keys define one worker group named `worker`;
    use `worker_groups` instead for heterogeneous clusters."""

    model_config = _FILE

    name: str = Field("default", description="cluster name; apps are ray-<name>-head, ray-<name>-<group>-<i>")
    runtime_identifier: str | None = Field(
        None, description="ML Runtime image for head and workers (env RUNTIME_IDENTIFIER overrides)"
    )
    head_cpu: Cpu = 2
    head_memory: MemoryGiB = 8
    head_gpus: Gpus = 0
    head_ray_cpus: Annotated[float, Field(ge=0)] | None = Field(
        None, description="CPUs Ray advertises on the head (default head_cpu; 0 keeps tasks off the head)"
    )
    head_runtime_identifier: str | None = None
    num_workers: Annotated[int, Field(ge=0)] = Field(
        1, description="workers of the single group `worker` (env RAY_NUM_WORKERS overrides)"
    )
    worker_cpu: Cpu = 2
    worker_memory: MemoryGiB = 8
    worker_gpus: Gpus = Field(0, description="GPUs per worker (env RAY_WORKER_GPUS overrides)")
    worker_runtime_identifier: str | None = None
    min_workers: Annotated[int, Field(ge=0)] | None = Field(
        None, description="with max_workers: autoscale the group `worker` (num_workers = starting size)"
    )
    max_workers: Annotated[int, Field(ge=0)] | None = Field(
        None, description="with min_workers: the most workers Ray's autoscaler may add"
    )
    worker_groups: list[WorkerGroupFile] | None = Field(
        None, description="heterogeneous worker groups; excludes num_workers and the worker_* keys"
    )
    ports: PortsFile = Field(default_factory=PortsFile)
    auth: AuthFile = Field(default_factory=AuthFile)
    startup_timeout: Seconds = Field(600, description="seconds `up` waits for the apps and Ray")
    cml_restart_wait: Annotated[float, Field(ge=0)] = Field(
        330,
        description=(
            "seconds the watch (`up --watch`, the supervising launch job) leaves a failed application to "
            "CML's automatic restart before restarting it itself; 0 if your administrator turned it off"
        ),
    )
    join_timeout: Seconds = Field(600, description="seconds a worker waits for the head's rendezvous")
    head_script: str = Field("cai_integration/ray_head.py", description="project-relative head launcher")
    worker_script: str = Field("cai_integration/ray_worker.py", description="project-relative launcher")
    environment: Environment = Field(
        default_factory=dict, description="extra non-secret environment variables for every node"
    )
    autoscaling: AutoscalingFile = Field(default_factory=AutoscalingFile)
    serve: ServeFile | None = Field(None, description="Serve applications to deploy on the cluster")
    autostop: AutostopFile | None = Field(
        None, description="stop or delete the cluster when idle (default: off); `ray-cai autostop` changes it"
    )
    head_fault_tolerance: bool = Field(
        True,
        description=(
            "a head restart loses nothing: GCS state in the project (RocksDB), one GCS per cluster "
            "(a lease), workers ride through a head restart; changing it replaces every node"
        ),
    )


class ClusterFile(BaseModel):
    """`ray_cluster_config.yaml`."""

    model_config = ConfigDict(
        strict=True, extra="forbid", title="ray-serve-cai cluster config (ray_cluster_config.yaml)"
    )

    ray_cluster: RayClusterFile = Field(default_factory=RayClusterFile)


_FLAT_WORKER_KEYS = (
    "num_workers",
    "worker_cpu",
    "worker_memory",
    "worker_gpus",
    "worker_runtime_identifier",
    "min_workers",
    "max_workers",
)
_FLAT_PATHS = {
    "replicas": "num_workers",
    "min_replicas": "min_workers",
    "max_replicas": "max_workers",
    "cpu": "worker_cpu",
    "memory": "worker_memory",
    "gpus": "worker_gpus",
    "runtime_identifier": "worker_runtime_identifier",
    "name": "name",  # the group `worker` is fixed; only the cluster name can shorten its app names
}
_HEAD_PATHS = {f: f"head_{f}" for f in ("cpu", "memory", "gpus", "ray_cpus", "runtime_identifier")}


def cluster_json_schema() -> dict[str, Any]:
    """JSON Schema of `ray_cluster_config.yaml` (for editors and `ray-cai config schema`)."""
    schema = ClusterFile.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# The environment variables that override `ray_cluster_config.yaml` (see `_apply_env`).
CLUSTER_OVERRIDE_VARIABLES = ("RAY_CLUSTER_NAME", "RUNTIME_IDENTIFIER", "RAY_NUM_WORKERS", "RAY_WORKER_GPUS")


def cluster_overrides(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The override variables set (non-empty) in ``env`` (default ``os.environ``), by name."""
    env = os.environ if env is None else env
    return {name: value for name in CLUSTER_OVERRIDE_VARIABLES if (value := env_value(env, name)) is not None}


def _apply_env(
    data: Any, env: Mapping[str, str], problems: list[Problem], overridden: dict[str, str]
) -> None:
    """Env overrides, applied to the raw YAML data in place (before validation)."""
    if not isinstance(data, dict):
        return
    section = data.setdefault("ray_cluster", {})
    if section is None:
        section = data["ray_cluster"] = {}
    if not isinstance(section, dict):
        return

    def put(target: dict[str, Any], key: str, value: Any, path: str, variable: str) -> None:
        target[key] = value
        overridden[path] = variable

    for variable, key in (("RAY_CLUSTER_NAME", "name"), ("RUNTIME_IDENTIFIER", "runtime_identifier")):
        if (value := env_value(env, variable)) is not None:
            put(section, key, value, f"ray_cluster.{key}", variable)
    _apply_worker_env(section, env, problems, put)


Put = Callable[[dict[str, Any], str, Any, str, str], None]


def _apply_worker_env(
    section: dict[str, Any], env: Mapping[str, str], problems: list[Problem], put: Put
) -> None:
    """RAY_NUM_WORKERS (the only group's size) and RAY_WORKER_GPUS (every group's GPUs)."""
    groups = section.get("worker_groups")
    if (replicas := env_int(env, "RAY_NUM_WORKERS", problems)) is not None:
        if groups is None:
            put(section, "num_workers", replicas, "ray_cluster.num_workers", "RAY_NUM_WORKERS")
        elif isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict):
            put(groups[0], "replicas", replicas, "ray_cluster.worker_groups[0].replicas", "RAY_NUM_WORKERS")
        elif isinstance(groups, list):
            message = (
                f"sets the size of the only worker group, but this cluster has {len(groups)} groups; "
                "set replicas per group in the file instead"
            )
            problems.append(Problem("RAY_NUM_WORKERS", message))
    if (gpus := env_int(env, "RAY_WORKER_GPUS", problems)) is not None:
        if groups is None:
            put(section, "worker_gpus", gpus, "ray_cluster.worker_gpus", "RAY_WORKER_GPUS")
        for i, group in enumerate(groups if isinstance(groups, list) else []):
            if isinstance(group, dict):
                put(group, "gpus", gpus, f"ray_cluster.worker_groups[{i}].gpus", "RAY_WORKER_GPUS")


# A bad or missing required value of a worker group is replaced by a stand-in for the lenient pass,
# so the group's other fields (name, runtime) are still checked.
_GROUP_STAND_INS: dict[str, Any] = {"replicas": 0, "cpu": 1.0, "memory": 1.0}


def _structure_problems(data: Any) -> list[Problem]:
    if data is None:
        return [Problem("", "the file is empty; expected a mapping with a `ray_cluster:` section")]
    if not isinstance(data, dict):
        return [Problem("", f"expected a mapping with a `ray_cluster:` section, got {type(data).__name__}")]
    problems = []
    section = data.get("ray_cluster")
    if isinstance(section, dict) and "worker_groups" in section:
        for key in _FLAT_WORKER_KEYS:
            if key in section:
                problems.append(
                    Problem(
                        f"ray_cluster.{key}",
                        "cannot be combined with worker_groups; set it on each group instead",
                    )
                )
    return problems


def _normalize(file: ClusterFile, group_index: list[int]) -> tuple[dict[str, Any], Callable[[str], str]]:
    """The ClusterSpec-shaped data of a validated file, and a map from spec paths to file paths."""
    rc = file.ray_cluster
    flat = rc.worker_groups is None
    if flat:
        explicit = "num_workers" in rc.model_fields_set
        groups = [
            {
                "name": "worker",
                "replicas": rc.num_workers if explicit or rc.min_workers is None else rc.min_workers,
                "cpu": rc.worker_cpu,
                "memory": rc.worker_memory,
                "gpus": rc.worker_gpus,
                "runtime_identifier": rc.worker_runtime_identifier,
                "min_replicas": rc.min_workers,
                "max_replicas": rc.max_workers,
            }
        ]
    else:
        groups = [g.model_dump() for g in rc.worker_groups or []]
        for group in groups:
            if group["replicas"] is None:  # a missing `replicas` is reported by _replicas_problems
                group["replicas"] = group["min_replicas"] if group["min_replicas"] is not None else 0
    data = {
        "name": rc.name,
        "head": {
            "cpu": rc.head_cpu,
            "memory": rc.head_memory,
            "gpus": rc.head_gpus,
            "runtime_identifier": rc.head_runtime_identifier,
            "ray_cpus": rc.head_ray_cpus,
        },
        "worker_groups": groups,
        "runtime_identifier": rc.runtime_identifier,
        "ports": rc.ports.model_dump(),
        "auth_token": rc.auth.token,
        "startup_timeout": rc.startup_timeout,
        "cml_restart_wait": rc.cml_restart_wait,
        "join_timeout": rc.join_timeout,
        "head_script": rc.head_script,
        "worker_script": rc.worker_script,
        "environment": dict(rc.environment),
        "autoscaling": rc.autoscaling.model_dump(),
        "serve": rc.serve.model_dump() if rc.serve is not None else None,
        "autostop": rc.autostop.model_dump() if rc.autostop is not None else None,
        "head_fault_tolerance": rc.head_fault_tolerance,
    }

    def where(path: str) -> str:
        if path.startswith("worker_groups["):
            index_text, _, rest = path[len("worker_groups[") :].partition("].")
            if flat:
                return f"ray_cluster.{_FLAT_PATHS.get(rest, rest)}"
            return f"ray_cluster.worker_groups[{group_index[int(index_text)]}].{rest}"
        if path.startswith("head."):
            return f"ray_cluster.{_HEAD_PATHS.get(path[5:], path[5:])}"
        if path == "auth_token":
            return "ray_cluster.auth.token"
        return f"ray_cluster.{path}" if path else "ray_cluster"

    return data, where


def _replicas_problems(file: ClusterFile, group_index: list[int]) -> list[Problem]:
    """`replicas` may only be left out of an autoscaled group (it starts at min_replicas)."""
    problems = []
    for i, group in enumerate(file.ray_cluster.worker_groups or []):
        if group.replicas is None and group.min_replicas is None:
            path = f"ray_cluster.worker_groups[{group_index[i] if i < len(group_index) else i}].replicas"
            problems.append(Problem(path, "is required (or give min_replicas and max_replicas to autoscale)"))
    return problems


def parse_cluster_spec(
    data: Any, *, env: Mapping[str, str] | None = None, source: str = DEFAULT_CLUSTER_FILE
) -> ClusterSpec:
    """Validate loaded YAML data (with env overrides applied first) into a ClusterSpec.

    ``env`` None means ``os.environ``; pass ``{}`` for no overrides. Raises ConfigError listing
    every problem, each with the path to edit (or the variable to fix).
    """
    env = os.environ if env is None else env
    data = copy.deepcopy(data)
    problems = _structure_problems(data)
    if data is None or not isinstance(data, dict):
        raise ConfigError(problems, source)
    overridden: dict[str, str] = {}
    _apply_env(data, env, problems, overridden)

    try:
        file = ClusterFile.model_validate(data)
    except ValidationError as exc:
        problems += problems_from_validation(exc, ClusterFile)
        file = lenient_validate(ClusterFile, data, exc, _GROUP_STAND_INS)

    spec: ClusterSpec | None = None
    if file is not None:
        section = data.get("ray_cluster") or {}
        raw_groups = section.get("worker_groups") if isinstance(section, dict) else None
        group_index = (
            [i for i, g in enumerate(raw_groups) if g is not REMOVED] if isinstance(raw_groups, list) else []
        )
        normalized, where = _normalize(file, group_index)
        problems += _replicas_problems(file, group_index)
        try:
            spec = ClusterSpec.model_validate(normalized, context={"skip_cross_field": True})
        except ValidationError as exc:  # pragma: no cover - the file model has the same field rules
            found = problems_from_validation(exc, ClusterSpec)
            problems += [Problem(where(p.field), p.message) for p in found]
        else:
            problems += cluster_problems(spec, where)

    if problems:
        raise ConfigError(_dedupe(_rename_overridden(problems, overridden)), source)
    assert spec is not None
    return spec


def _rename_overridden(problems: list[Problem], overridden: dict[str, str]) -> list[Problem]:
    return [Problem(overridden.get(p.field, p.field), p.message) for p in problems]


def _dedupe(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def load_cluster_spec(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> ClusterSpec:
    """Read and validate a cluster config file (default ``./ray_cluster_config.yaml``)."""
    file_path = Path(path) if path is not None else Path(DEFAULT_CLUSTER_FILE)
    source = str(path) if path is not None else DEFAULT_CLUSTER_FILE
    return parse_cluster_spec(load_yaml(file_path, source), env=env, source=source)


__all__ = [
    "APPLIED_SPEC_VARIABLE",
    "AUTOSCALER_VARIABLE",
    "CLUSTER_OVERRIDE_VARIABLES",
    "NODE_ID_RESOURCE_VARIABLE",
    "AutoscalingSpec",
    "AutostopSpec",
    "ClusterFile",
    "ClusterSpec",
    "HeadSpec",
    "NodeSpec",
    "RayPorts",
    "ServeSpec",
    "WorkerGroupSpec",
    "cluster_json_schema",
    "cluster_overrides",
    "cluster_problems",
    "desired_nodes",
    "format_path",
    "head_app_name",
    "head_node",
    "head_spec_hash",
    "load_cluster_spec",
    "node_id_resource",
    "parse_cluster_spec",
    "spec_from_applied",
    "validate_cluster_spec",
    "worker_app_name",
    "worker_index_of",
    "worker_node",
    "worker_spec_hash",
]
