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
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil

from ray_serve_cai.workspace.controls import Latency, RestartPolicy
from ray_serve_cai.workspace.model import Application, JobRun, new_id, now_timestamp
from ray_serve_cai.workspace.pods import (
    PIP_PROXY_PORT,
    POD_APP_PORT,
    POD_READONLY_PORT,
    LoopbackRelays,
    Pod,
    PodError,
    PodNetwork,
)
from ray_serve_cai.workspace.processes import (
    WORKLOAD_MARKER,
    WORKSPACE_MARKER,
    Leader,
    end_process_tree,
    exit_file_of,
    free_port,
    process_start_time,
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
LOST_REASON = "its process ended while the workspace server was down (exit code unknown)"


def ended_while_down(exit_code: int) -> str:
    """Why a workload that ended with `exit_code` while the server was down (its pod's init recorded
    the code) is over; LOST_REASON when the code is unknown."""
    return f"exited with code {exit_code} while the workspace server was down"


def _seconds_since(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    try:
        moment = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return 0.0
    return max((datetime.now(timezone.utc) - moment).total_seconds(), 0.0)


def _workload_of(process: psutil.Process) -> str | None:
    try:
        return str(process.environ().get(WORKLOAD_MARKER, ""))
    except Exception:
        return None


def _polling_endpoint(env: dict[str, str]) -> str:
    """CML's `CDSW_APP_POLLING_ENDPOINT` (default `/`; `.` means `/`) as an absolute path."""
    endpoint = env.get("CDSW_APP_POLLING_ENDPOINT", "/") or "/"
    if endpoint == ".":
        endpoint = "/"
    return endpoint if endpoint.startswith("/") else "/" + endpoint


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
    process: Leader | None = None
    context: WorkloadContext | None = None
    restart_task: asyncio.Task[None] | None = None  # a pending automatic restart
    restart_due: float | None = None  # monotonic time of that restart


@dataclass
class _Session:
    """A session pod opened for `ray-cai workspace exec`."""

    id: str
    owner_pid: int
    pod: Pod | None = None
    pod_ip: str | None = None


@dataclass
class _RunRuntime:
    task: asyncio.Task[None] | None = None
    process: Leader | None = None


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
        restart_policy: RestartPolicy | None = None,
        network: PodNetwork | None = None,
        network_reason: str = "",
    ) -> None:
        self.domain = domain
        self.api_url = api_url
        self._api_key = api_key
        self.workspace_tag = workspace_tag
        self.latency = latency
        self.stop_grace_seconds = stop_grace_seconds
        self.restart_policy = restart_policy or RestartPolicy()
        self.automatic_restarts = 0  # automatic restarts done since the server started
        # Called right after a workload's process is spawned or ended (the service flushes its store,
        # so the pid that re-adoption needs is durable before anything else happens).
        self.on_process_change: Callable[[], None] = lambda: None
        self._apps: dict[str, _AppRuntime] = {}
        self._runs: dict[str, _RunRuntime] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._sessions: dict[str, _Session] = {}
        self._session_watch: asyncio.Task[None] | None = None
        self._probe_client = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)
        # Pods (see pods.py) when the workspace can make them, else every workload on the host.
        self.network = network
        self.network_reason = network_reason
        self.relays: LoopbackRelays | None = None
        if network is not None:
            self.relays = network.relays = LoopbackRelays()
        self._api_port = int(api_url.rsplit(":", 1)[1]) if api_url.rsplit(":", 1)[-1].isdigit() else None

    @property
    def network_mode(self) -> str:
        return "pods" if self.network is not None else "shared-host"

    def network_state(self) -> dict[str, object]:
        """`"network": "pods" | "shared-host"`, why, and (pods) the CIDR, the pods and the faults."""
        state: dict[str, object] = {"network": self.network_mode, "reason": self.network_reason}
        if self.network is not None:
            state.update(
                {
                    "pod_cidr": str(self.network.cidr),
                    "gateway": self.network.gateway,
                    "bridge": self.network.bridge,
                    "pods": sorted(pod.ip for pod in self.network.pods()),
                    "faults": self.network.fault_list(),
                    "app_port": POD_APP_PORT,
                }
            )
        return state

    # ------------------------------------------------------------ pods

    async def set_workspace_ports(self, url_ports: set[int]) -> None:
        """The application URL ports every pod relays to the workspace (with the API's own port)."""
        if self.relays is not None:
            await self.relays.set_ports({*url_ports, *([self._api_port] if self._api_port else [])})

    async def _new_pod(self, workload: JobRun | Application | _Session) -> Pod | None:
        """A fresh pod for a workload about to start (None in shared-host mode)."""
        if self.network is None:
            return None
        pod = await asyncio.to_thread(self.network.create)
        try:
            if self.relays is not None:
                await self.relays.add_pod(pod)
        except Exception:
            await asyncio.to_thread(self.network.remove, pod)
            raise
        workload.pod_ip = pod.ip
        try:
            self.network.shape_new_pod(pod, asyncio.get_running_loop())
        except PodError as exc:  # a shaping fault must not keep a workload from starting
            logger.warning("pod %s: cannot shape its link: %s", pod.ip, exc)
        return pod

    def _adopt_pod(self, workload: JobRun | Application) -> None:
        """A re-adopted workload keeps its pod (and its address)."""
        if self.network is None or not workload.pod_ip:
            return
        pod = self.network.adopt(workload.pod_ip)
        if pod is None:
            workload.pod_ip = None
            return
        if self.relays is not None:
            self._spawn_background(self.relays.add_pod(pod))

    async def _release_pod(self, workload: JobRun | Application | _Session) -> None:
        """Remove the workload's pod (its processes have ended)."""
        ip, workload.pod_ip = workload.pod_ip, None
        if self.network is None or not ip:
            return
        if self.relays is not None:
            await self.relays.remove_pod(ip)
        pod = self.network.pod(ip) or self.network.adopt(ip)
        if pod is not None:
            await asyncio.to_thread(self.network.remove, pod)

    async def after_adoption(self) -> None:
        """Once every workload an earlier server left is re-adopted or given up: the pods nobody
        adopted go (a crashed server's pods of workloads that ended meanwhile)."""
        if self.network is not None:
            kept = [pod.ip for pod in self.network.pods()]
            removed = await asyncio.to_thread(self.network.sweep, kept)
            if removed:
                logger.info("removed %d namespace(s)/link(s) no workload uses any more", len(removed))

    def _in_pod(
        self, pod: Pod | None, command: list[str], env: dict[str, str], log_path: Path, forward: int | None
    ) -> list[str]:
        if pod is None or self.network is None:
            return command
        env["CDSW_IP_ADDRESS"] = pod.ip
        env["PIP_PROXY"] = f"http://127.0.0.1:{PIP_PROXY_PORT}"
        return self.network.wrap(pod, command, exit_file=exit_file_of(log_path), forward_port=forward)

    def _probe_url(self, app: Application, env: dict[str, str]) -> str:
        host = app.pod_ip if self.network is not None and app.pod_ip else "127.0.0.1"
        return f"http://{host}:{app.app_port}{_polling_endpoint(env)}"

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
                # Not a CML variable: the node layer picks free ports only when nodes share a host.
                "RAY_CAI_SHARED_HOST": "" if self.network is not None else "1",
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

    def _record_process(self, workload: JobRun | Application, process: Leader | None) -> None:
        """Keep the leader's pid and start time on the record (durable at once) for re-adoption."""
        if process is None:
            workload.pid, workload.process_started = None, None
        else:
            workload.pid, workload.process_started = process.pid, process_start_time(process.pid)
        self.on_process_change()

    # ------------------------------------------------------------ session pods (`ray-cai workspace exec`)

    async def open_session(
        self, context: WorkloadContext, environment: dict[str, str], owner_pid: int, log_dir: Path
    ) -> dict[str, object]:
        """A fresh pod of the project for a command the caller runs itself (a CML session's pod): its
        environment (a session's CDSW_* variables plus `environment`), working directory and the
        command prefix that enters the pod. The pod goes with `close_session`, or when `owner_pid` ends."""
        session = _Session(id=new_id(), owner_pid=owner_pid)
        env = self.workload_environment(context, session.id)
        env.update(environment)
        pod = await self._new_pod(session)
        session.pod = pod
        prefix: list[str] = []
        if pod is not None:
            marker = log_dir / f"session-{session.id}.exit"
            log_dir.mkdir(parents=True, exist_ok=True)
            prefix = self._in_pod(pod, [], env, marker, None)
        self._sessions[session.id] = session
        if self._session_watch is None or self._session_watch.done():
            self._session_watch = self._spawn_background(self._watch_sessions())
        return {
            "id": session.id,
            "pod_ip": pod.ip if pod is not None else None,
            "cwd": str(context.project_dir),
            "environment": env,
            "command_prefix": prefix,
        }

    async def close_session(self, session_id: str) -> bool:
        """End the session's processes and remove its pod; False when there is no such session."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        await asyncio.to_thread(end_process_tree, None, marker_value=session.id, grace_seconds=2.0)
        await self._release_pod(session)
        return True

    async def _watch_sessions(self) -> None:
        """A session whose owner (the `exec` command) ended without closing it is closed here."""
        while self._sessions:
            await asyncio.sleep(1.0)
            for session in list(self._sessions.values()):
                if not psutil.pid_exists(session.owner_pid):
                    await self.close_session(session.id)

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

    def adopt_run(
        self,
        run: JobRun,
        process: Leader,
        timeout_seconds: int,
        kill_on_timeout: bool,
        on_finished: Callable[[JobRun], None],
    ) -> None:
        """Supervise a run whose process an earlier server started (re-adoption after a restart)."""
        runtime = _RunRuntime(process=process)
        self._runs[run.id] = runtime
        self._adopt_pod(run)
        started = time.monotonic() - _seconds_since(run.running_at)

        async def supervise() -> None:
            try:
                await self._supervise_run(run, runtime, timeout_seconds, kill_on_timeout, started)
            finally:
                self._runs.pop(run.id, None)
                if run.status == "ENGINE_SUCCEEDED":
                    on_finished(run)

        runtime.task = self._spawn_background(self._guard_run(run, runtime, supervise()))

    def request_run_stop(self, run: JobRun) -> None:
        if run.active:
            run.stop_requested = True
            run.status = "ENGINE_STOPPING"

    async def _guard_run(self, run: JobRun, runtime: _RunRuntime, body: Awaitable[None]) -> None:
        """Run `body`: a shutdown ends the run's tree (STOPPED), a bug fails it; never active forever."""
        try:
            await body
        except asyncio.CancelledError:
            if runtime.process is not None:
                await asyncio.shield(
                    asyncio.to_thread(
                        end_process_tree, runtime.process, marker_value=run.id, grace_seconds=1.0
                    )
                )
            await asyncio.shield(self._release_pod(run))
            self._finish_run(run, "ENGINE_STOPPED", "workspace shut down")
            raise
        except Exception:  # a bug here must not leave the run active forever
            logger.exception("job run %s failed in the supervisor", run.id)
            with contextlib.suppress(Exception):
                await self._release_pod(run)
            self._finish_run(run, "ENGINE_FAILED", "internal workspace error")

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
        async def execute() -> None:
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
                pod = await self._new_pod(run)
                command = self._in_pod(pod, command, env, run.log_path, None)
                runtime.process = spawn_workload(
                    command, cwd=context.project_dir, env=env, log_path=run.log_path, record_exit=pod is None
                )
            except (ScriptError, OSError, PodError) as exc:
                with open(run.log_path, "ab") as log_file:
                    log_file.write(f"[workspace] cannot start: {exc}\n".encode())
                await self._release_pod(run)
                self._finish_run(run, "ENGINE_FAILED", str(exc))
                return
            run.status, run.running_at = "ENGINE_RUNNING", now_timestamp()
            self._record_process(run, runtime.process)
            await self._supervise_run(run, runtime, timeout_seconds, kill_on_timeout, time.monotonic())

        try:
            await self._guard_run(run, runtime, execute())
        finally:
            self._runs.pop(run.id, None)
            if run.status == "ENGINE_SUCCEEDED":
                on_finished(run)

    async def _supervise_run(
        self,
        run: JobRun,
        runtime: _RunRuntime,
        timeout_seconds: int,
        kill_on_timeout: bool,
        started: float,
    ) -> None:
        """Wait for the running process to end, be stopped or time out; then finish the run."""
        process = runtime.process
        assert process is not None
        timed_out = False
        while process.poll() is None and not run.stop_requested:
            if timeout_seconds and kill_on_timeout and time.monotonic() - started > timeout_seconds:
                timed_out = True
                break
            await asyncio.sleep(POLL_INTERVAL_SECONDS)
        if run.stop_requested or timed_out:
            await asyncio.to_thread(
                end_process_tree,
                process,
                marker_value=run.id,
                grace_seconds=self.stop_grace_seconds,
            )
            runtime.process = None
            await self._release_pod(run)
            self._record_process(run, None)
            if timed_out:
                self._finish_run(run, "ENGINE_TIMEDOUT", f"timed out after {timeout_seconds} s")
            else:
                self._finish_run(run, "ENGINE_STOPPED", "stopped")
            return
        exit_code = process.returncode
        run.exit_code = exit_code
        # The run's engine ends with its script: nothing it left behind survives (like the pod).
        await asyncio.to_thread(end_process_tree, None, marker_value=run.id, grace_seconds=1.0)
        runtime.process = None
        await self._release_pod(run)
        self._record_process(run, None)
        if exit_code == 0:
            self._finish_run(run, "ENGINE_SUCCEEDED", "")
        else:
            self._finish_run(run, "ENGINE_FAILED", f"script exited with code {exit_code}")

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

    def fail_lost_run(self, run: JobRun, exit_code: int | None) -> None:
        """A run whose process ended while no server watched it: finished by its exit code if it left
        one (SUCCEEDED/FAILED), else ENGINE_FAILED with the reason."""
        run.pid, run.process_started, run.exit_code = None, None, exit_code
        run.pod_ip = None  # its pod goes with the sweep after re-adoption
        if exit_code == 0:
            self._finish_run(run, "ENGINE_SUCCEEDED", "")
        elif exit_code is not None:
            self._finish_run(run, "ENGINE_FAILED", f"script {ended_while_down(exit_code)}")
        else:
            self._finish_run(run, "ENGINE_FAILED", LOST_REASON)

    # ------------------------------------------------------------ applications

    def _app_runtime(self, app: Application) -> _AppRuntime:
        return self._apps.setdefault(app.id, _AppRuntime())

    def start_app(self, app: Application, context: WorkloadContext, *, automatic: bool = False) -> None:
        """Mark the app STARTING and launch it in the background (after a stop of the old process).
        A start by a user (not `automatic`) resets the automatic-restart count."""
        app.status = "APPLICATION_STARTING"
        app.running_at = None
        runtime = self._app_runtime(app)
        runtime.context = context
        self._cancel_restart(runtime)
        if automatic:
            app.restart_attempts += 1
            self.automatic_restarts += 1
        else:
            app.restart_attempts = 0

        async def restart() -> None:
            async with runtime.lock:
                await self._terminate_app(app, runtime)
                app.status = "APPLICATION_STARTING"
                runtime.task = asyncio.ensure_future(self._run_app(app, runtime, context))

        self._spawn_background(restart())

    def adopt_app(self, app: Application, context: WorkloadContext, process: Leader) -> None:
        """Supervise an app whose process an earlier server started (re-adoption after a restart)."""
        runtime = self._app_runtime(app)
        runtime.context = context
        runtime.process = process
        self._adopt_pod(app)
        if app.status == "APPLICATION_STOPPING":  # the old server was stopping it: finish that
            self.request_app_stop(app)
            return
        probe_url = self._probe_url(app, app.environment)
        runtime.task = asyncio.ensure_future(self._supervise_app(app, runtime, process, probe_url))

    def request_app_stop(self, app: Application) -> asyncio.Task[None]:
        """Mark the app STOPPING and end its process tree in the background; returns that task."""
        runtime = self._app_runtime(app)
        self._cancel_restart(runtime)
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
            await self._release_pod(app)
            self._record_process(app, None)
            self._append_app_log(app, f"[workspace] application {app.id} stopped")
        elif app.pod_ip:
            await self._release_pod(app)

    @staticmethod
    def _append_app_log(app: Application, line: str) -> None:
        app.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(app.log_path, "ab") as log_file:
            log_file.write(f"{line}\n".encode())

    async def _run_app(self, app: Application, runtime: _AppRuntime, context: WorkloadContext) -> None:
        if self.latency.app_start_seconds:
            await asyncio.sleep(self.latency.app_start_seconds)
        if self.network is not None:  # as on CML: the same ports in every pod
            app.app_port, app.readonly_port = POD_APP_PORT, POD_READONLY_PORT
        else:
            app.app_port, app.readonly_port = free_port(), free_port()
        env = self.workload_environment(context, app.id)
        env.update(app.environment)
        env["CDSW_APP_PORT"] = str(app.app_port)
        env["CDSW_READONLY_PORT"] = str(app.readonly_port)
        try:
            command = build_command(context.project_dir, app.script)
            self._append_app_log(app, f"[workspace] starting application {app.id}: {app.script}")
            pod = await self._new_pod(app)
            command = self._in_pod(pod, command, env, app.log_path, app.app_port)
            if pod is not None:
                self._append_app_log(app, f"[workspace] pod {pod.ip} ({pod.netns})")
            runtime.process = spawn_workload(
                command, cwd=context.project_dir, env=env, log_path=app.log_path, record_exit=pod is None
            )
        except (ScriptError, OSError, PodError) as exc:
            self._append_app_log(app, f"[workspace] cannot start: {exc}")
            await self._release_pod(app)
            app.status, app.stopped_at = "APPLICATION_FAILED", now_timestamp()
            self._on_app_failed(app, runtime)
            return
        app.started_at = now_timestamp()
        self._record_process(app, runtime.process)
        await self._supervise_app(app, runtime, runtime.process, self._probe_url(app, env))

    async def _supervise_app(
        self, app: Application, runtime: _AppRuntime, process: Leader, probe_url: str
    ) -> None:
        while True:
            exit_code = process.poll()
            if exit_code is not None:
                failed = exit_code != 0 or app.status == "APPLICATION_STARTING"
                self._append_app_log(app, f"[workspace] application {app.id} exited with code {exit_code}")
                runtime.process = None
                # The engine ends with its script: nothing it left behind survives. Only then does
                # the app show as ended: a client that restarts it on seeing FAILED must not have its
                # new processes (same marker) caught by this sweep.
                await asyncio.to_thread(end_process_tree, None, marker_value=app.id, grace_seconds=1.0)
                await self._release_pod(app)
                app.status = "APPLICATION_FAILED" if failed else "APPLICATION_STOPPED"
                app.stopped_at = now_timestamp()
                self._record_process(app, None)
                if failed:
                    self._on_app_failed(app, runtime)
                return
            if app.status == "APPLICATION_STARTING" and await self._answers_http(probe_url):
                app.status, app.running_at = "APPLICATION_RUNNING", now_timestamp()
            await asyncio.sleep(APP_PROBE_INTERVAL_SECONDS)

    def fail_lost_app(self, app: Application, context: WorkloadContext, exit_code: int | None) -> None:
        """An app whose process ended while no server watched it: FAILED (STOPPED if it was running
        and left exit code 0), with the reason in its log; the restart policy applies as to any failure."""
        was_running = app.status == "APPLICATION_RUNNING"
        app.pid, app.process_started = None, None
        app.pod_ip = None  # its pod goes with the sweep after re-adoption
        app.stopped_at = now_timestamp()
        if exit_code == 0 and was_running:
            app.status = "APPLICATION_STOPPED"
        else:
            app.status = "APPLICATION_FAILED"
        detail = LOST_REASON if exit_code is None else ended_while_down(exit_code)
        self._append_app_log(app, f"[workspace] application {app.id} {app.status}: {detail}")
        runtime = self._app_runtime(app)
        runtime.context = context
        if app.status == "APPLICATION_FAILED":
            self._on_app_failed(app, runtime)

    # ------------------------------------------------------------ automatic restarts (CML's policy)

    def _cancel_restart(self, runtime: _AppRuntime) -> None:
        if runtime.restart_task is not None:
            runtime.restart_task.cancel()
            runtime.restart_task, runtime.restart_due = None, None

    def _on_app_failed(self, app: Application, runtime: _AppRuntime) -> None:
        """An app entered APPLICATION_FAILED by itself: restart it after the policy's delay, while
        attempts remain (CML: up to 3, 5 minutes apart)."""
        policy = self.restart_policy
        if not policy.enabled or app.restart_attempts >= policy.max_attempts or runtime.context is None:
            return
        context = runtime.context
        runtime.restart_due = time.monotonic() + policy.delay_seconds
        self._append_app_log(
            app,
            f"[workspace] automatic restart {app.restart_attempts + 1}/{policy.max_attempts} "
            f"in {policy.delay_seconds:g} s",
        )

        async def restart_later() -> None:
            await asyncio.sleep(policy.delay_seconds)
            runtime.restart_task, runtime.restart_due = None, None
            if app.status == "APPLICATION_FAILED" and self._apps.get(app.id) is runtime:
                self.start_app(app, context, automatic=True)

        runtime.restart_task = self._spawn_background(restart_later())

    def restart_state(self, apps: list[Application]) -> dict[str, object]:
        """The policy, the pending automatic restarts and the attempts used, per application id."""
        now = time.monotonic()
        pending = {
            app_id: round(max(r.restart_due - now, 0.0), 3)
            for app_id, r in self._apps.items()
            if r.restart_due is not None
        }
        return {
            **self.restart_policy.to_dict(),
            "pending": pending,
            "attempts": {a.id: a.restart_attempts for a in apps if a.restart_attempts},
            "automatic_restarts": self.automatic_restarts,
        }

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

    def end_unadoptable(self, adoptable: set[str]) -> list[str]:
        """End every process tree tagged by this workspace whose workload is not in `adoptable` (an
        earlier server's workloads nobody can supervise again). Blocking; returns the workload ids."""
        by_workload: dict[str, int] = {}
        for process in processes_with_marker(WORKSPACE_MARKER, self.workspace_tag):
            try:
                workload_id = process.environ().get(WORKLOAD_MARKER, "")
            except Exception:  # it ended while we looked
                continue
            if workload_id not in adoptable:
                by_workload[workload_id] = by_workload.get(workload_id, 0) + 1
        for workload_id in by_workload:
            logger.warning("ending processes of workload %s: they cannot be re-adopted", workload_id or "?")
            if workload_id:
                end_process_tree(None, marker_value=workload_id, grace_seconds=self.stop_grace_seconds)
        if "" in by_workload:
            stray = [
                p for p in processes_with_marker(WORKSPACE_MARKER, self.workspace_tag)
                if _workload_of(p) == ""
            ]  # fmt: skip
            for process in stray:
                with contextlib.suppress(Exception):
                    process.kill()
        return sorted(by_workload)

    async def shutdown(self, apps: list[Application], runs: list[JobRun]) -> None:
        """End every workload this workspace started, then sweep anything still carrying its tag."""
        for session_id in list(self._sessions):
            await self.close_session(session_id)
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
        if self.network is not None:  # no pod, link or fault outlives the workspace
            if self.relays is not None:
                await self.relays.close()
            await asyncio.to_thread(self.network.remove_all)
        await self._probe_client.aclose()
