"""Ray's Jobs REST API through the head's application URL: submit, status, list, logs, follow, stop.

```python
from ray_serve_cai.access.head import AppEndpoint
from ray_serve_cai.access.jobs import JobSubmission, JobsClient

with JobsClient(AppEndpoint("https://ray-default-head.ml.example.site", api_key)) as jobs:
    job_id = jobs.submit(JobSubmission(entrypoint="python train.py"))
    final = jobs.follow(job_id, on_output=print)
```

The endpoints are Ray's own (`POST /api/jobs/`, `GET /api/jobs/`, `GET /api/jobs/{id}`,
`POST /api/jobs/{id}/stop`, `GET /api/jobs/{id}/logs`, the WebSocket `/api/jobs/{id}/logs/tail`);
the head's HTTP server adds the Ray token. No Ray import: shipping a local `working_dir` or
`py_modules` needs Ray's package upload, so `upload_local_packages` imports Ray only when asked to.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from ruamel.yaml import YAML, YAMLError

from ray_serve_cai.access.head import AccessError, AppEndpoint
from ray_serve_cai.errors import BadInput, OperationFailed, WaitTimeout
from ray_serve_cai.waiting import poll_until

PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"
TERMINAL_STATUSES = frozenset({STOPPED, SUCCEEDED, FAILED})
SUBMISSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Ray resolves these runtime_env fields to packages it uploads from the submitting machine.
PACKAGE_FIELDS = ("working_dir", "py_modules")
REMOTE_URI = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
TAIL_PATH = "/api/jobs/{id}/logs/tail"


class JobsError(OperationFailed):
    """The Jobs API refused a request or could not be reached (exit code 1)."""


class JobNotFound(JobsError):
    """No job with that submission id (or job id) exists on the cluster."""


class JobInputError(BadInput):
    """Invalid job input (entrypoint, runtime env, resources): nothing was sent (exit code 2)."""


class LogStreamUnavailable(JobsError):
    """The WebSocket log tail could not be opened (a gateway that does not pass upgrades)."""


# -- input ---------------------------------------------------------------------------------------
def new_submission_id() -> str:
    """An id chosen before submitting (as Ray does), so a lost answer can be checked, not repeated."""
    return f"raysubmit_{secrets.token_hex(8)}"


def load_runtime_env(path: Path) -> dict[str, Any]:
    """A runtime env from a YAML or JSON file (JSON is YAML); it must be a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobInputError(f"--runtime-env: {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise JobInputError(f"--runtime-env: {path}: cannot read it ({type(err).__name__})") from None
    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise JobInputError(f"--runtime-env: {path}: not valid YAML or JSON{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise JobInputError(f"--runtime-env: {path}: must be a mapping of runtime_env fields")
    return data


def local_packages(runtime_env: Mapping[str, Any]) -> list[str]:
    """The local paths in `working_dir` / `py_modules` (remote URIs like s3:// or gcs:// excluded)."""
    found: list[str] = []
    for key in PACKAGE_FIELDS:
        value = runtime_env.get(key)
        values = value if isinstance(value, list) else [value]
        found += [v for v in values if isinstance(v, str) and not REMOTE_URI.match(v)]
    return found


def _non_negative(name: str, value: float | None) -> None:
    if value is not None and (not math.isfinite(value) or value < 0):
        raise JobInputError(f"{name}: must be a number of 0 or more, got {value:g}")


@dataclass(frozen=True)
class JobSubmission:
    """What `POST /api/jobs/` takes (Ray's `JobSubmitRequest`)."""

    entrypoint: str
    submission_id: str | None = None
    runtime_env: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict[str, float] | None = None

    def validate(self) -> None:
        """Raise `JobInputError` naming the field, before anything is sent."""
        if not self.entrypoint.strip():
            raise JobInputError("ENTRYPOINT: the command to run is empty")
        if self.submission_id is not None and not SUBMISSION_ID.match(self.submission_id):
            raise JobInputError(
                f"--submission-id: {self.submission_id!r} must be 1-128 letters, digits, '.', '_', ':' "
                "or '-', starting with a letter or digit"
            )
        _non_negative("--entrypoint-num-cpus", self.entrypoint_num_cpus)
        _non_negative("--entrypoint-num-gpus", self.entrypoint_num_gpus)
        if self.entrypoint_memory is not None and self.entrypoint_memory < 0:
            raise JobInputError(f"--entrypoint-memory: must be 0 or more bytes, got {self.entrypoint_memory}")
        for name, amount in (self.entrypoint_resources or {}).items():
            if not isinstance(amount, int | float) or isinstance(amount, bool):
                raise JobInputError(f"--entrypoint-resources: {name!r} must be a number, got {amount!r}")
            _non_negative(f"--entrypoint-resources: {name!r}", float(amount))
        for key, value in (self.metadata or {}).items():
            if not key or not isinstance(value, str):
                raise JobInputError(f"--metadata: {key!r}: keys must be non-empty and values strings")

    def body(self) -> dict[str, Any]:
        fields = {
            "entrypoint": self.entrypoint,
            "submission_id": self.submission_id,
            "runtime_env": self.runtime_env,
            "metadata": self.metadata,
            "entrypoint_num_cpus": self.entrypoint_num_cpus,
            "entrypoint_num_gpus": self.entrypoint_num_gpus,
            "entrypoint_memory": self.entrypoint_memory,
            "entrypoint_resources": self.entrypoint_resources,
        }
        return {key: value for key, value in fields.items() if value is not None}


# -- output --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobInfo:
    """One job as Ray reports it (`JobDetails`); `raw` keeps every field."""

    status: str
    submission_id: str | None = None
    job_id: str | None = None
    type: str = "SUBMISSION"
    entrypoint: str = ""
    message: str = ""
    start_time: int | None = None  # milliseconds since the epoch
    end_time: int | None = None
    driver_exit_code: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> JobInfo:
        return cls(
            status=str(data.get("status") or "UNKNOWN").upper(),
            submission_id=data.get("submission_id"),
            job_id=data.get("job_id"),
            type=str(data.get("type") or "SUBMISSION").upper(),
            entrypoint=str(data.get("entrypoint") or ""),
            message=str(data.get("message") or ""),
            start_time=data.get("start_time"),
            end_time=data.get("end_time"),
            driver_exit_code=data.get("driver_exit_code"),
            raw=dict(data),
        )

    @property
    def id(self) -> str:
        return self.submission_id or self.job_id or "?"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def duration(self) -> float | None:
        """Seconds from start to end (or to now while it runs)."""
        if not self.start_time:
            return None
        end = self.end_time or time.time() * 1000
        return max(0.0, (end - self.start_time) / 1000)

    def summary(self) -> str:
        """`<id> SUCCEEDED after 12.3s` plus the first line of Ray's message when it failed."""
        took = f" after {self.duration:.1f}s" if self.duration is not None and self.is_terminal else ""
        line = f"job {self.id} {self.status}{took}"
        if self.status in (FAILED, STOPPED) and self.message:
            line += f": {self.message.strip().splitlines()[0]}"
        return line

    def as_dict(self) -> dict[str, Any]:
        return dict(self.raw) or {"submission_id": self.submission_id, "status": self.status}


def _ray_error_text(response: httpx.Response) -> str:
    """Ray answers errors as plain text, often a whole traceback: keep its last meaningful line."""
    text = response.text.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"HTTP {response.status_code}"
    try:
        body = json.loads(text)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    return lines[-1][:500]


# -- the client ----------------------------------------------------------------------------------
class JobsClient:
    """Ray's Jobs REST API at an application URL. Requests are not retried (submissions are not
    idempotent); callers that wait poll with deadlines. Use as a context manager."""

    def __init__(self, endpoint: AppEndpoint, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint
        self._http = endpoint.http_client()
        self._clock = clock

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"JobsClient({self.endpoint.url!r})"

    # -- requests -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, job: str | None = None, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise JobsError(
                f"{method} {self.endpoint.url}{path}: no answer within {self.endpoint.timeout:g}s"
            ) from None
        except httpx.TransportError as err:
            raise AccessError(
                f"cannot reach the head at {self.endpoint.url} ({type(err).__name__}: {err}); "
                "is the cluster up (`ray-cai status`)?"
            ) from None
        if response.is_success:
            return response
        status = response.status_code
        if status in (401, 403):
            raise AccessError(
                f"{self.endpoint.url} refused the API key (HTTP {status}); check CML_API_KEY "
                "(an API v2 key of a user who can open the application)"
            )
        if status == 404 and job is not None:
            raise JobNotFound(f"no job {job!r} on the cluster (`ray-cai job list` shows the jobs)")
        if status == 503 and "not reachable yet" in response.text:
            raise JobsError(
                f"the Ray dashboard on the head is not up yet ({self.endpoint.url}); retry shortly"
            )
        raise JobsError(f"{method} {path} answered HTTP {status}: {_ray_error_text(response)}")

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "?").split(";")[0]
            raise JobsError(
                f"{response.request.method} {response.request.url.path} answered {kind}, not JSON: "
                f"is {self.endpoint.url} the head of a Ray cluster?"
            ) from None

    @staticmethod
    def _job_path(submission_id: str, suffix: str = "") -> str:
        return f"/api/jobs/{quote(submission_id, safe='')}{suffix}"

    def version(self) -> dict[str, Any]:
        """`GET /api/version`: the cluster's Ray version (a cheap reachability check)."""
        return dict(self._json(self._request("GET", "/api/version")))

    def submit(self, submission: JobSubmission) -> str:
        """Submit; returns the submission id. The id is chosen here when not given, so a broken
        connection leaves an id to check (`get`) instead of a job that may or may not exist."""
        submission.validate()
        if submission.submission_id is None:
            submission = JobSubmission(**{**submission.__dict__, "submission_id": new_submission_id()})
        assert submission.submission_id is not None
        try:
            response = self._http.post("/api/jobs/", json=submission.body())
        except httpx.TransportError as err:
            raise JobsError(
                f"the connection to {self.endpoint.url} broke while submitting ({type(err).__name__}); "
                f"the job may have been submitted: check `ray-cai job status {submission.submission_id}`"
            ) from None
        if not response.is_success:
            if response.status_code in (401, 403):
                raise AccessError(f"{self.endpoint.url} refused the API key (HTTP {response.status_code})")
            raise JobsError(f"Ray refused the job (HTTP {response.status_code}): {_ray_error_text(response)}")
        return str(self._json(response).get("submission_id") or submission.submission_id)

    def get(self, submission_id: str) -> JobInfo:
        response = self._request("GET", self._job_path(submission_id), job=submission_id)
        return JobInfo.from_api(self._json(response))

    def list(self) -> list[JobInfo]:
        """Every job Ray knows: submitted jobs and drivers started by `ray.init` clients."""
        rows = self._json(self._request("GET", "/api/jobs/"))
        return [JobInfo.from_api(row) for row in rows]

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job; False when it had already ended."""
        response = self._request("POST", self._job_path(submission_id, "/stop"), job=submission_id)
        return bool(self._json(response).get("stopped"))

    def logs(self, submission_id: str) -> str:
        """Everything the job's driver has printed so far."""
        response = self._request("GET", self._job_path(submission_id, "/logs"), job=submission_id)
        return str(self._json(response).get("logs") or "")

    # -- waiting ------------------------------------------------------------------------------
    def wait(
        self,
        submission_id: str,
        *,
        timeout: float,
        interval: float = 0.5,
        until: frozenset[str] | None = None,
    ) -> JobInfo:
        """Poll until the job's status is in `until` (default: ended); `WaitTimeout` after `timeout`."""
        wanted = until or TERMINAL_STATUSES
        last: list[JobInfo] = []

        def check() -> JobInfo | None:
            info = self.get(submission_id)
            last[:] = [info]
            return info if info.status in wanted else None

        return poll_until(
            check,
            timeout=timeout,
            interval=interval,
            max_interval=2.0,
            backoff=1.5,
            what=f"job {submission_id} to be {'/'.join(sorted(wanted))}",
            describe_last=lambda: f"last status {last[0].status}" if last else "",
        )

    def tail(self, submission_id: str, *, deadline: float | None = None) -> Iterator[str]:
        """Yield the job's log chunks as the driver prints them (Ray's WebSocket tail), from the start,
        until the job ends (the server closes) or `deadline` (a `clock()` value) passes (`WaitTimeout`).

        Raises `LogStreamUnavailable` when the upgrade is refused (nothing was yielded) and
        `JobNotFound` for an unknown id.
        """
        try:
            from websockets.exceptions import ConnectionClosedOK, InvalidStatus, WebSocketException
        except ImportError:
            raise LogStreamUnavailable("the websockets package is not installed") from None

        path = TAIL_PATH.format(id=quote(submission_id, safe=""))
        try:
            connection = self.endpoint.websocket(path)
        except InvalidStatus as err:
            status = err.response.status_code
            if status == 404:
                raise JobNotFound(f"no job {submission_id!r} on the cluster") from None
            # Anything else (a 403 from a gateway that refuses upgrades, a 500 from a proxy that drops
            # them) means no stream here; the polling fallback reports a truly refused key itself.
            raise LogStreamUnavailable(f"the log stream answered HTTP {status}") from None
        except (OSError, WebSocketException, TimeoutError) as err:
            raise LogStreamUnavailable(f"the log stream could not be opened ({type(err).__name__})") from None
        with connection:
            while True:
                if deadline is not None and self._clock() >= deadline:
                    raise WaitTimeout(f"stopped following job {submission_id}: the deadline passed")
                try:
                    message = connection.recv(timeout=1.0)
                except TimeoutError:
                    continue  # nothing printed this second; check the deadline and Ctrl-C, then wait again
                except ConnectionClosedOK:
                    return
                except WebSocketException as err:
                    raise LogStreamUnavailable(f"the log stream broke ({type(err).__name__})") from None
                yield message if isinstance(message, str) else message.decode("utf-8", "replace")

    def follow(
        self,
        submission_id: str,
        on_output: Callable[[str], None],
        *,
        timeout: float | None = None,
        on_notice: Callable[[str], None] = lambda _: None,
        poll_interval: float = 1.0,
    ) -> JobInfo:
        """Pass the job's logs to `on_output` as they come, until the job ends; return its final state.

        `timeout` None means until the job ends (Ctrl-C, a `KeyboardInterrupt`, stops following, never
        the job). Uses the WebSocket tail; where it cannot be opened or breaks, polls the logs every
        `poll_interval` seconds and passes on what is new (said once through `on_notice`).
        """
        deadline = None if timeout is None else self._clock() + timeout
        printed = 0
        try:
            for chunk in self.tail(submission_id, deadline=deadline):
                on_output(chunk)
                printed += len(chunk)
        except LogStreamUnavailable as err:
            on_notice(f"{err}; polling the logs every {poll_interval:g}s instead")
            return self._follow_by_polling(submission_id, on_output, printed, deadline, poll_interval)
        # The tail ends once Ray has seen the job end; its status is already (or about to be) final.
        return self.wait(submission_id, timeout=30)

    def _follow_by_polling(
        self,
        submission_id: str,
        on_output: Callable[[str], None],
        printed: int,
        deadline: float | None,
        interval: float,
    ) -> JobInfo:
        shown = [printed]

        def check() -> JobInfo | None:
            info = self.get(submission_id)  # status first: logs read after it hold everything it printed
            text = self.logs(submission_id)
            if len(text) > shown[0]:
                on_output(text[shown[0] :])
                shown[0] = len(text)
            return info if info.is_terminal else None

        remaining = math.inf if deadline is None else max(0.0, deadline - self._clock())
        return poll_until(
            check, timeout=remaining, interval=interval, what=f"job {submission_id} to end", clock=self._clock
        )


# -- packages (needs Ray) ------------------------------------------------------------------------
def check_local_packages(runtime_env: Mapping[str, Any]) -> list[str]:
    """The local `working_dir` / `py_modules` paths to upload; `JobInputError` (before anything is
    sent) when one does not exist or Ray, whose packaging the upload uses, is not installed here."""
    paths = local_packages(runtime_env)
    for path in paths:
        if not Path(path).exists():
            raise JobInputError(f"--runtime-env: {path!r} (working_dir/py_modules) does not exist")
    if paths:
        try:
            from ray.dashboard.modules.dashboard_sdk import SubmissionClient  # noqa: F401
        except ImportError:
            local = ", ".join(repr(p) for p in paths)
            raise JobInputError(
                f"--runtime-env: working_dir/py_modules {local} is a local path, uploaded with Ray's own "
                "packaging, and Ray is not installed here: pip install 'ray[default]==2.60.*' (or commit "
                "and deploy the code: jobs run in the project directory)"
            ) from None
    return paths


def upload_local_packages(endpoint: AppEndpoint, runtime_env: dict[str, Any]) -> dict[str, Any]:
    """Upload a local `working_dir` / `py_modules` through the app URL with Ray's own packaging
    (what `ray job submit --working-dir` does) and return the runtime env with their `gcs://` URIs.

    Needs Ray on this machine: the package format and its content hash are Ray's
    (`check_local_packages` says so before anything is sent).
    """
    paths = check_local_packages(runtime_env)
    if not paths:
        return runtime_env
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient

    env = json.loads(json.dumps(runtime_env))  # Ray rewrites the paths in place: work on a copy
    try:
        client = SubmissionClient(address=endpoint.url, headers=endpoint.headers, verify=endpoint.verify)
        client._upload_working_dir_if_needed(env)
        client._upload_py_modules_if_needed(env)
    except Exception as err:  # Ray raises RuntimeError, ConnectionError or requests' errors here
        lines = str(err).replace(endpoint.api_key, "[redacted]").strip().splitlines()
        raise JobsError(
            f"uploading {', '.join(paths)} failed: {lines[-1] if lines else type(err).__name__}"
        ) from None
    return dict(env)


__all__ = [
    "FAILED",
    "PENDING",
    "RUNNING",
    "STOPPED",
    "SUCCEEDED",
    "TERMINAL_STATUSES",
    "JobInfo",
    "JobInputError",
    "JobNotFound",
    "JobSubmission",
    "JobsClient",
    "JobsError",
    "LogStreamUnavailable",
    "check_local_packages",
    "load_runtime_env",
    "local_packages",
    "new_submission_id",
    "upload_local_packages",
]
