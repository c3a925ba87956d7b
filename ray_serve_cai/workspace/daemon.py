"""Start, find and stop the workspace server as a background daemon (the Python API behind the CLI).

```python
info = start_workspace()            # or ensure_workspace(); idempotent
info.url, info.api_key, info.pid, info.home
workspace_info()                    # WorkspaceInfo of the running server, or None
stop_workspace()                    # ends every workload, then the server; True if one was running
reset_workspace()                   # stop, then delete the state (projects, jobs, runs, apps, logs)
```

The state survives the server: a start after a stop or a crash finds the same projects, jobs, runs
and applications (`store.py`), and re-adopts the workloads a crashed server left running.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from ray_serve_cai.errors import OperationFailed, WaitTimeout
from ray_serve_cai.waiting import poll_until
from ray_serve_cai.workspace.controls import DEFAULT_RESTART_ATTEMPTS, DEFAULT_RESTART_DELAY_SECONDS
from ray_serve_cai.workspace.processes import DEFAULT_STOP_GRACE_SECONDS, WORKSPACE_MARKER, end_process_tree
from ray_serve_cai.workspace.statefile import ensure_api_key, read_state, resolve_home, write_state

# The server's own modules (pods, the records, the store) are imported by the functions that stop or
# reset it: finding the running workspace (every `--local` command) needs only its state file.

START_TIMEOUT_SECONDS = 30.0
SERVER_LOG_NAME = "server.log"


class WorkspaceError(OperationFailed):
    """The workspace daemon could not be started or stopped."""


@dataclass(frozen=True)
class WorkspaceInfo:
    """A running workspace. The API key is kept out of `repr`."""

    url: str
    api_key: str = field(repr=False)
    pid: int
    home: Path
    network: str = "shared-host"  # "pods" | "shared-host" (see pods.py)
    network_reason: str = ""
    pod_cidr: str | None = None

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
            verify=False,  # plain HTTP on loopback: no CA bundle to load (tens of ms per command)
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
    return _info(state, url, api_key, pid, resolved)


def _info(state: dict[str, object], url: str, api_key: str, pid: int, home: Path) -> WorkspaceInfo:
    cidr = state.get("pod_cidr")
    return WorkspaceInfo(
        url=url,
        api_key=api_key,
        pid=pid,
        home=home,
        network=str(state.get("network") or "shared-host"),
        network_reason=str(state.get("network_reason") or ""),
        pod_cidr=cidr if isinstance(cidr, str) else None,
    )


def _server_error(home: Path) -> str:
    """The server's own `error: ...` line from the end of its log, if it printed one."""
    try:
        with open(home / SERVER_LOG_NAME, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(log.tell() - 8192, 0))
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line.startswith("error: ")), "")


def start_workspace(
    home: Path | str | None = None,
    port: int = 0,
    *,
    stop_grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS,
    app_restart: bool = True,
    app_restart_attempts: int = DEFAULT_RESTART_ATTEMPTS,
    app_restart_delay: float = DEFAULT_RESTART_DELAY_SECONDS,
    timeout: float = START_TIMEOUT_SECONDS,
    pods: bool | None = None,
    pod_cidr: str | None = None,
) -> WorkspaceInfo:
    """Start the server in the background (unless one already runs for `home`) and wait until it answers.

    `port` 0 reuses the previous server's port (workloads keep its URL), else a free one. The
    `app_restart*` options set CML's automatic restart of failed applications (on, 3 attempts, 300 s
    apart by default; `PUT /_workspace/restart-policy` changes them while it runs). `pods`: every
    workload in its own pod (True: required, None: where possible, False: shared-host); `pod_cidr`
    their addresses (default: a free /16 of 100.64.0.0/10)."""
    resolved = resolve_home(home)
    with _home_lock(resolved):
        running = workspace_info(resolved)
        if running is not None:
            return running
        api_key = ensure_api_key(resolved)
        command = [
            sys.executable, "-m", "ray_serve_cai.workspace", "serve",
            "--home", str(resolved), "--port", str(port), "--stop-grace-seconds", str(stop_grace_seconds),
            "--app-restart" if app_restart else "--no-app-restart",
            "--app-restart-attempts", str(app_restart_attempts),
            "--app-restart-delay", str(app_restart_delay),
        ]  # fmt: skip
        if pods is not None:
            command.append("--pods" if pods else "--no-pods")
        if pod_cidr:
            command += ["--pod-cidr", pod_cidr]
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

        def answering() -> WorkspaceInfo | None:
            if server.poll() is not None:
                reason = _server_error(resolved)
                raise WorkspaceError(
                    f"workspace server exited with code {server.returncode}"
                    + (f" ({reason.removeprefix('error: ')})" if reason else "")
                    + f"; see {resolved / SERVER_LOG_NAME}"
                )
            state = read_state(resolved)
            url = state.get("url")
            if state.get("pid") == server.pid and isinstance(url, str) and _answers(url, api_key, server.pid):
                return _info(state, url, api_key, server.pid, resolved)
            return None

        try:
            return poll_until(
                answering, timeout=timeout, interval=0.05, what="the workspace server to answer"
            )
        except WaitTimeout:
            server.kill()
            server.wait()
            raise WorkspaceError(f"workspace server did not answer within {timeout:.0f} s") from None


class SessionError(WorkspaceError):
    """A session pod could not be opened (bad project, bad environment, no workspace)."""


