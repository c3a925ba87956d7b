"""A node's Ray logs through the head's application URL (the dashboard's log API, Ray 2.60).

`GET /api/v0/logs?node_id=...` lists a node's log files by kind; `GET /api/v0/logs/file?node_id=...
&filename=...&lines=N` returns the last N lines; `GET /api/v0/logs/stream?...&lines=N&interval=S`
keeps the response open and sends new lines as the file grows (a chunked HTTP response). Nodes are
named as the cluster names them (`ray-<cluster>-head`, `ray-<cluster>-<group>-<index>`, or just
`head`, `worker-0`); the head's status endpoint maps the names onto Ray node ids.

A job's driver writes `job-driver-<submission id>.log` on the node it runs on, which Ray's job info
names (`driver_node_id`); the head's file of that name holds only what Ray's job manager wrote there
before the driver started ("Runtime env is setting up."). With head fault tolerance the driver runs on
a worker (`ray-cai job submit --driver-on`), so `driver_node` finds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from ray_serve_cai.access.head import AccessError, AppEndpoint
from ray_serve_cai.access.jobs import (
    PENDING,
    RUNNING,
    TERMINAL_STATUSES,
    JobInputError,
    JobNotFound,
    JobsClient,
)
from ray_serve_cai.errors import OperationFailed, WaitTimeout

STATUS_PATH = "/ray-cai/status"
DEFAULT_FILE = "raylet.out"
# Ray's JOB_LOGS_PATH_TEMPLATE, `job-driver-{submission_id}.log`, with an id as `job submit` takes one.
DRIVER_LOG = re.compile(r"^job-driver-(?P<job>[A-Za-z0-9][A-Za-z0-9._:-]{0,127})\.log$")


class NodeLogsError(OperationFailed):
    """The logs could not be listed or read (exit code 1)."""


@dataclass(frozen=True)
class LoggedNode:
    """A Ray node whose logs can be read: as the head's status endpoint reports it."""

    name: str
    node_id: str
    alive: bool
    is_head: bool
    ip: str | None = None


def check_log_options(filename: str | None, tail: int) -> None:
    """`JobInputError` naming the flag, before anything is sent."""
    if filename is not None and (
        not filename.strip() or filename.startswith("/") or ".." in filename.split("/")
    ):
        raise JobInputError(
            f"--file: {filename!r} must be a file name relative to the node's Ray log directory"
        )
    if tail == 0 or tail < -1:
        raise JobInputError(
            f"--tail: must be a number of lines above 0 (or -1 for the whole file), got {tail}"
        )


def driver_log_job(filename: str) -> str | None:
    """The submission id a job driver's log file is named after (`job-driver-<id>.log`), else None."""
    found = DRIVER_LOG.match(filename)
    return found.group("job") if found else None


