"""The workspace's API semantics: validates requests, keeps projects/jobs/runs/apps, drives the supervisor.

Handlers in `server.py` call one method here per endpoint. Choices where CML's behaviour is
unconfirmed are documented in `ray_serve_cai/workspace/README.md`.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ray_serve_cai.workspace.errors import (
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
)
from ray_serve_cai.workspace.model import (
    ENGINE_TYPES,
    PROJECT_TEMPLATES,
    VISIBILITIES,
    Application,
    Job,
    JobRun,
    Project,
    environment_on_create,
    environment_on_update,
    new_id,
    now_timestamp,
    optional_bool,
    optional_int,
    optional_number,
    optional_string,
    require_string,
    validate_script_path,
    validate_subdomain,
)
from ray_serve_cai.workspace.runtimes import load_runtimes
from ray_serve_cai.workspace.supervisor import Supervisor, WorkloadContext

GIT_CLONE_TIMEOUT_SECONDS = 600
_CREDENTIALS_IN_URL = re.compile(r"(://)[^/@\s]+@")


def redact_url_credentials(text: str) -> str:
    return _CREDENTIALS_IN_URL.sub(r"\1***@", text)


class WorkspaceService:
    def __init__(self, home: Path, supervisor: Supervisor, runtimes: list[dict[str, Any]]) -> None:
        self.home = home
        self.supervisor = supervisor
        self._runtimes = runtimes
        self._runtimes_mtime = self._runtimes_file_mtime()
        self.projects: dict[str, Project] = {}
        self.jobs: dict[str, Job] = {}
        self.runs: dict[str, JobRun] = {}
        self.apps: dict[str, Application] = {}
        self._background: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ helpers

    def _runtimes_file_mtime(self) -> float | None:
        path = self.home / "runtimes.json"
        return path.stat().st_mtime if path.is_file() else None

    @property
    def runtimes(self) -> list[dict[str, Any]]:
        """The runtimes offered; a changed `runtimes.json` in the home is read again, so a test can
        publish a newer runtime while the workspace runs (as Cloudera does)."""
        mtime = self._runtimes_file_mtime()
        if mtime != self._runtimes_mtime:  # changed, added or removed (back to the default list)
            self._runtimes, self._runtimes_mtime = load_runtimes(self.home), mtime
        return self._runtimes

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
        known = {r["image_identifier"] for r in self.runtimes}
        if runtime_identifier not in known:
            raise invalid_argument(
                f"runtime_identifier {runtime_identifier!r} is not a runtime of this workspace "
                "(see GET /api/v2/runtimes)"
            )

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
        name = require_string(body, "name")
        git_url = optional_string(body, "git_url")
        template = optional_string(body, "template") or ("git" if git_url else "blank")
        if template not in PROJECT_TEMPLATES:
            raise invalid_argument(f"template must be one of {', '.join(PROJECT_TEMPLATES)}")
        if template == "git" and not git_url:
            raise invalid_argument("git_url is required when template is git")
        visibility = optional_string(body, "visibility") or "private"
        if visibility not in VISIBILITIES:
            raise invalid_argument(f"visibility must be one of {', '.join(VISIBILITIES)}")
        engine_type = optional_string(body, "default_project_engine_type") or "ml_runtime"
        if engine_type not in ENGINE_TYPES:
            raise invalid_argument(f"default_project_engine_type must be one of {', '.join(ENGINE_TYPES)}")
        environment = environment_on_create(body)
        if any(p.name == name for p in self.projects.values()):
            raise already_exists(f"project with name {name!r} already exists")
        project_id = new_id()
        project = Project(
            id=project_id,
            name=name,
            description=optional_string(body, "description"),
            visibility=visibility,
            default_engine_type=engine_type,
            template=template,
            directory=self.home / "projects" / project_id,
            environment=environment,
            shared_memory_limit=optional_int(body, "shared_memory_limit", 64),
        )
        self.projects[project_id] = project
        self._spawn(self._populate_project(project, git_url if template == "git" else ""))
        return project

    async def _populate_project(self, project: Project, git_url: str) -> None:
        project.directory.parent.mkdir(parents=True, exist_ok=True)
        if not git_url:
            await asyncio.sleep(0.05)
            project.directory.mkdir(parents=True, exist_ok=True)
            self._mark_created(project, "success", "")
            return
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        process = await asyncio.create_subprocess_exec(
            "git", "clone", "--quiet", "--", git_url, str(project.directory),
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
        changes: dict[str, Any] = {}
        if "name" in body:
            name = require_string(body, "name")
            if any(p.name == name and p.id != project_id for p in self.projects.values()):
                raise already_exists(f"project with name {name!r} already exists")
            changes["name"] = name
        if "description" in body:
            changes["description"] = optional_string(body, "description")
        for key in ("visibility", "project_visibility"):
            if body.get(key):
                visibility = optional_string(body, key)
                if visibility not in VISIBILITIES:
                    raise invalid_argument(f"{key} must be one of {', '.join(VISIBILITIES)}")
                changes["visibility"] = visibility
        if body.get("default_project_engine_type"):
            engine_type = optional_string(body, "default_project_engine_type")
            if engine_type not in ENGINE_TYPES:
                raise invalid_argument(
                    f"default_project_engine_type must be one of {', '.join(ENGINE_TYPES)}"
                )
            changes["default_engine_type"] = engine_type
        if "shared_memory_limit" in body:
            changes["shared_memory_limit"] = optional_int(body, "shared_memory_limit", 64)
        if "environment" in body:
            changes["environment"] = environment_on_update(body)
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
        self.runs = {k: r for k, r in self.runs.items() if r.project_id != project_id}
        self.projects.pop(project_id, None)
        await asyncio.to_thread(shutil.rmtree, project.directory, True)

    # ------------------------------------------------------------ runtimes

    def list_runtimes(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.runtimes]

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
        name = require_string(body, "name")
        script = require_string(body, "script")
        validate_script_path(script)
        runtime_identifier = optional_string(body, "runtime_identifier")
        self._check_runtime(project, runtime_identifier)
        parent_id = optional_string(body, "parent_job_id")
        schedule = optional_string(body, "schedule")
        if parent_id and schedule:
            raise invalid_argument("parent_job_id cannot be used alongside schedule")
        self._check_parent(project_id, None, parent_id, "parent_job_id")
        addons = body.get("runtime_addon_identifiers") or []
        if not isinstance(addons, list) or not all(isinstance(a, str) for a in addons):
            raise invalid_argument("runtime_addon_identifiers must be a list of strings")
        job = Job(
            id=new_id(),
            project_id=project_id,
            name=name,
            script=script,
            cpu=optional_number(body, "cpu", 1.0),
            memory=optional_number(body, "memory", 1.0),
            nvidia_gpu=optional_int(body, "nvidia_gpu", 0),
            environment=environment_on_create(body),
            arguments=optional_string(body, "arguments"),
            timeout=optional_int(body, "timeout", 0),
            kill_on_timeout=optional_bool(body, "kill_on_timeout", True),
            parent_id=parent_id,
            schedule=schedule,
            timezone=optional_string(body, "timezone"),
            paused=optional_bool(body, "paused", False),
            kernel=optional_string(body, "kernel"),
            runtime_identifier=runtime_identifier,
            runtime_addon_identifiers=addons,
            description=optional_string(body, "description"),
        )
        self.jobs[job.id] = job
        return job

    def get_job(self, project_id: str, job_id: str) -> Job:
        return self._job(project_id, job_id)

    def update_job(self, project_id: str, job_id: str, body: dict[str, Any]) -> Job:
        job = self._job(project_id, job_id)
        project = self._project(project_id)
        changes: dict[str, Any] = {}
        if "name" in body:
            changes["name"] = require_string(body, "name")
        if "script" in body:
            changes["script"] = require_string(body, "script")
            validate_script_path(changes["script"])
        for key in ("cpu", "memory"):
            if key in body:
                changes[key] = optional_number(body, key, 1.0)
        for key in ("nvidia_gpu", "timeout"):
            if key in body:
                changes[key] = optional_int(body, key, 0)
        for key in ("kill_on_timeout", "paused"):
            if key in body:
                changes[key] = optional_bool(body, key, False)
        for key in ("arguments", "schedule", "timezone", "kernel", "description"):
            if key in body:
                changes[key] = optional_string(body, key)
        if "runtime_identifier" in body:
            changes["runtime_identifier"] = optional_string(body, "runtime_identifier")
            self._check_runtime(project, changes["runtime_identifier"])
        if "parent_id" in body:
            changes["parent_id"] = optional_string(body, "parent_id")
            self._check_parent(project_id, job_id, changes["parent_id"], "parent_id")
        if "environment" in body:
            changes["environment"] = environment_on_update(body)
        for key, value in changes.items():
            setattr(job, key, value)
        job.updated_at = now_timestamp()
        return job

    async def _stop_active_runs(self, job: Job) -> None:
        for run in [r for r in self.runs.values() if r.job_id == job.id and r.active]:
            self.supervisor.request_run_stop(run)
        while any(r.job_id == job.id and r.active for r in self.runs.values()):
            await asyncio.sleep(0.05)

    async def delete_job(self, project_id: str, job_id: str) -> None:
        job = self._job(project_id, job_id)
        await self._stop_active_runs(job)
        self.jobs.pop(job_id, None)
        self.runs = {k: r for k, r in self.runs.items() if r.job_id != job_id}
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
        environment = environment_on_create(body)
        arguments = optional_string(body, "arguments") if body.get("arguments") else job.arguments
        return self._start_run(project, job, environment, arguments)

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
        """A SUCCEEDED run starts a run of every job whose parent is its job."""
        project = self.projects.get(finished.project_id)
        if project is None:
            return
        for child in [j for j in self.jobs.values() if j.parent_id == finished.job_id]:
            if any(r.job_id == child.id and r.active for r in self.runs.values()):
                continue  # one active run per job: the running one stands
            self._start_run(project, child, {}, child.arguments)

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
        validate_subdomain(subdomain)
        if any(a.subdomain == subdomain and a.id != app_id for a in self.apps.values()):
            raise already_exists(f"subdomain {subdomain!r} is already used by another application")

    def create_app(self, project_id: str, body: dict[str, Any]) -> Application:
        project = self._project(project_id)
        name = require_string(body, "name")
        subdomain = require_string(body, "subdomain")
        script = require_string(body, "script")
        validate_script_path(script)
        runtime_identifier = optional_string(body, "runtime_identifier")
        self._check_runtime(project, runtime_identifier)
        self._check_subdomain_free(subdomain, None)
        own_environment = environment_on_create(body)
        self._require_ready(project)
        addons = body.get("runtime_addon_identifiers") or []
        if not isinstance(addons, list) or not all(isinstance(a, str) for a in addons):
            raise invalid_argument("runtime_addon_identifiers must be a list of strings")
        app_id = new_id()
        app = Application(
            id=app_id,
            project_id=project_id,
            name=name,
            subdomain=subdomain,
            script=script,
            log_path=self.home / "logs" / "apps" / f"{app_id}.log",
            description=optional_string(body, "description"),
            cpu=optional_number(body, "cpu", 1.0),
            memory=optional_number(body, "memory", 1.0),
            nvidia_gpu=optional_int(body, "nvidia_gpu", 0),
            kernel=optional_string(body, "kernel"),
            runtime_identifier=runtime_identifier,
            runtime_addon_identifiers=addons,
            bypass_authentication=optional_bool(body, "bypass_authentication", False),
            # As on CML, the project's environment is copied into the app's own at creation.
            environment={**project.environment, **own_environment},
        )
        self.apps[app_id] = app
        self.supervisor.start_app(app, self._context(project, {}))
        return app

    def get_app(self, project_id: str, app_id: str) -> Application:
        return self._app(project_id, app_id)

    def app_by_subdomain(self, subdomain: str) -> Application | None:
        return next((a for a in self.apps.values() if a.subdomain == subdomain), None)

    def update_app(self, project_id: str, app_id: str, body: dict[str, Any]) -> Application:
        app = self._app(project_id, app_id)
        project = self._project(project_id)
        changes: dict[str, Any] = {}
        for key in ("name", "script"):
            if key in body:
                changes[key] = require_string(body, key)
        if "script" in changes:
            validate_script_path(changes["script"])
        if "subdomain" in body:
            changes["subdomain"] = require_string(body, "subdomain")
            self._check_subdomain_free(changes["subdomain"], app_id)
        for key in ("description", "kernel"):
            if key in body:
                changes[key] = optional_string(body, key)
        for key in ("cpu", "memory"):
            if key in body:
                changes[key] = optional_number(body, key, 1.0)
        if "nvidia_gpu" in body:
            changes["nvidia_gpu"] = optional_int(body, "nvidia_gpu", 0)
        if "bypass_authentication" in body:
            changes["bypass_authentication"] = optional_bool(body, "bypass_authentication", False)
        if "runtime_identifier" in body:
            changes["runtime_identifier"] = optional_string(body, "runtime_identifier")
            self._check_runtime(project, changes["runtime_identifier"])
        if "environment" in body:
            changes["environment"] = environment_on_update(body)
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
        await self.supervisor.shutdown(list(self.apps.values()), [r for r in self.runs.values() if r.active])
        for task in list(self._background):
            task.cancel()
