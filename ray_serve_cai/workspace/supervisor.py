"""Supervisor of workload processes: executes job runs and runs applications, and ends them.

The supervisor owns every process the workspace starts. It moves the status of job runs
(`ENGINE_SCHEDULING → ENGINE_STARTING → ENGINE_RUNNING → ENGINE_SUCCEEDED|FAILED|TIMEDOUT|STOPPED`)
and applications (`APPLICATION_STARTING → APPLICATION_RUNNING → APPLICATION_STOPPED|FAILED`, `:stop` via
`APPLICATION_STOPPING`). An application is RUNNING once it answers HTTP with a status below 500 on
`127.0.0.1:$CDSW_APP_PORT$CDSW_APP_POLLING_ENDPOINT`. Everything runs on the server's event loop;
blocking process work goes to worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ray_serve_cai.workspace.controls import Latency
from ray_serve_cai.workspace.model import Application, JobRun, new_id, now_timestamp
from ray_serve_cai.workspace.processes import (
    WORKLOAD_MARKER,
    WORKSPACE_MARKER,
    end_process_tree,
    free_port,
    processes_with_marker,
    spawn_workload,
)

logger = logging.getLogger(__name__)

# Variables of the server's own environment that must not leak into workloads: a workload talks to
# this workspace through CDSW_* like on CML, never through the caller's client settings.
_STRIPPED_VARIABLES = ("CML_HOST", "CML_API_KEY", WORKLOAD_MARKER, WORKSPACE_MARKER)
SCHEDULING_DELAY_SECONDS = 0.05
POLL_INTERVAL_SECONDS = 0.1
APP_PROBE_INTERVAL_SECONDS = 0.2


class ScriptError(Exception):
    """The workload's script cannot be started (missing, or of an unknown kind)."""


def build_command(project_dir: Path, script: str, arguments: str = "") -> list[str]:
    """The command line CML's runtime would use: `*.py` with this Python, `*.sh` with bash."""
    path = project_dir / script
    if not path.is_file():
        raise ScriptError(f"script {script!r} not found in the project")
    try:
        extra = shlex.split(arguments) if arguments else []
    except ValueError as exc:
        raise ScriptError(f"cannot split arguments: {exc}") from None
    if path.suffix == ".py":
        return [sys.executable, str(path), *extra]
    if path.suffix == ".sh":
        return ["bash", str(path), *extra]
    if os.access(path, os.X_OK):
        return [str(path), *extra]
    raise ScriptError(f"script {script!r} is neither *.py, *.sh nor executable")


@dataclass
class WorkloadContext:
    """What a workload needs from its project at start time."""

    project_id: str
    project_name: str
    project_dir: Path
    environment: dict[str, str]  # project env (jobs) or the app's env (apps: project env copied at create)


@dataclass
class _AppRuntime:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    process: subprocess.Popen[bytes] | None = None


@dataclass
class _RunRuntime:
    task: asyncio.Task[None] | None = None
    process: subprocess.Popen[bytes] | None = None


