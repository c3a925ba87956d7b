"""Serve's REST API (`/api/serve/applications/`) through the head's application URL.

Requests carry the CML API key (what CML's login lets through); the head's HTTP server strips it and
adds the Ray token for the dashboard, so nothing here knows the token. GET reads every application
(with the exact config each was deployed with), PUT applies a whole config declaratively (Serve
deletes the REST-deployed applications the body leaves out), DELETE shuts Serve down.
"""

from __future__ import annotations

from typing import Any

from ray_serve_cai.cml import CMLClient, CMLError
from ray_serve_cai.config.errors import ConfigError
from ray_serve_cai.config.serve import serve_rejection_problems
from ray_serve_cai.errors import OperationFailed

APPLICATIONS_PATH = "/api/serve/applications/"  # Serve registers the route with the trailing slash
ACTORS_PATH = "/api/v0/actors"  # Ray's state API
SERVE_CONTROLLER_ACTOR = "SERVE_CONTROLLER_ACTOR"  # ray.serve._private.constants.SERVE_CONTROLLER_NAME


class ServeAPIError(OperationFailed):
    """Serve's REST API could not be reached or failed (exit code 1)."""


# Serve starts on demand: the first PUT answers once Serve's controller and proxies run (seconds; on a
# loaded node, a minute or more).
SERVE_START_SECONDS = 180.0


class ServeRejected(ConfigError):
    """Serve refused the config (HTTP 400); the problems name its fields like the local check (exit 2)."""


class ServeAPI:
    """Serve's REST API of one cluster, reached through its head application `head` (the app name)."""

    def __init__(self, client: CMLClient, head: str, *, timeout: float = 60.0) -> None:
        self.client = client
        self.head = head
        self.timeout = timeout

    def _request(
        self, method: str, path: str = APPLICATIONS_PATH, *, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        try:
            response = self.client.app_request(
                self.head, method, path, timeout=timeout or self.timeout, **kwargs
            )
        except CMLError as err:
            raise ServeAPIError(f"Serve's REST API on {self.head} is unreachable: {err}") from None
        if response.status_code == 501:
            raise ServeAPIError(
                f"the nodes of {self.head} have no Ray Serve (HTTP 501): the environment setup installs "
                "the `ray` extra of ray-serve-cai, which brings ray[serve]; run the setup job again"
            )
        return response

    def details(self) -> dict[str, Any]:
        """`GET`: Serve's instance details (applications, their status, message and deployed config)."""
        response = self._request("GET")
        if response.status_code != 200:
            raise ServeAPIError(
                f"GET {APPLICATIONS_PATH} on {self.head} answered HTTP {response.status_code}: "
                f"{response.text.strip()[:300]}"
            )
        try:
            return dict(response.json())
        except ValueError:
            raise ServeAPIError(f"GET {APPLICATIONS_PATH} on {self.head} answered non-JSON") from None

    def controller_state(self) -> str | None:
        """The state of Serve's controller actor in the GCS (`ALIVE`, `RESTARTING`, ... ; a live one
        before a dead one), None when there is none (Ray's state API, `/api/v0/actors`)."""
        params = {
            "filter_keys": "name",
            "filter_predicates": "=",
            "filter_values": SERVE_CONTROLLER_ACTOR,
            "detail": "false",
        }
        response = self._request("GET", ACTORS_PATH, params=params)
        if response.status_code != 200:
            raise ServeAPIError(f"GET {ACTORS_PATH} on {self.head} answered HTTP {response.status_code}")
        try:
            rows = response.json()["data"]["result"]["result"]
        except (ValueError, KeyError, TypeError):
            raise ServeAPIError(f"GET {ACTORS_PATH} on {self.head} answered an unexpected body") from None
        states = [str(row.get("state")) for row in rows if isinstance(row, dict)]
        return next((s for s in states if s != "DEAD"), states[0] if states else None)

    def deploy(self, body: dict[str, Any], *, source: str = "serve config") -> None:
        """`PUT` the whole config; a 400 raises `ServeRejected` with Serve's problems and field paths.
        The first PUT of a cluster starts Serve (its controller, then its proxies) before it answers."""
        response = self._request("PUT", json=body, timeout=max(self.timeout, SERVE_START_SECONDS))
        if response.status_code == 400:
            raise ServeRejected(serve_rejection_problems(response.text), f"{source} (refused by Serve)")
        if response.status_code != 200:
            raise ServeAPIError(
                f"PUT {APPLICATIONS_PATH} on {self.head} answered HTTP {response.status_code}: "
                f"{response.text.strip()[:300]}"
            )

    def delete(self) -> None:
        """`DELETE`: shut Serve down, removing every application."""
        response = self._request("DELETE")
        if response.status_code != 200:
            raise ServeAPIError(
                f"DELETE {APPLICATIONS_PATH} on {self.head} answered HTTP {response.status_code}: "
                f"{response.text.strip()[:300]}"
            )


__all__ = ["APPLICATIONS_PATH", "SERVE_CONTROLLER_ACTOR", "ServeAPI", "ServeAPIError", "ServeRejected"]
