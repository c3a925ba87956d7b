"""The applied spec: what was deployed, recorded with the cluster, so every caller sees the same.

KubeRay keeps the desired state in the RayCluster object and `kubectl apply` records the last
applied configuration; here every pass that changes the cluster records, on the head application's
environment (`RAY_CAI_APPLIED_SPEC`, read with the list call every command already makes):

- `spec`: the cluster spec it applied (after env overrides), as configured — runtimes left unset
  stay unset here;
- `runtimes`: the runtime each part runs (`head`, every group), chosen once at first creation and
  kept, so neither a newer runtime nor a caller with another Python replaces the cluster;
- `config`: the caller's config without its overrides — the base of the three-way merge below;
- `origin`: commit, overrides, who, when and which command.

A later caller changes only what it asks for explicitly (`merge_request`): a field its config file
gives differently from the recorded base, an env override it sets, or a flag such as `scale N`.
Everything else stays as deployed. No secret is ever part of the record: the spec's environment
refuses secret-looking names at validation.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import subprocess
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ray_serve_cai.cluster.runtimes import HEAD
from ray_serve_cai.cml import Application
from ray_serve_cai.config import APPLIED_SPEC_VARIABLE, ClusterSpec, head_app_name, load_cluster_spec
from ray_serve_cai.config.cluster import cluster_overrides
from ray_serve_cai.config.errors import ConfigError
from ray_serve_cai.config.node_env import CLUSTER_VARIABLE

log = logging.getLogger("ray_serve_cai.cluster")

APPLIED_SPEC_VAR = APPLIED_SPEC_VARIABLE  # one name, defined with the node environment in config
RECORD_VERSION = 1

# Which spec fields an override variable sets ("*" = every worker group).
OVERRIDDEN_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "RAY_CLUSTER_NAME": (("name",),),
    "RUNTIME_IDENTIFIER": (("runtime_identifier",),),
    "RAY_NUM_WORKERS": (("worker_groups", "*", "replicas"),),
    "RAY_WORKER_GPUS": (("worker_groups", "*", "gpus"),),
}


class Origin(BaseModel):
    """Where an applied spec came from."""

    model_config = ConfigDict(extra="ignore")

    source: str = "up"  # up | scale | deploy | watch | autoscaler | python
    commit: str | None = None
    overrides: dict[str, str] = {}
    by: str = ""
    at: str = ""

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.overrides.items())]
        if self.commit:
            parts.append(f"commit {self.commit[:12]}")
        parts.append(f"by {self.by or 'unknown'} at {self.at or 'unknown time'} ({self.source})")
        return ", ".join(parts)


class AppliedRecord(BaseModel):
    """The record on the head application (see the module docstring)."""

    model_config = ConfigDict(extra="ignore")

    v: int = RECORD_VERSION
    spec: dict[str, Any]
    runtimes: dict[str, str] = {}
    config: dict[str, Any] | None = None
    origin: Origin = Origin()
    # When the cluster was first ready (KubeRay's "provisioned", latched): kept by later records.
    provisioned_at: str | None = None
    # This cluster instance's id, created with the first record and kept by every later one: the
    # head keys its stored GCS state by it (ray_serve_cai.node.gcs_storage), so a new cluster of
    # the same name never opens an old cluster's state.
    cluster_uid: str | None = None

    def cluster_spec(self) -> ClusterSpec:
        return ClusterSpec.model_validate_json(json.dumps(self.spec))

    def encode(self) -> str:
        return json.dumps(self.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)

    def summary(self) -> dict[str, Any]:
        """What `status --json` and `ray_cluster_info.json` carry: sizes, runtimes, origin."""
        groups = {g["name"]: g.get("replicas") for g in self.spec.get("worker_groups", [])}
        return {
            "workers": groups,
            "runtimes": dict(self.runtimes),
            "origin": self.origin.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class ClusterRequest:
    """What one caller asks for: its config with overrides, the same without, and explicit fields."""

    spec: ClusterSpec
    base: ClusterSpec | None = None  # the config without env overrides (None: same as `spec`)
    overrides: Mapping[str, str] = field(default_factory=dict)
    explicit: frozenset[tuple[str, ...]] = frozenset()  # e.g. ("worker_groups", "gpu", "replicas")
    source: str = "python"
    commit: str | None = None  # the commit the request comes from (None: the working directory's)
    by: str = ""  # who asks (`user@host`); "" until `resolved`

    def resolved(self) -> ClusterRequest:
        """The request with its commit and requester known: `git rev-parse` runs here, once per
        command (a `RayCluster` resolves its request when it is made), never per poll."""
        if self.commit and self.by:
            return self
        return replace(self, commit=self.commit or caller_commit(), by=self.by or who())

    def forced_paths(self) -> frozenset[tuple[str, ...]]:
        paths = set(self.explicit)
        for variable in self.overrides:
            paths.update(OVERRIDDEN_FIELDS.get(variable, ()))
        return frozenset(paths)

    def with_replicas(self, replicas: int, group: str | None) -> ClusterRequest:
        """The request with an explicit size for a group (as `scale N` asks)."""
        spec = self.spec.with_replicas(replicas, group)
        name = group or spec.worker_groups[0].name
        base = self.base.with_replicas(replicas, group) if self.base is not None else None
        explicit = self.explicit | {("worker_groups", name, "replicas")}
        return ClusterRequest(spec, base, self.overrides, frozenset(explicit), "scale", self.commit, self.by)


def load_cluster_request(
    path: str | Path | None = None, *, env: Mapping[str, str] | None = None, source: str = "up"
) -> ClusterRequest:
    """Load a config file twice (with and without env overrides) into a `ClusterRequest`.

    Validation errors are those of the file with its overrides (a ConfigError, exit 2)."""
    spec = load_cluster_spec(path, env=env)
    overrides = cluster_overrides(env)
    base = spec
    if overrides:
        try:
            base = load_cluster_spec(path, env={})
        except ConfigError:
            base = spec  # the file alone is invalid (an override mends it): treat every field as asked
    return ClusterRequest(spec, base, overrides, frozenset(), source)


# -------------------------------------------------------------------------------- reading


def read_record(apps: Iterable[Application], cluster: str) -> AppliedRecord | None:
    """The record on the cluster's head application in one observation, if there is a valid one."""
    name = head_app_name(cluster)
    for app in apps:
        if app.key != name:
            continue
        raw = (app.environment or {}).get(APPLIED_SPEC_VAR)
        if not raw:
            return None
        try:
            record = AppliedRecord.model_validate_json(raw)
            record.cluster_spec()
        except (ValidationError, ValueError) as err:
            log.warning("ignoring an unreadable applied spec on %s: %s", name, type(err).__name__)
            return None
        return record
    return None


