"""``CMLClient``: the CML API v2 calls this project needs, with pagination, retries and typed results."""

from __future__ import annotations

import difflib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from ._errors import (
    AmbiguousName,
    CMLConnectionError,
    CMLError,
    RefusedField,
    request_id_of,
)
from ._models import (
    PROJECT_TEMPLATES,
    Application,
    CreateApplication,
    CreateJob,
    FileInfo,
    Job,
    JobRun,
    Project,
    Runtime,
    environment_json,
)
from ._retry import FIRST_CONTACT_DEADLINE, Call, Done, Fail, RetryPolicy, classify, describe_transport_error
from ._settings import CMLSettings
from ._transport import application_url, http_client

__all__ = ["FIRST_CONTACT_DEADLINE", "PAGE_SIZE", "CMLClient"]

log = logging.getLogger("ray_serve_cai.cml")

#: Items per list call. CML's default is 10; larger pages keep polls to one call.
PAGE_SIZE = 100

_USER_AGENT = "ray-serve-cai-cml/0.1"

# Fields a PATCH may change: the writable fields of the spec's `Project`, `Job` and `Application`
# (UpdateProject/UpdateJob/UpdateApplication take the object; CML ignores its read-only fields —
# `Job.paused`, `Job.timezone`, `Project.creation_status`… — and any name it does not know). A name
# outside these sets would be silently dropped by CML, so it is refused here before anything is sent.
_PROJECT_PATCH = frozenset(
    {
        "name", "description", "visibility", "default_engine_type", "shared_memory_limit", "environment",
        "ephemeral_storage_request", "ephemeral_storage_limit",
    }
)  # fmt: skip
_JOB_PATCH = frozenset(
    {
        "name", "script", "schedule", "parent_id", "timeout", "kill_on_timeout", "cpu", "memory",
        "nvidia_gpu", "environment", "arguments", "runtime_identifier", "runtime_addon_identifiers", "kernel",
    }
)  # fmt: skip
_APPLICATION_PATCH = frozenset(
    {
        "name", "subdomain", "description", "script", "bypass_authentication", "kernel", "cpu",
        "memory", "nvidia_gpu", "environment", "runtime_identifier", "runtime_addon_identifiers",
    }
)  # fmt: skip

T = TypeVar("T", bound=BaseModel)


def _seg(value: str) -> str:
    """One URL path segment (ids are opaque strings)."""
    if not value:
        raise ValueError("an id must be a non-empty string")
    return quote(str(value), safe="")


