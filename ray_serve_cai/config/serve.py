"""The Serve config: a file in Ray Serve's own format (what `serve build` writes) that
`ray_cluster.serve.config` names, validated before any API call.

Validation uses Serve's own schema (`ray.serve.schema.ServeDeploySchema`) where Ray is installed:
its type and value rules, plus unknown keys (Serve ignores them for forward compatibility; a typo
would silently do nothing, so we name it), found by walking the same models. Without Ray (a light
runner that only deploys) the check is the structure and the import paths; Serve's own refusal
(`PUT` answers 400) is reported later in the same form (`serve_rejection_problems`). There is no
second hand-written copy of Serve's schema here.

Import paths must name a module of the project (a file or package under the project directory, as
committed) unless the application's `runtime_env` brings the code itself (`working_dir`,
`py_modules`); modules of Ray itself are always there. The nodes put the project directory on
Ray's `PYTHONPATH`, so such an import path needs no `runtime_env`.

New code rolls out by Serve's own rolling update: each application whose code is in the project gets
a code digest in its `runtime_env.env_vars` (`RAY_CAI_CODE_DIGEST`). Serve's code version of an
application is a hash of its import path, `runtime_env` and args (`get_app_code_version`), so a
changed digest makes Serve build the application again and replace its replicas a few at a time
(old ones serve until new ones run), while the same digest changes nothing (no PUT). What counts as
the code (`code_files`): every file under the directory of the import path's module (its package:
`examples/serve/` for `examples.serve.iris`), or the module file alone when it sits at the project
root; `__pycache__`, `*.pyc` and hidden entries excluded. An application whose `runtime_env` brings
its code (`working_dir`, `py_modules`: URIs that version it) or that imports Ray's own modules gets
no digest.

Where Serve runs is the platform's decision, not the user's: `proxy_location`, `http_options.host`,
`http_options.port` and `http_options.root_path` are overridden (`SERVE_OVERRIDES`), and
`overridden_settings` says which of the user's values were replaced.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_serve_cai.config._common import is_relative_script, load_yaml
from ray_serve_cai.config.errors import ConfigError, Problem, format_path, suggest

# Serve's HTTP proxies. In pods (CML; the local workspace's pods) one on every node, each on its own
# pod's loopback on SERVE_POD_PORT, reached through the node's authenticated ingress on
# SERVE_INGRESS_PORT (pod IP) by the cluster's Serve gateway. On a shared host (the local fallback,
# where one port per node would collide) one, on the head's loopback, mounted under /serve of the
# head's app URL. Either way Serve's root_path is /serve.
SERVE_PROXY_LOCATION = "HeadOnly"  # shared host
SERVE_PROXY_EVERY_NODE = "EveryNode"  # pods
SERVE_HOST = "127.0.0.1"
SERVE_POD_PORT = 8000  # Serve's default, free in every pod
SERVE_INGRESS_PORT = 8470  # the node launcher's token-checked door to its local proxy, on the pod IP
SERVE_ROOT_PATH = "/serve"
SERVE_PORT_KEY = "serve_http_port"  # the head's status endpoint publishes Serve's loopback port here
SERVE_LOCATION_KEY = "serve_proxy_location"  # ... and where Serve's proxies run
# Replicas stay off the head when there are workers (a head restart then takes none of them down):
# deployments without a label_selector of their own get this one (the nodes carry `ray-cai.group`).
OFF_HEAD_SELECTOR = {"ray-cai.group": "!head"}
SERVE_OVERRIDES = ("proxy_location", "http_options.host", "http_options.port", "http_options.root_path")
# A runtime_env with one of these brings its own code: its import path is not looked up in the project.
_CODE_CARRYING_RUNTIME_ENV = ("working_dir", "py_modules")
# Modules every node has (the `ray` extra installs them), so an import path may name them directly.
_ALWAYS_INSTALLED = ("ray",)
_MODULE_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CODE_DIGEST_VAR = "RAY_CAI_CODE_DIGEST"  # in each application's runtime_env.env_vars (see above)


@dataclass(frozen=True)
class ServeConfig:
    """A validated Serve config file: the document as the user wrote it, and where it came from."""

    document: dict[str, Any]
    source: str
    code_digests: dict[str, str] = field(default_factory=dict)  # application name → code digest
    off_head: bool = False  # the cluster has workers: deployments without a selector stay off the head

    @property
    def application_names(self) -> list[str]:
        return [str(app.get("name", "default")) for app in self.document.get("applications", [])]

    def applications(self) -> list[dict[str, Any]]:
        """The applications as they are applied: each with its code digest in runtime_env.env_vars
        (and, with `off_head`, OFF_HEAD_SELECTOR on deployments without a label selector)."""
        applied = []
        for app in copy.deepcopy(self.document.get("applications") or []):
            digest = self.code_digests.get(str(app.get("name", "default")))
            if digest is not None:
                runtime_env = dict(app.get("runtime_env") or {})
                runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), CODE_DIGEST_VAR: digest}
                app["runtime_env"] = runtime_env
            applied.append(app)
        if self.off_head:
            _keep_off_head(applied)
        return applied

    def request_body(self, http_port: int, proxy_location: str = SERVE_PROXY_LOCATION) -> dict[str, Any]:
        """The `PUT /api/serve/applications/` body: the document with the platform's settings (where
        the proxies run is the head's word: it started Serve) and the applications as applied."""
        body = copy.deepcopy(self.document)
        if "applications" in body:
            body["applications"] = self.applications()
        body["proxy_location"] = proxy_location
        http = dict(body.get("http_options") or {})
        http.update(host=SERVE_HOST, port=int(http_port), root_path=SERVE_ROOT_PATH)
        body["http_options"] = http
        return body

    def overridden_settings(self) -> list[str]:
        """One line per user setting the tool replaces (set in the file to another value)."""
        lines = []
        wanted = {
            "http_options.host": SERVE_HOST,
            "http_options.root_path": SERVE_ROOT_PATH,
        }
        http = self.document.get("http_options") or {}
        given = {
            "proxy_location": self.document.get("proxy_location"),
            "http_options.host": http.get("host"),
            "http_options.port": http.get("port"),
            "http_options.root_path": http.get("root_path"),
        }
        for key in SERVE_OVERRIDES:
            value = given[key]
            if value is None:
                continue
            if key == "http_options.port":
                lines.append(f"{key} {value!r} is replaced by the port the head picks (loopback only)")
            elif key == "proxy_location":
                lines.append(f"{key} {value!r} is the platform's (EveryNode in pods, else HeadOnly)")
            elif value != wanted[key]:
                lines.append(f"{key} {value!r} is replaced by {wanted[key]!r}")
        return lines