def run_in_session(
    info: WorkspaceInfo,
    command: list[str],
    *,
    project: str | None = None,
    environment: dict[str, str] | None = None,
) -> int:
    """Run `command` in a fresh session pod of `project` (as a CML session: its own IP, the project
    folder as working directory, CDSW_* variables plus `environment`), with this process's stdin,
    stdout and stderr; returns its exit code. The pod is removed afterwards (by the workspace, should
    this process die first)."""
    headers = {"Authorization": f"Bearer {info.api_key}"}
    body = {"project": project, "environment": environment or {}, "owner_pid": os.getpid()}
    try:
        response = httpx.post(
            f"{info.url}/_workspace/sessions",
            json=body,
            headers=headers,
            timeout=60.0,
            trust_env=False,
            verify=False,  # plain HTTP on loopback, as in `_answers`
        )
    except httpx.HTTPError as exc:
        raise SessionError(f"cannot reach the workspace at {info.url}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        error = SessionError(f"cannot open a session: {message}")
        if response.status_code in (400, 404):
            error.exit_code = 2
        raise error
    session = response.json()
    try:
        process = subprocess.Popen(
            [*session["command_prefix"], *command], cwd=session["cwd"], env=session["environment"]
        )
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:  # the command got the SIGINT too: wait for it to end
                continue
    except OSError as exc:
        raise SessionError(f"cannot run {command[0]!r}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(
                f"{info.url}/_workspace/sessions/{session['id']}",
                headers=headers,
                timeout=60.0,
                trust_env=False,
                verify=False,
            )


def ensure_workspace(home: Path | str | None = None) -> WorkspaceInfo:
    """The running workspace of `home`, started when needed."""
    return workspace_info(home) or start_workspace(home)


def stop_workspace(home: Path | str | None = None, *, timeout: float = 60.0) -> bool:
    """Stop every workload of the workspace, then its server. False when none was running."""
    from ray_serve_cai.workspace.pods import remove_leftovers

    resolved = resolve_home(home)
    with _home_lock(resolved):
        state = read_state(resolved)
        pid = state.get("pid")
        tag = state.get("workspace_tag")
        stopped = False
        if isinstance(pid, int) and _pid_alive(pid) and _is_workspace_server(pid):
            os.kill(pid, signal.SIGTERM)
            try:
                poll_until(
                    lambda: _server_gone(pid), timeout=timeout, interval=0.05, what="the server to end"
                )
            except WaitTimeout:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(WaitTimeout):
                    poll_until(lambda: _server_gone(pid), timeout=5, interval=0.05, what="the server to end")
            stopped = True
        if isinstance(tag, str) and tag:
            # Safety net: anything the server could not end (e.g. it was killed) still carries its tag.
            end_process_tree(None, marker_value=tag, marker_name=WORKSPACE_MARKER, grace_seconds=2.0)
        # Safety net for pods too: a killed server leaves its namespaces, links and bridge.
        remove_leftovers(resolved)
        if not stopped:
            _mark_stopped_offline(resolved)
        return stopped


def _mark_stopped_offline(home: Path) -> None:
    """With no server (it was killed), `stop` ended the workloads itself: record them as stopped."""
    from ray_serve_cai.workspace.model import APP_ACTIVE_STATUSES, Application, JobRun, now_timestamp
    from ray_serve_cai.workspace.store import Store, StoreError, db_path

    if not db_path(home).is_file():
        return
    try:
        store = Store(db_path(home))
    except StoreError:  # damaged or newer: left as it is (start says so; reset deletes it)
        return
    try:
        runs = {r.id: r for r in store.load("run", JobRun)}
        apps = {a.id: a for a in store.load("app", Application)}
        moment = now_timestamp()
        for run in runs.values():
            if run.active:
                run.status, run.failure_reason, run.finished_at = (
                    "ENGINE_STOPPED",
                    "workspace stopped",
                    moment,
                )
                run.pid = run.process_started = None
                store.mark("run", run.id)
        for app in apps.values():
            if app.status in APP_ACTIVE_STATUSES:
                app.status, app.stopped_at = "APPLICATION_STOPPED", moment
                app.pid = app.process_started = None
                store.mark("app", app.id)
        store.flush(lambda kind, record_id: (runs if kind == "run" else apps).get(record_id))
    finally:
        store.close()


def reset_workspace(home: Path | str | None = None) -> Path:
    """Stop the workspace, then delete its state: the database, the projects' files and the logs.
    The API key and the port are kept (`ray-cai workspace env` stays valid). Returns the home."""
    from ray_serve_cai.workspace.store import DB_FILE_NAME

    resolved = resolve_home(home)
    stop_workspace(resolved)
    with _home_lock(resolved):
        for name in (DB_FILE_NAME, f"{DB_FILE_NAME}-wal", f"{DB_FILE_NAME}-shm"):
            with contextlib.suppress(FileNotFoundError):
                (resolved / name).unlink()
        for directory in ("projects", "logs"):
            shutil.rmtree(resolved / directory, ignore_errors=True)
        state = read_state(resolved)
        if state:
            state.pop("workspace_tag", None)
            write_state(resolved, state)
    return resolved


def _server_gone(pid: int) -> bool:
    """The server's process no longer exists. A zombie counts as gone only when it is this process's
    child (then it is reaped here); another parent (init) reaps it soon, so its children are gone too."""
    try:
        process = psutil.Process(pid)
        if process.status() != psutil.STATUS_ZOMBIE:
            return False
        if process.ppid() != os.getpid():
            return False
    except psutil.NoSuchProcess:
        return True
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return True


def _is_workspace_server(pid: int) -> bool:
    try:
        command_line = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return "ray_serve_cai.workspace" in command_line and "serve" in command_line
