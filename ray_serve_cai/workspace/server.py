"""The workspace HTTP server: CML API v2 routes, bearer auth, test controls; application URLs.

`create_server()` builds the ASGI app; `serve()` binds 127.0.0.1, records `state.json` and runs uvicorn
until SIGTERM/SIGINT, then ends every workload it started. Each application is served on a loopback
listener of its own (`app_urls.py`), opened and closed by `AppListeners.sync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ray_serve_cai.errors import OperationFailed, WaitTimeout
from ray_serve_cai.waiting import poll_until
from ray_serve_cai.workspace import project_files
from ray_serve_cai.workspace.app_urls import AppListeners, AppLogins, login_code_answer
from ray_serve_cai.workspace.conformance import (
    ConformanceMiddleware,
    SpecChecker,
    ViolationLog,
    conformance_from_env,
)
from ray_serve_cai.workspace.controls import (
    AppUrlPolicy,
    FaultInjector,
    FaultPlan,
    Latency,
    RequestCounters,
    RestartPolicy,
)
from ray_serve_cai.workspace.errors import (
    GRPC_CODE_OF_HTTP_STATUS,
    GrpcCode,
    WorkspaceAPIError,
    error_body,
    invalid_argument,
)
from ray_serve_cai.workspace.listing import (
    APP_FILTER_KEYS,
    APP_SORT_KEYS,
    COLLABORATOR_KEYS,
    EXECUTION_FILTER_KEYS,
    EXECUTION_SORT_KEYS,
    JOB_FILTER_KEYS,
    JOB_SORT_KEYS,
    NAME_KEYS,
    PROJECT_FILTER_KEYS,
    PROJECT_SORT_KEYS,
    RUN_FILTER_KEYS,
    RUN_SORT_KEYS,
    RUNTIME_KEYS,
    WORKLOAD_STATUSES,
    filter_executions,
    list_page,
)
from ray_serve_cai.workspace.model import current_user
from ray_serve_cai.workspace.pod_controls import network_router, session_router
from ray_serve_cai.workspace.pods import PodNetwork, choose_network
from ray_serve_cai.workspace.processes import DEFAULT_STOP_GRACE_SECONDS
from ray_serve_cai.workspace.runtimes import load_runtimes
from ray_serve_cai.workspace.schedules import start_schedules
from ray_serve_cai.workspace.service import WorkspaceService
from ray_serve_cai.workspace.statefile import ensure_api_key, read_state, write_state
from ray_serve_cai.workspace.store import Store, db_path
from ray_serve_cai.workspace.supervisor import Supervisor

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v2"
CONTROL_PREFIX = "/_workspace"
# POSTs to these routes create a resource; `drop_create_response_rate` applies to them.
CREATE_ROUTES = frozenset(
    {
        f"{API_PREFIX}/projects",
        f"{API_PREFIX}/projects/{{project_id}}/jobs",
        f"{API_PREFIX}/projects/{{project_id}}/jobs/{{job_id}}/runs",
        f"{API_PREFIX}/projects/{{project_id}}/applications",
    }
)


@dataclass
class ServerConfig:
    home: Path
    api_key: str
    port: int
    stop_grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS

    @property
    def url(self) -> str:
        return f"http://localhost:{self.port}"

    @property
    def domain(self) -> str:
        return f"localhost:{self.port}"

    def __repr__(self) -> str:  # keep the key out of any log line
        return f"ServerConfig(home={self.home!s}, port={self.port})"


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def _read_body(request: Request, *, allow_empty: bool = True) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if allow_empty:
            return {}
        raise invalid_argument("request body is required")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid_argument("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid_argument("request body must be a JSON object")
    return body


def _list_response(
    request: Request,
    items: list[dict[str, Any]],
    key: str,
    filter_keys: frozenset[str] | None = None,
    sort_keys: frozenset[str] | None = None,
) -> JSONResponse:
    """One page of a list operation; `filter_keys`/`sort_keys` are the keys its spec documents."""
    query = request.query_params
    return _json(
        200,
        list_page(
            items,
            key,
            search_filter=query.get("search_filter"),
            sort=query.get("sort"),
            page_size=query.get("page_size"),
            page_token=query.get("page_token"),
            filter_keys=filter_keys,
            sort_keys=sort_keys,
        ),
    )


WORKER_THREADS = 64


def build_api(
    service: WorkspaceService,
    controls: dict[str, Any],
    config: ServerConfig,
    listeners: AppListeners | None = None,
    logins: AppLogins | None = None,
) -> FastAPI:
    """The FastAPI app: the CML routes and the `/_workspace/` controls, one router per resource,
    and the error shapes (auth, counters and faults are middlewares, see `WorkspaceGateway`).

    `listeners` follow the applications: `sync` after every call that adds or removes one, and at
    startup (apps re-adopted from a previous run get their listener back on their recorded port)."""
    logins = logins or AppLogins(config.api_key)
    listeners = listeners or AppListeners(logins, config.api_key, service.apps.get)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Workloads start and stop in worker threads (process scans, grace waits): a pool as wide as
        # a large cluster keeps 64 parallel stops from queueing behind the default handful of threads.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="workspace")
        )
        await service.start()  # re-adopts an earlier server's workloads; service.live_apps() lists them
        await service.supervisor.after_adoption()  # pods nobody adopted go
        await listeners.sync(
            service.apps.values()
        )  # every application (re-adopted ones too) gets its listener
        schedules = start_schedules(service)  # jobs with a cron `schedule` fire as on CML
        yield
        schedules.cancel()
        logger.info("shutting down: ending every workload")
        await listeners.close_all()
        await service.shutdown()

    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    _add_error_handlers(api)
    api.include_router(workspace_router(service, config))
    api.include_router(projects_router(service, listeners))
    api.include_router(runtimes_router(service))
    api.include_router(jobs_router(service))
    api.include_router(runs_router(service))
    api.include_router(applications_router(service, listeners))
    api.include_router(files_router(service))
    api.include_router(controls_router(service, controls, config, logins))
    return api


def _add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(WorkspaceAPIError)
    async def on_api_error(_: Request, exc: WorkspaceAPIError) -> JSONResponse:
        return _json(exc.http_status, exc.body())

    @api.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = GRPC_CODE_OF_HTTP_STATUS.get(exc.status_code, GrpcCode.INTERNAL)
        message = "no such API route" if exc.status_code == 404 else str(exc.detail)
        return _json(exc.status_code, error_body(code, message))

    @api.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=exc)
        return _json(500, error_body(GrpcCode.INTERNAL, "internal workspace error"))


def projects_router(service: WorkspaceService, listeners: AppListeners) -> APIRouter:
    """`/api/v2/projects[/{project_id}]` (deleting a project closes its applications' listeners)."""
    router = APIRouter(prefix=f"{API_PREFIX}/projects")

    @router.get("")
    async def list_projects(request: Request) -> JSONResponse:
        return _list_response(
            request, service.list_projects(), "projects", PROJECT_FILTER_KEYS, PROJECT_SORT_KEYS
        )

    @router.get("/batch")
    async def batch_list_projects(request: Request) -> JSONResponse:
        wanted = request.query_params.getlist("project_ids")
        return _json(200, {"projects": [p for p in service.list_projects() if p["id"] in wanted]})

    @router.post("")
    async def create_project(request: Request) -> JSONResponse:
        return _json(200, service.create_project(await _read_body(request, allow_empty=False)).to_api())

    @router.get("/{project_id}")
    async def get_project(project_id: str) -> JSONResponse:
        return _json(200, service.get_project(project_id).to_api())

    @router.patch("/{project_id}")
    async def update_project(project_id: str, request: Request) -> JSONResponse:
        return _json(200, service.update_project(project_id, await _read_body(request)).to_api())

    @router.delete("/{project_id}")
    async def delete_project(project_id: str) -> JSONResponse:
        try:
            await service.delete_project(project_id)
        finally:
            await listeners.sync(service.apps.values())
        return _json(200, {})

    @router.get("/{project_id}/collaborators")
    async def list_collaborators(project_id: str, request: Request) -> JSONResponse:
        items = service.list_collaborators(project_id)
        flat = [{**c, "username": c["user"]["username"]} for c in items]  # filter/sort on `username`
        page = list_page(
            flat, "collaborators", search_filter=request.query_params.get("search_filter"),
            sort=request.query_params.get("sort"), page_size=request.query_params.get("page_size"),
            page_token=request.query_params.get("page_token"),
            filter_keys=COLLABORATOR_KEYS, sort_keys=COLLABORATOR_KEYS,
        )  # fmt: skip
        page["collaborators"] = [
            {k: v for k, v in c.items() if k != "username"} for c in page["collaborators"]
        ]
        return _json(200, page)

    @router.put("/{project_id}/collaborators/{username}")
    async def add_collaborator(project_id: str, username: str, request: Request) -> JSONResponse:
        service.add_collaborator(project_id, username, await _read_body(request))
        return _json(200, {})

    @router.delete("/{project_id}/collaborators/{username}")
    async def delete_collaborator(project_id: str, username: str) -> JSONResponse:
        service.delete_collaborator(project_id, username)
        return _json(200, {})

    @router.get("/{project_id}/machineusers")
    async def list_machine_users(project_id: str, request: Request) -> JSONResponse:
        service.get_project(project_id)  # the workspace has no machine users: an empty page
        return _list_response(request, [], "run_as_machine_user_collaborators")

    return router


def workspace_router(service: WorkspaceService, config: ServerConfig) -> APIRouter:
    """The operations across projects: `ValidateAPIKey`, `ListProjectNames`, `ListAllJobs`,
    `ListWorkloadExecutions`, `ListWorkloadStatus`."""
    router = APIRouter(prefix=API_PREFIX)

    @router.post("/auth/validate_key")
    async def validate_key(request: Request) -> JSONResponse:
        await _read_body(request)  # `audience` is accepted; only the bearer key is checked (middleware)
        user = current_user()["username"]
        return _json(200, {"valid": True, "username": user, "message": "API key is valid"})

    @router.get("/projectnames")
    async def list_project_names(request: Request) -> JSONResponse:
        names = [{"name": p["name"]} for p in service.list_projects()]
        page = list_page(
            names, "project_names", search_filter=request.query_params.get("search_filter"),
            sort=request.query_params.get("sort"), page_size=request.query_params.get("page_size"),
            page_token=request.query_params.get("page_token"), filter_keys=NAME_KEYS, sort_keys=NAME_KEYS,
        )  # fmt: skip
        page["project_names"] = [item["name"] for item in page["project_names"]]
        return _json(200, page)

    @router.get("/jobs")
    async def list_all_jobs(request: Request) -> JSONResponse:
        # ListAllJobs takes no `sort`: creation order.
        query = request.query_params
        page = list_page(
            service.list_all_jobs(), "jobs", search_filter=query.get("search_filter"), sort=None,
            page_size=query.get("page_size"), page_token=query.get("page_token"), filter_keys=JOB_FILTER_KEYS,
        )  # fmt: skip
        return _json(200, page)

    @router.get("/workloads/executions")
    async def list_workload_executions(request: Request) -> JSONResponse:
        query = request.query_params
        workloads, executions = service.workload_executions()
        executions = filter_executions(
            executions, query.get("multi_column_search_filter"), query.get("time_range_search_filter")
        )
        page = list_page(
            executions, "executions", search_filter=query.get("search_filter"), sort=query.get("sort"),
            page_size=query.get("page_size"), page_token=query.get("page_token"),
            filter_keys=EXECUTION_FILTER_KEYS, sort_keys=EXECUTION_SORT_KEYS,
        )  # fmt: skip
        shown = {e["workload_crn"] for e in page["executions"]}
        page["workloads"] = [w for w in workloads if w["workload_crn"] in shown]
        return _json(200, page)

    @router.get("/workloadstatus")
    async def list_workload_status() -> JSONResponse:
        return _json(200, {"workload_status": list(WORKLOAD_STATUSES)})

    return router


def runtimes_router(service: WorkspaceService) -> APIRouter:
    """`/api/v2/runtimes`."""
    router = APIRouter(prefix=API_PREFIX)

    @router.get("/runtimes")
    async def list_runtimes(request: Request) -> JSONResponse:
        return _list_response(request, service.list_runtimes(), "runtimes", RUNTIME_KEYS, RUNTIME_KEYS)

    @router.post("/runtimes")
    async def register_custom_runtime(request: Request) -> JSONResponse:
        return _json(200, service.register_runtime(await _read_body(request, allow_empty=False)))

    @router.get("/runtimes:validate")
    async def validate_custom_runtime(request: Request) -> JSONResponse:
        return _json(200, service.validate_runtime(request.query_params.get("url", "")))

    @router.post("/runtimes:update")
    async def update_runtime_status(request: Request) -> JSONResponse:
        return _json(200, service.update_runtime_status(await _read_body(request, allow_empty=False)))

    @router.post("/runtimes/credential:set")
    async def set_docker_credential(request: Request) -> JSONResponse:
        return _json(200, service.set_docker_credential(await _read_body(request, allow_empty=False)))

    return router


def jobs_router(service: WorkspaceService) -> APIRouter:
    """`/api/v2/projects/{project_id}/jobs[/{job_id}]`."""
    router = APIRouter(prefix=f"{API_PREFIX}/projects/{{project_id}}/jobs")

    @router.get("")
    async def list_jobs(project_id: str, request: Request) -> JSONResponse:
        return _list_response(request, service.list_jobs(project_id), "jobs", JOB_FILTER_KEYS, JOB_SORT_KEYS)

    @router.post("")
    async def create_job(project_id: str, request: Request) -> JSONResponse:
        body = await _read_body(request, allow_empty=False)
        return _json(200, service.create_job(project_id, body).to_api())

    @router.get("/{job_id}")
    async def get_job(project_id: str, job_id: str) -> JSONResponse:
        return _json(200, service.get_job(project_id, job_id).to_api())

    @router.patch("/{job_id}")
    async def update_job(project_id: str, job_id: str, request: Request) -> JSONResponse:
        return _json(200, service.update_job(project_id, job_id, await _read_body(request)).to_api())

    @router.delete("/{job_id}")
    async def delete_job(project_id: str, job_id: str) -> JSONResponse:
        await service.delete_job(project_id, job_id)
        return _json(200, {})

    return router


def runs_router(service: WorkspaceService) -> APIRouter:
    """`/api/v2/projects/{project_id}/jobs/{job_id}/runs[/{run_id}[:stop]]` (the `:stop` action is
    declared before the plain run route)."""
    router = APIRouter(prefix=f"{API_PREFIX}/projects/{{project_id}}/jobs/{{job_id}}/runs")

    @router.post("/{run_id}:stop")
    async def stop_run(project_id: str, job_id: str, run_id: str) -> JSONResponse:
        return _json(200, service.stop_run(project_id, job_id, run_id).to_api())

    @router.get("")
    async def list_runs(project_id: str, job_id: str, request: Request) -> JSONResponse:
        runs = service.list_runs(project_id, job_id)
        return _list_response(request, runs, "job_runs", RUN_FILTER_KEYS, RUN_SORT_KEYS)

    @router.post("")
    async def create_run(project_id: str, job_id: str, request: Request) -> JSONResponse:
        return _json(200, service.create_run(project_id, job_id, await _read_body(request)).to_api())

    @router.get("/{run_id}")
    async def get_run(project_id: str, job_id: str, run_id: str) -> JSONResponse:
        return _json(200, service.get_run(project_id, job_id, run_id).to_api())

    return router


def applications_router(service: WorkspaceService, listeners: AppListeners) -> APIRouter:
    """`/api/v2/projects/{project_id}/applications[/{application_id}[:stop|:restart]]`; creating or
    deleting one opens or closes its listener (its URL)."""
    router = APIRouter(prefix=f"{API_PREFIX}/projects/{{project_id}}/applications")

    @router.post("/{application_id}:stop")
    async def stop_app(project_id: str, application_id: str) -> JSONResponse:
        return _json(200, service.stop_app(project_id, application_id).to_api())

    @router.post("/{application_id}:restart")
    async def restart_app(project_id: str, application_id: str) -> JSONResponse:
        return _json(200, service.restart_app(project_id, application_id).to_api())

    @router.get("")
    async def list_apps(project_id: str, request: Request) -> JSONResponse:
        apps = service.list_apps(project_id)
        return _list_response(request, apps, "applications", APP_FILTER_KEYS, APP_SORT_KEYS)

    @router.post("")
    async def create_app(project_id: str, request: Request) -> JSONResponse:
        body = await _read_body(request, allow_empty=False)
        app = service.create_app(project_id, body)
        await listeners.sync(service.apps.values())
        return _json(200, app.to_api())

    @router.get("/{application_id}")
    async def get_app(project_id: str, application_id: str) -> JSONResponse:
        return _json(200, service.get_app(project_id, application_id).to_api())

    @router.patch("/{application_id}")
    async def update_app(project_id: str, application_id: str, request: Request) -> JSONResponse:
        body = await _read_body(request)
        return _json(200, service.update_app(project_id, application_id, body).to_api())

    @router.delete("/{application_id}")
    async def delete_app(project_id: str, application_id: str) -> JSONResponse:
        try:
            await service.delete_app(project_id, application_id)
        finally:
            await listeners.sync(service.apps.values())
        return _json(200, {})

    return router


def files_router(service: WorkspaceService) -> APIRouter:
    """`/api/v2/projects/{project_id}/files[/{path}[:download]]`: the project folder the workloads see
    (`project_files.py`). A `{path}` may hold `/` (encoded as `%2F` by spec clients, or plain)."""
    router = APIRouter(prefix=f"{API_PREFIX}/projects/{{project_id}}/files")

    @router.post("")
    async def upload_file(project_id: str, request: Request) -> JSONResponse:
        directory = service.project_directory(project_id)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise invalid_argument("UploadFile takes multipart/form-data (one part per file)")
        async with request.form() as form:
            parts: list[tuple[str, bytes]] = []
            for name, value in form.multi_items():
                content = await value.read() if isinstance(value, StarletteUploadFile) else value.encode()
                parts.append((name, content))
        if not parts:
            raise invalid_argument("UploadFile needs at least one part (its field name is the destination)")
        for name, content in parts:
            await asyncio.to_thread(project_files.write_file, directory, name, content)
        return _json(200, {})

    @router.get("/{path:path}")
    async def list_project_files(project_id: str, path: str) -> JSONResponse:
        directory = service.project_directory(project_id)
        return _json(200, await asyncio.to_thread(project_files.list_files, directory, path))

    @router.post("/{path:path}")
    async def download_project_file(project_id: str, path: str) -> Response:
        if not path.endswith(":download"):
            raise WorkspaceAPIError(GrpcCode.NOT_FOUND, "no such API route", 404)
        directory = service.project_directory(project_id)
        target = await asyncio.to_thread(project_files.read_file, directory, path.removesuffix(":download"))
        return Response(await asyncio.to_thread(target.read_bytes), media_type="application/octet-stream")

    @router.delete("/{path:path}")
    async def delete_project_file(project_id: str, path: str) -> JSONResponse:
        directory = service.project_directory(project_id)
        await asyncio.to_thread(project_files.delete_file, directory, path)
        return _json(200, {})

    @router.patch("/{path:path}")
    async def update_project_file_metadata(project_id: str, path: str, request: Request) -> JSONResponse:
        directory = service.project_directory(project_id)
        body = await _read_body(request, allow_empty=False)
        new_path = body.get("path")
        if not isinstance(new_path, str) or not new_path.strip():
            raise invalid_argument("path (the new name, relative to the project root) is required")
        info = await asyncio.to_thread(project_files.rename_file, directory, path, new_path)
        return _json(200, info)

    return router


def controls_router(
    service: WorkspaceService, controls: dict[str, Any], config: ServerConfig, logins: AppLogins
) -> APIRouter:
    """The test controls under `/_workspace/` (not part of CML): health, counters, faults, latency,
    login codes, processes."""
    counters: RequestCounters = controls["counters"]
    faults: FaultInjector = controls["faults"]
    latency: Latency = controls["latency"]
    router = APIRouter(prefix=CONTROL_PREFIX)

    @router.get("/health")
    async def health() -> JSONResponse:
        return _json(200, {"status": "ok", "pid": os.getpid(), "url": config.url, "home": str(config.home)})

    @router.get("/counters")
    async def get_counters() -> JSONResponse:
        return _json(200, counters.snapshot())

    @router.post("/counters:reset")
    async def reset_counters() -> JSONResponse:
        counters.reset()
        return _json(200, counters.snapshot())

    @router.get("/faults")
    async def get_faults() -> JSONResponse:
        return _json(200, faults.snapshot())

    @router.put("/faults")
    async def put_faults(request: Request) -> JSONResponse:
        faults.configure(FaultPlan.from_body(await _read_body(request)))
        return _json(200, faults.snapshot())

    @router.delete("/faults")
    async def delete_faults() -> JSONResponse:
        faults.clear()
        return _json(200, faults.snapshot())

    @router.get("/latency")
    async def get_latency() -> JSONResponse:
        return _json(200, latency.to_dict())

    @router.put("/latency")
    async def put_latency(request: Request) -> JSONResponse:
        body = await _read_body(request)
        replacement = Latency()
        replacement.update(body)
        latency.update(replacement.to_dict())
        return _json(200, latency.to_dict())

    @router.post("/applications/{application_id}/login-code")
    async def mint_login_code(application_id: str) -> JSONResponse:
        # A one-time browser login link for one application (see app_urls.py); a secret, never logged.
        app = service.apps.get(application_id)
        if app is None:
            return _json(404, error_body(GrpcCode.NOT_FOUND, f"no application with id {application_id!r}"))
        return _json(200, login_code_answer(app, logins), headers={"cache-control": "no-store"})

    @router.get("/processes")
    async def list_processes() -> JSONResponse:
        found = await asyncio.to_thread(service.supervisor.live_workload_processes)
        return _json(200, {"processes": found, "pids": sorted(int(str(p["pid"])) for p in found)})

    return router


# ------------------------------------------------------------------------------------ middlewares

# Where the request-id middleware keeps the server's own `send` (the fault middleware aborts the TCP
# connection through it).
_TRANSPORT_SEND = "ray_cai.transport_send"


async def _send_json(send: Send, status: int, body: Any, extra_headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def route_template(api: FastAPI, scope: Scope) -> str | None:
    """The route template (`/api/v2/projects/{project_id}`) of a CML API request, None for others."""
    if not scope["path"].startswith(API_PREFIX):
        return None
    partial: str | None = None
    for route in _flat_routes(api.router.routes):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", scope["path"]))
        if match == Match.PARTIAL and partial is None:
            partial = str(getattr(route, "path", scope["path"]))
    return partial or scope["path"]


def _flat_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes themselves: recent FastAPI keeps an included router as one entry (`original_router`)
    whose routes carry the full path (the router's prefix applied)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat_routes(inner.routes)
        else:
            yield route


class RequestIdMiddleware:
    """Every answer carries a fresh `x-request-id`, as CML's do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex.encode()

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app({**scope, _TRANSPORT_SEND: send}, receive, send_with_request_id)


class CountersMiddleware:
    """Counts every CML API request by method and route template (authorized or not)."""

    def __init__(self, app: ASGIApp, api: FastAPI, counters: RequestCounters) -> None:
        self.app = app
        self.api = api
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            template = route_template(self.api, scope)
            if template is not None:
                self.counters.record(scope["method"], template)
        await self.app(scope, receive, send)


class BearerAuthMiddleware:
    """Only `Authorization: Bearer <API key>` opens the API listener (never a login cookie)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    def __repr__(self) -> str:  # keep the key out of any log line
        return "BearerAuthMiddleware()"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._authorized(scope):
            await _send_json(send, 401, error_body(16, "missing or invalid API key (Bearer)"))
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        authorization = next(
            (v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"), ""
        )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return hmac.compare_digest(token.strip().encode(), self._key)


class FaultsMiddleware:
    """Injected faults on CML API requests (test controls): hangs, errors, resets, lost answers."""

    def __init__(self, app: ASGIApp, api: FastAPI, faults: FaultInjector) -> None:
        self.app = app
        self.api = api
        self.faults = faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        template = route_template(self.api, scope) if scope["type"] == "http" else None
        if template is None:
            await self.app(scope, receive, send)
            return
        is_create = scope["method"] == "POST" and template in CREATE_ROUTES
        decision = self.faults.decide(scope["path"], is_create=is_create)
        transport_send: Send = scope.get(_TRANSPORT_SEND, send)
        if decision.hang_seconds:
            # A kill point for tests: the body is read first, so the request is served after the pause
            # even when its client was killed meanwhile (the request reached CML, the answer is lost).
            receive = await self._buffered(receive)
            await asyncio.sleep(decision.hang_seconds)
        if decision.reset:
            await self._abort_connection(transport_send)
            return
        if decision.error_status is not None:
            extra = {}
            if decision.error_status == 429:
                plan = self.faults.plan
                extra["Retry-After"] = str(plan.retry_after_seconds if plan else 1)
            code = GRPC_CODE_OF_HTTP_STATUS.get(decision.error_status, GrpcCode.INTERNAL)
            message = f"injected fault: HTTP {decision.error_status}"
            await _send_json(send, decision.error_status, error_body(code, message), extra)
            return
        if decision.drop_response:

            async def discard(_: Message) -> None:
                return None

            await self.app(scope, receive, discard)
            plan = self.faults.plan
            if plan is not None and plan.drop_mode == "reset":
                await self._abort_connection(transport_send)
            else:
                await _send_json(send, 502, error_body(14, "injected fault: create response lost"))
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _buffered(receive: Receive) -> Receive:
        """Read the whole request body now; the returned `receive` replays it."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return replay

    @staticmethod
    async def _abort_connection(send: Send) -> None:
        """Drop the TCP connection without any response (uvicorn keeps the transport on its cycle)."""
        cycle = getattr(send, "__self__", None)
        transport = getattr(cycle, "transport", None)
        if transport is not None:
            transport.abort()
            with contextlib.suppress(Exception):
                cycle.disconnected = True  # type: ignore[union-attr]
            await asyncio.sleep(0)
            return
        # Fallback: promise a body and never send it.
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1024")]})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class WorkspaceGateway:
    """The API listener's ASGI app: the middlewares around the FastAPI app, outermost first —
    request id, counters, bearer auth, faults. Lifespan and other scopes go straight to the app."""

    def __init__(
        self,
        api: FastAPI,
        service: WorkspaceService,
        config: ServerConfig,
        counters: RequestCounters,
        faults: FaultInjector,
        conformance: tuple[SpecChecker, ViolationLog] | None = None,
    ) -> None:
        self.api = api
        self.service = service
        self.config = config
        app: ASGIApp = FaultsMiddleware(api, api, faults)
        app = BearerAuthMiddleware(app, config.api_key)
        app = CountersMiddleware(app, api, counters)
        if conformance is not None:  # sees every answer, injected faults and auth refusals included
            app = ConformanceMiddleware(app, *conformance)
        self._chain: ASGIApp = RequestIdMiddleware(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)
            return
        await self._chain(scope, receive, send)


class FlushBeforeAnswer:
    """ASGI middleware: every change a request made is committed to the store before its answer
    starts, so an answer a client saw is never lost by a crash of the server."""

    def __init__(self, app: ASGIApp, service: WorkspaceService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def flushing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.service.flush()
            await send(message)

        await self.app(scope, receive, flushing_send)


def restart_policy_router(service: WorkspaceService) -> APIRouter:
    """`GET/PUT/DELETE /_workspace/restart-policy`: CML's automatic restart of failed applications
    (DELETE: back to the server's start options)."""
    router = APIRouter()
    supervisor = service.supervisor

    @router.get(f"{CONTROL_PREFIX}/restart-policy")
    async def get_restart_policy() -> JSONResponse:
        return _json(200, supervisor.restart_state(list(service.apps.values())))

    @router.put(f"{CONTROL_PREFIX}/restart-policy")
    async def put_restart_policy(request: Request) -> JSONResponse:
        replacement = RestartPolicy(**supervisor.restart_policy.to_dict())
        replacement.update(await _read_body(request))
        supervisor.restart_policy.update(replacement.to_dict())
        return _json(200, supervisor.restart_state(list(service.apps.values())))

    initial = supervisor.restart_policy.to_dict()  # the start options

    @router.delete(f"{CONTROL_PREFIX}/restart-policy")
    async def reset_restart_policy() -> JSONResponse:
        supervisor.restart_policy.update(initial)
        return _json(200, supervisor.restart_state(list(service.apps.values())))

    return router


def create_server(
    config: ServerConfig,
    workspace_tag: str | None = None,
    *,
    store: Store | None = None,
    restart_policy: RestartPolicy | None = None,
    network: PodNetwork | None = None,
    network_reason: str = "",
) -> WorkspaceGateway:
    """The whole ASGI application of a workspace rooted at `config.home` (its state in `store`,
    by default `<home>/workspace.db`)."""
    latency = Latency()
    counters = RequestCounters()
    faults = FaultInjector()
    supervisor = Supervisor(
        domain=config.domain,
        api_url=config.url,
        api_key=config.api_key,
        workspace_tag=workspace_tag or f"{config.port}-{secrets.token_hex(6)}",
        latency=latency,
        stop_grace_seconds=config.stop_grace_seconds,
        restart_policy=restart_policy,
        network=network,
        network_reason=network_reason,
    )
    service = WorkspaceService(config.home, supervisor, load_runtimes(config.home), store)
    logins = AppLogins(config.api_key)
    url_policy = AppUrlPolicy()
    listeners = AppListeners(logins, config.api_key, service.apps.get, policy=url_policy)
    listeners.on_ports = supervisor.set_workspace_ports
    api = build_api(
        service, {"counters": counters, "faults": faults, "latency": latency}, config, listeners, logins
    )
    api.include_router(restart_policy_router(service))
    api.include_router(app_urls_router(url_policy))
    conformance = conformance_from_env(config.home)
    api.include_router(conformance_router(conformance[1] if conformance else None))
    api.include_router(network_router(service))
    api.include_router(session_router(service))
    api.add_middleware(FlushBeforeAnswer, service=service)
    return WorkspaceGateway(api, service, config, counters, faults, conformance)


def app_urls_router(policy: AppUrlPolicy) -> APIRouter:
    """`GET/PUT/DELETE /_workspace/app-urls`: what application URLs pass (`{"websocket_upgrades":
    false}` makes them refuse WebSocket upgrades, as some gateways do); DELETE restores the default."""
    router = APIRouter()

    @router.get(f"{CONTROL_PREFIX}/app-urls")
    async def get_app_urls() -> JSONResponse:
        return _json(200, policy.to_dict())

    @router.put(f"{CONTROL_PREFIX}/app-urls")
    async def put_app_urls(request: Request) -> JSONResponse:
        policy.update(await _read_body(request))
        return _json(200, policy.to_dict())

    @router.delete(f"{CONTROL_PREFIX}/app-urls")
    async def reset_app_urls() -> JSONResponse:
        policy.reset()
        return _json(200, policy.to_dict())

    return router


def conformance_router(log: ViolationLog | None) -> APIRouter:
    """`GET /_workspace/conformance`: whether answers are checked against CML's spec
    (`RAY_CAI_WORKSPACE_SPEC`) and the violations recorded so far (`conformance.py`)."""
    router = APIRouter()

    @router.get(f"{CONTROL_PREFIX}/conformance")
    async def get_conformance() -> JSONResponse:
        if log is None:
            return _json(200, {"checking": False, "violations": []})
        return _json(200, {"checking": True, "log": str(log.path), "violations": list(log.recorded)})

    return router


PORT_REUSE_TIMEOUT_SECONDS = 5.0


def _bind(port: int, *, preferred: bool) -> socket.socket:
    """A listening socket on 127.0.0.1:`port`. The port of the previous server (`preferred`) is
    retried for a few seconds, then a free one is taken (with a warning: workloads that hold the old
    URL in CDSW_API_URL cannot reach the new one)."""

    def attempt(wanted: int) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", wanted))
        except OSError:
            sock.close()
            return None
        sock.listen(512)
        return sock

    if not port:
        sock = attempt(0)
        assert sock is not None
        return sock
    if not preferred:
        sock = attempt(port)
        if sock is None:
            raise OperationFailed(f"cannot listen on 127.0.0.1:{port}: the port is in use")
        return sock
    try:
        return poll_until(
            lambda: attempt(port),
            timeout=PORT_REUSE_TIMEOUT_SECONDS,
            interval=0.2,
            what=f"port {port} of the previous server to be free",
        )
    except WaitTimeout:
        logger.warning("port %d of the previous server is taken; the workspace URL changes", port)
        sock = attempt(0)
        assert sock is not None
        return sock


def serve(
    home: Path,
    port: int = 0,
    stop_grace_seconds: float = DEFAULT_STOP_GRACE_SECONDS,
    restart_policy: RestartPolicy | None = None,
    pods: bool | None = None,
    pod_cidr: str | None = None,
) -> None:
    """Run the workspace server in the foreground until SIGTERM/SIGINT.

    `pods`: True requires pods (an error where they cannot be made), False runs every workload on the
    host (shared-host), None makes pods where possible (see pods.py).

    Its state is in `<home>/workspace.db`; a restart keeps the URL (the previous port, unless `port`
    names another) and the workspace tag, and re-adopts the workloads the previous server left."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "projects").mkdir(exist_ok=True)
    api_key = ensure_api_key(home)
    store = Store(db_path(home))
    network: PodNetwork | None = None
    try:
        state = read_state(home)
        previous_port = state.get("port") if isinstance(state.get("port"), int) else None
        sock = _bind(port or previous_port or 0, preferred=not port and previous_port is not None)
        config = ServerConfig(home=home, api_key=api_key, port=int(sock.getsockname()[1]),
                              stop_grace_seconds=stop_grace_seconds)  # fmt: skip
        workspace_tag = store.get_meta("workspace_tag") or f"{config.port}-{secrets.token_hex(6)}"
        store.set_meta("workspace_tag", workspace_tag)
        network, network_reason = choose_network(home, pods, pod_cidr)
        gateway = create_server(
            config, workspace_tag, store=store, restart_policy=restart_policy,
            network=network, network_reason=network_reason,
        )  # fmt: skip
    except BaseException:
        store.close()
        if network is not None:  # the bridge made for this failed start
            network.remove_all()
        raise
    state = read_state(home)
    state.update(
        {
            "url": config.url,
            "api_key": api_key,
            "pid": os.getpid(),
            "home": str(home),
            "port": config.port,
            "workspace_tag": workspace_tag,
            "network": "pods" if network is not None else "shared-host",
            "network_reason": network_reason,
            "pod_cidr": str(network.cidr) if network is not None else None,
        }
    )
    write_state(home, state)
    logger.info("workspace serving %s (home %s)", config.url, home)
    uvicorn_config = uvicorn.Config(
        gateway,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(uvicorn_config).run(sockets=[sock])
    finally:
        if network is not None:  # after the shutdown removed every pod: the bridge
            network.remove_all()
        state = read_state(home)
        if state.get("pid") == os.getpid():
            state["pid"] = None
            write_state(home, state)