def observed_runtimes(apps: Iterable[Application], cluster: str, groups: Sequence[str]) -> dict[str, str]:
    """The runtimes the cluster's existing applications run: the head's, and one app's per group."""
    wanted = {head_app_name(cluster): HEAD}
    prefix = f"ray-{cluster}-"
    found: dict[str, str] = {}
    for app in apps:
        name = app.key
        runtime = app.runtime_identifier
        if not runtime or (app.environment or {}).get(CLUSTER_VARIABLE) != cluster:
            continue
        if name in wanted:
            found.setdefault(HEAD, runtime)
            continue
        for group in groups:
            rest = name.removeprefix(prefix + group + "-")
            if name.startswith(prefix + group + "-") and rest.isdigit():
                found.setdefault(group, runtime)
    return found


# -------------------------------------------------------------------------------- merging

_MISSING = object()


def _merge(base: Any, applied: Any, theirs: Any, forced: frozenset[tuple[str, ...]], path: tuple) -> Any:
    """Three-way merge: the caller's value where it asked for it, else what is applied."""
    if _is_forced(path, forced):
        return theirs
    if path == ("worker_groups",):
        return _merge_groups(base, applied, theirs, forced)
    if isinstance(base, dict) and isinstance(applied, dict) and isinstance(theirs, dict):
        out: dict[str, Any] = {}
        for key in [*theirs, *(k for k in applied if k not in theirs)]:
            b, a, t = base.get(key, _MISSING), applied.get(key, _MISSING), theirs.get(key, _MISSING)
            if t is _MISSING:
                if b is _MISSING and a is not _MISSING:
                    out[key] = a  # someone else added it; this caller did not remove it
                continue
            if a is _MISSING:
                if b is _MISSING or t != b:
                    out[key] = t  # new in this caller's config, or changed by it
                continue
            out[key] = _merge(b if b is not _MISSING else t, a, t, forced, (*path, key))
        return out
    return theirs if theirs != base else applied


def _merge_groups(base: Any, applied: Any, theirs: Any, forced: frozenset[tuple[str, ...]]) -> Any:
    by_name = {g["name"]: g for g in base or []}
    applied_by_name = {g["name"]: g for g in applied or []}
    theirs_names = {g["name"] for g in theirs or []}
    out = []
    for group in theirs or []:
        name = group["name"]
        if name not in by_name:
            out.append(group)  # a group this caller added
        elif name in applied_by_name:
            out.append(_merge(by_name[name], applied_by_name[name], group, forced, ("worker_groups", name)))
        # else: deployed without it since; this caller did not ask for it again
    for name, group in applied_by_name.items():
        if name not in theirs_names and name not in by_name:
            out.append(group)  # added by someone else; this caller did not remove it
    return out


