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

import contextlib
import getpass
import json
import math
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from ruamel.yaml import YAML, YAMLError

from ray_serve_cai.access.head import AccessError, AppEndpoint
from ray_serve_cai.config.history import (
    META_ATTEMPT,
    META_DEADLINE,
    META_MAX_RETRIES,
    META_RECORD,
    META_RUN,
    META_SUBMITTER,
    META_TIMEOUT,
    deadline_message,
    retry_id,
)
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


DRIVER_PLACES = ("auto", "workers", "head")
# Ray's error type when its job monitor fails on an unexpected (e.g. transient, during failover) error.
FAILOVER_ERROR_TYPES = frozenset({"JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE"})
HEAD_RESOURCE = "node:__internal_head__"  # every Ray head has it (1.0)
HEAD_RESOURCE_AMOUNT = 0.001
GROUP_LABEL = "ray-cai.group"  # the node label every ray-cai node carries (`head` on the head)


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
    # Where the driver runs: "auto" (a worker when the head has fault tolerance on, the cluster has a
    # worker and no entrypoint resources are given, so the job outlives a head restart; else Ray's
    # default, the head), "workers", "head".
    driver: str = "auto"
    entrypoint_label_selector: dict[str, str] | None = None

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
        if self.driver not in DRIVER_PLACES:
            raise JobInputError(f"--driver-on: {self.driver!r} is not one of {', '.join(DRIVER_PLACES)}")

    @property
    def placed_by_user(self) -> bool:
        """Entrypoint resources or a label selector place the driver (Ray then does not pin it)."""
        return bool(
            self.entrypoint_num_cpus or self.entrypoint_num_gpus or self.entrypoint_memory
            or self.entrypoint_resources or self.entrypoint_label_selector
        )  # fmt: skip

    def placed(self, on_workers: bool) -> JobSubmission:
        """The submission with its driver placed: on the head Ray's `node:__internal_head__`
        resource pins it; on a worker a label selector keeps it off the head (group `head`)."""
        if self.driver == "head":
            resources = {**(self.entrypoint_resources or {}), HEAD_RESOURCE: HEAD_RESOURCE_AMOUNT}
            return replace(self, entrypoint_resources=resources)
        if self.driver == "workers" or (on_workers and not self.placed_by_user):
            selector = {**(self.entrypoint_label_selector or {}), GROUP_LABEL: "!head"}
            return replace(self, entrypoint_label_selector=selector)
        return self

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
            "entrypoint_label_selector": self.entrypoint_label_selector,
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
        if isinstance(body, dict) and (body.get("message") or body.get("error")):
            return str(body.get("message") or body.get("error"))
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
            submission = replace(submission, submission_id=new_submission_id())
        assert submission.submission_id is not None
        automatic = submission.driver == "auto" and not submission.placed_by_user
        submission = submission.placed(automatic and self.drivers_belong_on_workers())
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

    def drivers_belong_on_workers(self) -> bool:
        """Whether a driver is better off on a worker (the head's `/ray-cai/status`): the head has
        fault tolerance on (else a head restart loses the job wherever its driver runs) and Ray has
        an alive node besides the head. False when the head cannot say (Ray's default applies)."""
        try:
            response = self._http.get("/ray-cai/status", timeout=10)
            body = response.json() if response.is_success else {}
        except (httpx.HTTPError, ValueError):
            return False
        if not isinstance(body, dict) or not (body.get("head_fault_tolerance") or {}).get("enabled"):
            return False
        nodes = body.get("nodes") or []
        return any(isinstance(node, dict) and node.get("alive") and not node.get("is_head") for node in nodes)

    def get(self, submission_id: str) -> JobInfo:
        response = self._request("GET", self._job_path(submission_id), job=submission_id)
        return self._failover_checked(JobInfo.from_api(self._json(response)))

    def _failover_checked(self, info: JobInfo) -> JobInfo:
        """Ray 2.60 can mark a live job FAILED on a transient error while its head fails over
        (ray#65025: the job monitor's "Unexpected error occurred"). When the job's supervisor actor
        still lives, the job runs: say RUNNING, and why Ray says otherwise."""
        if info.status != FAILED or info.raw.get("error_type") not in FAILOVER_ERROR_TYPES:
            return info
        if not info.submission_id or not self.supervisor_alive(info.submission_id):
            return info
        note = (
            "still running: Ray marked it FAILED during a head failover (ray#65025) but its "
            f"driver's supervisor lives; Ray said: {info.message.strip()}"
        )
        return replace(info, status=RUNNING, message=note, end_time=None, raw={**info.raw, "status": RUNNING,
                       "message": note})  # fmt: skip

    def supervisor_alive(self, submission_id: str) -> bool:
        """Whether the job's supervisor actor (which runs its driver) is ALIVE (Ray's state API)."""
        params = {
            "filter_keys": "name", "filter_predicates": "=",
            "filter_values": f"_ray_internal_job_actor_{submission_id}", "detail": "false",
        }  # fmt: skip
        try:
            response = self._http.get("/api/v0/actors", params=params, timeout=10)
            rows = response.json()["data"]["result"]["result"] if response.is_success else []
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return False
        return any(isinstance(row, dict) and row.get("state") == "ALIVE" for row in rows)

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


