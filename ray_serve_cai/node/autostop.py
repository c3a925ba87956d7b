"""Autostop, the head's part: is the cluster idle, for how long, and — past the timeout — act.

The head is the one part of a cluster that always runs, so it decides (as SkyPilot's skylet does).
Every `check_interval` seconds it asks Ray, in the head's pod:

- the Jobs API (`GET /api/jobs/` of the local dashboard, with the cluster's token): busy while a
  submitted job is PENDING or RUNNING, or a driver is connected (a Ray Client connection is a
  driver too; Ray's own, such as the dashboard's that starts Serve on demand, are not listed);
- the GCS (`GetClusterStatus`, what `ray status` shows): busy while tasks, actors or placement
  groups wait for resources;
- Serve: every request to Serve goes through the head's `/serve` mount (Serve runs HeadOnly on the
  head's loopback), where `ServeTraffic` notes when each application last answered — and how many
  requests are in flight (streams, WebSockets). A request counts as a busy moment.

The cluster is idle from the last busy moment on (`IdleClock`; a scale event of the autoscaler is
not a busy moment; the head's start and a changed setting are). A probe that cannot answer counts
as busy: the cluster never stops on a guess.
Once idle for `idle_timeout`, one more check confirms, then the action runs through the CML API
(`ray_serve_cai.cluster.autostop.run_action`: workers first, the head last). The setting is re-read
from the applied spec on the head application at every check, so `ray-cai autostop` changes it
without a restart. What the head measures is in `/ray-cai/status` under `autostop`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from ray_serve_cai.config import AutostopSpec, spec_from_applied
from ray_serve_cai.config.cluster import AUTOSTOP_DEFAULT_CHECK_INTERVAL

logger = logging.getLogger("ray_serve_cai.node")

ACTIVE_JOB_STATUSES = frozenset({"PENDING", "RUNNING"})
RAY_CLIENT_MARKER = "ray.util.client.server"
PROBE_TIMEOUT_SECONDS = 10.0
SERVE_BUSY_STATUSES = frozenset({"DEPLOYING", "DELETING"})
# The Serve gateway's note (`node.gateway.TrafficNote`) is rewritten at least every 10 s while a request
# is open: an older note's open requests are those of a gateway that is gone.
GATEWAY_NOTE_FRESH_SECONDS = 30.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ------------------------------------------------------------------------------------ pure core


def job_reasons(jobs: Iterable[Mapping[str, Any]]) -> list[str]:
    """What keeps the cluster busy in the Jobs API's list (`GET /api/jobs/`): submitted jobs that
    are pending or running, and drivers still connected."""
    reasons = []
    for job in jobs:
        status = str(job.get("status") or "")
        if status not in ACTIVE_JOB_STATUSES:
            continue
        entrypoint = str(job.get("entrypoint") or "")
        if job.get("type") == "SUBMISSION" or job.get("submission_id"):
            reasons.append(f"job {job.get('submission_id') or job.get('job_id')} {status.lower()}")
        elif RAY_CLIENT_MARKER in entrypoint:
            reasons.append(f"a Ray client is connected (job {job.get('job_id')})")
        else:
            reasons.append(f"driver {job.get('job_id')} connected ({_short(entrypoint)})")
    return reasons


def demand_reasons(
    tasks: Sequence[tuple[Mapping[str, float], int]], placement_groups: Sequence[Mapping[str, float]]
) -> list[str]:
    """Resource requests waiting in the GCS: (bundle, count) of tasks/actors, and placement groups."""
    reasons = []
    waiting = sum(count for _, count in tasks)
    if waiting:
        shapes = ", ".join(_bundle(b) for b, _ in tasks[:3]) + (", ..." if len(tasks) > 3 else "")
        reasons.append(f"{waiting} task(s)/actor(s) wait for resources ({shapes})")
    if placement_groups:
        reasons.append(f"{len(placement_groups)} placement group(s) wait for resources")
    return reasons


def serve_deploy_reasons(applications: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Serve applications being deployed or deleted (Serve's own status): an `up` or a deploy that
    applies a Serve config is work in progress, not idleness."""
    return [
        f"Serve application {name} is {str(app.get('status')).lower()}"
        for name, app in sorted(applications.items())
        if app.get("status") in SERVE_BUSY_STATUSES
    ]


def serve_reasons(in_flight: Mapping[str, int], recent: Mapping[str, float], now: float) -> list[str]:
    """Serve applications with requests in flight now, or answered since the last check."""
    reasons = [
        f"Serve application {app} has {n} request(s) in flight" for app, n in sorted(in_flight.items()) if n
    ]
    busy_apps = {app for app, n in in_flight.items() if n}
    reasons += [
        f"Serve application {app} answered a request {max(0.0, now - at):.0f} s ago"
        for app, at in sorted(recent.items())
        if app not in busy_apps
    ]
    return reasons