class Supervisor:
    def __init__(
        self,
        *,
        domain: str,
        api_url: str,
        api_key: str,
        workspace_tag: str,
        latency: Latency,
        stop_grace_seconds: float,
    ) -> None:
        self.domain = domain
        self.api_url = api_url
        self._api_key = api_key
        self.workspace_tag = workspace_tag
        self.latency = latency
        self.stop_grace_seconds = stop_grace_seconds
        self._apps: dict[str, _AppRuntime] = {}
        self._runs: dict[str, _RunRuntime] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._probe_client = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)

    # ------------------------------------------------------------ environment

    def workload_environment(self, context: WorkloadContext, workload_id: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_VARIABLES}
        env.update(context.environment)
        env.update(
            {
                "CDSW_PROJECT_ID": context.project_id,
                "CDSW_PROJECT": context.project_name,
                "CDSW_DOMAIN": self.domain,
                "CDSW_APIV2_KEY": self._api_key,
                "CDSW_API_URL": f"{self.api_url}/api/v1",
                "CDSW_IP_ADDRESS": "127.0.0.1",
                "CDSW_ENGINE_ID": new_id().replace("-", ""),
                "PYTHONUNBUFFERED": "1",
                WORKLOAD_MARKER: workload_id,
                WORKSPACE_MARKER: self.workspace_tag,
            }
        )
        return env

    def _spawn_background(self, coroutine: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------ job runs

    def start_run(
        self,
        run: JobRun,
        context: WorkloadContext,
        script: str,
        timeout_seconds: int,
        kill_on_timeout: bool,
        on_finished: Callable[[JobRun], None],
    ) -> None:
        runtime = _RunRuntime()
        self._runs[run.id] = runtime
        run.scheduling_at = run.created_at
        runtime.task = self._spawn_background(
            self._execute_run(run, runtime, context, script, timeout_seconds, kill_on_timeout, on_finished)
        )

    def request_run_stop(self, run: JobRun) -> None:
        if run.active:
            run.stop_requested = True
            run.status = "ENGINE_STOPPING"

    async def _execute_run(
        self,
        run: JobRun,
        runtime: _RunRuntime,
        context: WorkloadContext,
        script: str,
        timeout_seconds: int,
        kill_on_timeout: bool,
        on_finished: Callable[[JobRun], None],
    ) -> None:
        try:
            await self._sleep_unless_stopped(run, SCHEDULING_DELAY_SECONDS + self.latency.job_start_seconds)
            if run.stop_requested:
                self._finish_run(run, "ENGINE_STOPPED", "stopped before it started")
                return
            run.status, run.starting_at = "ENGINE_STARTING", now_timestamp()
            env = self.workload_environment(context, run.id)
            env.update(run.environment)
            env["JOB_ARGUMENTS"] = run.arguments
            try:
                command = build_command(context.project_dir, script, run.arguments)
                with open(run.log_path, "ab") as log_file:
                    log_file.write(f"[workspace] starting job run {run.id}: {script}\n".encode())
                runtime.process = spawn_workload(
                    command, cwd=context.project_dir, env=env, log_path=run.log_path
                )
            except (ScriptError, OSError) as exc:
                with open(run.log_path, "ab") as log_file:
                    log_file.write(f"[workspace] cannot start: {exc}\n".encode())
                self._finish_run(run, "ENGINE_FAILED", str(exc))
                return
            run.status, run.running_at = "ENGINE_RUNNING", now_timestamp()
            started = time.monotonic()
            timed_out = False
            while runtime.process.poll() is None and not run.stop_requested:
                if timeout_seconds and kill_on_timeout and time.monotonic() - started > timeout_seconds:
                    timed_out = True
                    break
                await asyncio.sleep(POLL_INTERVAL_SECONDS)
            if run.stop_requested or timed_out:
                await asyncio.to_thread(
                    end_process_tree,
                    runtime.process,
                    marker_value=run.id,
                    grace_seconds=self.stop_grace_seconds,
                )
                if timed_out:
                    self._finish_run(run, "ENGINE_TIMEDOUT", f"timed out after {timeout_seconds} s")
                else:
                    self._finish_run(run, "ENGINE_STOPPED", "stopped")
                return
            exit_code = runtime.process.returncode
            run.exit_code = exit_code
            # The run's engine ends with its script: nothing it left behind survives (like the pod).
            await asyncio.to_thread(end_process_tree, None, marker_value=run.id, grace_seconds=1.0)
            if exit_code == 0:
                self._finish_run(run, "ENGINE_SUCCEEDED", "")
            else:
                self._finish_run(run, "ENGINE_FAILED", f"script exited with code {exit_code}")
        except asyncio.CancelledError:
            if runtime.process is not None:
                await asyncio.shield(
                    asyncio.to_thread(
                        end_process_tree, runtime.process, marker_value=run.id, grace_seconds=1.0
                    )
                )
            self._finish_run(run, "ENGINE_STOPPED", "workspace shut down")
            raise
        except Exception:  # a bug here must not leave the run active forever
            logger.exception("job run %s failed in the supervisor", run.id)
            self._finish_run(run, "ENGINE_FAILED", "internal workspace error")
        finally:
            self._runs.pop(run.id, None)
            if run.status == "ENGINE_SUCCEEDED":
                on_finished(run)

    @staticmethod
    async def _sleep_unless_stopped(run: JobRun, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not run.stop_requested and time.monotonic() < deadline:
            await asyncio.sleep(min(POLL_INTERVAL_SECONDS, max(deadline - time.monotonic(), 0)))

    @staticmethod
    def _finish_run(run: JobRun, status: str, reason: str) -> None:
        run.status, run.failure_reason, run.finished_at = status, reason, now_timestamp()
        if run.log_path.parent.is_dir():
            with open(run.log_path, "ab") as log_file:
                log_file.write(f"[workspace] job run {run.id} finished: {status}\n".encode())

    # ------------------------------------------------------------ applications

    def _app_runtime(self, app: Application) -> _AppRuntime:
        return self._apps.setdefault(app.id, _AppRuntime())

    def start_app(self, app: Application, context: WorkloadContext) -> None:
        """Mark the app STARTING and launch it in the background (after a stop of the old process)."""
        app.status = "APPLICATION_STARTING"
        app.running_at = None
        runtime = self._app_runtime(app)

        async def restart() -> None:
            async with runtime.lock:
                await self._terminate_app(app, runtime)
                app.status = "APPLICATION_STARTING"
                runtime.task = asyncio.ensure_future(self._run_app(app, runtime, context))

        self._spawn_background(restart())

    def request_app_stop(self, app: Application) -> asyncio.Task[None]:
        """Mark the app STOPPING and end its process tree in the background; returns that task."""
        runtime = self._app_runtime(app)
        if app.status in ("APPLICATION_STARTING", "APPLICATION_RUNNING"):
            app.status = "APPLICATION_STOPPING"

        async def stop() -> None:
            async with runtime.lock:
                was_active = runtime.task is not None or runtime.process is not None
                await self._terminate_app(app, runtime)
                if was_active or app.status == "APPLICATION_STOPPING":
                    app.status, app.stopped_at = "APPLICATION_STOPPED", now_timestamp()

        return self._spawn_background(stop())

    async def forget_app(self, app: Application) -> None:
        """Stop the app (waiting for its tree to end) and drop its runtime state."""
        await self.request_app_stop(app)
        self._apps.pop(app.id, None)

    async def _terminate_app(self, app: Application, runtime: _AppRuntime) -> None:
        if runtime.task is not None:
            runtime.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runtime.task
            runtime.task = None
        process, runtime.process = runtime.process, None
        if process is not None:
            await asyncio.to_thread(
                end_process_tree, process, marker_value=app.id, grace_seconds=self.stop_grace_seconds
            )
            self._append_app_log(app, f"[workspace] application {app.id} stopped")

    @staticmethod
    def _append_app_log(app: Application, line: str) -> None:
        app.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(app.log_path, "ab") as log_file:
            log_file.write(f"{line}\n".encode())

    async def _run_app(self, app: Application, runtime: _AppRuntime, context: WorkloadContext) -> None:
        if self.latency.app_start_seconds:
            await asyncio.sleep(self.latency.app_start_seconds)
        app.app_port, app.readonly_port = free_port(), free_port()
        env = self.workload_environment(context, app.id)
        env.update(app.environment)
        env["CDSW_APP_PORT"] = str(app.app_port)
        env["CDSW_READONLY_PORT"] = str(app.readonly_port)
        polling_endpoint = env.get("CDSW_APP_POLLING_ENDPOINT", "/") or "/"
        if polling_endpoint == ".":
            polling_endpoint = "/"
        if not polling_endpoint.startswith("/"):
            polling_endpoint = "/" + polling_endpoint
        try:
            command = build_command(context.project_dir, app.script)
            self._append_app_log(app, f"[workspace] starting application {app.id}: {app.script}")
            runtime.process = spawn_workload(command, cwd=context.project_dir, env=env, log_path=app.log_path)
        except (ScriptError, OSError) as exc:
            self._append_app_log(app, f"[workspace] cannot start: {exc}")
            app.status, app.stopped_at = "APPLICATION_FAILED", now_timestamp()
            return
        app.started_at = now_timestamp()
        process = runtime.process
        probe_url = f"http://127.0.0.1:{app.app_port}{polling_endpoint}"
        while True:
            exit_code = process.poll()
            if exit_code is not None:
                failed = exit_code != 0 or app.status == "APPLICATION_STARTING"
                app.status = "APPLICATION_FAILED" if failed else "APPLICATION_STOPPED"
                app.stopped_at = now_timestamp()
                self._append_app_log(app, f"[workspace] application {app.id} exited with code {exit_code}")
                runtime.process = None
                # The engine ends with its script: nothing it left behind survives.
                await asyncio.to_thread(end_process_tree, None, marker_value=app.id, grace_seconds=1.0)
                return
            if app.status == "APPLICATION_STARTING" and await self._answers_http(probe_url):
                app.status, app.running_at = "APPLICATION_RUNNING", now_timestamp()
            await asyncio.sleep(APP_PROBE_INTERVAL_SECONDS)

    async def _answers_http(self, url: str) -> bool:
        try:
            response = await self._probe_client.get(url)
        except httpx.HTTPError:
            return False
        return response.status_code < 500

    # ------------------------------------------------------------ inventory and shutdown

    def live_workload_processes(self) -> list[dict[str, object]]:
        found = []
        for process in processes_with_marker(WORKSPACE_MARKER, self.workspace_tag):
            try:
                if process.status() == "zombie":
                    continue
                found.append(
                    {
                        "pid": process.pid,
                        "workload_id": process.environ().get(WORKLOAD_MARKER, ""),
                        "name": process.name(),
                    }
                )
            except Exception:  # the process ended while we looked
                continue
        return found

    async def shutdown(self, apps: list[Application], runs: list[JobRun]) -> None:
        """End every workload this workspace started, then sweep anything still carrying its tag."""
        for run in runs:
            self.request_run_stop(run)
        stops = [self.request_app_stop(app) for app in apps]
        run_tasks = [r.task for r in self._runs.values() if r.task is not None]
        await asyncio.gather(*stops, *run_tasks, return_exceptions=True)
        await asyncio.to_thread(
            end_process_tree,
            None,
            marker_value=self.workspace_tag,
            marker_name=WORKSPACE_MARKER,
            grace_seconds=self.stop_grace_seconds,
        )
        await self._probe_client.aclose()