def _patch_body(kind: str, allowed: frozenset[str], fields: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, sorted(allowed), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; writable: {', '.join(sorted(allowed))}"
        raise RefusedField(
            f"update_{kind}(): {name!r} is not a writable field of a CML {kind} (CML would ignore it){hint}"
        )
    body = dict(fields)
    if "environment" in body and body["environment"] is not None:
        body["environment"] = environment_json(body["environment"])
    if kind == "job" and body.get("timeout") is not None:
        body["timeout"] = str(int(body["timeout"]))  # `Job.timeout` is an int64: a string in the JSON
    return body


def _create_body(cls: type[T], request: T | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    given = {k: v for k, v in fields.items() if v is not None}
    if request is None:
        request = cls(**given)
    elif given:
        raise TypeError(f"pass either a {cls.__name__} or keyword fields, not both ({', '.join(given)})")
    return request.body()  # type: ignore[attr-defined]


def _filter_param(search_filter: Mapping[str, Any] | str | None) -> str | None:
    if search_filter is None:
        return None
    return search_filter if isinstance(search_filter, str) else json.dumps(dict(search_filter))


class CMLClient:
    """A synchronous client for one CML workspace's API v2.

    Lists are transparently paginated. GET, PATCH, DELETE and the ``:stop``/``:restart`` actions are
    retried on 429, 500, 502, 503, 504 and connection failures (full-jitter backoff, ``Retry-After`` honoured,
    bounded by ``settings.retry_deadline``). A POST that creates something is only retried when it
    provably was not acted on (connect failure, 429); a lost answer or a 5xx raises
    :class:`CreateOutcomeUnknown` (``maybe_applied=True``): the caller must list before creating again.
    Thread-safe: one client may serve many threads.
    """

    def __init__(
        self,
        settings: CMLSettings | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings if settings is not None else CMLSettings.from_env()
        self._retry = retry if retry is not None else RetryPolicy(deadline=self.settings.retry_deadline)
        self._reached = False  # set once CML has answered anything: later connection errors are transient
        self._sleep = sleep
        self._clock = clock
        timeout = httpx.Timeout(self.settings.timeout)
        self._key = self.settings.api_key.get_secret_value()

        def make(base_url: str) -> httpx.Client:
            return http_client(
                base_url,
                api_key=self._key,
                verify=self.settings.verify,
                timeout=timeout,
                user_agent=_USER_AGENT,
                transport=transport,
            )

        self._http = make(self.settings.api_url)
        # Application URLs are absolute; the workspace's scheme as the base sets their TLS (none for
        # a plain-HTTP workspace, whose applications are plain HTTP too: `app_url`).
        self._apps = make(self.settings.host)
        # Application URLs the workspace gave (the local workspace's `url` field), by subdomain and
        # name, so `app_url(name)` is right after any call that returned the application.
        self._app_urls: dict[str, str] = {}
        self._app_urls_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CMLClient(host={self.settings.host!r})"

    def __enter__(self) -> CMLClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pools."""
        self._http.close()
        self._apps.close()

    # -- transport -----------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        creates: bool = False,
        files: Any = None,
        raw: bool = False,
    ) -> Any:
        """One API call with retries; returns the decoded JSON body (``{}`` when empty), or the bytes
        with ``raw``. ``files`` sends a multipart body (httpx's ``files``) instead of JSON.

        Each attempt's outcome is judged by the pure `classify` (done / retry after a delay / fail)."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        call = Call(
            method,
            path,
            creates=creates,
            host=self.settings.host,
            secret=self._key,
            timeout=self.settings.timeout,
            raw=raw,
        )
        start = self._clock()
        attempt = 0
        while True:
            attempt += 1
            sent_at = self._clock()
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._http.request(
                    method, path, params=query or None, json=None if files else body, files=files
                )
            except httpx.TransportError as exc:
                outcome = exc
                log.debug(
                    "%s %s failed: %s (attempt %d)", method, call.full_path, type(exc).__name__, attempt
                )
            else:
                self._reached = True
                log.debug(
                    "%s %s -> %d [request id %s] (attempt %d, %.2fs)",
                    method,
                    call.full_path,
                    outcome.status_code,
                    request_id_of(outcome) or "-",
                    attempt,
                    self._clock() - sent_at,
                )
            verdict = classify(
                call,
                outcome,
                attempt=attempt,
                elapsed=self._clock() - start,
                reached=self._reached,
                policy=self._retry,
            )
            if isinstance(verdict, Done):
                return verdict.body
            if isinstance(verdict, Fail):
                if isinstance(outcome, httpx.TransportError):
                    raise verdict.error from outcome
                raise verdict.error
            if isinstance(outcome, httpx.Response):
                outcome.close()
            self._sleep(verdict.delay)

    def _describe(self, exc: httpx.TransportError) -> str:
        return describe_transport_error(exc, Call("", "", secret=self._key, timeout=self.settings.timeout))

    def _paginate(
        self, path: str, key: str, params: Mapping[str, Any] | None = None, *, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every item of a list endpoint, following ``next_page_token`` until it is empty."""
        if limit is not None and limit <= 0:
            return
        query = dict(params or {})
        query["page_size"] = min(PAGE_SIZE, limit) if limit else PAGE_SIZE
        seen: set[str] = set()
        count = 0
        while True:
            page = self._request("GET", path, params=query)
            for item in page.get(key) or []:
                yield item
                count += 1
                if limit is not None and count >= limit:
                    return
            token = page.get("next_page_token") or ""
            if not token:
                return
            if token in seen:
                raise CMLError(f"CML repeated page token on GET /api/v2{path}; stopping to avoid a loop")
            seen.add(token)
            query["page_token"] = token

    # -- the key -------------------------------------------------------------------------------
    def validate_api_key(self, audience: str | None = None) -> dict[str, Any]:
        """``ValidateAPIKey``: ``{"valid", "username", "message"}`` for the key this client sends."""
        body = {"audience": audience} if audience else {}
        return dict(self._request("POST", "/auth/validate_key", body=body))

    # -- projects ------------------------------------------------------------------------------
    def list_projects(
        self,
        search_filter: Mapping[str, Any] | str | None = None,
        sort: str | None = None,
        *,
        include_public_projects: bool = False,
    ) -> list[Project]:
        """Projects visible to the key's user (all pages). ``search_filter`` matches substrings."""
        params = {
            "search_filter": _filter_param(search_filter),
            "sort": sort,
            "include_public_projects": "true" if include_public_projects else None,
        }
        return [Project.model_validate(p) for p in self._paginate("/projects", "projects", params)]

    def find_project_by_name(self, name: str) -> Project | None:
        """The project named exactly ``name`` (CML's search is a substring match), or None.

        Raises :class:`AmbiguousName` if several projects have that exact name.
        """
        return _exactly_one("project", name, self.list_projects(search_filter={"name": name}))

    def create_project(
        self,
        name: str,
        *,
        template: str | None = None,
        git_url: str | None = None,
        git_ref: str | None = None,
        description: str | None = None,
        visibility: str = "private",
        default_project_engine_type: str | None = None,
        environment: Mapping[str, str] | None = None,
    ) -> Project:
        """Create a project. With a ``git_url`` (and ``git_ref``, the branch) it is cloned and no
        ``template`` is sent unless given; without one the spec's ``local`` template makes an empty
        project (files are uploaded separately). ``template`` takes the spec's documented values.

        A git clone is asynchronous: poll :meth:`get_project` until ``creation_status`` settles.
        """
        if template is not None and template not in PROJECT_TEMPLATES:
            raise RefusedField(
                f"template {template!r} is not one CML documents; use one of {', '.join(PROJECT_TEMPLATES)}"
                " (or none with a git_url)"
            )
        body: dict[str, Any] = {"name": name, "visibility": visibility}
        if template or not git_url:
            body["template"] = template or "local"
        optional = {
            "git_url": git_url,
            "git_ref": git_ref,
            "description": description,
            "default_project_engine_type": default_project_engine_type,
            "environment": dict(environment) if environment is not None else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return Project.model_validate(self._request("POST", "/projects", body=body, creates=True))

    def get_project(self, project_id: str) -> Project:
        return Project.model_validate(self._request("GET", f"/projects/{_seg(project_id)}"))

    def update_project(self, project_id: str, **fields: Any) -> Project:
        """PATCH a project. ``environment`` (a dict) REPLACES the whole map; it is sent as a JSON string."""
        body = _patch_body("project", _PROJECT_PATCH, fields)
        return Project.model_validate(self._request("PATCH", f"/projects/{_seg(project_id)}", body=body))

    def delete_project(self, project_id: str) -> None:
        self._request("DELETE", f"/projects/{_seg(project_id)}")

    # -- project files -------------------------------------------------------------------------
    @staticmethod
    def _file_path(project_id: str, path: str) -> str:
        """``/projects/{id}/files/{path}``: the path is one URL segment (``/`` sent as ``%2F``); the
        project root is ``.``, sent as ``%2E`` (httpx would otherwise drop a ``.`` segment)."""
        relative = path.strip().lstrip("/") or "."
        segment = "%2E" if relative == "." else quote(relative, safe="")
        return f"/projects/{_seg(project_id)}/files/{segment}"

    def upload_project_file(self, project_id: str, path: str, content: bytes) -> None:
        """Write ``content`` to ``path`` (relative to the project root, ``/home/cdsw`` on CML): the
        spec's ``UploadFile``, a multipart part whose form-field name is the destination."""
        relative = path.strip().lstrip("/")
        if not relative:
            raise ValueError("a destination path is required")
        name = relative.rsplit("/", 1)[-1]
        files = {relative: (name, content, "application/octet-stream")}
        self._request("POST", f"/projects/{_seg(project_id)}/files", files=files)

    def list_project_files(self, project_id: str, path: str = "") -> list[FileInfo]:
        """The entries of a project directory (or the file itself); ``""`` is the project root."""
        data = self._request("GET", self._file_path(project_id, path))
        return [FileInfo.model_validate(f) for f in data.get("files") or []]

    def download_project_file(self, project_id: str, path: str) -> bytes:
        """The bytes of a project file (``POST …/files/{path}:download``)."""
        return self._request("POST", self._file_path(project_id, path) + ":download", raw=True)

    def delete_project_file(self, project_id: str, path: str) -> None:
        """Delete a project file or directory (with its contents)."""
        self._request("DELETE", self._file_path(project_id, path))

    def rename_project_file(self, project_id: str, path: str, new_path: str) -> FileInfo:
        """Move a project file to ``new_path`` (``UpdateProjectFileMetadata``)."""
        data = self._request("PATCH", self._file_path(project_id, path), body={"path": new_path})
        return FileInfo.model_validate(data)

    # -- runtimes ------------------------------------------------------------------------------
    def list_runtimes(self, search_filter: Mapping[str, Any] | str | None = None) -> list[Runtime]:
        """ML Runtimes (all pages); e.g. ``search_filter={"kernel": "Python 3.11"}``."""
        params = {"search_filter": _filter_param(search_filter)}
        return [Runtime.model_validate(r) for r in self._paginate("/runtimes", "runtimes", params)]

    # -- jobs ----------------------------------------------------------------------------------
    def list_jobs(self, project_id: str, search_filter: Mapping[str, Any] | str | None = None) -> list[Job]:
        params = {"search_filter": _filter_param(search_filter)}
        return [
            Job.model_validate(j)
            for j in self._paginate(f"/projects/{_seg(project_id)}/jobs", "jobs", params)
        ]

    def find_job_by_name(self, project_id: str, name: str) -> Job | None:
        """The job named exactly ``name`` in the project, or None (:class:`AmbiguousName` if several)."""
        return _exactly_one("job", name, self.list_jobs(project_id, search_filter={"name": name}))

    def create_job(
        self,
        project_id: str,
        request: CreateJob | None = None,
        *,
        name: str | None = None,
        script: str | None = None,
        cpu: float | None = None,
        memory: float | None = None,
        nvidia_gpu: int | None = None,
        parent_id: str | None = None,
        environment: Mapping[str, str] | None = None,
        arguments: str | None = None,
        timeout: int | None = None,
        kill_on_timeout: bool | None = None,
        runtime_identifier: str | None = None,
        kernel: str | None = None,
    ) -> Job:
        """Create a job (it does not run). Pass a :class:`CreateJob` or the same fields as keywords;
        ``parent_id`` makes it a dependent job (the spec's ``parent_job_id`` is its deprecated alias)."""
        body = _create_body(
            CreateJob,
            request,
            {
                "name": name,
                "script": script,
                "cpu": cpu,
                "memory": memory,
                "nvidia_gpu": nvidia_gpu,
                "parent_id": parent_id,
                "environment": dict(environment) if environment is not None else None,
                "arguments": arguments,
                "timeout": timeout,
                "kill_on_timeout": kill_on_timeout,
                "runtime_identifier": runtime_identifier,
                "kernel": kernel,
            },
        )
        data = self._request("POST", f"/projects/{_seg(project_id)}/jobs", body=body, creates=True)
        return Job.model_validate(data)

    def get_job(self, project_id: str, job_id: str) -> Job:
        return Job.model_validate(self._request("GET", self._job_path(project_id, job_id)))

    def update_job(self, project_id: str, job_id: str, **fields: Any) -> Job:
        """PATCH a job; the parent is ``parent_id`` here; ``environment`` replaces the whole map."""
        body = _patch_body("job", _JOB_PATCH, fields)
        return Job.model_validate(self._request("PATCH", self._job_path(project_id, job_id), body=body))

    def delete_job(self, project_id: str, job_id: str) -> None:
        """Delete a job (its dependent jobs are not deleted)."""
        self._request("DELETE", self._job_path(project_id, job_id))

    @staticmethod
    def _job_path(project_id: str, job_id: str) -> str:
        return f"/projects/{_seg(project_id)}/jobs/{_seg(job_id)}"

    # -- job runs ------------------------------------------------------------------------------
    def list_job_runs(self, project_id: str, job_id: str, limit: int | None = None) -> list[JobRun]:
        """Runs of a job, newest first (``sort=-created_at``); at most ``limit`` of them."""
        path = f"{self._job_path(project_id, job_id)}/runs"
        items = self._paginate(path, "job_runs", {"sort": "-created_at"}, limit=limit)
        return [JobRun.model_validate(r) for r in items]

    def latest_job_run(self, project_id: str, job_id: str) -> JobRun | None:
        """The newest run of a job, or None if it never ran."""
        runs = self.list_job_runs(project_id, job_id, limit=1)
        return runs[0] if runs else None

    def create_job_run(
        self,
        project_id: str,
        job_id: str,
        environment: Mapping[str, str] | None = None,
        arguments: str | None = None,
    ) -> JobRun:
        """Start a run of a job (its dependent jobs follow on success, server-side). Never retried."""
        body: dict[str, Any] = {}
        if environment is not None:
            body["environment"] = dict(environment)
        if arguments is not None:
            body["arguments"] = arguments
        data = self._request("POST", f"{self._job_path(project_id, job_id)}/runs", body=body, creates=True)
        return JobRun.model_validate(data)

    def get_job_run(self, project_id: str, job_id: str, run_id: str) -> JobRun:
        return JobRun.model_validate(
            self._request("GET", f"{self._job_path(project_id, job_id)}/runs/{_seg(run_id)}")
        )

    def stop_job_run(self, project_id: str, job_id: str, run_id: str) -> JobRun | None:
        """Stop a run; returns the run if CML answers with it."""
        data = self._request("POST", f"{self._job_path(project_id, job_id)}/runs/{_seg(run_id)}:stop")
        return JobRun.model_validate(data) if data.get("id") else None

    # -- applications --------------------------------------------------------------------------
    def list_applications(
        self, project_id: str, search_filter: Mapping[str, Any] | str | None = None
    ) -> list[Application]:
        """Applications of a project (all pages)."""
        params = {"search_filter": _filter_param(search_filter)}
        path = f"/projects/{_seg(project_id)}/applications"
        return [self._application(a) for a in self._paginate(path, "applications", params)]

    def create_application(
        self,
        project_id: str,
        request: CreateApplication | None = None,
        *,
        name: str | None = None,
        subdomain: str | None = None,
        script: str | None = None,
        cpu: float | None = None,
        memory: float | None = None,
        nvidia_gpu: int | None = None,
        environment: Mapping[str, str] | None = None,
        runtime_identifier: str | None = None,
        description: str | None = None,
        bypass_authentication: bool | None = None,
        kernel: str | None = None,
    ) -> Application:
        """Create AND start an application. Pass a :class:`CreateApplication` or the fields as keywords."""
        body = _create_body(
            CreateApplication,
            request,
            {
                "name": name,
                "subdomain": subdomain,
                "script": script,
                "cpu": cpu,
                "memory": memory,
                "nvidia_gpu": nvidia_gpu,
                "environment": dict(environment) if environment is not None else None,
                "runtime_identifier": runtime_identifier,
                "description": description,
                "bypass_authentication": bypass_authentication,
                "kernel": kernel,
            },
        )
        data = self._request("POST", f"/projects/{_seg(project_id)}/applications", body=body, creates=True)
        return self._application(data)

    def get_application(self, project_id: str, application_id: str) -> Application:
        return self._application(self._request("GET", self._app_path(project_id, application_id)))

    def update_application(self, project_id: str, application_id: str, **fields: Any) -> Application:
        """PATCH an application. It keeps running the old settings until :meth:`restart_application`."""
        body = _patch_body("application", _APPLICATION_PATCH, fields)
        data = self._request("PATCH", self._app_path(project_id, application_id), body=body)
        return self._application(data)

    def delete_application(self, project_id: str, application_id: str) -> None:
        self._request("DELETE", self._app_path(project_id, application_id))

    def stop_application(self, project_id: str, application_id: str) -> Application | None:
        """``:stop``; returns the application if CML answers with it."""
        data = self._request("POST", f"{self._app_path(project_id, application_id)}:stop")
        return self._application(data) if data.get("id") else None

    def restart_application(self, project_id: str, application_id: str) -> Application | None:
        """``:restart`` — also how a stopped application is started again."""
        data = self._request("POST", f"{self._app_path(project_id, application_id)}:restart")
        return self._application(data) if data.get("id") else None

    @staticmethod
    def _app_path(project_id: str, application_id: str) -> str:
        return f"/projects/{_seg(project_id)}/applications/{_seg(application_id)}"

    def _application(self, data: Any) -> Application:
        app = Application.model_validate(data)
        url = application_url(app)
        if url is not None:
            with self._app_urls_lock:
                for key in {app.subdomain, app.name} - {""}:
                    self._app_urls[key] = url
        return app

    # -- application HTTP ----------------------------------------------------------------------
    def app_url(self, app: Application | str) -> str:
        """The application's URL, without a trailing ``/``.

        The local workspace says it (its ``url`` field, ``http://127.0.0.1:<port>``); CML's API v2 has
        no such field, so there it is built as CML builds it: ``https://<subdomain>.<CDSW_DOMAIN>``.
        A name or subdomain uses the URL this client last saw for that application, else CML's rule.
        """
        if not isinstance(app, str):
            url = application_url(app)
            if url is not None:
                return url
        subdomain = app if isinstance(app, str) else app.key
        if not subdomain:
            raise ValueError("an application subdomain is required")
        with self._app_urls_lock:
            known = self._app_urls.get(subdomain)
        return known or f"{self.settings.scheme}://{subdomain}.{self.settings.domain}"

    def app_request(
        self, app: Application | str, method: str, path: str = "/", **kwargs: Any
    ) -> httpx.Response:
        """Send one HTTP request to an application with ``Authorization: Bearer <key>``.

        ``kwargs`` go to :meth:`httpx.Client.request`. Any status is returned as is; a connection failure
        raises :class:`CMLConnectionError`. Not retried: callers poll.
        """
        url = self.app_url(app) + ("" if path.startswith("/") else "/") + path
        headers = dict(kwargs.pop("headers", None) or {})
        if not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = f"Bearer {self._key}"
        try:
            response = self._apps.request(method, url, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise CMLConnectionError(f"cannot reach application at {url}: {self._describe(exc)}") from exc
        log.debug("%s %s -> %d", method, url, response.status_code)
        return response


def _exactly_one(kind: str, name: str, candidates: list[Any]) -> Any:
    exact = [c for c in candidates if c.name == name]
    if len(exact) > 1:
        ids = ", ".join(c.id for c in exact)
        raise AmbiguousName(f"{len(exact)} {kind}s are named {name!r} (ids {ids}); use the id instead")
    return exact[0] if exact else None