class NodeLogs:
    """The dashboard's log API at the head's application URL."""

    def __init__(self, endpoint: AppEndpoint) -> None:
        self.endpoint = endpoint
        self._http = endpoint.http_client()

    def __enter__(self) -> NodeLogs:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def _get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        try:
            response = self._http.get(path, params=params)
        except httpx.TransportError as err:
            raise AccessError(
                f"cannot reach the head at {self.endpoint.url} ({type(err).__name__})"
            ) from None
        if response.status_code in (401, 403):
            raise AccessError(f"{self.endpoint.url} refused the API key (HTTP {response.status_code})")
        return response

    def nodes(self) -> list[LoggedNode]:
        """The cluster's nodes (alive or dead) from the head's status endpoint."""
        response = self._get(STATUS_PATH)
        try:
            body = response.json()
        except ValueError:
            raise NodeLogsError(f"{self.endpoint.url}{STATUS_PATH} answered non-JSON") from None
        if response.status_code != 200:
            raise NodeLogsError(
                f"the head cannot list its nodes yet: {body.get('error') or response.status_code}"
            )
        return [
            LoggedNode(
                name=str(n.get("node_name") or n.get("node_id")),
                node_id=str(n.get("node_id")),
                alive=bool(n.get("alive")),
                is_head=bool(n.get("is_head")),
                ip=n.get("ip"),
            )
            for n in body.get("nodes", [])
            if n.get("node_id")
        ]

    def find_node(self, wanted: str | None, cluster: str) -> LoggedNode:
        """The node called `wanted` (a node name, its short form `head`/`worker-0`, or a Ray node id
        or a unique prefix of one); the head when None. Alive nodes win over dead ones of a name."""
        nodes = sorted(self.nodes(), key=lambda n: not n.alive)
        if wanted is None:
            found = [n for n in nodes if n.is_head]
        else:
            names = {wanted, wanted if wanted.startswith(f"ray-{cluster}-") else f"ray-{cluster}-{wanted}"}
            found = [n for n in nodes if n.name in names]
            if not found:
                found = [n for n in nodes if n.node_id.startswith(wanted)]
                if len({n.node_id for n in found}) > 1:
                    raise NodeLogsError(f"{wanted!r} matches {len(found)} node ids; give more of the id")
        if not found:
            known = ", ".join(sorted({n.name for n in nodes})) or "none"
            raise NodeLogsError(f"no node {wanted or 'head'!r} in cluster {cluster!r} (nodes: {known})")
        return found[0]

    def driver_node(self, submission_id: str, cluster: str, *, wait: float = 0) -> LoggedNode | None:
        """The node job `submission_id`'s driver runs (or ran) on, from Ray's job info. None when Ray
        does not know the job or its driver has not started (PENDING: the runtime env is being set
        up). With `wait` above 0, a PENDING job is waited for up to that many seconds, until it
        runs or ends (`WaitTimeout` names the job and its last status)."""
        with JobsClient(self.endpoint) as jobs:
            try:
                info = jobs.get(submission_id)
                if wait > 0 and info.status == PENDING:
                    started = frozenset({RUNNING}) | TERMINAL_STATUSES
                    info = jobs.wait(submission_id, timeout=wait, until=started)
            except JobNotFound:
                return None
        node_id = info.raw.get("driver_node_id")
        return self.find_node(str(node_id), cluster) if node_id else None

    def list_files(self, node: LoggedNode, glob: str = "*") -> dict[str, list[str]]:
        """The node's log files by kind (`raylet`, `gcs_server`, `worker_out`, ...)."""
        response = self._get("/api/v0/logs", {"node_id": node.node_id, "glob": glob})
        try:
            body = response.json()
        except ValueError:
            raise NodeLogsError(
                f"listing the logs of {node.name} answered HTTP {response.status_code}"
            ) from None
        if response.status_code != 200 or not body.get("result", False):
            raise NodeLogsError(
                f"listing the logs of {node.name} failed: {body.get('msg') or response.status_code}"
            )
        return {kind: list(files) for kind, files in (body.get("data", {}).get("result") or {}).items()}

    def _log_params(self, node: LoggedNode, filename: str, tail: int) -> dict[str, Any]:
        return {"node_id": node.node_id, "filename": filename, "lines": tail}

    def read(self, node: LoggedNode, filename: str = DEFAULT_FILE, *, tail: int = 1000) -> str:
        """The last `tail` lines of a log file of the node (-1: the whole file)."""
        response = self._get("/api/v0/logs/file", self._log_params(node, filename, tail))
        if response.status_code != 200:
            raise NodeLogsError(self._read_error(node, filename, response.text, response.status_code))
        return response.text

    @staticmethod
    def _read_error(node: LoggedNode, filename: str, text: str, status: int) -> str:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else f"HTTP {status}"
        if "not found" in text.lower() or "does not exist" in text.lower() or "No such file" in text:
            return f"no log file {filename!r} on {node.name} (`ray-cai logs {node.name} --list` lists them)"
        return f"reading {filename} of {node.name} failed (HTTP {status}): {detail[:300]}"

    def follow(
        self,
        node: LoggedNode,
        filename: str = DEFAULT_FILE,
        *,
        tail: int = 100,
        interval: float = 0.5,
        timeout: float | None = None,
    ) -> Iterator[str]:
        """Yield the last `tail` lines, then new text as the file grows (Ray's streaming response),
        until `timeout` seconds pass (`WaitTimeout`) or, with None, until the caller stops (Ctrl-C)
        or the stream ends (the node went away)."""
        params = {**self._log_params(node, filename, tail), "interval": interval}
        # Ray sends nothing while the file does not grow, so a read timeout is the deadline itself.
        try:
            with (
                self.endpoint.http_client(read_timeout=timeout) as http,
                http.stream("GET", "/api/v0/logs/stream", params=params) as response,
            ):
                if response.status_code in (401, 403):
                    raise AccessError(
                        f"{self.endpoint.url} refused the API key (HTTP {response.status_code})"
                    )
                if response.status_code != 200:
                    response.read()
                    raise NodeLogsError(self._read_error(node, filename, response.text, response.status_code))
                for chunk in response.iter_text():
                    if chunk:
                        yield chunk
        except httpx.ReadTimeout:
            raise WaitTimeout(f"stopped following {filename} of {node.name} after {timeout:g}s") from None
        except httpx.TransportError as err:
            raise AccessError(
                f"the log stream from {self.endpoint.url} broke ({type(err).__name__})"
            ) from None


__all__ = ["DEFAULT_FILE", "LoggedNode", "NodeLogs", "NodeLogsError", "check_log_options", "driver_log_job"]
