"""Helpers for tests that need a real workspace: a handle with raw API access and the test controls.

Used by `tests/conftest.py` (fixtures `workspace`, `workspace_env`); tests of other layers can use
`WorkspaceHandle` directly. The API key is never part of `repr` or of any assertion message here.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from ray_serve_cai.workspace.daemon import WorkspaceInfo
from ray_serve_cai.workspace.processes import WORKLOAD_MARKER, processes_with_marker

TERMINAL_RUN_STATUSES = frozenset(
    {"ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_TIMEDOUT", "ENGINE_STOPPED", "ENGINE_SKIPPED"}
)


class WorkspaceHandle:
    """A running workspace seen from a test: `api()` for raw calls with the bearer key, plus controls."""

    def __init__(self, info: WorkspaceInfo) -> None:
        self.info = info
        self.url = info.url
        self.api_key = info.api_key
        self.home = info.home
        self.port = info.port
        self.domain = info.domain
        self._client = httpx.Client(
            base_url=info.url,
            headers={"Authorization": f"Bearer {info.api_key}"},
            timeout=httpx.Timeout(60.0),
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"WorkspaceHandle(url={self.url!r}, home={str(self.home)!r})"

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------ raw API

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One raw request (path relative to the workspace URL) with the bearer key."""
        return self._client.request(method, path, **kwargs)

    def api_ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.api(method, path, **kwargs)
        assert response.status_code == 200, f"{method} {path} -> {response.status_code}: {response.text}"
        return response.json()

    def app_request(self, app: dict[str, Any], method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request to an application (its API object) at its own URL, with the bearer key."""
        return self._client.request(method, f"{app['url']}{path}", **kwargs)

    # ------------------------------------------------------------ test controls

    def counters(self) -> dict[str, Any]:
        return self.api_ok("GET", "/_workspace/counters")

    def reset_counters(self) -> None:
        self.api_ok("POST", "/_workspace/counters:reset")

    def set_faults(self, **plan: Any) -> dict[str, Any]:
        return self.api_ok("PUT", "/_workspace/faults", json=plan)

    def clear_faults(self) -> None:
        self.api_ok("DELETE", "/_workspace/faults")

    def set_latency(self, **latency: float) -> dict[str, Any]:
        return self.api_ok("PUT", "/_workspace/latency", json=latency)

    def restart_policy(self) -> dict[str, Any]:
        """CML's automatic restart of failed apps: policy, pending restarts, attempts by app id."""
        return self.api_ok("GET", "/_workspace/restart-policy")

    def set_restart_policy(self, **policy: Any) -> dict[str, Any]:
        """E.g. `set_restart_policy(enabled=True, max_attempts=1, delay_seconds=0.5)`."""
        return self.api_ok("PUT", "/_workspace/restart-policy", json=policy)

    def reset_controls(self) -> None:
        self.clear_faults()
        self.set_latency()
        if self.info.network == "pods":
            self.heal_network()
        self.api_ok("DELETE", "/_workspace/restart-policy")
        self.api_ok("DELETE", "/_workspace/app-urls")
        self.reset_counters()

    def set_app_urls(self, **policy: Any) -> dict[str, Any]:
        """E.g. `set_app_urls(websocket_upgrades=False)`: app URLs refuse WebSocket upgrades."""
        return self.api_ok("PUT", "/_workspace/app-urls", json=policy)

    def processes(self) -> list[int]:
        return list(self.api_ok("GET", "/_workspace/processes")["pids"])

    # ------------------------------------------------------------ pods and network faults

    @property
    def pods(self) -> bool:
        """True when every workload runs in its own pod (see `ray_serve_cai.workspace.pods`)."""
        return self.info.network == "pods"

    def network(self) -> dict[str, Any]:
        """`{"network": "pods"|"shared-host", "reason", "pod_cidr", "pods": [ips], "faults": [...]}`."""
        return self.api_ok("GET", "/_workspace/network")

    def partition(self, applications: Iterable[str], seconds: float = 0) -> dict[str, Any]:
        """Cut these applications' pods (ids or names) off from every pod and the workspace for
        `seconds` (0: until `heal_network`)."""
        body = {"applications": list(applications), "seconds": seconds}
        return self.api_ok("POST", "/_workspace/network/partition", json=body)

    def shape_network(
        self,
        applications: Iterable[str],
        *,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss_percent: float = 0,
        seconds: float = 0,
    ) -> dict[str, Any]:
        """`tc netem` on these applications' pod links for `seconds` (0: until `heal_network`)."""
        body = {
            "applications": list(applications),
            "delay_ms": delay_ms,
            "jitter_ms": jitter_ms,
            "loss_percent": loss_percent,
            "seconds": seconds,
        }
        return self.api_ok("POST", "/_workspace/network/shape", json=body)

    def heal_network(self) -> dict[str, Any]:
        return self.api_ok("DELETE", "/_workspace/network")

    @staticmethod
    def host_pids(workload_id: str, pids: dict[str, int]) -> dict[str, int]:
        """The host's pids of a workload's processes that recorded their own pids: inside a pod a
        process sees the pod's pid namespace. Same pids in shared-host mode; unknown ones kept."""
        table: dict[int, int] = {}
        for process in processes_with_marker(WORKLOAD_MARKER, workload_id):
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
            except OSError:
                continue
            line = next((ln for ln in status.splitlines() if ln.startswith("NSpid:")), "")
            if line.split()[1:]:
                table[int(line.split()[-1])] = process.pid
        return {name: table.get(pid, pid) for name, pid in pids.items()}

    # ------------------------------------------------------------ conveniences

    def runtime_identifier(self, edition: str = "Standard") -> str:
        runtimes = self.api_ok("GET", "/api/v2/runtimes", params={"page_size": 100})["runtimes"]
        return next(r["image_identifier"] for r in runtimes if r["edition"] == edition)

    def project_dir(self, project_id: str) -> Path:
        return self.home / "projects" / project_id

    def create_project(
        self, name: str, *, files_from: Path | None = None, timeout: float = 30.0, **fields: Any
    ) -> dict[str, Any]:
        """Create a project — from `git_url` when the fields give one (the spec's way: no template), else
        a `local` one (unless `fields` say otherwise) — wait for success, copy files in."""
        body = {"name": name, **({} if "git_url" in fields else {"template": "local"}), **fields}
        project = self.api_ok("POST", "/api/v2/projects", json=body)
        project = self.wait_for(
            lambda: self.api_ok("GET", f"/api/v2/projects/{project['id']}"),
            lambda p: p["creation_status"] != "creating",
            timeout=timeout,
            what=f"project {name} creation",
        )
        if files_from is not None:
            shutil.copytree(files_from, self.project_dir(project["id"]), dirs_exist_ok=True)
        return project

    def wait_for(
        self,
        fetch: Callable[[], Any],
        done: Callable[[Any], bool],
        *,
        timeout: float = 30.0,
        interval: float = 0.05,
        what: str = "condition",
    ) -> Any:
        deadline = time.monotonic() + timeout
        value = fetch()
        while not done(value):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {value!r}")
            time.sleep(interval)
            value = fetch()
        return value

    def wait_for_run(
        self, project_id: str, job_id: str, run_id: str, statuses: Iterable[str] = TERMINAL_RUN_STATUSES,
        timeout: float = 30.0,
    ) -> dict[str, Any]:  # fmt: skip
        wanted = set(statuses)
        return self.wait_for(
            lambda: self.api_ok("GET", f"/api/v2/projects/{project_id}/jobs/{job_id}/runs/{run_id}"),
            lambda run: run["status"] in wanted,
            timeout=timeout,
            what=f"run {run_id} to reach {sorted(wanted)}",
        )

    def wait_for_app(
        self, project_id: str, app_id: str, statuses: Iterable[str], timeout: float = 30.0
    ) -> dict[str, Any]:
        wanted = set(statuses)
        return self.wait_for(
            lambda: self.api_ok("GET", f"/api/v2/projects/{project_id}/applications/{app_id}"),
            lambda app: app["status"] in wanted,
            timeout=timeout,
            what=f"application {app_id} to reach {sorted(wanted)}",
        )
