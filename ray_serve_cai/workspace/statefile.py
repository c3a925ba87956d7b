"""The workspace home and its `state.json` (mode 0600): url, api_key, pid, home of the running server."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import platformdirs

HOME_VARIABLE = "RAY_CAI_WORKSPACE_HOME"
STATE_FILE_NAME = "state.json"


def resolve_home(home: Path | str | None = None) -> Path:
    """`home`, else `$RAY_CAI_WORKSPACE_HOME`, else `<user data dir>/ray-serve-cai/workspace`."""
    if home is not None:
        return Path(home).expanduser().resolve()
    from_env = os.environ.get(HOME_VARIABLE)
    if from_env:
        return Path(from_env).expanduser().resolve()
    return Path(platformdirs.user_data_dir("ray-serve-cai")) / "workspace"


def state_path(home: Path) -> Path:
    return home / STATE_FILE_NAME


def read_state(home: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(state_path(home).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def write_state(home: Path, state: dict[str, Any]) -> None:
    """Atomically replace state.json, readable by the owner only."""
    home.mkdir(parents=True, exist_ok=True)
    target = state_path(home)
    temporary = target.with_name(f".{STATE_FILE_NAME}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle, indent=2)
        os.chmod(temporary, 0o600)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def ensure_api_key(home: Path) -> str:
    """The workspace's API key: kept across restarts, created once with `secrets.token_urlsafe`."""
    state = read_state(home)
    api_key = state.get("api_key")
    if not isinstance(api_key, str) or not api_key:
        api_key = secrets.token_urlsafe(32)
        state["api_key"] = api_key
        state.setdefault("home", str(home))
        write_state(home, state)
    return api_key
