"""The head application's URL and HTTP/WebSocket clients for it, with the CML API key.

`find_head(client, project_id, cluster)` finds the running head application with one list call;
`AppEndpoint` holds its URL, the key and the TLS setting, and makes an `httpx.Client` (the package's
one HTTP construction, `cml.http_client`, as `CMLClient.app_request` uses) and WebSocket
connections that send `Authorization: Bearer <key>` (what CML's application gateway and the local
workspace's app listeners let through). The key never appears in a URL, a message or a `repr`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from ray_serve_cai.access.dashboard import DashboardError, find_head_application
from ray_serve_cai.cml import (
    APPLICATION_RUNNING,
    Application,
    CMLClient,
    CMLError,
    http_client,
    ssl_context,
)
from ray_serve_cai.cml._settings import is_loopback_name
from ray_serve_cai.config.node_status import HEALTH_PATH, STATUS_PATH, HeadStatus, NodeHealth
from ray_serve_cai.errors import OperationFailed

USER_AGENT = "ray-serve-cai-access"


class AccessError(OperationFailed):
    """The cluster could not be reached through its application URL (exit code 1)."""


@dataclass(frozen=True)
class AppEndpoint:
    """An application URL plus what a program needs to pass CML's login: the API key, the CA bundle."""

    url: str
    api_key: str = field(repr=False)
    verify: bool | str = True
    timeout: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/"))

    @classmethod
    def from_client(cls, client: CMLClient, url: str) -> AppEndpoint:
        settings = client.settings
        return cls(url, settings.api_key.get_secret_value(), settings.verify, settings.timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "User-Agent": USER_AGENT}

    @property
    def is_loopback(self) -> bool:
        return is_loopback_name(urlsplit(self.url).hostname or "")

    def ssl_context(self) -> ssl.SSLContext:
        """The package's one TLS context (`cml.ssl_context`) for this endpoint's setting."""
        return ssl_context(self.verify)

    def http_client(self, *, read_timeout: float | str | None = "default") -> httpx.Client:
        """A client with base URL, key and TLS set, made the one way the package talks HTTP to CML
        (`cml.http_client`: what `CMLClient.app_request` uses too). Streaming readers pass their
        own `read_timeout` (None: no limit on a silent stretch)."""
        read = self.timeout if read_timeout == "default" else read_timeout
        timeout = httpx.Timeout(self.timeout, read=read)  # type: ignore[arg-type]
        return http_client(
            self.url, api_key=self.api_key, verify=self.verify, timeout=timeout, user_agent=USER_AGENT
        )

    def websocket_url(self, path: str) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}{path}"

    def websocket(self, path: str, *, open_timeout: float | None = None) -> Any:
        """A `websockets.sync` client connection to `path` with the key sent in the handshake."""
        from websockets.sync.client import connect

        url = self.websocket_url(path)
        options: dict[str, Any] = {
            "additional_headers": self.headers,
            "open_timeout": open_timeout or self.timeout,
            "max_size": None,  # log chunks can be large; Ray sends each as one message
            # Ray 2.60's dashboard (aiohttp) fails to send permessage-deflate frames ("Cannot write
            # to closing transport") and closes the tail at once: never offer compression.
            "compression": None,
            "user_agent_header": USER_AGENT,
        }
        if url.startswith("wss://"):
            options["ssl"] = self.ssl_context()
        if self.is_loopback:
            options["proxy"] = None
        return connect(url, **options)


def find_head(client: CMLClient, project_id: str, cluster: str) -> Application:
    """The cluster's running head application (one list call); `AccessError` names what is wrong."""
    try:
        head = find_head_application(client, project_id, cluster)
    except CMLError as err:
        raise AccessError(f"cannot list the applications of project {project_id}: {err}") from None
    except DashboardError as err:
        raise AccessError(str(err)) from None
    if head.status != APPLICATION_RUNNING:
        status = (head.status or "unknown").removeprefix("APPLICATION_").lower()
        raise AccessError(
            f"the head application {head.name!r} is {status}, not running (see `ray-cai status`)"
        )
    return head


def head_endpoint(client: CMLClient, project_id: str, cluster: str) -> AppEndpoint:
    """Where the cluster's head answers: its application URL, reached with the client's API key."""
    return AppEndpoint.from_client(client, client.app_url(find_head(client, project_id, cluster)))


def read_head_status(client: CMLClient, head: str) -> tuple[dict[str, Any], str | None]:
    """Ray's view from the head's status endpoint (`STATUS_PATH`): (the view, None), or ({}, why
    not) when the head does not answer with it. One HTTP request, not an API call."""
    try:
        response = client.app_request(head, "GET", STATUS_PATH)
    except CMLError as err:
        return {}, f"head status endpoint unreachable: {err}"
    if response.status_code != 200:
        return {}, f"head status endpoint answered HTTP {response.status_code}"
    try:
        return HeadStatus.model_validate(response.json()).body(), None
    except ValueError:  # non-JSON, or JSON that is not the status model (ValidationError)
        return {}, "head status endpoint answered with something else than its status"


def read_node_error(client: CMLClient, node: str) -> str:
    """The last error a node's own health page reports ('' when it has none or does not answer)."""
    try:
        health = NodeHealth.model_validate(client.app_request(node, "GET", HEALTH_PATH, timeout=5).json())
    except (CMLError, ValueError):
        return ""
    return health.last_error or ""


__all__ = [
    "AccessError",
    "AppEndpoint",
    "find_head",
    "head_endpoint",
    "read_head_status",
    "read_node_error",
]
