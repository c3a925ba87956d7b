"""Helpers shared by the cluster and deploy specs: YAML loading, digests, name and env rules."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from pydantic import BaseModel
from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from ray_serve_cai.config.errors import ConfigError, Problem

DNS_LABEL = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
MAX_APP_NAME = 63
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV_PREFIXES = ("RAY_CAI_", "CDSW_")
# Parts of a variable name that mark a secret. Matched per `_`-separated word so that PATH,
# PYTHONPATH or TOKENIZERS_PARALLELISM stay allowed while GH_PAT, HF_TOKEN, AWS_SECRET_ACCESS_KEY don't.
_SECRET_WORDS = ("TOKEN", "TOKENS", "KEY", "KEYS", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "PAT")
_SECRET_SUFFIXES = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS")
# Values that are certainly credentials whatever the variable is called (GitHub token formats).
_SECRET_VALUE = re.compile(r"^(ghp_|gho_|ghu_|ghs_|ghr_|github_pat_)[A-Za-z0-9_]{10,}")
_PYTHON_VERSION = re.compile(r"python-?(\d+)\.(\d+)", re.IGNORECASE)


def spec_digest(obj: Any) -> str:
    """A stable short (16 hex chars) sha256 of ``obj`` as canonical JSON (sorted keys).

    Pydantic models are dumped first; whole floats hash like ints (``2`` and ``2.0`` are one value),
    tuples like lists, paths and enums by their value.
    """
    canonical = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _canonical(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return _canonical(obj.model_dump(mode="json"))
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj) and obj.is_integer():
            return int(obj)
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, Enum):
        return _canonical(obj.value)
    if isinstance(obj, PurePath):
        return obj.as_posix()
    raise TypeError(f"spec_digest: cannot hash a {type(obj).__name__}")


def format_number(value: float) -> str:
    """``2.0`` → ``"2"``, ``0.5`` → ``"0.5"`` (how numbers appear in env vars)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def python_version_of(runtime_identifier: str | None) -> str | None:
    """``...-python3.11-gpu:2025.09`` → ``"3.11"``; None when the identifier does not say."""
    if not runtime_identifier:
        return None
    found = _PYTHON_VERSION.search(runtime_identifier)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def env_name_problem(name: str) -> str | None:
    """Why ``name`` may not be set in a workload's ``environment``, or None if it may."""
    if not ENV_NAME.match(name):
        return "not a valid environment variable name (letters, digits, _; not starting with a digit)"
    upper = name.upper()
    if upper.startswith(RESERVED_ENV_PREFIXES):
        return f"names starting with {' or '.join(RESERVED_ENV_PREFIXES)} are set by ray-serve-cai / CML"
    words = [w for w in upper.split("_") if w]
    if any(w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words):
        return (
            "looks like a secret; secrets never go into an application's or job's environment "
            "(pass them as CI secrets / environment variables of the deploying process instead)"
        )
    return None


def environment_problems(env: Mapping[Any, Any], path: str) -> list[Problem]:
    """Problems with the names and values of an ``environment`` mapping already typed as str → str."""
    problems: list[Problem] = []
    for key, value in env.items():
        if not isinstance(key, str):
            continue
        why = env_name_problem(key)
        if why:
            problems.append(Problem(f"{path}.{key}", why))
        elif isinstance(value, str) and _SECRET_VALUE.match(value):
            message = "value looks like a GitHub token; never put secrets here"
            problems.append(Problem(f"{path}.{key}", message))
    return problems


_DUPLICATE_KEY = re.compile(r'found duplicate key "(?P<key>.*)" with value')


def _yaml() -> YAML:
    """ruamel.yaml's safe loader, pure Python (the same messages everywhere), YAML 1.1 scalars
    (``yes``/``no``/``on`` are booleans, as in the YAML most tools and users write); it refuses
    duplicate keys itself."""
    loader = YAML(typ="safe", pure=True)
    loader.version = (1, 1)
    return loader


def _yaml_problem(exc: MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}" if mark else ""
    if isinstance(exc, DuplicateKeyError):
        found = _DUPLICATE_KEY.search(exc.problem or "")
        key = found.group("key") if found else "?"
        return Problem(
            where, f"duplicate key '{key}' (YAML keys must be unique; the file would be ambiguous)"
        )
    detail = exc.problem or exc.context or "syntax error"
    column = f" (column {mark.column + 1})" if mark else ""
    return Problem(where, f"invalid YAML: {detail}{column}")


def load_yaml(path: Path, source: str) -> Any:
    """Read a YAML file; missing file, syntax errors and duplicate keys raise ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("", f"file not found: {path}")], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("", f"cannot read {path}: {exc}")], source) from None
    try:
        return _yaml().load(text)
    except MarkedYAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], source) from None
    except YAMLError as exc:
        raise ConfigError([Problem("", f"invalid YAML: {exc}")], source) from None


def env_value(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value of an override variable; unset and empty both mean "no override"
    (CI systems often pass an unset secret as an empty string)."""
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def env_int(env: Mapping[str, str], name: str, problems: list[Problem]) -> int | None:
    """A whole number ≥ 0 from an override variable; a bad value becomes a problem named by the variable."""
    raw = env_value(env, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        problems.append(Problem(name, f"must be a whole number 0 or more, got {raw!r}"))
        return None
    if value < 0:
        problems.append(Problem(name, f"must be a whole number 0 or more, got {raw!r}"))
        return None
    return value


def is_relative_script(path: str) -> str | None:
    """Why ``path`` is not a usable project-relative script path, or None if it is."""
    if not path.strip():
        return "must not be empty"
    if path.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:", path):
        return "must be a path relative to the project root, not an absolute path"
    if ".." in PurePath(path.replace("\\", "/")).parts:
        return "must stay inside the project (no '..')"
    return None
