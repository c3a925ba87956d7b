"""Start, find and stop the workspace server as a background daemon (the Python API behind the CLI).

```python
info = start_workspace()            # or ensure_workspace(); idempotent
info.url, info.api_key, info.pid, info.home
workspace_info()                    # WorkspaceInfo of the running server, or None
stop_workspace()                    # ends every workload, then the server; True if one was running
```
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from ray_serve_cai.workspace.processes import DEFAULT_STOP_GRACE_SECONDS, WORKSPACE_MARKER, end_process_tree
from ray_serve_cai.workspace.statefile import ensure_api_key, read_state, resolve_home

START_TIMEOUT_SECONDS = 30.0
SERVER_LOG_NAME = "server.log"


class WorkspaceError(Exception):
    """The workspace daemon could not be started or stopped."""


@dataclass(frozen=True)
class WorkspaceInfo:
    """A running workspace. The API key is kept out of `repr`."""

    url: str
    api_key: str = field(repr=False)
    pid: int
    home: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def domain(self) -> str:
        return f"localhost:{self.port}"


@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _answers(url: str, api_key: str, pid: int) -> bool:
    try:
        response = httpx.get(
            f"{url}/_workspace/health",
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=2.0,
            trust_env=False,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json().get("pid") == pid


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def workspace_info(home: Path | str | None = None) -> WorkspaceInfo | None:
    """The running workspace of `home` (it must answer its health check), or None."""
    resolved = resolve_home(home)
    state = read_state(resolved)
    pid, url, api_key = state.get("pid"), state.get("url"), state.get("api_key")
    if not isinstance(pid, int) or not isinstance(url, str) or not isinstance(api_key, str):
        return None
    if not _pid_alive(pid) or not _answers(url, api_key, pid):
        return None
    return WorkspaceInfo(url=url, api_key=api_key, pid=pid, home=resolved)


def start_workspace(
    home: Path | str | None = None,
    port: int = 0,
    *,
    stop_grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS,
    timeout: float = START_TIMEOUT_SECONDS,
) -> WorkspaceInfo:
    """Start the server in the background (unless one already runs for `home`) and wait until it answers."""
    resolved = resolve_home(home)
    with _home_lock(resolved):
        running = workspace_info(resolved)
        if running is not None:
            return running
        api_key = ensure_api_key(resolved)
        command = [
            sys.executable, "-m", "ray_serve_cai.workspace", "serve",
            "--home", str(resolved), "--port", str(port), "--stop-grace-seconds", str(stop_grace_seconds),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("CML_HOST", "CML_API_KEY")}
        with open(resolved / SERVER_LOG_NAME, "ab") as log_file:
            server = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise WorkspaceError(
                    f"workspace server exited with code {server.returncode}; see {resolved / SERVER_LOG_NAME}"
                )
            state = read_state(resolved)
            url = state.get("url")
            if state.get("pid") == server.pid and isinstance(url, str) and _answers(url, api_key, server.pid):
                return WorkspaceInfo(url=url, api_key=api_key, pid=server.pid, home=resolved)
            time.sleep(0.05)
        server.kill()
        server.wait()
        raise WorkspaceError(f"workspace server did not answer within {timeout:.0f} s")


def ensure_workspace(home: Path | str | None = None) -> WorkspaceInfo:
    """The running workspace of `home`, started when needed."""
    return workspace_info(home) or start_workspace(home)


def stop_workspace(home: Path | str | None = None, *, timeout: float = 60.0) -> bool:
    """Stop every workload of the workspace, then its server. False when none was running."""
    resolved = resolve_home(home)
    with _home_lock(resolved):
        state = read_state(resolved)
        pid = state.get("pid")
        tag = state.get("workspace_tag")
        stopped = False
        if isinstance(pid, int) and _pid_alive(pid) and _is_workspace_server(pid):
            os.kill(pid, signal.SIGTERM)
            try:
                psutil.Process(pid).wait(timeout=timeout)
            except psutil.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(psutil.NoSuchProcess, psutil.TimeoutExpired):
                    psutil.Process(pid).wait(timeout=5)
            except psutil.NoSuchProcess:
                pass
            stopped = True
        if isinstance(tag, str) and tag:
            # Safety net: anything the server could not end (e.g. it was killed) still carries its tag.
            end_process_tree(None, marker_value=tag, marker_name=WORKSPACE_MARKER, grace_seconds=2.0)
        return stopped


def _is_workspace_server(pid: int) -> bool:
    try:
        command_line = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return "ray_serve_cai.workspace" in command_line and "serve" in command_line
