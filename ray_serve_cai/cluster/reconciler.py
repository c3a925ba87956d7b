"""The I/O shell of the reconciler: `RayCluster`, a Ray cluster whose head and workers are CML
applications of one project.

A pass is a pipeline of values: `observe()` → `Observation` (one list call, the head's Ray view) →
`plan(observation)` (pure, `passes.plan_pass`) → `apply(plan, observation)` (the only step that
changes anything) → `status(observation)` (pure, `passes.cluster_status`). The object holds only
what the caller asked for (client, project, request, options): nothing is carried between passes
but what a loop (`wait_until_ready`, `watch`) keeps in its own variables. Creates run in parallel
with bounded concurrency; waits poll once per interval whatever the cluster size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

from ray_serve_cai.access.head import read_head_status, read_node_error
from ray_serve_cai.cluster.applied import APPLIED_SPEC_VAR, AppliedRecord, ClusterRequest, utc_now
from ray_serve_cai.cluster.autostop import clear_stopped_mark, deleted_by_autostop, head_is_down, stopped_mark
from ray_serve_cai.cluster.errors import ClusterError
from ray_serve_cai.cluster.lock import cluster_lock, remove_stale_lock
from ray_serve_cai.cluster.nodes import create_node_app, delete_app, run_parallel
from ray_serve_cai.cluster.observation import Observation
from ray_serve_cai.cluster.passes import (
    cluster_status,
    desired_spec,
    differences,
    needs_catalog,
    plan_pass,
    provisioned_record,
)
from ray_serve_cai.cluster.plan import Action, ActionKind, Plan
from ray_serve_cai.cluster.serve import ServeScope, converge_serve
from ray_serve_cai.cluster.status import ClusterStatus, alive_in_ray, describe_failure
from ray_serve_cai.cluster.watch import Healer, OutsideRay, restarts_outside_ray
from ray_serve_cai.cml import APPLICATION_RUNNING, CMLClient, CMLError, NotFound, Runtime
from ray_serve_cai.config import ClusterSpec, head_app_name

log = logging.getLogger("ray_serve_cai.cluster")

# How often the head's status endpoint is asked while only Ray's view is missing (not an API call).
RAY_POLL_SECONDS = 0.25

ProgressCallback = Callable[[ClusterStatus], None]


class RayCluster:
    """A Ray cluster whose head and workers are CML applications of one project.

    Verbs (SkyPilot-style, one signature each): `observe`, `plan`, `status`, `up`,
    `wait_until_ready`, `watch`, `down`, and `scaled` for a size change. See the module docstring.
    """

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
        request = spec if isinstance(spec, ClusterRequest) else ClusterRequest(spec)
        self.request = request.resolved()  # the caller's commit: one `git rev-parse` per command
        self.spec = self.request.spec
        self.poll_interval = poll_interval
        self.max_parallel = max_parallel
        self.lock_wait = lock_wait
        self.project_dir = project_dir  # where project-relative files (the Serve config) are; None = cwd
        # A lock outlives a run killed on another machine by at most this long (one on this
        # machine is taken over at once); a pass holds it only while it plans and applies.
        self.lock_ttl = 120.0

    def scaled(self, replicas: int, group: str | None = None) -> RayCluster:
        """The same cluster asked for `replicas` workers in `group` (None: the only group) — the one
        `scale` merge, for the CLI and Python callers alike. BadInput before any API call (an
        autoscaled group's size is the autoscaler's)."""
        cluster = RayCluster(
            self.client,
            self.project_id,
            self.request.with_replicas(replicas, group),
            poll_interval=self.poll_interval,
            max_parallel=self.max_parallel,
            lock_wait=self.lock_wait,
            project_dir=self.project_dir,
        )
        cluster.lock_ttl = self.lock_ttl
        return cluster

    @property
    def serve_scope(self) -> ServeScope:
        """What Serve's pass (`cluster.serve`) needs of this cluster."""
        return ServeScope(
            self.client,
            self.spec.name,
            self.spec.serve,
            Path(self.project_dir or Path.cwd()),
            self.spec.startup_timeout,
            project_id=self.project_id,
            runtime_identifier=self.spec.runtime_of(None),
            has_workers=any(g.replicas or g.max_replicas for g in self.spec.worker_groups),
        )

    # -- observe ---------------------------------------------------------------------------
    def observe(self, *, ray: bool = True, runtimes: tuple[Runtime, ...] | None = None) -> Observation:
        """One observation: every application of the project (one paginated list call), Ray's view
        from the head's status endpoint when the head runs (`ray=False`: not asked), and the runtime
        catalog only when a part of the spec has no runtime yet (`runtimes`: one this pass listed
        already)."""
        apps = tuple(self.client.list_applications(self.project_id))
        observation = Observation(self.spec.name, self.project_id, apps, at=utc_now())
        head = observation.head
        if head is not None:
            observation = replace(observation, head_url=self.client.app_url(head))
            if ray and head.status == APPLICATION_RUNNING:
                view, problem = read_head_status(self.client, head.key)
                observation = replace(observation, ray=view, ray_problem=problem)
        if needs_catalog(observation, self.request):
            catalog = runtimes if runtimes is not None else tuple(self.client.list_runtimes())
            observation = replace(observation, runtimes=catalog)
        return observation

    def _observe_clean(self, *, ray: bool = True) -> Observation:
        """An observation without a stale lock: one left by a killed run is removed first (then the
        project is listed once more)."""
        observation = self.observe(ray=ray)
        if remove_stale_lock(self.client, self.project_id, self.spec.name, observation.lock):
            observation = self.observe(ray=ray)
        return observation

    # -- pure views of one observation -------------------------------------------------------
    def plan(self, observation: Observation | None = None) -> Plan:
        """What `up` would change (pure over the observation; one is made when none is given)."""
        return plan_pass(observation or self.observe(ray=False), self.request)

    def status(self, observation: Observation | None = None) -> ClusterStatus:
        """Apps plus Ray's own view, "as deployed" (pure over the observation)."""
        return cluster_status(observation or self.observe(), self.request)

    def differences(self, observation: Observation) -> list[str]:
        """How this caller's request differs from what is deployed (empty without a record)."""
        return differences(observation, self.request)

    def effective_spec(self, observation: Observation | None = None) -> ClusterSpec:
        """The spec with a runtime for every part (see `passes.desired_spec`)."""
        return desired_spec(observation or self.observe(ray=False), self.request).effective

    # -- apply -----------------------------------------------------------------------------
    def apply(self, plan: Plan, observation: Observation) -> None:
        """Carry out a plan made from `observation`: deletes, then creates/updates/restarts, each
        batch in parallel; then the plan's record on the head when no create/update carried it."""
        if plan.conflicts:
            raise ClusterError("; ".join(c.describe() for c in plan.conflicts))
        deletes = plan.of_kind(ActionKind.DELETE)
        others = [a for a in plan.actions if a.kind is not ActionKind.DELETE]
        self._run_parallel(self._delete, deletes)
        self._run_parallel(lambda action: self._apply_one(action, plan.record), others)
        head = head_app_name(self.spec.name)
        head_written = any(
            a.name == head and a.kind in (ActionKind.CREATE, ActionKind.UPDATE) for a in plan.actions
        )
        if plan.record is not None and not head_written:
            self._write_record(observation, plan.record)

    def _run_parallel(self, fn: Callable[[Action], None], actions: Sequence[Action]) -> None:
        failures = run_parallel(fn, actions, self.max_parallel)
        if failures:
            raise ClusterError("; ".join(str(e) for e in failures)) from failures[0]

    def _apply_one(self, action: Action, record: AppliedRecord | None) -> None:
        assert action.node is not None
        if action.kind is ActionKind.CREATE:
            try:
                create_node_app(self.client, self.project_id, self.spec.name, action.node, record=record)
            except CMLError as err:
                raise ClusterError(f"could not create application {action.name!r}: {err}") from None
            return
        assert action.app is not None
        if action.kind is ActionKind.UPDATE:
            log.info("updating %s (%s)", action.name, action.reason)
            fields = action.node.app_fields()
            if action.node.role == "head" and record is not None:
                fields["environment"][APPLIED_SPEC_VAR] = record.encode()
            self.client.update_application(self.project_id, action.app.id, **fields)
        else:
            log.info("restarting %s (%s)", action.name, action.reason)
        self.client.restart_application(self.project_id, action.app.id)

    def _delete(self, action: Action) -> None:
        assert action.app is not None
        delete_app(self.client, self.project_id, action.app.id, action.name)

    def _write_record(self, observation: Observation, record: AppliedRecord) -> None:
        """Record the applied spec on the head application's environment (a PATCH, no restart)."""
        head = observation.head
        if head is None:
            return  # no head yet: it gets the record when it is created
        environment = {**(head.environment or {}), APPLIED_SPEC_VAR: record.encode()}
        try:
            self.client.update_application(self.project_id, head.id, environment=environment)
        except NotFound:
            return  # deleted meanwhile: the next pass creates it with the record
        except CMLError as err:
            raise ClusterError(f"could not record the applied spec on {head.name!r}: {err}") from None

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

    # -- a pass ----------------------------------------------------------------------------
    def converge(
        self,
        observation: Observation,
        *,
        deployed: bool = False,
        extra: Sequence[Action] = (),
        defer: Callable[[Action], bool] | None = None,
        ray: bool = False,
    ) -> tuple[Plan, Observation | None]:
        """One reconcile pass from `observation`: plan; when an application must change, take the
        cluster lock, observe and plan again under it (another run may have acted meanwhile) and
        apply. `extra` are actions the planner cannot see in one observation (see `plan_pass`),
        `defer` leaves some out for a later pass. Returns the plan carried out and the observation
        it was made from (under the lock; `ray=True`: with Ray's view) — None when nothing was
        written, so `observation` is still current."""
        # Autostop: a stop is not a failure — a healing pass (`deployed`) leaves a cluster the head
        # stopped (or deleted) alone; a deliberate pass (up, deploy, scale) starts it: the mark goes first.
        if deployed and (
            stopped_mark(observation.apps, self.spec.name)
            or deleted_by_autostop(observation.apps, self.spec.name, self.project_dir or Path.cwd())
        ):
            return Plan((), ()), None
        if not deployed and clear_stopped_mark(
            self.client, self.project_id, self.spec.name, observation.apps
        ):
            if head_is_down(observation.apps, self.spec.name):
                # Nothing of Ray ran while it was stopped: the cluster starts fresh, not from the GCS
                # state of before the stop (head fault tolerance), and Serve from its config again.
                self._remove_gcs_state()
            observation = self.observe(ray=ray, runtimes=observation.runtimes)
        plan = plan_pass(observation, self.request, deployed=deployed, extra=extra, defer=defer)
        if plan.is_noop:
            if plan.record is None:
                return plan, None
            self._write_record(observation, plan.record)  # e.g. a cluster made before records
            return plan, observation
        with self._lock(plan.head_runtime):
            under_lock = self.observe(ray=ray, runtimes=observation.runtimes)
            plan = plan_pass(under_lock, self.request, deployed=deployed, extra=extra, defer=defer)
            self.apply(plan, under_lock)
        return plan, under_lock

    # -- verbs -----------------------------------------------------------------------------
    def up(
        self, *, wait: bool = True, timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> tuple[Plan, ClusterStatus]:
        """Converge: plan, apply, then (by default) wait until Ray reports every node alive; then
        Serve's pass over the same status."""
        observation = self._observe_clean()
        plan, changed = self.converge(observation)
        current = observation if changed is None else None
        if wait:
            status = self.wait_until_ready(timeout, on_progress, observation=current)
        else:
            status = self.status(current or self.observe())
        status = converge_serve(self.serve_scope, status, wait=wait, timeout=timeout, on_progress=on_progress)
        return plan, status

    def wait_until_ready(
        self,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        *,
        observation: Observation | None = None,
    ) -> ClusterStatus:
        """Poll until `ready`; fail fast on a failed app; deadline.

        One list call per poll interval whatever the cluster size, also when a node is replaced
        (its observation under the lock is the next poll's). In between, once every app exists, the
        head's status endpoint (not an API call) is asked every `RAY_POLL_SECONDS`; when Ray sees
        every node, one list call confirms at once. `observation` is a fresh one to start from.
        The first time the cluster is ready, that is recorded (`AppsProvisioned` latches)."""
        wait = timeout if timeout is not None else self.spec.startup_timeout
        deadline = time.monotonic() + wait
        outside = OutsideRay()
        replaced: set[str] = set()
        current = observation or self.observe()
        while True:
            status = self.status(current)
            if on_progress:
                on_progress(status)
            if status.ready:
                self._latch_provisioned(current, status)
                return status
            if status.state == "failed":
                raise ClusterError(describe_failure("an application failed", status))
            seconds_outside = outside.update(status)
            if time.monotonic() >= deadline:
                status.problems.extend(self._outside_ray_errors(seconds_outside))
                raise ClusterError(describe_failure("timed out waiting for the cluster", status))
            # A node running but not in Ray for half the wait is replaced once (e.g. its Ray failed).
            late = {name: s for name, s in seconds_outside.items() if s > wait / 2 and name not in replaced}
            next_observation: Observation | None = None
            if late:
                replaced |= set(late)
                actions = restarts_outside_ray(current, status, late, self._node_error)
                _plan, next_observation = self.converge(current, deployed=True, extra=actions, ray=True)
            current = next_observation or self._next_poll(current, status, deadline)

    def _next_poll(self, current: Observation, status: ClusterStatus, deadline: float) -> Observation:
        """Wait for the next poll and observe; earlier when Ray sees every node."""
        next_list = min(deadline, time.monotonic() + self.poll_interval)
        all_created = not status.surplus and all(n.app_id and n.spec_current for n in status.nodes)
        while time.monotonic() < next_list:
            time.sleep(min(RAY_POLL_SECONDS, max(0.0, next_list - time.monotonic())))
            if all_created and self._ray_reports_all(current, status):
                break  # Ray sees every node: confirm with one list call now instead of at the next poll
        return self.observe()

    def _latch_provisioned(self, observation: Observation, status: ClusterStatus) -> None:
        record = provisioned_record(observation, status)
        if record is not None:
            self._write_record(observation, record)

    def _node_error(self, name: str) -> str:
        return read_node_error(self.client, name)

    def _outside_ray_errors(self, outside: dict[str, float]) -> list[str]:
        problems = []
        for name, seconds in sorted(outside.items()):
            error = self._node_error(name)
            problems.append(
                f"{name}: running but not in Ray for {seconds:.0f}s; "
                + (f"last error: {error}" if error else "it reports no error")
            )
        return problems

    def _ray_reports_all(self, current: Observation, status: ClusterStatus) -> bool:
        """Whether the head's Ray view has every node of `status` alive, by the status's own rule
        (`alive_in_ray`: a Ray node of the application's current start, not a previous raylet)."""
        view, _problem = read_head_status(self.client, head_app_name(self.spec.name))
        apps = current.by_key
        return all(
            alive_in_ray(view, n.name, apps[n.name].starting_at if n.name in apps else None)
            for n in status.nodes
        )

    def watch(
        self,
        *,
        interval: float = 30.0,
        on_pass: Callable[[Plan, ClusterStatus], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        max_passes: int | None = None,
    ) -> None:
        """Keep reconciling every `interval` seconds: dead apps are restarted, missing ones created,
        and an app stuck in STARTING, or running but not in Ray, past `startup_timeout` is restarted.
        The first pass applies this caller's request; later ones heal towards what is recorded as
        deployed (another caller may have changed the cluster since). Each pass: one observation,
        one status, the healer's actions from both, one plan; Serve's pass over the status."""
        healer = Healer(self.spec.startup_timeout, self.spec.cml_restart_wait)
        passes = 0
        while not should_stop():
            observation = self._observe_clean()
            status = self.status(observation)
            extra = healer.actions(observation, status, self._node_error)
            plan, changed = self.converge(
                observation, deployed=passes > 0, extra=extra, defer=healer.left_to_cml
            )
            if changed is not None:
                status = self.status(self.observe())  # what the pass changed shows in its status
            status = converge_serve(self.serve_scope, status, wait=False)
            if on_pass:
                on_pass(plan, status)
            passes += 1
            if max_passes is not None and passes >= max_passes:
                return
            end = time.monotonic() + interval
            while time.monotonic() < end and not should_stop():
                time.sleep(min(0.5, interval))

    def down(self) -> list[str]:
        """Stop and delete every application this cluster owns (nodes copy their logs on stop), then
        the head's stored GCS state (head fault tolerance): a later cluster of this name starts fresh."""
        removed = self._delete_apps()
        self._remove_gcs_state()
        return removed

    def _remove_gcs_state(self) -> None:
        """Delete `.ray-cai/<cluster>/gcs/` (RocksDB, lease, epochs, failover record; see
        ray_serve_cai.node.gcs_storage) through the project files API; none there is fine."""
        path = f".ray-cai/{self.spec.name}/gcs"
        try:
            self.client.delete_project_file(self.project_id, path)
        except NotFound:
            return
        except CMLError as err:
            log.warning("could not remove the stored GCS state %s: %s", path, err)
            return
        log.info("removed the stored GCS state %s", path)

    def _delete_apps(self) -> list[str]:
        observation = self._observe_clean(ray=False)
        if not observation.owned:
            return []
        owned = {app.id for app in observation.owned}
        runtime = next((a.runtime_identifier for a in observation.apps if a.id in owned), None)
        with self._lock(runtime or self.plan(observation).head_runtime):
            mine = self.observe(ray=False).owned
            actions = [Action(ActionKind.DELETE, app.subdomain, app=app, reason="down") for app in mine]
            if not self.spec.autoscaled_groups:
                self._run_parallel(self._delete, actions)
                return [a.name for a in actions]
            # The head first: Ray's autoscaler runs there and could create a worker meanwhile;
            # one more look removes a worker it created before it stopped.
            head_name = head_app_name(self.spec.name)
            self._run_parallel(self._delete, [a for a in actions if a.name == head_name])
            self._run_parallel(self._delete, [a for a in actions if a.name != head_name])
            gone = {a.app.id for a in actions if a.app is not None}
            late_actions = [
                Action(ActionKind.DELETE, app.subdomain, app=app, reason="down")
                for app in self.observe(ray=False).owned
                if app.id not in gone
            ]
            self._run_parallel(self._delete, late_actions)
        return [a.name for a in actions + late_actions]
