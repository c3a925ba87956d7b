"""`CMLNodeProvider`: Ray's autoscaler adds and removes worker applications through the CML API.

Ray's own monitor (started by `ray start --head --autoscaling-config=...` on the head application)
loads this class for `provider.type: external`. It is a `BatchingNodeProvider`, as KubeRay's v1
autoscaler is: every autoscaler update starts with `get_node_data` — ONE `list_applications` call —
and ends with at most one `submit_scale_request`.

* Nodes are applications of this cluster (marker `RAY_CAI_CLUSTER`), keyed by application id; a
  node's "ip" is its `NODE_ID_AS_RESOURCE` (`use_node_id_as_ip`), which the node advertises to Ray.
* One owner per action: the provider decides how many workers a group gets (Ray's demand within
  min/max); creating and deleting an app is the cluster layer's one path
  (`ray_serve_cai.cluster.nodes`: the same fields, markers, spec hash and create-then-look rule as
  `ray-cai up`), names come from its one free-index rule (`cluster.plan.free_indices`), and a batch
  of creates runs in parallel under the cluster lock `up` and the watch take (held elsewhere: this
  update creates nothing, the next tries again). The spec is the applied spec on the head
  application (`RAY_CAI_APPLIED_SPEC`), read from the same list call; the head's own environment
  is the fallback.
* Deletions vanish from what the autoscaler reads at once (tombstones, kept until CML no longer
  lists the app; a failed delete is retried). A create is never repeated blindly: a lost answer is
  resolved by looking (`create_or_find`), and a name created or maybe created stays reserved until
  the list shows it (or a grace period passes). A failing create backs off per group; a group never
  exceeds `max_replicas` counting the apps not yet listed.
* Only autoscaled groups are the autoscaler's: fixed groups are shown to Ray (so their capacity
  counts) pinned at their size, and requests to change them are ignored.
* The API key comes only from the workload's environment (`CDSW_APIV2_KEY`); it is never logged
  (the CML client redacts it) nor written anywhere.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray.autoscaler.batching_node_provider import BatchingNodeProvider, NodeData, ScaleRequest
from ray.autoscaler.tags import NODE_KIND_HEAD, NODE_KIND_WORKER, STATUS_UP_TO_DATE, STATUS_UPDATE_FAILED

from ray_serve_cai.atomic import write_json_atomically
from ray_serve_cai.cluster.errors import ClusterError, LockHeld
from ray_serve_cai.cluster.lock import cluster_lock, default_owner
from ray_serve_cai.cluster.nodes import create_node_app, delete_app
from ray_serve_cai.cluster.plan import free_indices, taken_indices
from ray_serve_cai.cml import (
    APPLICATION_FAILED,
    APPLICATION_RUNNING,
    APPLICATION_STOPPED,
    Application,
    CMLClient,
    CMLError,
    CMLSettings,
    CreateOutcomeUnknown,
    is_permanent,
)
from ray_serve_cai.config import (
    APPLIED_SPEC_VARIABLE,
    NODE_ID_RESOURCE_VARIABLE,
    ClusterSpec,
    NodeSpec,
    head_app_name,
    spec_from_applied,
    worker_index_of,
    worker_node,
)
from ray_serve_cai.config.autoscaling import (
    HEAD_NODE_TYPE,
    decision_path,
    ray_autoscaling_config,
)
from ray_serve_cai.config.cluster import WorkerGroupSpec
from ray_serve_cai.config.node_env import CLUSTER_VARIABLE, GROUP_VARIABLE, ROLE_VARIABLE

log = logging.getLogger("ray_serve_cai.autoscale")

# A created (or maybe created) name stays reserved this long while the list does not show it yet.
PENDING_GRACE_SECONDS = 60.0
DELETE_RETRY_SECONDS = 10.0
BACKOFF_FIRST_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 60.0
MAX_PARALLEL_CREATES = 16
# The cluster lock around a batch of creates: held seconds at most, and how long failing creates of
# the lock itself are retried before this update gives up (the next one tries again).
LOCK_TTL_SECONDS = 60.0
LOCK_PATIENCE_SECONDS = 5.0


def workload_settings(env: Mapping[str, str] | None = None) -> CMLSettings:
    """Connection settings from the workload's own environment: `CDSW_API_URL` (or `CDSW_DOMAIN`),
    `CDSW_APIV2_KEY`, `CDSW_PROJECT_ID`. Never a user's CML_* settings: this is the workload's key."""
    env = os.environ if env is None else env

    def get(name: str) -> str:
        return env.get(name, "").strip()

    host = get("CDSW_API_URL") or get("CDSW_DOMAIN")
    missing = [n for n in ("CDSW_APIV2_KEY", "CDSW_PROJECT_ID") if not get(n)]
    if not host:
        missing.insert(0, "CDSW_API_URL or CDSW_DOMAIN")
    if missing:
        raise CMLError(f"the CML node provider needs {', '.join(missing)} in the workload's environment")
    values: dict[str, Any] = {
        "host": host,
        "api_key": get("CDSW_APIV2_KEY"),
        "project_id": get("CDSW_PROJECT_ID"),
        "timeout": 15.0,
        "retry_deadline": 10.0,  # an autoscaler update should not hang on one call
    }
    bundle = get("CML_CA_BUNDLE") or get("REQUESTS_CA_BUNDLE")
    if bundle:
        values["verify"] = bundle
    return CMLSettings.create(**values)


def _status_text(status: str) -> str:
    if status == APPLICATION_RUNNING:
        return STATUS_UP_TO_DATE
    if status in (APPLICATION_FAILED, APPLICATION_STOPPED, ""):
        return STATUS_UPDATE_FAILED
    return status.removeprefix("APPLICATION_").lower()  # starting, stopping, ...: why it is pending


@dataclass
class _Tombstone:
    name: str
    group: str
    deleted_at: float
    attempted_at: float


@dataclass
class _Backoff:
    failures: int = 0
    not_before: float = 0.0


class CMLNodeProvider(BatchingNodeProvider):
    """Ray's autoscaler's view of, and hands on, the worker applications of one ray-cai cluster."""

    def __init__(
        self,
        provider_config: dict[str, Any],
        cluster_name: str,
        *,
        client: CMLClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(provider_config, cluster_name)
        self.cluster: str = provider_config.get("ray_cai_cluster") or cluster_name
        self.project_dir = Path(provider_config.get("project_dir") or os.getcwd())
        self.config_path: str | None = provider_config.get("config_path")
        self.head_resource = provider_config.get("head_node_id_resource")
        self.client = client if client is not None else CMLClient(workload_settings())
        project_id = self.client.settings.project_id
        if not project_id:
            raise CMLError("the CML node provider needs the project id (CDSW_PROJECT_ID)")
        self.project_id: str = project_id
        self._clock = clock
        self._lock = threading.RLock()
        self._tombstones: dict[str, _Tombstone] = {}  # app id -> deletion requested
        # app name -> (reserved until (monotonic), created for sure). A name whose create had an
        # unknown outcome is freed by the next list that does not show it; a created one is kept
        # until the list shows it or the grace period passes (a list may lag behind a create).
        self._pending: dict[str, tuple[float, bool]] = {}
        self._backoff: dict[str, _Backoff] = {}  # group -> create backoff
        self._apps: dict[str, Application] = {}  # app id -> last observation (this cluster's)
        self._spec: ClusterSpec | None = spec_from_applied(os.environ.get(APPLIED_SPEC_VARIABLE))
        self._observed = False
        self._lock_owner = default_owner()  # one owner per provider: a lock it left is its own
        self.decision: dict[str, Any] = {}
        self.list_calls = 0

    # -- reading -----------------------------------------------------------------------------
    def get_node_data(self) -> dict[str, NodeData]:
        """One list call: the head and this cluster's workers, without the ones being deleted."""
        with self._lock:
            try:
                self.list_calls += 1
                apps = self.client.list_applications(self.project_id)
            except CMLError as err:
                self._observed = False  # safe_to_scale() says no: nothing is decided on old data
                log.warning("cannot list applications (%s); skipping this autoscaler update", err)
                return dict(self.node_data_dict)
            self._observed = True
            mine = {a.id: a for a in apps if (a.environment or {}).get(CLUSTER_VARIABLE) == self.cluster}
            self._apps = mine
            self._refresh_spec(mine)
            self._settle_tombstones(mine)
            listed_names = {a.key for a in mine.values()}
            now = self._clock()
            for name, (until, created) in list(self._pending.items()):
                if name in listed_names or until <= now or not created:
                    del self._pending[name]
            return self._node_data(mine)

    def safe_to_scale(self) -> bool:
        """No decision on a failed observation or without a spec to create workers from."""
        return self._observed and self._spec is not None

    def _node_data(self, mine: Mapping[str, Application]) -> dict[str, NodeData]:
        nodes: dict[str, NodeData] = {}
        for app_id, app in mine.items():
            env = app.environment or {}
            if app_id in self._tombstones:
                continue
            ip = env.get(NODE_ID_RESOURCE_VARIABLE)
            if env.get(ROLE_VARIABLE) == "head" and app.key == head_app_name(self.cluster):
                head_ip = ip or (str(self.head_resource) if self.head_resource is not None else None)
                nodes[app_id] = NodeData(
                    kind=NODE_KIND_HEAD, type=HEAD_NODE_TYPE, ip=head_ip, status=STATUS_UP_TO_DATE
                )
            elif env.get(ROLE_VARIABLE) == "worker" and self._group_index(app) is not None:
                nodes[app_id] = NodeData(
                    kind=NODE_KIND_WORKER,
                    type=env.get(GROUP_VARIABLE, ""),
                    ip=ip,
                    status=_status_text(app.status or ""),
                )
        return nodes

    def _group_index(self, app: Application) -> int | None:
        """The index of a worker app of a group of the spec; None for anything else."""
        env = app.environment or {}
        group = env.get(GROUP_VARIABLE, "")
        if self._spec is None or group not in {g.name for g in self._spec.worker_groups}:
            return None
        return worker_index_of(self.cluster, group, app.key)

    def _refresh_spec(self, mine: Mapping[str, Application]) -> None:
        """The applied spec on the head app (a later `up` may have changed bounds); rewrite Ray's
        autoscaling config when it changed, so the next update uses the new bounds."""
        head = next((a for a in mine.values() if a.key == head_app_name(self.cluster)), None)
        spec = spec_from_applied((head.environment or {}).get(APPLIED_SPEC_VARIABLE)) if head else None
        if spec is None or spec == self._spec:
            return
        self._spec = spec
        if self.config_path:
            try:
                write_json_atomically(
                    Path(self.config_path), ray_autoscaling_config(spec, project_dir=self.project_dir)
                )
            except OSError as err:
                log.warning("cannot rewrite the autoscaling config %s: %s", self.config_path, err)

    def _settle_tombstones(self, mine: Mapping[str, Application]) -> None:
        """Forget tombstones of apps CML no longer lists; delete again those it keeps listing."""
        now = self._clock()
        for app_id, stone in list(self._tombstones.items()):
            if app_id not in mine:
                del self._tombstones[app_id]
            elif now - stone.attempted_at >= DELETE_RETRY_SECONDS:
                stone.attempted_at = now
                self._delete(app_id, stone.name)

    # -- acting ------------------------------------------------------------------------------
    def submit_scale_request(self, scale_request: ScaleRequest) -> None:
        """Delete the named workers (tombstoned first), then create what each autoscaled group
        lacks: all at once, under the cluster lock, through the cluster layer's one create path."""
        with self._lock:
            spec = self._spec
            if spec is None:
                return
            autoscaled = {g.name: g for g in spec.autoscaled_groups}
            deleted, ignored = self._delete_requested(scale_request, autoscaled)
            desired, planned, errors = self._plan_creates(spec, autoscaled, scale_request)
            created, create_errors = self._create_all(spec, planned)
            self._record(desired, created, deleted, ignored, errors + create_errors)

    def _delete_requested(
        self, scale_request: ScaleRequest, autoscaled: Mapping[str, WorkerGroupSpec]
    ) -> tuple[list[str], list[str]]:
        """Tombstone and delete the workers Ray asks to remove; fixed groups' workers are ignored."""
        deleted: list[str] = []
        ignored: list[str] = []
        for node_id in sorted(scale_request.workers_to_delete):
            app = self._apps.get(node_id)
            if app is None or node_id in self._tombstones:
                continue
            group = (app.environment or {}).get(GROUP_VARIABLE, "")
            if group not in autoscaled:
                ignored.append(app.key)
                continue
            now = self._clock()
            self._tombstones[node_id] = _Tombstone(app.key, group, now, now)
            self._delete(node_id, app.key)
            deleted.append(app.key)
        return deleted, ignored

    def _plan_creates(
        self, spec: ClusterSpec, autoscaled: Mapping[str, WorkerGroupSpec], scale_request: ScaleRequest
    ) -> tuple[dict[str, int], list[NodeSpec], list[str]]:
        """Per group: the desired count (within the bounds) and the nodes to create, their names
        reserved at the lowest free indices before anything is asked."""
        desired: dict[str, int] = {}
        planned: list[NodeSpec] = []
        errors: list[str] = []
        for group_name, group in autoscaled.items():
            assert group.min_replicas is not None and group.max_replicas is not None
            wanted = scale_request.desired_num_workers.get(group_name)
            if wanted is None:
                continue
            target = max(group.min_replicas, min(group.max_replicas, wanted))
            desired[group_name] = target
            missing = target - self._count(group_name)
            if missing <= 0:
                continue
            backoff = self._backoff.get(group_name)
            if backoff is not None and backoff.not_before > self._clock():
                errors.append(
                    f"{group_name}: create backing off {backoff.not_before - self._clock():.0f}s more"
                )
                continue
            names = {a.key for a in self._apps.values()} | set(self._pending)
            free = free_indices(taken_indices(self.cluster, group_name, names))
            for _ in range(missing):
                node = worker_node(spec, group_name, next(free))
                self._pending[node.name] = (self._clock() + PENDING_GRACE_SECONDS, False)  # reserved
                planned.append(node)
        return desired, planned, errors

    def _create_all(self, spec: ClusterSpec, planned: list[NodeSpec]) -> tuple[list[str], list[str]]:
        """Create the planned workers in parallel under the cluster lock (one actor at a time: an
        `up` or a watch holding it makes this update skip its creates)."""
        if not planned:
            return [], []
        outcomes: list[tuple[NodeSpec, Exception | None]]
        try:
            with (
                cluster_lock(
                    self.client,
                    self.project_id,
                    self.cluster,
                    ttl=LOCK_TTL_SECONDS,
                    patience=LOCK_PATIENCE_SECONDS,
                    runtime_identifier=spec.head.runtime_identifier,
                    owner=self._lock_owner,
                ),
                ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_CREATES, len(planned))) as pool,
            ):
                outcomes = list(pool.map(self._create, planned))
        except LockHeld as err:
            for node in planned:
                self._pending.pop(node.name, None)  # nothing was asked: the names are free again
            return [], [f"{node.name}: {err}; trying at the next update" for node in planned]
        except (ClusterError, CMLError) as err:
            outcomes = [(node, err) for node in planned]
            for node in planned:
                self._pending.pop(node.name, None)
        created: list[str] = []
        errors: list[str] = []
        failed_groups: set[str] = set()
        for node, error in outcomes:
            if error is None:
                self._pending[node.name] = (self._clock() + PENDING_GRACE_SECONDS, True)
                created.append(node.name)
                continue
            errors.append(f"{node.name}: {error}")
            failed_groups.add(node.group)
            unknown = isinstance(error, CreateOutcomeUnknown) or (
                isinstance(error, CMLError) and not is_permanent(error)
            )
            if not unknown:
                self._pending.pop(node.name, None)  # refused: the name is free again
            log.warning("create of %s failed (%s)", node.name, error)
        for group in {n.group for n in planned} - failed_groups:
            self._backoff.pop(group, None)
        for group in sorted(failed_groups):
            self._back_off(group)
        return created, errors

    def _back_off(self, group: str) -> None:
        """A group whose creates failed waits 2 s, doubling to 60 s, before it tries again."""
        backoff = self._backoff.setdefault(group, _Backoff())
        backoff.failures += 1
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (backoff.failures - 1))
        backoff.not_before = self._clock() + delay
        log.warning("creates of group %s failed; backing off %.0fs", group, delay)

    def _count(self, group: str) -> int:
        """Apps of ``group`` that exist or may exist: listed (not tombstoned) plus reserved names."""
        listed = {
            a.key
            for app_id, a in self._apps.items()
            if app_id not in self._tombstones
            and (a.environment or {}).get(GROUP_VARIABLE) == group
            and self._group_index(a) is not None
        }
        reserved = {n for n in self._pending if worker_index_of(self.cluster, group, n) is not None}
        return len(listed | reserved)

    def _create(self, node: NodeSpec) -> tuple[NodeSpec, Exception | None]:
        """Create one worker app through the cluster layer's create path; (node, error or None)."""
        try:
            create_node_app(self.client, self.project_id, self.cluster, node, attempts=2)
        except CMLError as err:
            return node, err
        log.info("created %s (group %s)", node.name, node.group)
        return node, None

    def _delete(self, app_id: str, name: str) -> None:
        try:
            delete_app(self.client, self.project_id, app_id, name)
        except CMLError as err:  # the tombstone stays; get_node_data deletes again
            log.warning("delete of %s failed (%s); will try again", name, err)

    def _record(
        self,
        desired: dict[str, int],
        created: list[str],
        deleted: list[str],
        ignored: list[str],
        errors: list[str],
    ) -> None:
        """The last decision, for `ray-cai status` (through the head's status endpoint)."""
        self.decision = {
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "desired": desired,
            "created": created,
            "deleted": deleted,
            "ignored": ignored,
            "errors": errors,
        }
        try:
            write_json_atomically(decision_path(self.project_dir, self.cluster), self.decision)
        except OSError as err:
            log.warning("cannot record the autoscaler decision: %s", err)
