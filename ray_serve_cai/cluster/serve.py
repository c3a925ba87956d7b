"""Serve, level-triggered: observe Serve's applications → decide (pure) → PUT only when needed → wait.

The desired state is the Serve config file named by `ray_cluster.serve.config`. What Serve runs is
read back from Serve itself (`GET /api/serve/applications/`: each application's `deployed_app_config`
is the exact config it was submitted with), so no marker of ours can drift from it: the config is
applied when an application's submitted config differs from the file, when one is missing (a new
head has an empty Serve: it gets the applications back without a user action) or when Serve runs a
REST-deployed application the file no longer lists. An unchanged config makes no PUT. Serve itself
updates `num_replicas` and `user_config` in place, so no node is replaced for them, and a new code
digest (config.serve: the application's files changed) by a rolling update of its replicas.

After a head restart Serve's controller (a detached actor) comes back on the new head and recovers
its checkpoint from the GCS (with head fault tolerance); until it answers, Serve's GET shows no
controller (`controller_info` empty) or answers 503. Nothing is applied then: `apply` waits for the
controller (`SERVE_RECOVERY_SECONDS`), then decides on what it recovered, so only applications that
are really missing or different are applied (Serve's declarative PUT leaves an application whose
config is unchanged alone). Only when no controller comes back in time (GCS state lost) does the
whole config go to a new one.

This is the second plan/apply of a pass, over the cluster status the first one derived:
observe (`observe`: one GET) → decide (`decide`, pure) → apply (`apply`: PUT only when needed).
`RayCluster.up` and its watch compose it after the nodes' pass (`converge_serve`), as KubeRay runs
its reconcile functions one after another; `ray-cai serve` calls the verbs below directly. It knows
the cluster only as a `ServeScope` (client, cluster name, Serve spec, project directory): it never
imports the reconciler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray_serve_cai.access.head import read_head_status
from ray_serve_cai.access.serve import ServeAPI, ServeAPIError
from ray_serve_cai.cluster.conditions import Condition
from ray_serve_cai.cluster.errors import ClusterError
from ray_serve_cai.cluster.plan import GATEWAY_ROLE
from ray_serve_cai.cluster.status import ClusterStatus
from ray_serve_cai.cml import (
    APPLICATION_FAILED,
    APPLICATION_STOPPED,
    Application,
    CMLClient,
    CMLError,
    create_application_or_find,
)
from ray_serve_cai.config import head_app_name
from ray_serve_cai.config.cluster import ServeSpec
from ray_serve_cai.config.errors import ConfigError
from ray_serve_cai.config.node_env import (
    CLUSTER_VARIABLE,
    NODE_POLLING_ENDPOINT,
    POLLING_ENDPOINT_VARIABLE,
    ROLE_VARIABLE,
)
from ray_serve_cai.config.serve import (
    SERVE_LOCATION_KEY,
    SERVE_PORT_KEY,
    SERVE_PROXY_EVERY_NODE,
    SERVE_PROXY_LOCATION,
    SERVE_ROOT_PATH,
    ServeConfig,
    load_serve_config,
)
from ray_serve_cai.waiting import poll_until

log = logging.getLogger("ray_serve_cai.cluster.serve")

SERVE_RUNNING = "RUNNING"  # Serve's word for a running application (not CML's APPLICATION_RUNNING)
FAILED_STATES = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})
NOT_DEPLOYED = "NOT_DEPLOYED"  # our word for a desired application Serve does not have
SERVE_POLL_SECONDS = 1.0
SERVE_RECOVERY_SECONDS = 90.0  # a restarted controller recovers its checkpoint within this
GATEWAY_SCRIPT = "cai_integration/serve_gateway.py"
GATEWAY_CPU = 1.0
GATEWAY_MEMORY_GB = 1.0


@dataclass(frozen=True)
class ServeScope:
    """What Serve's pass needs to know of a cluster: how to reach its head, its Serve spec, the
    project directory its Serve config is relative to, and how long a start may take."""

    client: CMLClient
    cluster: str
    serve: ServeSpec | None
    project_dir: Path
    startup_timeout: float
    project_id: str = ""
    runtime_identifier: str | None = None  # the head's: the gateway runs on the same runtime
    has_workers: bool = False  # replicas are then kept off the head (EveryNode only)

    @property
    def head(self) -> str:
        return head_app_name(self.cluster)

    @property
    def gateway(self) -> str:
        return gateway_app_name(self.cluster)


def gateway_app_name(cluster: str) -> str:
    """The Serve gateway's application (= subdomain): `ray-<cluster>-serve` (no worker name has no index)."""
    return f"ray-{cluster}-serve"