@dataclass
class IdleClock:
    """Seconds since the last busy moment. `started` counts as one (a fresh cluster is idle from
    its start); a check that finds the cluster busy, or a Serve request, is another."""

    last_busy: float

    def observe(self, now: float, busy: bool, last_request: float | None = None) -> float:
        if busy:
            self.last_busy = now
        if last_request is not None:
            self.last_busy = max(self.last_busy, min(last_request, now))
        return max(0.0, now - self.last_busy)


def fires_in(setting: AutostopSpec | None, idle_seconds: float, busy: Sequence[str]) -> float | None:
    """Seconds until the action (0: due now); None while busy or when autostop is off."""
    if setting is None or busy:
        return None
    return max(0.0, setting.idle_timeout - idle_seconds)


def _bundle(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------ Serve traffic


@dataclass
class ServeTraffic:
    """Counts requests through the head's `/serve` mount, per application (by route prefix, the
    first path segment under the mount; `/` apps are named by the longest known route prefix) — and,
    with `gateway`, the requests the cluster's Serve gateway relays (its note in the project,
    `node.gateway.TrafficNote`): in pods, Serve's endpoint is the gateway, not the head."""

    clock: Callable[[], float] = time.monotonic
    last_answered: dict[str, float] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)  # route prefix -> application name
    lock: threading.Lock = field(default_factory=threading.Lock)
    gateway: Path | None = None
    wall: Callable[[], float] = time.time  # the gateway's note is in wall-clock time (another pod)

    def application_of(self, path: str) -> str:
        """The Serve application a path (under the mount, prefix stripped) goes to, else its prefix."""
        path = "/" + path.lstrip("/")
        best = ""
        for prefix in self.routes:
            trimmed = prefix.rstrip("/")
            matches = path == trimmed or path.startswith(trimmed + "/") or trimmed == ""
            if matches and len(prefix) > len(best):
                best = prefix
        if best:
            return self.routes[best]
        first = path.split("/")[1] if path.count("/") >= 1 else ""
        return f"/{first}"

    def wrap(self, prefix: str, app: ASGIApp) -> ASGIApp:
        """An ASGI app that passes everything to `app` and notes each request's application."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope.get("type") not in ("http", "websocket"):
                await app(scope, receive, send)
                return
            raw = str(scope.get("path") or "")
            name = self.application_of(raw[len(prefix) :] if raw.startswith(prefix) else raw)
            with self.lock:
                self.in_flight[name] = self.in_flight.get(name, 0) + 1
            try:
                await app(scope, receive, send)
            finally:
                with self.lock:
                    self.in_flight[name] -= 1
                    self.last_answered[name] = self.clock()

        return counted

    def snapshot(self) -> tuple[dict[str, int], dict[str, float]]:
        """Requests in flight and when each application last answered (this clock), the gateway's
        included."""
        with self.lock:
            in_flight, answered = dict(self.in_flight), dict(self.last_answered)
        note = self._gateway_note()
        if note:
            now, wall = self.clock(), self.wall()
            fresh = wall - float(note.get("at") or 0) <= GATEWAY_NOTE_FRESH_SECONDS
            for path, at in (note.get("last_request") or {}).items():
                name = self.application_of(str(path))
                seen = now - max(0.0, wall - float(at))
                answered[name] = max(answered.get(name, seen), seen)
            for path, count in (note.get("open") or {}).items() if fresh else ():
                name = self.application_of(str(path))
                in_flight[name] = in_flight.get(name, 0) + int(count)
        return in_flight, answered

    def _gateway_note(self) -> dict[str, Any] | None:
        if self.gateway is None:
            return None
        try:
            note = json.loads(self.gateway.read_text())
        except (OSError, ValueError):
            return None  # no gateway (a shared host, no Serve) or a note being replaced
        return note if isinstance(note, dict) else None


# ------------------------------------------------------------------------------------ Ray probes


@dataclass
class RayProbe:
    """Asks the head's Ray what keeps the cluster busy. `dashboard` gives the local dashboard's base
    URL and token (None while Ray is not up); `gcs` a GCS client (None likewise)."""

    dashboard: Callable[[], tuple[str, str | None] | None]
    gcs: Callable[[], Any]

    def _get(self, path: str) -> Any:
        target = self.dashboard()
        if target is None:
            raise RuntimeError("the dashboard is not up")
        base, token = target
        headers = {"X-Ray-Authorization": f"Bearer {token}"} if token else {}
        response = httpx.get(f"{base}{path}", headers=headers, timeout=PROBE_TIMEOUT_SECONDS)
        response.raise_for_status()
        return response.json()

    def jobs(self) -> list[dict[str, Any]]:
        body = self._get("/api/jobs/")
        return body if isinstance(body, list) else []

    def serve_applications(self) -> dict[str, dict[str, Any]]:
        """Serve's applications (name → details with `status`, `route_prefix`); {} without Serve."""
        body = self._get("/api/serve/applications/")
        applications = body.get("applications") if isinstance(body, dict) else None
        return dict(applications) if isinstance(applications, dict) else {}

    def demand(self) -> tuple[list[tuple[dict[str, float], int]], list[dict[str, float]]]:
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        client = self.gcs()
        if client is None:
            raise RuntimeError("the GCS is not up")
        reply = GetClusterStatusReply()
        reply.ParseFromString(client.get_cluster_status(timeout_s=PROBE_TIMEOUT_SECONDS))
        state = reply.cluster_resource_state
        tasks = [(dict(r.request.resources_bundle), int(r.count)) for r in state.pending_resource_requests]
        groups = [
            {k: v for req in g.requests for k, v in req.resources_bundle.items()}
            for g in state.pending_gang_resource_requests
        ]
        return tasks, groups

    def busy(self, serve: ServeTraffic, now: float, since: float) -> list[str]:
        """Every reason the cluster is busy now; a probe that fails is a reason (never stop on a guess)."""
        reasons: list[str] = []
        try:
            reasons += job_reasons(self.jobs())
        except Exception as error:
            reasons.append(f"cannot tell whether jobs run: {type(error).__name__}: {_short(str(error))}")
        try:
            reasons += demand_reasons(*self.demand())
        except Exception as error:
            reasons.append(f"cannot tell whether work waits: {type(error).__name__}")
        try:
            applications = self.serve_applications()
            reasons += serve_deploy_reasons(applications)
            with serve.lock:
                serve.routes = {
                    str(app["route_prefix"]): name
                    for name, app in applications.items()
                    if isinstance(app, dict) and app.get("route_prefix")
                }
        except Exception as error:
            reasons.append(f"cannot tell whether Serve deploys: {type(error).__name__}")
        in_flight, answered = serve.snapshot()
        reasons += serve_reasons(in_flight, {a: t for a, t in answered.items() if t >= since}, now)
        return reasons