# -- retries and deadlines -----------------------------------------------------------------------
def who_submits() -> str:
    """`user@host` of this process: who submitted a job, as its record says."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class JobPolicy:
    """What the tool adds to Ray's job: retries on failure and a deadline over every attempt."""

    max_retries: int = 0
    timeout: float | None = None  # seconds from the first submission; None: no deadline

    def validate(self) -> None:
        if self.max_retries < 0:
            raise JobInputError(f"--max-retries: must be 0 or more, got {self.max_retries}")
        if self.timeout is not None and (not math.isfinite(self.timeout) or self.timeout <= 0):
            raise JobInputError(f"--timeout: must be more than 0 seconds, got {self.timeout:g}")


@dataclass(frozen=True)
class Outcome:
    """How a record ended: its status (a stop at the deadline is FAILED), why, and every attempt."""

    record_id: str
    status: str
    message: str
    attempts: tuple[JobInfo, ...]

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    def summary(self) -> str:
        tries = f" after {len(self.attempts)} attempts" if len(self.attempts) > 1 else ""
        line = f"job {self.record_id} {self.status}{tries}"
        if self.status != SUCCEEDED and self.message:
            line += f": {self.message.strip().splitlines()[0]}"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "submission_id": self.record_id,
            "status": self.status,
            "message": self.message,
            "attempts": [a.submission_id for a in self.attempts],
        }