def _keep_off_head(applications: list[dict[str, Any]]) -> None:
    """Each listed deployment without a label selector gets OFF_HEAD_SELECTOR (in place)."""
    for app in applications:
        for deployment in app.get("deployments") or []:
            options = dict(deployment.get("ray_actor_options") or {})
            if not options.get("label_selector"):
                options["label_selector"] = dict(OFF_HEAD_SELECTOR)
                deployment["ray_actor_options"] = options


def serve_path_problems(path: str) -> str | None:
    """Why `ray_cluster.serve.config` is not a usable project-relative file path, or None."""
    return is_relative_script(path)


def load_serve_config(relative: str, project_dir: Path) -> ServeConfig:
    """Read and validate the Serve config at project-relative `relative`; ConfigError lists every
    problem with its field path (exit 2 in the CLI)."""
    why = serve_path_problems(relative)
    if why:
        raise ConfigError([Problem("ray_cluster.serve.config", why)], "ray_cluster_config.yaml")
    data = load_yaml(Path(project_dir) / relative, relative)
    return parse_serve_config(data, project_dir=Path(project_dir), source=relative)


def parse_serve_config(data: Any, *, project_dir: Path, source: str) -> ServeConfig:
    problems = serve_config_problems(data, project_dir)
    if problems:
        raise ConfigError(problems, source)
    digests = {}
    for app in data.get("applications") or []:
        digest = code_digest(app, project_dir)
        if digest is not None:
            digests[str(app.get("name", "default"))] = digest
    return ServeConfig(document=copy.deepcopy(data), source=source, code_digests=digests)