def _is_forced(path: tuple, forced: frozenset[tuple[str, ...]]) -> bool:
    return any(
        len(p) == len(path) and all(a == "*" or a == b for a, b in zip(p, path, strict=True)) for p in forced
    )


def merge_request(record: AppliedRecord | None, request: ClusterRequest) -> ClusterSpec:
    """The spec a changing pass applies: the caller's request merged onto what is deployed."""
    if record is None:
        return request.spec
    try:
        applied = record.cluster_spec()
    except (ValidationError, ValueError):
        return request.spec
    if applied.name != request.spec.name:
        return request.spec
    base = record.config if record.config is not None else record.spec
    theirs = request.spec.model_dump(mode="json")
    if request.base is not None and request.base is not request.spec:
        # Fields the caller's file left as the recorded base are not asked for: compare the file.
        theirs_file = request.base.model_dump(mode="json")
        merged = _merge(base, applied.model_dump(mode="json"), theirs_file, request.forced_paths(), ())
        merged = _apply_forced(merged, theirs, request.forced_paths())
    else:
        merged = _merge(base, applied.model_dump(mode="json"), theirs, request.forced_paths(), ())
    return ClusterSpec.model_validate_json(json.dumps(merged))


def _apply_forced(merged: dict[str, Any], theirs: dict[str, Any], forced: frozenset[tuple[str, ...]]) -> Any:
    """Set every forced field (an override, a flag) to the caller's value."""
    for path in forced:
        if path[0] == "worker_groups":
            wanted = {g["name"]: g for g in theirs.get("worker_groups", [])}
            for group in merged.get("worker_groups", []):
                if (path[1] == "*" or path[1] == group["name"]) and group["name"] in wanted:
                    group[path[2]] = wanted[group["name"]][path[2]]
        elif path[0] in theirs:
            merged[path[0]] = theirs[path[0]]
    return merged


# -------------------------------------------------------------------------------- comparing


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
        out = {}
        for item in value:
            out.update(_flatten({k: v for k, v in item.items() if k != "name"}, f"{path}.{item['name']}"))
            out.setdefault(f"{path}.{item['name']}", "present")
        return out
    return {path: value}


def spec_differences(deployed: ClusterSpec, wanted: ClusterSpec) -> list[str]:
    """`field: deployed X, your config Y` for every field a pass would change, in field order."""
    a, b = _flatten(deployed.model_dump(mode="json")), _flatten(wanted.model_dump(mode="json"))
    lines = []
    for key in [*a, *(k for k in b if k not in a)]:
        if a.get(key, _MISSING) != b.get(key, _MISSING):
            old = "absent" if key not in a else json.dumps(a[key])
            new = "absent" if key not in b else json.dumps(b[key])
            if key.endswith(".present"):
                continue
            lines.append(f"{key}: deployed {old}, your config {new}")
    return lines


# -------------------------------------------------------------------------------- writing


def caller_commit(repo: Path | None = None) -> str | None:
    """The commit the caller's checkout is at (`git rev-parse HEAD`), else `GITHUB_SHA`, else None."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("GITHUB_SHA") or None


def who() -> str:
    """`user@host` of this process (the engine id inside CML)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{os.environ.get('CDSW_ENGINE_ID') or socket.gethostname()}"


def new_record(
    spec: ClusterSpec,
    runtimes: Mapping[str, str],
    request: ClusterRequest,
    *,
    at: str | None = None,
    commit: str | None = None,
    provisioned_at: str | None = None,
    cluster_uid: str | None = None,
) -> AppliedRecord:
    """The record of a pass that applies `spec` (pure when `at` is given: a pass passes the time of
    its observation); `commit` defaults to the request's."""
    base = request.base if request.base is not None else request.spec
    return AppliedRecord(
        spec=spec.model_dump(mode="json"),
        runtimes=dict(runtimes),
        config=base.model_dump(mode="json"),
        origin=Origin(
            source=request.source,
            commit=commit or request.commit,
            overrides=dict(request.overrides),
            by=request.by,
            at=at or utc_now(),
        ),
        provisioned_at=provisioned_at,
        cluster_uid=cluster_uid or uuid.uuid4().hex,
    )


def utc_now() -> str:
    """The time as records write it (ISO 8601, seconds, UTC)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def same_applied(record: AppliedRecord | None, spec: ClusterSpec, runtimes: Mapping[str, str]) -> bool:
    """True when `record` already says `spec` with `runtimes` is deployed (nothing to write)."""
    return (
        record is not None
        and record.spec == spec.model_dump(mode="json")
        and dict(record.runtimes) == dict(runtimes)
    )