class ManagedJob:
    """One job submitted through the tool: its attempts (a retry is a new Ray job `<id>-retry<n>`)
    and its deadline. What the head records about it (`ray_serve_cai.config.history`) travels in each
    attempt's Ray `metadata`, so a second client (or this one after a crash) finds it again with
    `attach`, and the head can enforce the deadline when no client is left."""

    def __init__(
        self,
        jobs: JobsClient,
        request: JobSubmission,
        policy: JobPolicy = JobPolicy(),
        *,
        run_id: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if request.submission_id is None:
            request = replace(request, submission_id=new_submission_id())
        assert request.submission_id is not None
        self.jobs = jobs
        self.request = request
        self.policy = policy
        self.run_id = run_id
        self.record_id: str = request.submission_id
        self.deadline: float | None = None
        self.submitter = who_submits()
        self._now = wall_clock
        self.attempts: list[JobInfo] = []

    def _metadata(self, attempt: int) -> dict[str, str]:
        metadata = dict(self.request.metadata or {})
        metadata.update(
            {
                META_RECORD: self.record_id,
                META_ATTEMPT: str(attempt),
                META_SUBMITTER: self.submitter,
                META_MAX_RETRIES: str(self.policy.max_retries),
            }
        )
        if self.run_id:
            metadata[META_RUN] = self.run_id
        if self.deadline is not None:
            metadata[META_DEADLINE] = f"{self.deadline:.3f}"
            metadata[META_TIMEOUT] = f"{self.policy.timeout:g}"
        return metadata

    def submit(self) -> str:
        """Submit the first attempt (a submission id Ray already has is joined, not repeated)."""
        if self.policy.timeout is not None:
            self.deadline = self._now() + self.policy.timeout
        return self._submit_attempt(1)

    def _submit_attempt(self, attempt: int) -> str:
        submission_id = retry_id(self.record_id, attempt)
        request = replace(self.request, submission_id=submission_id, metadata=self._metadata(attempt))
        try:
            self.jobs.submit(request)
        except JobsError as err:
            try:
                existing = self.jobs.get(submission_id)  # a lost answer, or a second client: join it
            except JobNotFound:
                raise err from None
            self.attempts.append(existing)
            return submission_id
        self.attempts.append(self.jobs.get(submission_id))
        return submission_id

    def attach(self) -> bool:
        """Find this record's attempts on the cluster (by the metadata); False when there are none.
        The deadline and retry budget are the ones the first submission set."""
        mine = [
            job
            for job in self.jobs.list()
            if (job.raw.get("metadata") or {}).get(META_RECORD) == self.record_id
        ]
        if not mine:
            return False
        mine.sort(key=lambda j: int((j.raw.get("metadata") or {}).get(META_ATTEMPT) or 1))
        first = mine[0].raw.get("metadata") or {}
        deadline = first.get(META_DEADLINE)
        self.deadline = float(deadline) if deadline else None
        self.attempts = mine
        return True

    @property
    def current(self) -> str:
        return self.attempts[-1].submission_id or self.record_id if self.attempts else self.record_id

    def _deadline_passed(self) -> bool:
        return self.deadline is not None and self._now() >= self.deadline - 0.5

    def follow(
        self,
        on_output: Callable[[str], None],
        *,
        on_notice: Callable[[str], None] = lambda _: None,
    ) -> Outcome:
        """Follow the current attempt's logs until the record ends: a FAILED attempt is retried while
        the budget lasts (never a STOPPED one: a stop by the user is final); when the deadline passes
        the attempt is stopped and the record is FAILED with the deadline as the reason.
        `KeyboardInterrupt` passes through (the caller decides whether to stop the job)."""
        while True:
            attempt = len(self.attempts)
            submission_id = self.current
            remaining = None if self.deadline is None else max(0.0, self.deadline - self._now())
            try:
                final = self.jobs.follow(submission_id, on_output, timeout=remaining, on_notice=on_notice)
            except WaitTimeout:
                final = self._stop_at_deadline(submission_id, on_notice)
            self.attempts[-1] = final
            if final.status == SUCCEEDED:
                return self._outcome(SUCCEEDED, final.message)
            if final.status == STOPPED and self._deadline_passed():
                return self._outcome(FAILED, deadline_message(self.policy.timeout))
            if final.status == STOPPED:
                return self._outcome(STOPPED, final.message or "stopped")
            if attempt > self.policy.max_retries or self._deadline_passed():
                return self._outcome(FAILED, final.message)
            on_notice(
                f"attempt {attempt} of job {self.record_id} FAILED; retrying "
                f"({attempt} of {self.policy.max_retries} retries)"
            )
            self._submit_attempt(attempt + 1)

    def _stop_at_deadline(self, submission_id: str, on_notice: Callable[[str], None]) -> JobInfo:
        on_notice(f"the deadline of job {self.record_id} passed: stopping {submission_id}")
        with contextlib.suppress(JobsError):
            self.jobs.stop(submission_id)
        try:
            return self.jobs.wait(submission_id, timeout=60)
        except WaitTimeout:
            return self.jobs.get(submission_id)

    def stop(self, timeout: float = 60) -> JobInfo | None:
        """Stop the current attempt (Ctrl-C of a run) and wait until Ray says it ended."""
        if not self.attempts:
            return None
        submission_id = self.current
        with contextlib.suppress(JobsError):
            self.jobs.stop(submission_id)
        try:
            final = self.jobs.wait(submission_id, timeout=timeout)
        except WaitTimeout:
            final = self.jobs.get(submission_id)
        self.attempts[-1] = final
        return final

    def _outcome(self, status: str, message: str) -> Outcome:
        return Outcome(self.record_id, status, message, tuple(self.attempts))


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
    "JobPolicy",
    "JobSubmission",
    "JobsClient",
    "JobsError",
    "LogStreamUnavailable",
    "ManagedJob",
    "Outcome",
    "check_local_packages",
    "load_runtime_env",
    "local_packages",
    "new_submission_id",
    "upload_local_packages",
    "who_submits",
]