def serve_config_problems(data: Any, project_dir: Path) -> list[Problem]:
    """Every problem of a loaded Serve config, each with its field path."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        return [Problem("", f"expected a Serve config mapping with `applications:`, got {kind}")]
    schema = _serve_schema()
    problems = _schema_problems(data, schema) if schema is not None else _structure_problems(data)
    applications = data.get("applications")
    if isinstance(applications, list):
        for index, app in enumerate(applications):
            if isinstance(app, dict):
                problems += _import_path_problems(app, index, project_dir)
    return list(dict.fromkeys(problems))


# --------------------------------------------------------------------------- with Serve's schema


def _serve_schema() -> Any:
    """`ray.serve.schema.ServeDeploySchema`, or None where Ray Serve is not installed."""
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        return None
    return ServeDeploySchema


def _schema_problems(data: dict[str, Any], schema: Any) -> list[Problem]:
    from pydantic import ValidationError

    problems = _unknown_keys(data, schema, ())
    try:
        schema.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            path = format_path(_data_loc(data, tuple(error["loc"])))
            problems.append(Problem(path, str(error["msg"]).removeprefix("Value error, ")))
    return problems


def _data_loc(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The part of a pydantic error location that names places in the data (union tags dropped)."""
    kept: list[Any] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and isinstance(part, str):
            kept.append(part)
            if part not in current:
                break
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            kept.append(part)
            current = current[part]
        else:
            break
    return tuple(kept)


def _models_of(annotation: Any) -> list[Any]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_of(arg)
    return found


def _container_of(annotation: Any) -> str | None:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set):
        return "list"
    if origin is dict:
        return "dict"
    if origin in (typing.Union, types.UnionType):
        kinds = {_container_of(a) for a in typing.get_args(annotation)} - {None}
        return kinds.pop() if len(kinds) == 1 else None
    return None


def _unknown_keys(data: Any, model: Any, loc: tuple[Any, ...]) -> list[Problem]:
    """Keys that Serve's model at `loc` does not define (Serve itself would ignore them)."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    known = {name: field for name, field in fields.items()}
    known.update({field.alias: field for field in fields.values() if field.alias})
    problems = []
    for key, value in data.items():
        field = known.get(key)
        if field is None:
            names = sorted(k for k in known if not k.startswith("_"))
            hint = suggest(str(key), names) or f" (Serve knows: {', '.join(names)})"
            problems.append(Problem(format_path((*loc, key)), f"unknown key{hint}"))
            continue
        nested = _models_of(field.annotation)
        if len(nested) != 1:
            continue
        container = _container_of(field.annotation)
        if container == "list" and isinstance(value, list):
            for index, item in enumerate(value):
                problems += _unknown_keys(item, nested[0], (*loc, key, index))
        elif container == "dict" and isinstance(value, dict):
            for name, item in value.items():
                problems += _unknown_keys(item, nested[0], (*loc, key, name))
        elif container is None:
            problems += _unknown_keys(value, nested[0], (*loc, key))
    return problems


# --------------------------------------------------------------------------- without Ray


def _structure_problems(data: dict[str, Any]) -> list[Problem]:
    """The light check (no Ray here): the shape a Serve config must have to be deployable."""
    applications = data.get("applications")
    if applications is None:
        return [Problem("applications", "required: the list of Serve applications to run")]
    if not isinstance(applications, list):
        return [Problem("applications", f"must be a list of applications, got {type(applications).__name__}")]
    problems = []
    for index, app in enumerate(applications):
        where = f"applications[{index}]"
        if not isinstance(app, dict):
            problems.append(Problem(f"applications[{index}]", "must be a mapping with an import_path"))
        elif not isinstance(app.get("import_path"), str):
            problems.append(Problem(f"{where}.import_path", "required: a module:attribute string"))
        elif not isinstance(app.get("runtime_env", {}), dict):
            problems.append(Problem(f"applications[{index}].runtime_env", "must be a mapping"))
    return problems


# --------------------------------------------------------------------------- import paths


def _import_path_problems(app: dict[str, Any], index: int, project_dir: Path) -> list[Problem]:
    import_path = app.get("import_path")
    field = f"applications[{index}].import_path"
    if not isinstance(import_path, str):
        return []
    runtime_env = app.get("runtime_env")
    if isinstance(runtime_env, dict) and any(runtime_env.get(k) for k in _CODE_CARRYING_RUNTIME_ENV):
        return []  # the runtime_env brings the code: Serve looks the module up there
    module = import_path.partition(":")[0] if ":" in import_path else import_path.rpartition(".")[0]
    parts = module.split(".")
    if not module or not all(_MODULE_PART.match(p) for p in parts):
        return [Problem(field, f"{import_path!r} is not an import path of the form module.sub:attribute")]
    if parts[0] in _ALWAYS_INSTALLED:
        return []
    if _module_in_project(parts, project_dir):
        return []
    return [
        Problem(
            field,
            f"module {module!r} is not in the project ({project_dir}): no {'/'.join(parts)}.py or "
            f"{'/'.join(parts)}/ there; commit the module in the project, or give the application "
            "a runtime_env with working_dir/py_modules",
        )
    ]


def _module_parts(app: dict[str, Any]) -> list[str] | None:
    """The import path's module as parts (`examples.serve.iris:app` → examples, serve, iris)."""
    import_path = app.get("import_path")
    if not isinstance(import_path, str):
        return None
    module = import_path.partition(":")[0] if ":" in import_path else import_path.rpartition(".")[0]
    parts = module.split(".")
    return parts if module and all(_MODULE_PART.match(p) for p in parts) else None