@dataclass
class ServeView:
    """Serve's applications as Serve reports them, plus which desired ones are missing or outdated."""

    url: str | None
    applications: dict[str, dict[str, Any]] = field(default_factory=dict)
    desired: list[str] = field(default_factory=list)
    outdated: list[str] = field(default_factory=list)
    settling: list[str] = field(default_factory=list)  # deployments not yet at their replica target
    error: str | None = None

    @property
    def failing(self) -> dict[str, dict[str, Any]]:
        """Desired applications in a failed state with their current config (Serve's verdict stands)."""
        return {
            name: app
            for name, app in self.applications.items()
            if app["status"] in FAILED_STATES and name not in self.outdated
        }

    @property
    def all_running(self) -> bool:
        return (
            self.error is None
            and not self.outdated
            and not self.settling
            and all(app["status"] == SERVE_RUNNING for app in self.applications.values())
        )

    def problems(self) -> list[str]:
        lines = [
            f"serve application {name!r}: {app['status']}: {app['message']}"
            for name, app in self.failing.items()
        ]
        if self.error:
            lines.append(f"serve: {self.error}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "applications": self.applications}


@dataclass(frozen=True)
class ServeDecision:
    """What the apply step must do: PUT (with why) or nothing."""

    put: bool
    reason: str


# --------------------------------------------------------------------------- pure core


def canonical_app(app: dict[str, Any]) -> dict[str, Any]:
    """One application's config in the form Serve stores it (Serve's own model where Ray is installed,
    so `5.0` and `5` compare equal), for comparing the file with `deployed_app_config`."""
    try:
        from ray.serve.schema import ServeApplicationSchema
    except ImportError:
        return app
    try:
        return dict(ServeApplicationSchema.model_validate(app).model_dump(mode="json", exclude_unset=True))
    except ValueError:
        return app


def decide(desired: ServeConfig, details: dict[str, Any]) -> ServeDecision:
    """PUT when an application is missing, was submitted with another config, or is REST-deployed
    but no longer in the file; else nothing. `details` is Serve's GET answer."""
    deployed = details.get("applications") or {}
    wanted = {str(app.get("name", "default")): app for app in desired.applications()}
    missing = [name for name in wanted if name not in deployed]
    if missing and len(missing) == len(wanted) and not deployed:
        return ServeDecision(True, "Serve has no applications (new cluster or a new head)")
    changed = [
        name
        for name, app in wanted.items()
        if name in deployed
        and canonical_app(deployed[name].get("deployed_app_config") or {}) != canonical_app(app)
    ]
    removed = [
        name
        for name, app in deployed.items()
        if name not in wanted and str(app.get("source", "declarative")).lower() == "declarative"
    ]
    reasons = []
    if missing:
        reasons.append(f"missing: {', '.join(missing)}")
    if changed:
        reasons.append(f"config changed: {', '.join(changed)}")
    if removed:
        reasons.append(f"no longer in the file: {', '.join(removed)}")
    if (details.get("target_capacity") or None) != (desired.document.get("target_capacity") or None):
        reasons.append("target_capacity changed")
    return ServeDecision(bool(reasons), "; ".join(reasons) or "Serve runs the config of the file")


def summarize(details: dict[str, Any], desired: ServeConfig | None, url: str | None) -> ServeView:
    """The `serve status` shape from Serve's GET answer; desired applications Serve lacks show as
    NOT_DEPLOYED, and those submitted with another config are listed in `outdated`."""
    apps: dict[str, dict[str, Any]] = {}
    for name, app in sorted((details.get("applications") or {}).items()):
        apps[name] = {
            "status": app.get("status"),
            "route_prefix": app.get("route_prefix"),
            "message": app.get("message") or "",
            "last_deployed_time_s": app.get("last_deployed_time_s"),
            "deployments": {
                dep_name: {
                    "status": dep.get("status"),
                    "message": dep.get("message") or "",
                    "replicas": _replica_states(dep.get("replicas") or []),
                    "target_num_replicas": dep.get("target_num_replicas"),
                }
                for dep_name, dep in sorted((app.get("deployments") or {}).items())
            },
        }
    outdated: list[str] = []
    settling: list[str] = []
    desired_names: list[str] = []
    if desired is not None:
        for want in desired.applications():
            name = str(want.get("name", "default"))
            desired_names.append(name)
            got = (details.get("applications") or {}).get(name)
            if got is None:
                apps[name] = {
                    "status": NOT_DEPLOYED,
                    "route_prefix": want.get("route_prefix", "/"),
                    "message": "in the Serve config file but not deployed (yet)",
                    "last_deployed_time_s": None,
                    "deployments": {},
                }
            elif canonical_app(got.get("deployed_app_config") or {}) != canonical_app(want):
                outdated.append(name)
            elif not _at_target(got, want):
                settling.append(name)
    return ServeView(url=url, applications=apps, desired=desired_names, outdated=outdated, settling=settling)


def _at_target(deployed: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Serve has taken up the config: each deployment's target is the file's `num_replicas` (when it
    names a number) and that many replicas run. Right after a PUT the old state still shows."""
    deployments = deployed.get("deployments") or {}
    for entry in wanted.get("deployments") or []:
        number = entry.get("num_replicas")
        got = deployments.get(entry.get("name"))
        if isinstance(number, int) and got is not None and got.get("target_num_replicas") != number:
            return False
    for got in deployments.values():
        running = sum(1 for r in got.get("replicas") or [] if r.get("state") == SERVE_RUNNING)
        if got.get("target_num_replicas") is not None and running != got["target_num_replicas"]:
            return False
    return True


def _replica_states(replicas: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for replica in replicas:
        state = str(replica.get("state"))
        counts[state] = counts.get(state, 0) + 1
    return counts


def attach(status: ClusterStatus, view: ServeView | None) -> ClusterStatus:
    """The cluster status with Serve's view: not `ready` while an application is not RUNNING,
    `failed` while one failed (Serve's own message is among the problems)."""
    if view is None:
        return status
    state = status.state
    if state == "ready" and view.failing:
        state = "failed"
    elif state == "ready" and not view.all_running:
        state = "pending"
    serving = not view.failing and view.all_running
    condition = Condition(
        "ServeReady",
        serving,
        "" if serving else ("DeployFailed" if view.failing else "Deploying"),
        "; ".join(view.problems()),
    )
    # ServeReady goes before Ready, which now says whether Serve's applications run too.
    conditions = [c for c in status.conditions if c.type != "Ready"] + [condition]
    conditions += [
        replace(c, status=state == "ready", reason="" if state == "ready" else state.capitalize())
        for c in status.conditions
        if c.type == "Ready"
    ]
    return replace(
        status,
        state=state,
        serve=view.as_dict(),
        problems=[*status.problems, *view.problems()],
        conditions=conditions,
    )


# --------------------------------------------------------------------------- I/O shell


def serve_url(cluster: ServeScope, gateway: Application | None = None) -> str:
    """The Serve endpoint, behind CML's login: `<gateway URL>/serve/` when the cluster has its Serve
    gateway (proxies on every node), else `<head app URL>/serve/`."""
    base = cluster.client.app_url(gateway) if gateway is not None else cluster.client.app_url(cluster.head)
    return base + SERVE_ROOT_PATH + "/"


def find_gateway(cluster: ServeScope) -> Application | None:
    """The cluster's Serve gateway application, if there is one (one list call)."""
    return _project_apps(cluster).get(cluster.gateway)


def _project_apps(cluster: ServeScope) -> dict[str, Application]:
    """The cluster's head and gateway applications by name (one list call; none without a project)."""
    if not cluster.project_id:
        return {}
    try:
        apps = cluster.client.list_applications(cluster.project_id)
    except CMLError:
        return {}
    wanted = {cluster.head, cluster.gateway}
    return {
        a.key: a
        for a in apps
        if a.key in wanted and (a.environment or {}).get(CLUSTER_VARIABLE) == cluster.cluster
    }


def gateway_fields(cluster: ServeScope, runtime_identifier: str | None = None) -> dict[str, Any]:
    """The gateway application's fields: marked as the cluster's (so `down` removes it) with the
    gateway role (so the nodes' pass leaves it alone), on the head's runtime."""
    fields: dict[str, Any] = {
        "name": cluster.gateway,
        "subdomain": cluster.gateway,
        "description": f"Ray Serve gateway of the ray-cai cluster {cluster.cluster}",
        "script": GATEWAY_SCRIPT,
        "cpu": GATEWAY_CPU,
        "memory": GATEWAY_MEMORY_GB,
        "environment": {
            CLUSTER_VARIABLE: cluster.cluster,
            ROLE_VARIABLE: GATEWAY_ROLE,
            POLLING_ENDPOINT_VARIABLE: NODE_POLLING_ENDPOINT,
        },
    }
    runtime = cluster.runtime_identifier or runtime_identifier
    if runtime:
        fields["runtime_identifier"] = runtime
    return fields


def ensure_gateway(cluster: ServeScope) -> Application | None:
    """The Serve gateway, created when missing and restarted when stopped or failed (one list call);
    None without a project id (nothing to create it in)."""
    if not cluster.project_id:
        return None
    apps = _project_apps(cluster)
    found = apps.get(cluster.gateway)
    if found is None:
        log.info("creating the Serve gateway %s", cluster.gateway)
        head = apps.get(cluster.head)
        runtime = head.runtime_identifier if head is not None else None
        fields, owner = gateway_fields(cluster, runtime), (CLUSTER_VARIABLE, cluster.cluster)
        return create_application_or_find(cluster.client, cluster.project_id, fields, owner=owner)
    if found.status in (APPLICATION_STOPPED, APPLICATION_FAILED):
        log.info("restarting the Serve gateway %s (%s)", cluster.gateway, found.status)
        cluster.client.restart_application(cluster.project_id, found.id)
    return found


def desired_serve(cluster: ServeScope) -> ServeConfig | None:
    """The validated Serve config of the cluster's spec (ConfigError, exit 2, when it is bad)."""
    if cluster.serve is None:
        return None
    config = load_serve_config(cluster.serve.config, cluster.project_dir)
    return replace(config, off_head=cluster.has_workers)


def api(cluster: ServeScope) -> ServeAPI:
    return ServeAPI(cluster.client, cluster.head)


def observe(cluster: ServeScope, desired: ServeConfig | None = None, url: str | None = None) -> ServeView:
    """Serve's view through the head (one GET); an unreachable Serve is reported in `error`. `url`:
    the endpoint when the caller knows it (else one list call finds the gateway)."""
    url = url or serve_url(cluster, find_gateway(cluster))
    try:
        details = api(cluster).details()
    except ServeAPIError as err:
        return ServeView(url=url, desired=desired.application_names if desired else [], error=str(err))
    return summarize(details, desired, url)


def controller_up(details: dict[str, Any]) -> bool:
    """Serve's GET came from a running controller (without one it answers an empty schema)."""
    return bool(details.get("controller_info"))


def recovered_details(
    serve: ServeAPI, *, timeout: float = SERVE_RECOVERY_SECONDS, interval: float = SERVE_POLL_SECONDS
) -> dict[str, Any]:
    """Serve's details once its controller answers (a restarted one has recovered its checkpoint by
    then). Without a controller: at once when the GCS has none alive or restarting (Serve was shut
    down, or its state was lost with the head), else after `timeout`. A GET that keeps failing (503
    while the GCS or the controller recovers) raises its error at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            details = serve.details()
        except ServeAPIError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(interval)
            continue
        if controller_up(details):
            return details
        try:
            state = serve.controller_state()
        except ServeAPIError:
            state = None  # Ray's state API cannot say: nothing is known to be recovering
        if state in (None, "DEAD") or time.monotonic() >= deadline:
            return details
        log.info("Serve's controller is %s: waiting for it to recover before applying anything", state)
        time.sleep(interval)


def apply(
    cluster: ServeScope,
    desired: ServeConfig,
    http_port: int,
    *,
    location: str = SERVE_PROXY_LOCATION,
    force: bool = False,
) -> ServeDecision:
    """PUT the config when Serve does not run it (or `force`); returns what was decided. A controller
    that is recovering (after a head restart) is waited for first: it may bring the applications back.
    `location`: where the head started Serve's proxies."""
    serve = api(cluster)
    decision = ServeDecision(True, "asked to apply now")
    if not force:
        decision = decide(desired, recovered_details(serve))
    if decision.put:
        for line in desired.overridden_settings():
            log.warning("serve config %s: %s", desired.source, line)
        log.info("applying the Serve config %s (%s)", desired.source, decision.reason)
        serve.deploy(desired.request_body(http_port, location), source=desired.source)
    return decision


def head_serve_location(status: ClusterStatus) -> str:
    """Where the head started Serve's proxies (HeadOnly before heads published it)."""
    return str(status.ray.get(SERVE_LOCATION_KEY) or SERVE_PROXY_LOCATION)


def head_serve_port(status: ClusterStatus) -> int | None:
    port = status.ray.get(SERVE_PORT_KEY)
    return int(port) if port else None


def wait_settled(
    cluster: ServeScope,
    desired: ServeConfig,
    *,
    timeout: float,
    on_view: Callable[[ServeView], None] | None = None,
    url: str | None = None,
) -> ServeView:
    """Poll until every desired application runs its current config, or one failed with it."""
    last: list[ServeView] = []
    url = url or serve_url(cluster, find_gateway(cluster))

    def check() -> ServeView | None:
        view = observe(cluster, desired, url)
        last[:] = [view]
        if on_view:
            on_view(view)
        if view.error is None and not view.outdated and (view.all_running or view.failing):
            return view
        return None

    def describe() -> str:
        if not last:
            return "no answer from Serve"
        apps = last[0].applications
        return ", ".join(f"{n}: {a['status']} {a['message']}".strip() for n, a in apps.items()) or (
            last[0].error or "no applications"
        )

    return poll_until(
        check,
        timeout=timeout,
        interval=SERVE_POLL_SECONDS,
        what=f"the Serve applications of {desired.source} to run",
        describe_last=describe,
    )


def endpoint_for(cluster: ServeScope, status: ClusterStatus) -> str:
    """The endpoint of a ready cluster: with proxies on every node its gateway (created or restarted
    when needed: one list call), else the head's `/serve/`."""
    if head_serve_location(status) == SERVE_PROXY_EVERY_NODE:
        gateway = ensure_gateway(cluster)
        if gateway is not None:
            return serve_url(cluster, gateway)
    return serve_url(cluster)


def converge_serve(
    cluster: ServeScope,
    status: ClusterStatus,
    *,
    wait: bool = True,
    timeout: float | None = None,
    on_progress: Callable[[ClusterStatus], None] | None = None,
) -> ClusterStatus:
    """The Serve part of a reconcile pass: once the nodes are ready, apply the config if Serve does
    not run it, keep the Serve gateway (proxies on every node), then (with `wait`) wait until the
    applications settle. Returns the status with Serve's view attached. A cluster without `serve:`
    is returned unchanged.

    With `wait` (up, deploy) problems raise: a bad or refused config `ConfigError` (exit 2), an
    unreachable Serve or a deadline `ClusterError`. Without it (a watch pass) they are reported in
    the view and the next pass tries again."""
    if cluster.serve is None:
        return status
    url: str | None = None
    try:
        desired = desired_serve(cluster)
        assert desired is not None
        if not status.ready:
            return attach(status, observe(cluster, desired)) if status.ray else status
        deadline = time.monotonic() + (timeout if timeout is not None else cluster.startup_timeout)
        port = head_serve_port(status) or (_wait_for_serve_port(cluster, deadline) if wait else None)
        if port is None:
            not_yet = ServeView(url=serve_url(cluster), error="the head has not published Serve's port yet")
            return attach(status, not_yet)
        if head_serve_port(status) is None:  # published while we waited: where does Serve run?
            view, _problem = read_head_status(cluster.client, cluster.head)
            status = replace(status, ray={**status.ray, **view})
        url = endpoint_for(cluster, status)
        apply(cluster, desired, port, location=head_serve_location(status))
        if not wait:
            return attach(status, observe(cluster, desired, url))
        started = time.monotonic()

        def progress(view: ServeView) -> None:
            if on_progress:
                on_progress(attach(status, view))

        remaining = max(1.0, deadline - time.monotonic())
        view = wait_settled(cluster, desired, timeout=remaining, on_view=progress, url=url)
        log.info("Serve settled in %.1fs", time.monotonic() - started)
        return attach(status, view)
    except (ConfigError, ServeAPIError, TimeoutError, CMLError) as err:
        if wait:
            if isinstance(err, ConfigError):
                raise
            raise ClusterError(str(err)) from None
        log.warning("serve: %s", err)
        return attach(status, ServeView(url=url or serve_url(cluster), error=str(err)))


def observe_into(cluster: ServeScope, status: ClusterStatus) -> ClusterStatus:
    """`status` with Serve's view attached (read only: `ray-cai status`); unchanged without `serve:`."""
    if cluster.serve is None or not status.ray:
        return status
    return attach(status, observe(cluster, desired_serve(cluster)))


def _wait_for_serve_port(cluster: ServeScope, deadline: float) -> int | None:
    """Serve's port from the head's status. A head publishes it with its rendezvous (Serve starts on
    demand); one of an earlier version did once its own Serve start finished, a few seconds later."""
    head = cluster.head

    def published() -> int | None:
        view, _problem = read_head_status(cluster.client, head)
        port = view.get(SERVE_PORT_KEY)
        return int(port) if port else None

    return poll_until(
        published,
        timeout=max(1.0, deadline - time.monotonic()),
        interval=0.5,
        what=f"the head {head} to publish Serve's port ({SERVE_PORT_KEY} in its status)",
        describe_last=lambda: "an older head publishes it once Serve started (its log says why not)",
    )


__all__ = [
    "SERVE_RUNNING",
    "ServeDecision",
    "ServeScope",
    "ServeView",
    "apply",
    "attach",
    "canonical_app",
    "controller_up",
    "converge_serve",
    "decide",
    "desired_serve",
    "endpoint_for",
    "ensure_gateway",
    "find_gateway",
    "gateway_app_name",
    "observe",
    "observe_into",
    "recovered_details",
    "serve_url",
    "summarize",
    "wait_settled",
]