# ------------------------------------------------------------------------------------ the monitor


@dataclass(frozen=True)
class Recorded:
    """The setting as the head last read it from the applied spec (and whether it is stopped)."""

    setting: AutostopSpec | None
    stopped: bool = False


def initial_setting(applied_spec: str | None) -> AutostopSpec | None:
    """The setting in the applied spec the head started with (`RAY_CAI_APPLIED_SPEC`)."""
    spec = spec_from_applied(applied_spec)
    return spec.autostop if spec is not None else None


class AutostopMonitor:
    """The head's loop: read the setting, measure, and act once idle past the timeout.

    `read_recorded` re-reads the setting from the applied spec (one CML list call), `act(action,
    idle_seconds)` carries out the action; both go through the CML API, wired in by the head's
    entry script (`HooksFactory`). While the cluster carries the stopped mark it does nothing."""

    def __init__(
        self,
        probe: RayProbe,
        serve: ServeTraffic,
        *,
        setting: AutostopSpec | None,
        read_recorded: ReadRecorded | None,
        act: Callable[[str, float], str] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probe, self.serve = probe, serve
        self.setting = setting
        self.read_recorded, self.act = read_recorded, act
        self.clock = clock
        self.idle = IdleClock(clock())
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.last_check: float | None = None
        self.busy: list[str] = []
        self.idle_seconds: float | None = None
        self.error: str | None = None
        self.acted: str | None = None
        self.thread: threading.Thread | None = None

    @property
    def interval(self) -> float:
        return self.setting.check_interval if self.setting is not None else AUTOSTOP_DEFAULT_CHECK_INTERVAL

    def report(self) -> dict[str, Any]:
        """The head's view for `/ray-cai/status` (`autostop`)."""
        with self.lock:
            setting = self.setting
            idle = None if self.idle_seconds is None else round(self.idle_seconds, 1)
            return {
                "idle_timeout": setting.idle_timeout if setting else None,
                "action": setting.action if setting else None,
                "check_interval": self.interval,
                "idle_seconds": idle,
                "fires_in_seconds": (None if idle is None else fires_in(setting, idle, self.busy)),
                "busy": list(self.busy),
                "checked_seconds_ago": (
                    None if self.last_check is None else round(self.clock() - self.last_check, 1)
                ),
                **({"error": self.error} if self.error else {}),
                **({"acted": self.acted} if self.acted else {}),
            }

    def refresh_setting(self) -> bool:
        """Re-read the setting; False when the cluster is already marked stopped (nothing to do)."""
        if self.read_recorded is None:
            return True
        try:
            recorded = self.read_recorded()
        except Exception as error:
            detail = f"{type(error).__name__}: {_short(str(error), 120)}"
            self.error = f"cannot read the autostop setting: {detail}"
            return True
        with self.lock:
            if recorded.setting != self.setting:
                # A new or changed setting counts from now (as SkyPilot's does): turning autostop on
                # for a cluster idle for an hour must not stop it at once.
                logger.info("autostop setting now %s", recorded.setting or "off")
                self.idle.last_busy = max(self.idle.last_busy, self.clock())
            self.setting = recorded.setting
            self.error = None
        return not recorded.stopped

    def measure(self) -> float:
        """One check: the busy reasons and the idle time (kept for the report)."""
        since = self.last_check if self.last_check is not None else self.idle.last_busy
        now = self.clock()
        busy = self.probe.busy(self.serve, now, since)
        in_flight, answered = self.serve.snapshot()
        last_request = max(answered.values(), default=None)
        idle = self.idle.observe(now, bool(busy) or any(in_flight.values()), last_request)
        with self.lock:
            self.busy, self.idle_seconds, self.last_check = busy, idle, now
        return idle

    def check_once(self) -> str | None:
        """Read, measure, and act when due (confirmed by one more measurement); what it did, if anything."""
        if not self.refresh_setting():
            return None
        setting = self.setting
        if setting is None:  # off: no probe of Ray at all (a cluster without autostop pays nothing)
            with self.lock:
                self.busy, self.idle_seconds, self.last_check = [], None, None
            return None
        idle = self.measure()
        if self.act is None or fires_in(setting, idle, self.busy) != 0:
            return None
        idle = self.measure()  # confirm: a job may have been submitted a moment ago
        if fires_in(setting, idle, self.busy) != 0:
            return None
        timeout, action = setting.idle_timeout, setting.action
        logger.info("autostop: idle %.0fs (idle_timeout %.0fs): %s", idle, timeout, action)
        try:
            outcome = self.act(setting.action, idle)
        except Exception as error:
            detail = f"{type(error).__name__}: {_short(str(error), 160)}"
            self.error = f"autostop {setting.action} failed: {detail}"
            logger.error("%s", self.error)
            return None
        self.acted = outcome
        logger.info("autostop: %s", outcome)
        return outcome

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.check_once()
            except Exception:
                logger.exception("autostop check failed")
            self.stop_event.wait(self.interval)

    def start(self) -> AutostopMonitor:
        self.thread = threading.Thread(target=self.run, name="autostop", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()


class ReadRecorded(Protocol):
    def __call__(self) -> Any: ...  # an object with `.setting` (AutostopSpec | None) and `.stopped`


# What the head's entry script passes in (see `cai_integration/ray_head.py`): given the cluster, the
# project directory and the environment, `read_recorded` and `act` through the CML API with the
# workload's own key — the cluster layer's `ray_serve_cai.cluster.autostop.head_hooks`. The node
# layer uses config and Ray only, so the CML calls are wired in from outside it.
HooksFactory = Callable[[str, Path, Mapping[str, str]], tuple[ReadRecorded, Callable[[str, float], str]]]


def start_autostop(
    status: Any,
    serve: ServeTraffic,
    gcs_client: Callable[[str], Any],
    *,
    project_dir: Path | str,
    env: Mapping[str, str],
    hooks: HooksFactory | None,
) -> AutostopMonitor:
    """Start the head's monitor (the launcher's hook): `status` is the head's `NodeStatus` (dashboard
    port and token, GCS address), `gcs_client(address)` the in-process GCS client."""

    def dashboard() -> tuple[str, str | None] | None:
        port = status.dashboard_port
        return None if port is None else (f"http://127.0.0.1:{port}", status.dashboard_token())

    def gcs() -> Any:
        return gcs_client(status.gcs_address) if status.gcs_address else None

    read_recorded: ReadRecorded | None = None
    act: Callable[[str, float], str] | None = None
    problem = "the head was started without the CML hooks (cai_integration/ray_head.py passes them)"
    if hooks is not None:
        try:
            read_recorded, act = hooks(status.cluster, Path(project_dir), env)
            problem = ""
        except Exception as error:  # no API key in the environment, ...: measure, but cannot act
            problem = str(error)
    monitor = AutostopMonitor(
        RayProbe(dashboard, gcs),
        serve,
        setting=initial_setting(env.get("RAY_CAI_APPLIED_SPEC")),
        read_recorded=read_recorded,
        act=act,
    )
    if problem:
        monitor.error = f"autostop cannot act: {problem}"
        logger.warning("%s", monitor.error)
    status.autostop = monitor.report
    return monitor.start()