def code_files(app: dict[str, Any], project_dir: Path) -> list[Path]:
    """The project files an application's code is (see the module docstring); [] when its code is
    not in the project (Ray's modules, a runtime_env that brings it)."""
    runtime_env = app.get("runtime_env")
    if isinstance(runtime_env, dict) and any(runtime_env.get(k) for k in _CODE_CARRYING_RUNTIME_ENV):
        return []
    parts = _module_parts(app)
    if parts is None or parts[0] in _ALWAYS_INSTALLED:
        return []
    root = Path(project_dir)
    package = root.joinpath(*parts)
    if package.is_dir():
        base = package if len(parts) == 1 else package.parent
    elif len(parts) > 1:
        base = root.joinpath(*parts[:-1])
    else:
        single = root / f"{parts[0]}.py"
        return [single] if single.is_file() else []
    found = []
    for directory, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        found += [
            Path(directory) / name for name in files if not name.startswith(".") and not name.endswith(".pyc")
        ]
    return sorted(found)


def code_digest(app: dict[str, Any], project_dir: Path) -> str | None:
    """A digest of `code_files` (relative paths and contents), None when there are none."""
    files = code_files(app, project_dir)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(Path(project_dir)).as_posix().encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _module_in_project(parts: list[str], project_dir: Path) -> bool:
    base = Path(project_dir).joinpath(*parts[:-1])
    last = parts[-1]
    return (base / f"{last}.py").is_file() or (base / last).is_dir()


# --------------------------------------------------------------------------- Serve's refusal

_LOC_LINE = re.compile(r"^([A-Za-z_][\w\-\[\]]*(?:\.[\w\-\[\]]+)*)$")


def serve_rejection_problems(text: str) -> list[Problem]:
    """The problems in Serve's `PUT` refusal (HTTP 400: `repr()` of a pydantic ValidationError, or
    the controller's message), in the same field-path form as the local check."""
    lines = text.strip().splitlines()
    if not lines or "validation error" not in lines[0]:
        return [Problem("", text.strip() or "Serve refused the config (HTTP 400)")]
    problems = []
    i = 1
    while i < len(lines):
        match = _LOC_LINE.match(lines[i].strip()) if not lines[i].startswith(" ") else None
        if match and i + 1 < len(lines) and lines[i + 1].startswith(" "):
            loc = tuple(int(p) if p.isdigit() else p for p in match.group(1).split("."))
            message = lines[i + 1].strip().split(" [type=")[0].removeprefix("Value error, ")
            problems.append(Problem(format_path(loc), message))
            i += 2
        else:
            i += 1
    return problems or [Problem("", text.strip())]


__all__ = [
    "CODE_DIGEST_VAR",
    "OFF_HEAD_SELECTOR",
    "SERVE_HOST",
    "SERVE_INGRESS_PORT",
    "SERVE_LOCATION_KEY",
    "SERVE_OVERRIDES",
    "SERVE_POD_PORT",
    "SERVE_PORT_KEY",
    "SERVE_PROXY_EVERY_NODE",
    "SERVE_PROXY_LOCATION",
    "SERVE_ROOT_PATH",
    "ServeConfig",
    "code_digest",
    "code_files",
    "load_serve_config",
    "parse_serve_config",
    "serve_config_problems",
    "serve_path_problems",
    "serve_rejection_problems",
]
