"""The workspace's API semantics: validates requests, keeps projects/jobs/runs/apps, drives the supervisor.

Handlers in `server.py` call one method here per endpoint. CML's spec (`shared/reference/
cml-api-v2.swagger.json`) is the contract; choices where it is silent are documented in
`ray_serve_cai/workspace/README.md`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from ray_serve_cai.waiting import apoll_until
from ray_serve_cai.workspace.bodies import (
    AppCreate,
    AppUpdate,
    JobCreate,
    JobUpdate,
    ProjectCreate,
    ProjectUpdate,
    RunCreate,
    parse_body,
)
from ray_serve_cai.workspace.errors import (
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
)
from ray_serve_cai.workspace.model import (
    APP_ACTIVE_STATUSES,
    Application,
    Job,
    JobRun,
    Project,
    last_timestamp,
    new_id,
    now_timestamp,
    restore_clock,
    set_change_hook,
)
from ray_serve_cai.workspace.processes import (
    AdoptedProcess,
    Leader,
    exit_file_of,
    read_exit_code,
    reserve_ports,
)
from ray_serve_cai.workspace.runtimes import as_api_runtime, load_runtimes
from ray_serve_cai.workspace.store import FLUSH_INTERVAL_SECONDS, Store, db_path
from ray_serve_cai.workspace.supervisor import Supervisor, WorkloadContext

logger = logging.getLogger(__name__)
R = TypeVar("R")
# How long deleting a job waits for its active runs to end (their stop grace plus margin).
RUN_STOP_TIMEOUT_SECONDS = 120.0

GIT_CLONE_TIMEOUT_SECONDS = 600
# Store meta keys: runtimes registered through the API, statuses set through UpdateRuntimeStatus.
REGISTERED_RUNTIMES = "registered_runtimes"
RUNTIME_STATUSES = "runtime_statuses"
RUNTIME_STATUS_VALUES = ("ENABLED", "DISABLED", "DEPRECATED")
COLLABORATOR_PERMISSIONS = ("read", "write", "admin", "operator", "business_user")
_IMAGE_REFERENCE = re.compile(
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+:[\w][\w.-]{0,127}$"
)


def image_reference_problem(url: str) -> str:
    """Why `url` is not a registry/repository:tag image reference ("" when it is one)."""
    if not url:
        return "url is required"
    if not _IMAGE_REFERENCE.match(url):
        return f"{url!r} is not an image reference (registry/repository:tag)"
    return ""


def custom_runtime(url: str) -> dict[str, Any]:
    name, _, tag = url.rpartition(":")
    return {"image_identifier": url, "editor": "PBJ Workbench", "kernel": "Python", "edition": "Custom",
            "description": f"custom runtime {name.rsplit('/', 1)[-1]}", "full_version": tag,
            "status": "ENABLED"}  # fmt: skip


def crn(kind: str, resource_id: str) -> str:
    """A CRN-shaped identifier of a workspace resource."""
    return f"crn:cdp:ml:local:workspace:{kind}/{resource_id}"


def _execution(
    *,
    workload_crn: str,
    execution_crn: str,
    start: str,
    end: str | None,
    status: str,
    resources: tuple[Any, Any, Any],
    creator: dict[str, str],
    failure_reason: str = "",
) -> dict[str, Any]:
    cpu, memory, gpu = resources
    execution = {
        "workload_crn": workload_crn,
        "workload_execution_crn": execution_crn,
        "pod_name": f"engine-{execution_crn.rsplit('/', 1)[-1]}",
        "start_time": start,
        "allocated_cpu_cores": float(cpu or 0),
        "allocated_memory_gb": float(memory or 0),
        "allocated_gpu_cores": float(gpu or 0),
        "status": status.split("_", 1)[-1].lower(),  # running, succeeded, failed… (ListWorkloadStatus)
        "run_as_user_name": creator.get("username", ""),
    }
    if end:
        execution["end_time"] = end
    if failure_reason:
        execution["failure_reason"] = failure_reason
    return execution


_ENGINE_KEY = ("default_project_engine_type",)


def _without_empty(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    """`body` without these keys when they are empty: an empty choice means the default (or no change)."""
    return {k: v for k, v in body.items() if not (k in keys and v == "")}


_CREDENTIALS_IN_URL = re.compile(r"(://)[^/@\s]+@")


def redact_url_credentials(text: str) -> str:
    return _CREDENTIALS_IN_URL.sub(r"\1***@", text)


class _Tracked(dict[str, R], Generic[R]):
    """The service's records of one kind: adding or removing one marks it for the store."""

    def __init__(self, kind: str, mark: Callable[[str, str], None]) -> None:
        super().__init__()
        self._kind, self._mark = kind, mark

    def __setitem__(self, key: str, value: R) -> None:
        super().__setitem__(key, value)
        self._mark(self._kind, key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._mark(self._kind, key)

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        if key in self:
            self._mark(self._kind, key)
        return super().pop(key, *default)


class WorkspaceService:
    """The records (in memory, written through to `store`) and the API semantics on them.

    `await start()` once the event loop runs: it re-adopts the workloads an earlier server left
    running, then flushes background changes every `FLUSH_INTERVAL_SECONDS`. `flush()` writes every
    change now (the server calls it before each answer leaves)."""

    def __init__(
        self, home: Path, supervisor: Supervisor, runtimes: list[dict[str, Any]], store: Store | None = None
    ) -> None:
        self.home = home
        self.supervisor = supervisor
        self.store = store if store is not None else Store(db_path(home))
        mark = self.store.mark
        self.projects: _Tracked[Project] = _Tracked("project", mark)
        self.jobs: _Tracked[Job] = _Tracked("job", mark)
        self.runs: _Tracked[JobRun] = _Tracked("run", mark)
        self.apps: _Tracked[Application] = _Tracked("app", mark)
        self._runtimes = runtimes
        self._runtimes_mtime = self._runtimes_file_mtime()
        # Runtimes a job or app names stay offered even when runtimes.json drops them later.
        self._in_use = {r["image_identifier"]: r for r in self.store.runtimes_in_use()}
        self._background: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._load()
        set_change_hook(mark)
        supervisor.on_process_change = self.flush

    def _load(self) -> None:
        restore_clock(self.store.get_meta("last_timestamp"))
        for table, kind, cls in (
            (self.projects, "project", Project),
            (self.jobs, "job", Job),
            (self.runs, "run", JobRun),
            (self.apps, "app", Application),
        ):
            for record in self.store.load(kind, cls):
                dict.__setitem__(table, record.id, record)  # loaded: nothing to write back
        # Every port an app holds (`app_port`, `readonly_port`, a listener's `*_port`) stays its own.
        reserve_ports(
            value
            for app in self.apps.values()
            for name, value in vars(app).items()
            if name.endswith("_port") and isinstance(value, int)
        )
        for project in self.projects.values():
            if project.creation_status == "creating":
                self._mark_created(project, "error", "creation interrupted by a restart of the workspace")

    def _lookup(self, kind: str, record_id: str) -> Any | None:
        table = {"project": self.projects, "job": self.jobs, "run": self.runs, "app": self.apps}[kind]
        return table.get(record_id)

    def flush(self) -> None:
        """Commit every change made so far (records and the clock) to the store."""
        if self.store.dirty:  # the common case of a read: nothing to do, no lock taken
            self.store.flush(self._lookup, meta=[("last_timestamp", last_timestamp())])

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            try:
                self.flush()
            except Exception:  # keep flushing; the next answer's flush reports it
                logger.exception("cannot write the workspace database")

    # ------------------------------------------------------------ start: re-adoption

    async def start(self) -> list[Application]:
        """Re-adopt the workloads an earlier server left (live ones are supervised again, dead ones are
        marked as CML would, tagged processes nobody can adopt are ended), then start flushing.

        Returns the applications active afterwards: the gateway reopens their listeners (their
        ports, `app_port` and any listener field, are the stored ones)."""
        adoptable: dict[str, Leader] = {}
        for workload in [*self.runs.values(), *self.apps.values()]:
            if workload.pid is None:
                continue
            active = (
                workload.active if isinstance(workload, JobRun) else workload.status in APP_ACTIVE_STATUSES
            )
            process = AdoptedProcess.find(
                workload.pid, workload.process_started, exit_file_of(workload.log_path)
            )
            if active and process is not None:
                adoptable[workload.id] = process
        # Before anything new starts: end every tagged process that belongs to no adoptable workload.
        await asyncio.to_thread(self.supervisor.end_unadoptable, set(adoptable))
        for run in list(self.runs.values()):
            if run.active:
                self._readopt_run(run, adoptable.get(run.id))
        for app in list(self.apps.values()):
            if app.status in APP_ACTIVE_STATUSES:
                self._readopt_app(app, adoptable.get(app.id))
        self.flush()
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_loop())
        if adoptable:
            logger.info("re-adopted %d workload(s) of an earlier server", len(adoptable))
        return self.live_apps()

    def live_apps(self) -> list[Application]:
        """Applications that are starting, running or stopping (the ones with a process to route to)."""
        return [a for a in self.apps.values() if a.status in APP_ACTIVE_STATUSES]

    def _readopt_run(self, run: JobRun, process: Leader | None) -> None:
        job = self.jobs.get(run.job_id)
        project = self.projects.get(run.project_id)
        timeout = int(run.job_snapshot.get("timeout") or 0)
        kill_on_timeout = bool(run.job_snapshot.get("kill_on_timeout", True))
        if process is not None:
            self.supervisor.adopt_run(run, process, timeout, kill_on_timeout, self._start_dependent_runs)
        elif run.pid is not None:
            self.supervisor.fail_lost_run(run, read_exit_code(exit_file_of(run.log_path)))
            if run.status == "ENGINE_SUCCEEDED":
                self._start_dependent_runs(run)
        elif run.status == "ENGINE_STOPPING" or job is None or project is None:
            self.supervisor.fail_lost_run(run, None)
            if run.status == "ENGINE_STOPPING":
                run.status = "ENGINE_STOPPED"
        else:  # accepted but never started: start it now
            run.status = "ENGINE_SCHEDULING"
            context = self._context(project, {**project.environment, **job.environment})
            self.supervisor.start_run(
                run, context, job.script, timeout, kill_on_timeout, self._start_dependent_runs
            )

    def _readopt_app(self, app: Application, process: Leader | None) -> None:
        project = self.projects.get(app.project_id)
        if project is None:
            return
        context = self._context(project, {})
        if process is not None:
            self.supervisor.adopt_app(app, context, process)
        elif app.pid is not None:
            self.supervisor.fail_lost_app(app, context, read_exit_code(exit_file_of(app.log_path)))
        elif app.status == "APPLICATION_STOPPING":
            app.status, app.stopped_at = "APPLICATION_STOPPED", now_timestamp()
        else:  # accepted (STARTING) but its process never started: start it now
            attempts = app.restart_attempts
            self.supervisor.start_app(app, context)
            app.restart_attempts = attempts

    # ------------------------------------------------------------ helpers

    def _runtimes_file_mtime(self) -> float | None:
        path = self.home / "runtimes.json"
        return path.stat().st_mtime if path.is_file() else None

    @property
    def runtimes(self) -> list[dict[str, Any]]:
        """The runtimes offered; a changed `runtimes.json` in the home is read again, so a test can
        publish a newer runtime while the workspace runs (as Cloudera does). Runtimes registered
        through the API follow, and statuses set through `UpdateRuntimeStatus` apply to all."""
        mtime = self._runtimes_file_mtime()
        if mtime != self._runtimes_mtime:  # changed, added or removed (back to the default list)
            self._runtimes, self._runtimes_mtime = load_runtimes(self.home), mtime
        listed = [*self._runtimes, *self._stored_list(REGISTERED_RUNTIMES)]
        offered = {r["image_identifier"] for r in listed}
        statuses = self._stored_dict(RUNTIME_STATUSES)
        return [
            {**r, "status": statuses.get(r["image_identifier"], r.get("status", "ENABLED"))}
            for r in [*listed, *(r for i, r in self._in_use.items() if i not in offered)]
        ]

    def _stored_list(self, key: str) -> list[dict[str, Any]]:
        raw = self.store.get_meta(key)
        return list(json.loads(raw)) if raw else []

    def _stored_dict(self, key: str) -> dict[str, str]:
        raw = self.store.get_meta(key)
        return dict(json.loads(raw)) if raw else {}

    def _project(self, project_id: str) -> Project:
        project = self.projects.get(project_id)
        if project is None:
            raise not_found(f"project {project_id} not found")
        return project

    def _job(self, project_id: str, job_id: str) -> Job:
        self._project(project_id)
        job = self.jobs.get(job_id)
        if job is None or job.project_id != project_id:
            raise not_found(f"job {job_id} not found in project {project_id}")
        return job

    def _run(self, project_id: str, job_id: str, run_id: str) -> JobRun:
        self._job(project_id, job_id)
        run = self.runs.get(run_id)
        if run is None or run.job_id != job_id:
            raise not_found(f"job run {run_id} not found for job {job_id}")
        return run

    def _app(self, project_id: str, app_id: str) -> Application:
        self._project(project_id)
        app = self.apps.get(app_id)
        if app is None or app.project_id != project_id:
            raise not_found(f"application {app_id} not found in project {project_id}")
        return app

    def _check_runtime(self, project: Project, runtime_identifier: str) -> None:
        if not runtime_identifier:
            if project.default_engine_type == "ml_runtime":
                raise invalid_argument(
                    "runtime image must be specified: runtime_identifier is required in ML Runtime projects"
                )
            return
        runtime = next((r for r in self.runtimes if r["image_identifier"] == runtime_identifier), None)
        if runtime is None:
            raise invalid_argument(
                f"runtime_identifier {runtime_identifier!r} is not a runtime of this workspace "
                "(see GET /api/v2/runtimes)"
            )
        if runtime_identifier not in self._in_use:
            self._in_use[runtime_identifier] = runtime
            self.store.keep_runtime(runtime)  # offered for as long as the workspace lives

    @staticmethod
    def _require_ready(project: Project) -> None:
        if project.creation_status != "success":
            raise failed_precondition(
                f"project {project.id} is not ready (creation_status {project.creation_status!r})"
            )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _context(self, project: Project, environment: dict[str, str]) -> WorkloadContext:
        return WorkloadContext(
            project_id=project.id,
            project_name=project.name,
            project_dir=project.directory,
            environment=environment,
        )

    # ------------------------------------------------------------ projects

    def list_projects(self) -> list[dict[str, Any]]:
        return [p.to_api() for p in self.projects.values()]

    def create_project(self, body: dict[str, Any]) -> Project:
        request = parse_body(ProjectCreate, _without_empty(body, "template", "visibility", *_ENGINE_KEY))
        if any(p.name == request.name for p in self.projects.values()):
            raise already_exists(f"project with name {request.name!r} already exists")
        parent: Project | None = None
        if request.parent_project:
            parent = self._project(request.parent_project)
            self._require_ready(parent)
        template = "git" if request.git_url else (request.template or "local")
        project_id = new_id()
        project = Project(
            id=project_id,
            name=request.name,
            description=request.description,
            visibility=request.visibility,
            default_engine_type=request.default_project_engine_type,
            template=template,
            directory=self.home / "projects" / project_id,
            environment=dict(request.environment),
            shared_memory_limit=request.shared_memory_limit,
        )
        self.projects[project_id] = project
        source = parent.directory if parent is not None else None
        self._spawn(self._populate_project(project, request.git_url, request.git_ref, source))
        return project

    async def _populate_project(
        self, project: Project, git_url: str, git_ref: str, fork: Path | None
    ) -> None:
        """Fill the project's folder: a clone of `git_url` (at `git_ref`), a copy of the project it
        forks (`parent_project`), or nothing (every template is an empty folder here)."""
        project.directory.parent.mkdir(parents=True, exist_ok=True)
        if fork is not None and not git_url:
            await asyncio.to_thread(shutil.copytree, fork, project.directory, symlinks=True)
            self._mark_created(project, "success", "")
            return
        if not git_url:
            await asyncio.sleep(0.05)
            project.directory.mkdir(parents=True, exist_ok=True)
            self._mark_created(project, "success", "")
            return
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        branch = ["--branch", git_ref] if git_ref else []
        process = await asyncio.create_subprocess_exec(
            "git", "clone", "--quiet", *branch, "--", git_url, str(project.directory),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
        )  # fmt: skip
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), GIT_CLONE_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            self._mark_created(project, "error", f"git clone timed out after {GIT_CLONE_TIMEOUT_SECONDS} s")
            return
        if project.id not in self.projects:
            shutil.rmtree(project.directory, ignore_errors=True)
            return
        if process.returncode != 0:
            detail = redact_url_credentials(stderr.decode(errors="replace").strip())[-500:]
            self._mark_created(project, "error", f"git clone failed: {detail}")
            project.directory.mkdir(parents=True, exist_ok=True)
            return
        self._mark_created(project, "success", "")

    @staticmethod
    def _mark_created(project: Project, status: str, error_message: str) -> None:
        project.creation_status, project.error_message = status, error_message
        project.updated_at = now_timestamp()

    def get_project(self, project_id: str) -> Project:
        return self._project(project_id)

    def update_project(self, project_id: str, body: dict[str, Any]) -> Project:
        project = self._project(project_id)
        request = parse_body(ProjectUpdate, _without_empty(body, "visibility", "default_engine_type"))
        changes = request.changes()
        if "name" in changes and any(
            p.name == request.name and p.id != project_id for p in self.projects.values()
        ):
            raise already_exists(f"project with name {request.name!r} already exists")
        for key, value in changes.items():
            setattr(project, key, value)
        project.updated_at = now_timestamp()
        return project

    async def delete_project(self, project_id: str) -> None:
        project = self._project(project_id)
        apps = [a for a in self.apps.values() if a.project_id == project_id]
        await asyncio.gather(*(self.supervisor.forget_app(a) for a in apps))
        for job in [j for j in self.jobs.values() if j.project_id == project_id]:
            await self._stop_active_runs(job)
            self.jobs.pop(job.id, None)
        for app in apps:
            self.apps.pop(app.id, None)
        for run_id in [k for k, r in self.runs.items() if r.project_id == project_id]:
            self.runs.pop(run_id, None)
        self.projects.pop(project_id, None)
        await asyncio.to_thread(shutil.rmtree, project.directory, True)

    # ------------------------------------------------------------ project files

    def project_directory(self, project_id: str) -> Path:
        """The folder of a ready project (its files API and its workloads' working directory)."""
        project = self._project(project_id)
        if not project.directory.is_dir():
            raise failed_precondition(
                f"project {project.id} has no files yet (creation_status {project.creation_status!r})"
            )
        return project.directory

    # ------------------------------------------------------------ runtimes

    def list_runtimes(self) -> list[dict[str, Any]]:
        return [as_api_runtime(r) for r in self.runtimes]

    def register_runtime(self, body: dict[str, Any]) -> dict[str, Any]:
        """`RegisterCustomRuntime`: the image at `url` becomes a runtime (the workspace's own Python
        runs it, as every runtime here); a malformed image reference is refused in the answer."""
        url = str(body.get("url") or "").strip()
        problem = image_reference_problem(url)
        if problem:
            return {"validation_success": False, "insert_success": False, "reason": problem}
        if any(r["image_identifier"] == url for r in self.runtimes):
            return {
                "validation_success": True,
                "insert_success": False,
                "reason": "runtime already registered",
            }
        registered = self._stored_list(REGISTERED_RUNTIMES)
        registered.append(custom_runtime(url))
        self.store.set_meta(REGISTERED_RUNTIMES, json.dumps(registered))
        return {"validation_success": True, "insert_success": True}

    def validate_runtime(self, url: str) -> dict[str, Any]:
        """`ValidateCustomRuntime`: whether `url` is an image reference the workspace can register."""
        problem = image_reference_problem(url.strip())
        return {"success": False, "reason": problem} if problem else {"success": True}

    def update_runtime_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """`UpdateRuntimeStatus`: set `status` (ENABLED, DISABLED, DEPRECATED) of the runtimes named in
        `image_identifier`; answers how many there were."""
        status = body.get("status")
        if status not in RUNTIME_STATUS_VALUES:
            raise invalid_argument(f"status must be one of {', '.join(RUNTIME_STATUS_VALUES)}")
        wanted = body.get("image_identifier") or []
        if not isinstance(wanted, list) or not all(isinstance(i, str) for i in wanted):
            raise invalid_argument("image_identifier must be a list of runtime image identifiers")
        known = {r["image_identifier"] for r in self.runtimes}
        hits = [i for i in wanted if i in known]
        statuses = self._stored_dict(RUNTIME_STATUSES)
        statuses.update(dict.fromkeys(hits, status))
        self.store.set_meta(RUNTIME_STATUSES, json.dumps(statuses))
        return {"rows_affected": len(hits)}

    def set_docker_credential(self, body: dict[str, Any]) -> dict[str, Any]:
        """`SetDockerCredential`: the workspace pulls no images; it only checks the runtime exists."""
        runtime = str(body.get("runtime_identifier") or "")
        if runtime not in {r["image_identifier"] for r in self.runtimes}:
            raise not_found(f"runtime {runtime!r} not found")
        return {}

    # ------------------------------------------------------------ across projects

    def list_all_jobs(self) -> list[dict[str, Any]]:
        """`ListAllJobs`: every job of every project, each with its `project`."""
        return [j.to_api_with_project(self.projects[j.project_id]) for j in self.jobs.values()
                if j.project_id in self.projects]  # fmt: skip

    def workload_executions(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """`ListWorkloadExecutions`: the workloads (jobs, applications) and their executions (job
        runs; an application's current start), newest last."""
        workloads: list[dict[str, Any]] = []
        executions: list[dict[str, Any]] = []
        for job in self.jobs.values():
            workloads.append(
                self._workload("job", job.id, job.name, job.created_at, job.creator, job.project_id)
            )
        for app in self.apps.values():
            workloads.append(
                self._workload("application", app.id, app.name, app.created_at, app.creator, app.project_id)
            )
            ended = app.stopped_at if app.status in ("APPLICATION_STOPPED", "APPLICATION_FAILED") else None
            executions.append(
                _execution(
                    workload_crn=crn("application", app.id), execution_crn=crn("application_run", app.id),
                    start=app.started_at or app.created_at, end=ended, status=app.status,
                    resources=(app.cpu, app.memory, app.nvidia_gpu), creator=app.creator,
                )
            )  # fmt: skip
        for run in self.runs.values():
            snapshot = run.job_snapshot
            executions.append(
                _execution(
                    workload_crn=crn("job", run.job_id), execution_crn=crn("job_run", run.id),
                    start=run.running_at or run.starting_at or run.created_at, end=run.finished_at,
                    status=run.status, failure_reason=run.failure_reason, creator=snapshot.get("creator", {}),
                    resources=(snapshot.get("cpu"), snapshot.get("memory"), snapshot.get("nvidia_gpu")),
                )
            )  # fmt: skip
        executions.sort(key=lambda e: e["start_time"])
        return workloads, executions

    def _workload(
        self, kind: str, workload_id: str, name: str, created: str, creator: dict[str, str], project_id: str
    ) -> dict[str, Any]:
        project = self.projects.get(project_id)
        return {
            "workload_crn": crn(kind, workload_id),
            "workload_name": name,
            "workload_type": kind,
            "create_time": created,
            "creator_user_name": creator.get("username", ""),
            "project": {"crn": crn("project", project_id), "name": project.name if project else ""},
            "deleted": False,
        }

    # ------------------------------------------------------------ collaborators

    def list_collaborators(self, project_id: str) -> list[dict[str, Any]]:
        project = self._project(project_id)
        return [
            {"user": {"username": name, "name": name, "email": f"{name}@localhost"}, "permission": permission}
            for name, permission in sorted(project.collaborators.items())
        ]

    def add_collaborator(self, project_id: str, username: str, body: dict[str, Any]) -> None:
        project = self._project(project_id)
        permission = str(body.get("permission") or "read")
        if permission not in COLLABORATOR_PERMISSIONS:
            raise invalid_argument(f"permission must be one of {', '.join(COLLABORATOR_PERMISSIONS)}")
        project.collaborators = {**project.collaborators, username: permission}

    def delete_collaborator(self, project_id: str, username: str) -> None:
        project = self._project(project_id)
        if username not in project.collaborators:
            raise not_found(f"{username!r} is not a collaborator of project {project_id}")
        project.collaborators = {k: v for k, v in project.collaborators.items() if k != username}

    # ------------------------------------------------------------ jobs

    def list_jobs(self, project_id: str) -> list[dict[str, Any]]:
        self._project(project_id)
        return [j.to_api() for j in self.jobs.values() if j.project_id == project_id]

    def _check_parent(self, project_id: str, job_id: str | None, parent_id: str, field_name: str) -> None:
        if not parent_id:
            return
        parent = self.jobs.get(parent_id)
        if parent is None or parent.project_id != project_id:
            raise not_found(f"{field_name}: parent job {parent_id} not found in project {project_id}")
        ancestor: str = parent_id
        while ancestor:
            if ancestor == job_id:
                raise invalid_argument(f"{field_name}: a job cannot depend on itself or its descendants")
            ancestor = self.jobs[ancestor].parent_id if ancestor in self.jobs else ""

    def create_job(self, project_id: str, body: dict[str, Any]) -> Job:
        project = self._project(project_id)
        request = parse_body(JobCreate, body)
        self._check_runtime(project, request.runtime_identifier)
        # `parent_job_id` is the spec's deprecated alias of `parent_id`.
        parent_field = "parent_id" if request.parent_id else "parent_job_id"
        parent_id = request.parent_id or request.parent_job_id
        if parent_id and request.schedule:
            raise invalid_argument(f"{parent_field} cannot be used alongside schedule")
        self._check_parent(project_id, None, parent_id, parent_field)
        fields = request.model_dump(exclude={"parent_job_id", "parent_id"})
        job = Job(id=new_id(), project_id=project_id, parent_id=parent_id, **fields)
        self.jobs[job.id] = job
        return job

    def get_job(self, project_id: str, job_id: str) -> Job:
        return self._job(project_id, job_id)

    def update_job(self, project_id: str, job_id: str, body: dict[str, Any]) -> Job:
        job = self._job(project_id, job_id)
        project = self._project(project_id)
        changes = parse_body(JobUpdate, body).changes()
        if "runtime_identifier" in changes:
            self._check_runtime(project, changes["runtime_identifier"])
        if "parent_id" in changes:
            self._check_parent(project_id, job_id, changes["parent_id"], "parent_id")
        for key, value in changes.items():
            setattr(job, key, value)
        job.updated_at = now_timestamp()
        return job

    async def _stop_active_runs(self, job: Job) -> None:
        for run in [r for r in self.runs.values() if r.job_id == job.id and r.active]:
            self.supervisor.request_run_stop(run)
        await apoll_until(
            lambda: not any(r.job_id == job.id and r.active for r in self.runs.values()),
            timeout=RUN_STOP_TIMEOUT_SECONDS + self.supervisor.stop_grace_seconds,
            interval=0.05,
            what=f"the active runs of job {job.id} to stop",
        )

    async def delete_job(self, project_id: str, job_id: str) -> None:
        job = self._job(project_id, job_id)
        await self._stop_active_runs(job)
        self.jobs.pop(job_id, None)
        for run_id in [k for k, r in self.runs.items() if r.job_id == job_id]:
            self.runs.pop(run_id, None)
        for child in self.jobs.values():
            if child.parent_id == job_id:
                child.parent_id = ""  # dependent jobs are kept, detached

    # ------------------------------------------------------------ job runs

    def list_runs(self, project_id: str, job_id: str) -> list[dict[str, Any]]:
        self._job(project_id, job_id)
        return [r.to_api() for r in self.runs.values() if r.job_id == job_id]

    def create_run(self, project_id: str, job_id: str, body: dict[str, Any]) -> JobRun:
        job = self._job(project_id, job_id)
        project = self._project(project_id)
        self._require_ready(project)
        request = parse_body(RunCreate, body)
        return self._start_run(project, job, dict(request.environment), request.arguments or job.arguments)

    def _start_run(self, project: Project, job: Job, environment: dict[str, str], arguments: str) -> JobRun:
        if any(r.job_id == job.id and r.active for r in self.runs.values()):
            raise failed_precondition(f"job run for job {job.id} already active")
        run_id = new_id()
        run = JobRun(
            id=run_id,
            project_id=project.id,
            job_id=job.id,
            arguments=arguments,
            environment=environment,
            job_snapshot=job.to_api(),
            log_path=self.home / "logs" / "runs" / f"{run_id}.log",
        )
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
        run.log_path.touch()
        self.runs[run_id] = run
        self.supervisor.start_run(
            run,
            self._context(project, {**project.environment, **job.environment}),
            job.script,
            job.timeout,
            job.kill_on_timeout,
            self._start_dependent_runs,
        )
        return run

    def _start_dependent_runs(self, finished: JobRun) -> None:
        """A SUCCEEDED run starts a run of every job whose parent is its job. A job that already has a
        run going keeps it (one active run per job) and gets an `ENGINE_SKIPPED` run instead: the
        record CML keeps of a run it did not start."""
        project = self.projects.get(finished.project_id)
        if project is None:
            return
        for child in [j for j in self.jobs.values() if j.parent_id == finished.job_id]:
            if any(r.job_id == child.id and r.active for r in self.runs.values()):
                self._record_skipped_run(project, child)
                continue
            self._start_run(project, child, {}, child.arguments)

    def _record_skipped_run(self, project: Project, job: Job) -> None:
        run_id = new_id()
        created = now_timestamp()
        run = JobRun(
            id=run_id,
            project_id=project.id,
            job_id=job.id,
            arguments=job.arguments,
            environment={},
            job_snapshot=job.to_api(),
            log_path=self.home / "logs" / "runs" / f"{run_id}.log",
            status="ENGINE_SKIPPED",
            failure_reason=f"skipped: job {job.id} already had an active run",
            created_at=created,
            finished_at=created,
        )
        run.log_path.parent.mkdir(parents=True, exist_ok=True)
        run.log_path.touch()
        self.runs[run_id] = run

    def get_run(self, project_id: str, job_id: str, run_id: str) -> JobRun:
        return self._run(project_id, job_id, run_id)

    def stop_run(self, project_id: str, job_id: str, run_id: str) -> JobRun:
        run = self._run(project_id, job_id, run_id)
        self.supervisor.request_run_stop(run)
        return run

    # ------------------------------------------------------------ applications

    def list_apps(self, project_id: str) -> list[dict[str, Any]]:
        self._project(project_id)
        return [a.to_api() for a in self.apps.values() if a.project_id == project_id]

    def _check_subdomain_free(self, subdomain: str, app_id: str | None) -> None:
        if any(a.subdomain == subdomain and a.id != app_id for a in self.apps.values()):
            raise already_exists(f"subdomain {subdomain!r} is already used by another application")

    def create_app(self, project_id: str, body: dict[str, Any]) -> Application:
        project = self._project(project_id)
        request = parse_body(AppCreate, body)
        self._check_runtime(project, request.runtime_identifier)
        self._check_subdomain_free(request.subdomain, None)
        self._require_ready(project)
        app_id = new_id()
        fields = request.model_dump(exclude={"environment"})
        app = Application(
            id=app_id,
            project_id=project_id,
            log_path=self.home / "logs" / "apps" / f"{app_id}.log",
            # As on CML, the project's environment is copied into the app's own at creation.
            environment={**project.environment, **request.environment},
            **fields,
        )
        self.apps[app_id] = app
        self.supervisor.start_app(app, self._context(project, {}))
        return app

    def get_app(self, project_id: str, app_id: str) -> Application:
        return self._app(project_id, app_id)

    def update_app(self, project_id: str, app_id: str, body: dict[str, Any]) -> Application:
        app = self._app(project_id, app_id)
        project = self._project(project_id)
        changes = parse_body(AppUpdate, body).changes()
        if "subdomain" in changes:
            self._check_subdomain_free(changes["subdomain"], app_id)
        if "runtime_identifier" in changes:
            self._check_runtime(project, changes["runtime_identifier"])
        for key, value in changes.items():
            setattr(app, key, value)
        app.updated_at = now_timestamp()
        return app

    def stop_app(self, project_id: str, app_id: str) -> Application:
        app = self._app(project_id, app_id)
        self.supervisor.request_app_stop(app)
        return app

    def restart_app(self, project_id: str, app_id: str) -> Application:
        app = self._app(project_id, app_id)
        project = self._project(project_id)
        self._require_ready(project)
        self.supervisor.start_app(app, self._context(project, {}))
        return app

    async def delete_app(self, project_id: str, app_id: str) -> None:
        app = self._app(project_id, app_id)
        await self.supervisor.forget_app(app)
        self.apps.pop(app_id, None)

    # ------------------------------------------------------------ shutdown

    async def shutdown(self) -> None:
        """End every workload (their records say STOPPED), commit, close the store."""
        await self.supervisor.shutdown(list(self.apps.values()), [r for r in self.runs.values() if r.active])
        for task in list(self._background):
            task.cancel()
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()
        set_change_hook(None)
        self.store.close()
