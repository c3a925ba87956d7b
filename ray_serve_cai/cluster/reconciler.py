"""The I/O shell of the reconciler: observe → plan → apply → wait → verify against a CML project.

`RayCluster` reads like a provisioner (SkyPilot's verbs): `plan`, `up`, `status`, `scale`, `down`,
`connect_info`. One list call observes every application of the project; creates run in parallel
with bounded concurrency; waits poll once per interval whatever the cluster size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ray_serve_cai.cluster.applied import (
    APPLIED_SPEC_VAR,
    AppliedRecord,
    ClusterRequest,
    caller_commit,
    merge_request,
    new_record,
    observed_runtimes,
    read_record,
    same_applied,
    spec_differences,
)
from ray_serve_cai.cluster.autostop import apply_to_status as apply_autostop  # autostop (#22)
from ray_serve_cai.cluster.autostop import clear_stopped_mark, deleted_by_autostop, stopped_mark
from ray_serve_cai.cluster.conditions import Condition
from ray_serve_cai.cluster.errors import ClusterError
from ray_serve_cai.cluster.lock import cluster_lock, remove_stale_lock
from ray_serve_cai.cluster.plan import (
    CLUSTER_MARKER,
    FAILED,
    RUNNING,
    STARTING,
    Action,
    ActionKind,
    ObservedApp,
    Plan,
    desired_for,
    group_sizes,
    owned_apps,
    plan_changes,
)
from ray_serve_cai.cluster.runtimes import RuntimeChoiceError, resolve_runtimes
from ray_serve_cai.cluster.serve import converge_serve
from ray_serve_cai.cml import (
    Application,
    BadRequest,
    CMLClient,
    CMLError,
    Conflict,
    NotFound,
    Runtime,
    create_application_or_find,
)
from ray_serve_cai.config import ClusterSpec, NodeSpec, head_app_name
from ray_serve_cai.config.node_status import HEALTH_PATH, STATUS_PATH, HeadStatus, NodeHealth

log = logging.getLogger("ray_serve_cai.cluster")

# How often the head's status endpoint is asked while only Ray's view is missing (not an API call).
RAY_POLL_SECONDS = 0.25


@dataclass
class NodeStatus:
    name: str
    role: str
    group: str
    app_id: str | None = None
    app_status: str | None = None
    spec_current: bool = False
    in_ray: bool = False
    log_hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "group": self.group,
            "app_id": self.app_id,
            "app_status": self.app_status,
            "spec_current": self.spec_current,
            "in_ray": self.in_ray,
        }


@dataclass
class ClusterStatus:
    """Apps plus Ray's own view. `state` is `ready` only when every owned app runs with the
    desired spec, nothing surplus remains, and Ray reports every node alive."""

    cluster: str
    project_id: str
    state: str
    nodes: list[NodeStatus]
    surplus: list[str] = field(default_factory=list)
    ray: dict[str, Any] = field(default_factory=dict)
    dashboard_url: str | None = None
    problems: list[str] = field(default_factory=list)
    # What is deployed (the applied spec's summary and origin) and how the caller's config differs.
    applied: dict[str, Any] | None = None
    differences: list[str] = field(default_factory=list)
    # Per worker group: current (apps of the group), desired, min, max (None unless autoscaled).
    groups: list[dict[str, Any]] = field(default_factory=list)
    # Serve's applications (`ray-cai serve status` shape) when the spec has `serve:`; see cluster/serve.py.
    serve: dict[str, Any] | None = None
    # Why the state is what it is, one condition per aspect (see `derive_status`).
    conditions: list[Condition] = field(default_factory=list)
    # autostop (#22): the setting, the head's idle view, the stopped mark (see cluster/autostop.py).
    autostop: dict[str, Any] | None = None
    desired: list[NodeSpec] = field(default_factory=list, repr=False)  # the nodes it was derived for

    @property
    def autoscaler(self) -> dict[str, Any] | None:
        """The autoscaler's last decision, as the head's status endpoint reports it."""
        return self.ray.get("autoscaler") or None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def progress_line(self) -> str:
        """One line for progress displays: `<state>: a/n apps running, b/n nodes alive in Ray`."""
        total = len(self.nodes)
        running = sum(1 for n in self.nodes if n.app_status == RUNNING)
        in_ray = sum(1 for n in self.nodes if n.in_ray)
        line = f"{self.state}: {running}/{total} apps running, {in_ray}/{total} nodes alive in Ray"
        return line + (f", {len(self.surplus)} surplus" if self.surplus else "")

    def as_dict(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "project_id": self.project_id,
            "state": self.state,
            "nodes": [n.as_dict() for n in self.nodes],
            "surplus": self.surplus,
            "ray": self.ray,
            "dashboard_url": self.dashboard_url,
            "problems": self.problems,
            "applied": self.applied,
            "differences": self.differences,
            "groups": self.groups,
            "autoscaler": self.autoscaler,
            "serve": self.serve,
            "conditions": [c.as_dict() for c in self.conditions],
            "autostop": self.autostop,  # autostop (#22)
        }


@dataclass(frozen=True)
class Target:
    """What a pass aims at: the spec as configured (merged onto what is deployed), the same with a
    runtime for every part, those runtimes, and the record read from the observation."""

    configured: ClusterSpec
    effective: ClusterSpec
    runtimes: dict[str, str]
    record: AppliedRecord | None

    @property
    def needs_record(self) -> bool:
        return not same_applied(self.record, self.configured, self.runtimes)


ProgressCallback = Callable[[ClusterStatus], None]


def _observed(app: Application) -> ObservedApp:
    return ObservedApp(
        id=app.id,
        name=app.name,
        subdomain=app.subdomain or app.name,
        status=app.status or "",
        environment=dict(app.environment or {}),
    )


def _log_hint(app: Application | None) -> str:
    if app is None:
        return ""
    local_log = getattr(app, "log_path", None) or (app.model_extra or {}).get("log_path")
    if local_log:
        return f"logs: {local_log}"
    return f"logs: CML UI → Applications → {app.name} → Logs"


class RayCluster:
    """A Ray cluster whose head and workers are CML applications of one project."""

    def __init__(
        self,
        client: CMLClient,
        project_id: str,
        spec: ClusterSpec | ClusterRequest,
        *,
        poll_interval: float = 2.0,
        max_parallel: int = 16,
        lock_wait: float = 120.0,
        project_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.project_id = project_id
        self.request = spec if isinstance(spec, ClusterRequest) else ClusterRequest(spec)
        self.spec = self.request.spec
        self.poll_interval = poll_interval
        self.max_parallel = max_parallel
        self.lock_wait = lock_wait
        self.project_dir = project_dir  # where project-relative files (the Serve config) are; None = cwd
        # A lock outlives a run killed on another machine by at most this long (one on this
        # machine is taken over at once); a pass holds it only while it plans and applies.
        self.lock_ttl = 120.0
        self._listed_runtimes: list[Runtime] | None = None
        self._record_to_write: AppliedRecord | None = None
        # The watch, after its first pass, heals towards what is recorded as deployed instead of
        # asserting its own config again (another caller may have changed the cluster since).
        self._heal_only = False

    def _list_runtimes(self) -> list[Runtime]:
        if self._listed_runtimes is None:
            self._listed_runtimes = self.client.list_runtimes()
        return self._listed_runtimes

    def target(self, apps: Sequence[Application], *, deployed: bool = False) -> Target:
        """The spec this caller converges to, from one observation: its request merged onto the
        applied spec recorded with the cluster (`deployed=True`: the recorded spec itself), with the
        runtimes chosen once and kept (a list of runtimes only for a part that has none yet)."""
        record = read_record(apps, self.spec.name)
        configured = merge_request(record, self.request)
        if record is not None and (deployed or self._heal_only):
            configured = record.cluster_spec()
        known = observed_runtimes(apps, self.spec.name, [g.name for g in configured.worker_groups])
        if record is not None:
            known.update(record.runtimes)
        try:
            effective, runtimes = resolve_runtimes(configured, known, self._list_runtimes)
        except RuntimeChoiceError as err:
            raise ClusterError(str(err)) from None
        return Target(configured, effective, runtimes, record)

    def effective_spec(self, apps: Sequence[Application] | None = None) -> ClusterSpec:
        """The spec with a runtime for every part (see `target`)."""
        return self.target(self.observe() if apps is None else apps).effective

    # -- observe ---------------------------------------------------------------------------
    def observe(self) -> list[Application]:
        """Every application of the project, in one paginated list call."""
        return self.client.list_applications(self.project_id)

    # -- plan ------------------------------------------------------------------------------
    def plan(self, apps: Sequence[Application] | None = None) -> Plan:
        apps = self.observe() if apps is None else apps
        return self._plan(apps, self.target(apps))

    def _plan(self, apps: Sequence[Application], target: Target) -> Plan:
        observed = [_observed(a) for a in apps]
        return plan_changes(self.spec.name, desired_for(target.effective, observed), observed)

    def differences(self, apps: Sequence[Application]) -> list[str]:
        """How this caller's request differs from what is deployed (empty without a record)."""
        record = read_record(apps, self.spec.name)
        if record is None:
            return []
        lines = spec_differences(record.cluster_spec(), merge_request(record, self.request))
        if lines:
            lines.append(f"deployed: {record.origin.describe()}")
        commit = caller_commit()
        if record.origin.commit and commit and commit != record.origin.commit:
            lines.append(
                f"deployed from commit {record.origin.commit[:12]}; your checkout is at {commit[:12]}"
            )
        return lines

    # -- apply -----------------------------------------------------------------------------
    def apply(self, plan: Plan) -> None:
        """Carry out a plan: deletes, then creates/updates/restarts, each batch in parallel."""
        if plan.conflicts:
            raise ClusterError("; ".join(c.describe() for c in plan.conflicts))
        deletes = plan.of_kind(ActionKind.DELETE)
        others = [a for a in plan.actions if a.kind is not ActionKind.DELETE]
        self._run_parallel(self._delete, deletes)
        self._run_parallel(self._apply_one, others)

    def _run_parallel(self, fn: Callable[[Action], None], actions: Sequence[Action]) -> None:
        if not actions:
            return
        with ThreadPoolExecutor(max_workers=min(self.max_parallel, len(actions))) as pool:
            errors = [f.exception() for f in [pool.submit(fn, a) for a in actions]]
        failures = [e for e in errors if e is not None]
        if failures:
            raise ClusterError("; ".join(str(e) for e in failures)) from failures[0]

    def _apply_one(self, action: Action) -> None:
        assert action.node is not None
        if action.kind is ActionKind.CREATE:
            self._create(action.node)
        elif action.kind is ActionKind.UPDATE:
            assert action.app is not None
            log.info("updating %s (%s)", action.name, action.reason)
            self.client.update_application(self.project_id, action.app.id, **self._app_fields(action.node))
            self.client.restart_application(self.project_id, action.app.id)
        elif action.kind is ActionKind.RESTART:
            assert action.app is not None
            log.info("restarting %s (%s)", action.name, action.reason)
            self.client.restart_application(self.project_id, action.app.id)

    def _app_fields(self, node: NodeSpec) -> dict[str, Any]:
        fields = node.app_fields()
        if node.role == "head" and self._record_to_write is not None:
            fields["environment"][APPLIED_SPEC_VAR] = self._record_to_write.encode()
        return fields

    def _find_app(self, name: str) -> Application | None:
        return next((a for a in self.observe() if (a.subdomain or a.name) == name), None)

    def _create(self, node: NodeSpec) -> None:
        """Create one node's application; a create whose outcome is unknown is observed, not repeated."""

        fields = {"name": node.name, "subdomain": node.name, "description": node.description}
        try:
            create_application_or_find(
                self.client,
                self.project_id,
                {**fields, **self._app_fields(node)},
                owner=(CLUSTER_MARKER, self.spec.name),
            )
        except CMLError as err:
            raise ClusterError(f"could not create application {node.name!r}: {err}") from None
        log.info("created %s", node.name)

    def _delete(self, action: Action) -> None:
        """Delete an application. Official Cloudera code deletes running applications directly
        (reference §7); should a workspace refuse to delete a running one, stop it first."""
        assert action.app is not None
        log.info("deleting %s", action.name)
        app_id = action.app.id
        try:
            self.client.delete_application(self.project_id, app_id)
        except NotFound:
            return  # already gone: that is the desired state
        except (BadRequest, Conflict):
            with suppress(NotFound):
                self.client.stop_application(self.project_id, app_id)
                self.client.delete_application(self.project_id, app_id)

    # -- wait + verify ---------------------------------------------------------------------
    def status(self, apps: Sequence[Application] | None = None) -> ClusterStatus:
        """Apps (one list call) plus Ray's own view from the head's status endpoint."""
        apps = self.observe() if apps is None else apps
        target = self.target(apps, deployed=True)  # ready means "as deployed"
        observed = [_observed(a) for a in apps]
        head_name = head_app_name(self.spec.name)
        head = next((a for a in apps if (a.subdomain or a.name) == head_name), None)
        owned_head = head is not None and _observed(head).owned_by(self.spec.name)
        ray_view, ray_problem = ({}, None)
        if owned_head and head is not None and head.status == RUNNING:
            ray_view, ray_problem = self._ray_view(head_name)
        status = derive_status(
            self.spec.name,
            desired_for(target.effective, observed),
            apps,
            ray_view,
            ray_problem,
        )
        status.project_id = self.project_id
        status.dashboard_url = self.client.app_url(head_name) + "/" if owned_head else None
        status.applied = target.record.summary() if target.record else None
        status.differences = self.differences(apps) if target.record else []
        status.groups = group_sizes(target.effective, owned_apps(self.spec.name, observed), status.desired)
        apply_autostop(status, apps, target.record)  # autostop (#22): state `stopped`, the idle view
        return status

    def _ray_view(self, head_name: str) -> tuple[dict[str, Any], str | None]:
        try:
            response = self.client.app_request(head_name, "GET", STATUS_PATH)
        except CMLError as err:
            return {}, f"head status endpoint unreachable: {err}"
        if response.status_code != 200:
            return {}, f"head status endpoint answered HTTP {response.status_code}"
        try:
            return HeadStatus.model_validate(response.json()).body(), None
        except ValueError:  # non-JSON, or JSON that is not the status model (ValidationError)
            return {}, "head status endpoint answered with something else than its status"

    def wait_until_ready(
        self,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        apps: Sequence[Application] | None = None,
    ) -> ClusterStatus:
        """Poll until `ready`; fail fast on a failed app; deadline.

        At most one list call per poll interval whatever the cluster size. In between, once every
        app exists, the head's status endpoint (not an API call) is asked every `RAY_POLL_SECONDS`;
        when Ray sees every node, one list call confirms at once, so readiness is seen when it
        happens, not at the next poll. `apps` is a fresh observation to start from."""
        wait = timeout if timeout is not None else self.spec.startup_timeout
        deadline = time.monotonic() + wait
        outside_since: dict[str, float] = {}
        replaced: set[str] = set()
        while True:
            observed = self.observe() if apps is None else apps
            apps = None
            status = self.status(observed)
            if on_progress:
                on_progress(status)
            if status.ready:
                return status
            if status.state == "failed":
                raise ClusterError(_describe_failure("an application failed", status))
            outside = _outside_ray(status, outside_since)
            if time.monotonic() >= deadline:
                status.problems.extend(self._outside_ray_errors(outside))
                raise ClusterError(_describe_failure("timed out waiting for the cluster", status))
            # A node running but not in Ray for half the wait is replaced once (e.g. its Ray failed).
            late = {name: s for name, s in outside.items() if s > wait / 2 and name not in replaced}
            if late:
                replaced |= set(late)
                self.converge(extra=lambda apps, late=late: self._replace_outside_ray(apps, late))
                continue
            next_list = min(deadline, time.monotonic() + self.poll_interval)
            all_created = not status.surplus and all(n.app_id and n.spec_current for n in status.nodes)
            while time.monotonic() < next_list:
                time.sleep(min(RAY_POLL_SECONDS, max(0.0, next_list - time.monotonic())))
                if all_created and self._ray_reports_all(status):
                    # Ray sees every node: confirm with one list call now instead of at the next poll.
                    apps = self.observe()
                    break

    def _node_error(self, name: str) -> str:
        """The last error a node's own health page reports ('' when it has none or does not answer)."""
        try:
            health = NodeHealth.model_validate(
                self.client.app_request(name, "GET", HEALTH_PATH, timeout=5).json()
            )
        except (CMLError, ValueError):
            return ""
        return health.last_error or ""

    def _outside_ray_errors(self, outside: dict[str, float]) -> list[str]:
        problems = []
        for name, seconds in sorted(outside.items()):
            error = self._node_error(name)
            problems.append(
                f"{name}: running but not in Ray for {seconds:.0f}s; "
                + (f"last error: {error}" if error else "it reports no error")
            )
        return problems

    def _replace_outside_ray(self, apps: Sequence[Application], outside: dict[str, float]) -> list[Action]:
        """Restart actions for the named nodes that still run (one health request each, for the reason)."""
        nodes = {n.name: n for n in desired_for(self.target(apps).effective, [_observed(a) for a in apps])}
        actions = []
        for app in apps:
            name = app.subdomain or app.name
            if name in outside and name in nodes and app.status == RUNNING:
                error = self._node_error(name)
                reason = f"running but not in Ray for {outside[name]:.0f}s" + (f": {error}" if error else "")
                log.warning("replacing %s: %s", name, reason)
                actions.append(
                    Action(ActionKind.RESTART, name, node=nodes[name], app=_observed(app), reason=reason)
                )
        return actions

    def _ray_reports_all(self, status: ClusterStatus) -> bool:
        view, _problem = self._ray_view(head_app_name(self.spec.name))
        alive = {n.get("node_name") for n in view.get("nodes", []) if n.get("alive")}
        return all(n.name in alive for n in status.nodes)

    def _lock(self, runtime: str | None) -> AbstractContextManager[object]:
        """The cluster lock; its application runs `runtime` (ML Runtime projects need one)."""
        return cluster_lock(
            self.client,
            self.project_id,
            self.spec.name,
            ttl=self.lock_ttl,
            wait=self.lock_wait,
            runtime_identifier=runtime,
        )

    # -- verbs -----------------------------------------------------------------------------
    def converge(
        self,
        extra: Callable[[list[Application]], list[Action]] | None = None,
        defer: Callable[[Action], bool] | None = None,
    ) -> Plan:
        """One reconcile pass: observe and plan; when something must change, take the cluster lock,
        plan again under it (another run may have acted meanwhile) and apply. `extra` adds actions
        the planner cannot see from one observation (e.g. apps stuck in STARTING); it runs once.
        `defer` leaves out actions for a later pass (a failed app CML is about to restart)."""
        return self._converge(extra, defer)[0]

    def _converge(
        self,
        extra: Callable[[list[Application]], list[Action]] | None = None,
        defer: Callable[[Action], bool] | None = None,
    ) -> tuple[Plan, list[Application] | None]:
        """`converge`, also returning the observation when nothing was changed (still current)."""

        def planned(apps: Sequence[Application], target: Target) -> Plan:
            plan = self._plan(apps, target)
            if defer is None:
                return plan
            return replace(plan, actions=tuple(a for a in plan.actions if not defer(a)))

        apps = self.observe()
        if remove_stale_lock(self.client, self.project_id, self.spec.name, apps):
            apps = self.observe()
        # autostop (#22): a stop is not a failure — the watch leaves a cluster the head stopped (or
        # deleted) alone; any other pass (up, deploy, scale) starts it: the stopped mark goes first.
        if self._heal_only and (
            stopped_mark(apps, self.spec.name)
            or deleted_by_autostop(apps, self.spec.name, self.project_dir or Path.cwd())
        ):
            return Plan((), ()), apps
        if not self._heal_only and clear_stopped_mark(self.client, self.project_id, self.spec.name, apps):
            apps = self.observe()
        target = self.target(apps)
        plan = planned(apps, target)
        extra_actions = extra(apps) if extra else []
        if plan.is_noop and not extra_actions:
            if not target.needs_record:
                return plan, apps
            self._write_record(apps, target)  # e.g. a cluster made before records existed
            return plan, None
        with self._lock(target.runtimes.get("head")):
            apps = self.observe()
            target = self.target(apps)
            plan = planned(apps, target)
            busy = {a.name for a in plan.actions}
            more = tuple(a for a in extra_actions if a.name not in busy)
            plan = replace(plan, actions=plan.actions + more)
            self._record_to_write = self._new_record(target) if target.needs_record else None
            try:
                self.apply(plan)
            finally:
                record, self._record_to_write = self._record_to_write, None
            head = head_app_name(self.spec.name)
            head_written = any(
                a.name == head and a.kind in (ActionKind.CREATE, ActionKind.UPDATE) for a in plan.actions
            )
            if record is not None and not head_written:
                self._write_record(apps, target, record)
        return plan, None

    def _new_record(self, target: Target) -> AppliedRecord:
        commit = self.request.commit or caller_commit()
        return new_record(target.configured, target.runtimes, self.request, commit=commit)

    def _write_record(
        self, apps: Sequence[Application], target: Target, record: AppliedRecord | None = None
    ) -> None:
        """Record the applied spec on the head application's environment (a PATCH, no restart)."""
        head = next((a for a in apps if (a.subdomain or a.name) == head_app_name(self.spec.name)), None)
        if head is None or not _observed(head).owned_by(self.spec.name):
            return  # no head yet: it gets the record when it is created
        record = record or self._new_record(target)
        environment = {**(head.environment or {}), APPLIED_SPEC_VAR: record.encode()}
        try:
            self.client.update_application(self.project_id, head.id, environment=environment)
        except NotFound:
            return  # deleted meanwhile: the next pass creates it with the record
        except CMLError as err:
            raise ClusterError(f"could not record the applied spec on {head.name!r}: {err}") from None

    def up(
        self, *, wait: bool = True, timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> tuple[Plan, ClusterStatus]:
        """Converge: plan, apply, then (by default) wait until Ray reports every node alive."""
        plan, apps = self._converge()
        status = self.wait_until_ready(timeout, on_progress, apps=apps) if wait else self.status(apps)
        status = converge_serve(self, status, wait=wait, timeout=timeout, on_progress=on_progress)
        return plan, status

    def watch(
        self,
        *,
        interval: float = 30.0,
        on_pass: Callable[[Plan, ClusterStatus], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        max_passes: int | None = None,
    ) -> None:
        """Keep reconciling every `interval` seconds: dead apps are restarted, missing ones created,
        and an app stuck in STARTING, or running but not in Ray, past `startup_timeout` is restarted."""
        healer = _Healer(self)
        passes = 0
        while not should_stop():
            plan = self.converge(extra=healer.stuck_apps, defer=healer.left_to_cml)
            self._heal_only = True  # later passes keep what is deployed, whoever deployed it
            status = converge_serve(self, self.status(), wait=False)
            if on_pass:
                on_pass(plan, status)
            passes += 1
            if max_passes is not None and passes >= max_passes:
                return
            end = time.monotonic() + interval
            while time.monotonic() < end and not should_stop():
                time.sleep(min(0.5, interval))

    def down(self) -> list[str]:
        """Stop and delete every application this cluster owns (nodes copy their logs on stop)."""
        apps = self.observe()
        remove_stale_lock(self.client, self.project_id, self.spec.name, apps)
        mine = owned_apps(self.spec.name, [_observed(a) for a in apps])
        if not mine:
            return []
        runtime = next((a.runtime_identifier for a in apps if a.id in {m.id for m in mine}), None)
        with self._lock(runtime or self.target(apps).runtimes.get("head")):
            mine = owned_apps(self.spec.name, [_observed(a) for a in self.observe()])
            actions = [Action(ActionKind.DELETE, app.subdomain, app=app, reason="down") for app in mine]
            if not self.spec.autoscaled_groups:
                self._run_parallel(self._delete, actions)
                return [a.name for a in actions]
            # The head first: Ray's autoscaler runs there and could create a worker meanwhile;
            # one more look removes a worker it created before it stopped.
            head = head_app_name(self.spec.name)
            self._run_parallel(self._delete, [a for a in actions if a.name == head])
            self._run_parallel(self._delete, [a for a in actions if a.name != head])
            gone = {a.app.id for a in actions if a.app is not None}
            listed = owned_apps(self.spec.name, [_observed(a) for a in self.observe()])
            late_actions = [
                Action(ActionKind.DELETE, app.subdomain, app=app, reason="down")
                for app in listed
                if app.id not in gone
            ]
            self._run_parallel(self._delete, late_actions)
        return [a.name for a in actions + late_actions]


class _Healer:
    """What the watch remembers between passes, to act on what one observation cannot show: apps
    stuck in STARTING, apps running but not in Ray, and failed apps left to CML's own restart."""

    def __init__(self, cluster: RayCluster) -> None:
        self.cluster = cluster
        self.starting_since: dict[str, float] = {}
        self.outside_since: dict[str, float] = {}
        self.failed_since: dict[str, float] = {}

    def left_to_cml(self, action: Action) -> bool:
        """CML restarts a failed application by itself (reference §5): observe, then act — the
        watch restarts it only once it stayed failed for `cml_restart_wait` seconds."""
        if action.kind is not ActionKind.RESTART or action.app is None or action.app.status != FAILED:
            return False
        waited = time.monotonic() - self.failed_since.setdefault(action.app.id, time.monotonic())
        if waited < self.cluster.spec.cml_restart_wait:
            log.info("%s failed %.0fs ago: left to CML's automatic restart for now", action.name, waited)
            return True
        return False  # its entry goes once the app is no longer failed (see stuck_apps)

    def stuck_apps(self, apps: list[Application]) -> list[Action]:
        failed = {a.id for a in apps if a.status == FAILED}
        for app_id in [i for i in self.failed_since if i not in failed]:
            del self.failed_since[app_id]  # restarted (by CML, or by us) or gone
        timeout = self.cluster.spec.startup_timeout
        outside = _outside_ray(self.cluster.status(apps), self.outside_since)
        late = {name: s for name, s in outside.items() if s > timeout}
        for name in late:
            self.outside_since[name] = time.monotonic()  # the restart takes a while to show
        return self.stuck_in_starting(apps) + self.cluster._replace_outside_ray(apps, late)

    def stuck_in_starting(self, apps: list[Application]) -> list[Action]:
        now = time.monotonic()
        observed = [_observed(a) for a in apps]
        nodes = {n.name: n for n in desired_for(self.cluster.target(apps).effective, observed)}
        starting = {a.id: a for a in apps if a.status == STARTING and (a.subdomain or a.name) in nodes}
        for app_id in [i for i in self.starting_since if i not in starting]:
            del self.starting_since[app_id]
        actions = []
        for app in starting.values():
            since = self.starting_since.setdefault(app.id, now)
            if now - since > self.cluster.spec.startup_timeout:
                name = app.subdomain or app.name
                reason = f"stuck in STARTING for {now - since:.0f}s"
                action = Action(ActionKind.RESTART, name, node=nodes[name], app=_observed(app), reason=reason)
                actions.append(action)
                self.starting_since[app.id] = now
        return actions


def derive_status(
    cluster: str,
    desired: Sequence[NodeSpec],
    apps: Sequence[Application],
    ray_view: dict[str, Any],
    ray_problem: str | None = None,
) -> ClusterStatus:
    """The cluster's status from one observation and Ray's own view (pure: no I/O).

    `state` is the one word (`absent`, `failed`, `pending`, `ready`); `conditions` say why, one
    per aspect (KubeRay-style): AppsProvisioned (every desired app exists with the desired spec and
    nothing surplus remains), HeadReady (the head runs and answers with Ray's view), RayNodesAlive
    (Ray sees every node), Ready (all of it now)."""
    by_name = {(a.subdomain or a.name): a for a in apps}
    mine = {o.subdomain: o for o in owned_apps(cluster, [_observed(a) for a in apps])}
    nodes: list[NodeStatus] = []
    for node in desired:
        app = by_name.get(node.name) if node.name in mine else None
        nodes.append(
            NodeStatus(
                name=node.name,
                role=node.role,
                group=node.group,
                app_id=app.id if app else None,
                app_status=app.status if app else None,
                spec_current=bool(app) and mine[node.name].spec_hash == node.spec_hash,
                log_hint=_log_hint(app),
            )
        )
    desired_names = {n.name for n in desired}
    surplus = sorted(name for name in mine if name not in desired_names)
    alive_names = {n.get("node_name") for n in ray_view.get("nodes", []) if n.get("alive")}
    for node_status in nodes:
        node_status.in_ray = node_status.name in alive_names

    problems = [ray_problem] if ray_problem else []
    problems += [f"{n.name}: {n.app_status}; {n.log_hint}" for n in nodes if n.app_status == FAILED]
    missing = [n.name for n in nodes if not n.app_id]
    outdated = [n.name for n in nodes if n.app_id and not n.spec_current]
    provisioned = not missing and not outdated and not surplus
    head = next((n for n in nodes if n.role == "head"), None)
    head_ready = head is not None and head.app_status == RUNNING and bool(ray_view) and not ray_problem
    not_in_ray = [n.name for n in nodes if not n.in_ray]
    all_alive = not not_in_ray and ray_view.get("alive_nodes") == len(nodes)
    running = all(n.app_status == RUNNING for n in nodes)
    if not mine:
        state = "absent"
    elif any(n.app_status == FAILED for n in nodes):
        state = "failed"
    elif provisioned and running and all_alive:
        state = "ready"
    else:
        state = "pending"

    def why(items: list[str], text: str) -> str:
        return f"{text}: {', '.join(items)}" if items else ""

    not_running = [f"{n.name} ({(n.app_status or 'missing').removeprefix('APPLICATION_').lower()})"
                   for n in nodes if n.app_id and n.app_status != RUNNING]  # fmt: skip
    conditions = [
        Condition(
            "AppsProvisioned",
            provisioned,
            "" if provisioned else ("Missing" if missing else "Outdated" if outdated else "Surplus"),
            why(missing, "no application") or why(outdated, "outdated spec") or why(surplus, "surplus"),
        ),
        Condition(
            "HeadReady",
            head_ready,
            "" if head_ready else ("NoHead" if head is None or not head.app_id else "HeadNotAnswering"),
            ray_problem or ("" if head_ready or head is None else f"head application {head.app_status}"),
        ),
        Condition(
            "RayNodesAlive",
            all_alive,
            "" if all_alive else "NotInRay",
            why(not_in_ray, f"{len(alive_names)}/{len(nodes)} alive in Ray; not yet"),
        ),
        Condition(
            "Ready",
            state == "ready",
            "" if state == "ready" else state.capitalize(),
            why(not_running, "not running") if state != "ready" else "",
        ),
    ]
    return ClusterStatus(
        cluster=cluster,
        project_id="",
        state=state,
        nodes=nodes,
        surplus=surplus,
        ray=ray_view,
        problems=problems,
        conditions=conditions,
        desired=list(desired),
    )


def _outside_ray(status: ClusterStatus, since: dict[str, float]) -> dict[str, float]:
    """Seconds each node has been running its current spec but not in Ray, as far as this caller
    has seen (`since` keeps the first sighting). Workers count only while the head reports Ray's
    view: without it nothing is known about them."""
    now = time.monotonic()
    viewed = "nodes" in status.ray
    outside = {
        n.name
        for n in status.nodes
        if n.app_status == RUNNING and n.spec_current and not n.in_ray and (viewed or n.role == "head")
    }
    for name in list(since):
        if name not in outside:
            del since[name]
    return {name: now - since.setdefault(name, now) for name in sorted(outside)}


def _describe_failure(headline: str, status: ClusterStatus) -> str:
    lines = [f"{headline} (cluster {status.cluster!r}, state {status.state}):"]
    for node in status.nodes:
        if node.app_status == RUNNING and node.in_ray:
            continue
        where = "not in Ray yet" if node.app_status == RUNNING else (node.app_status or "no application")
        hint = f"; {node.log_hint}" if node.log_hint else ""
        lines.append(f"  {node.name}: {where}{hint}")
    lines.extend(f"  {p}" for p in status.problems if "logs:" not in p)
    return "\n".join(lines)
