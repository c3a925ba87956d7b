"""`CMLNodeProvider`: Ray's autoscaler adds and removes worker applications through the CML API.

Ray's own monitor (started by `ray start --head --autoscaling-config=...` on the head application)
loads this class for `provider.type: external`. It is a `BatchingNodeProvider`, as KubeRay's v1
autoscaler is: every autoscaler update starts with `get_node_data` — ONE `list_applications` call —
and ends with at most one `submit_scale_request`.

* Nodes are applications of this cluster (marker `RAY_CAI_CLUSTER`), keyed by application id; a
  node's "ip" is its `NODE_ID_AS_RESOURCE` (`use_node_id_as_ip`), which the node advertises to Ray.
* Worker apps are created exactly as `ray-cai up` creates them (`worker_node(spec, group, index)`:
  same name `ray-<cluster>-<group>-<index>` at the lowest free index, fields, markers, spec hash).
  The spec is the applied spec on the head application (`RAY_CAI_APPLIED_SPEC`), read from the same
  list call; the head's own environment is the fallback.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray.autoscaler.batching_node_provider import BatchingNodeProvider, NodeData, ScaleRequest
from ray.autoscaler.tags import NODE_KIND_HEAD, NODE_KIND_WORKER, STATUS_UP_TO_DATE, STATUS_UPDATE_FAILED

from ray_serve_cai.cml import (
    APPLICATION_FAILED,
    APPLICATION_RUNNING,
    APPLICATION_STOPPED,
    Application,
    CMLClient,
    CMLError,
    CMLSettings,
    CreateOutcomeUnknown,
    NotFound,
    create_application_or_find,
    is_permanent,
)
from ray_serve_cai.config import (
    APPLIED_SPEC_VARIABLE,
    NODE_ID_RESOURCE_VARIABLE,
    ClusterSpec,
    head_app_name,
    spec_from_applied,
    worker_app_name,
    worker_index_of,
    worker_node,
)
from ray_serve_cai.config.autoscaling import (
    HEAD_NODE_TYPE,
    decision_path,
    ray_autoscaling_config,
    write_json_atomically,
)

log = logging.getLogger("ray_serve_cai.autoscale")

CLUSTER_MARKER = "RAY_CAI_CLUSTER"
ROLE_MARKER = "RAY_CAI_ROLE"
GROUP_MARKER = "RAY_CAI_GROUP"
# A created (or maybe created) name stays reserved this long while the list does not show it yet.
PENDING_GRACE_SECONDS = 60.0
DELETE_RETRY_SECONDS = 10.0
BACKOFF_FIRST_SECONDS = 2.0
BACKOFF_MAX_SECONDS = 60.0


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
            mine = {a.id: a for a in apps if (a.environment or {}).get(CLUSTER_MARKER) == self.cluster}
            self._apps = mine
            self._refresh_spec(mine)
            self._settle_tombstones(mine)
            listed_names = {a.subdomain or a.name for a in mine.values()}
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
            if env.get(ROLE_MARKER) == "head" and (app.subdomain or app.name) == head_app_name(self.cluster):
                head_ip = ip or (str(self.head_resource) if self.head_resource is not None else None)
                nodes[app_id] = NodeData(
                    kind=NODE_KIND_HEAD, type=HEAD_NODE_TYPE, ip=head_ip, status=STATUS_UP_TO_DATE
                )
            elif env.get(ROLE_MARKER) == "worker" and self._group_index(app) is not None:
                nodes[app_id] = NodeData(
                    kind=NODE_KIND_WORKER,
                    type=env.get(GROUP_MARKER, ""),
                    ip=ip,
                    status=_status_text(app.status or ""),
                )
        return nodes

    def _group_index(self, app: Application) -> int | None:
        """The index of a worker app of a group of the spec; None for anything else."""
        env = app.environment or {}
        group = env.get(GROUP_MARKER, "")
        if self._spec is None or group not in {g.name for g in self._spec.worker_groups}:
            return None
        return worker_index_of(self.cluster, group, app.subdomain or app.name)

    def _refresh_spec(self, mine: Mapping[str, Application]) -> None:
        """The applied spec on the head app (a later `up` may have changed bounds); rewrite Ray's
        autoscaling config when it changed, so the next update uses the new bounds."""
        head = next(
            (a for a in mine.values() if (a.subdomain or a.name) == head_app_name(self.cluster)), None
        )
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
        """Delete the named workers (tombstoned first), then create what each autoscaled group lacks."""
        with self._lock:
            spec = self._spec
            if spec is None:
                return
            autoscaled = {g.name: g for g in spec.autoscaled_groups}
            deleted: list[str] = []
            ignored: list[str] = []
            for node_id in sorted(scale_request.workers_to_delete):
                app = self._apps.get(node_id)
                if app is None or node_id in self._tombstones:
                    continue
                group = (app.environment or {}).get(GROUP_MARKER, "")
                name = app.subdomain or app.name
                if group not in autoscaled:
                    ignored.append(name)
                    continue
                now = self._clock()
                self._tombstones[node_id] = _Tombstone(name, group, now, now)
                self._delete(node_id, name)
                deleted.append(name)
            created: list[str] = []
            errors: list[str] = []
            desired: dict[str, int] = {}
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
                for _ in range(missing):
                    name, error = self._create(spec, group_name)
                    if name and not error:
                        created.append(name)
                    if error:
                        errors.append(error)
                        break
            self._record(desired, created, deleted, ignored, errors)

    def _count(self, group: str) -> int:
        """Apps of ``group`` that exist or may exist: listed (not tombstoned) plus reserved names."""
        listed = {
            a.subdomain or a.name
            for app_id, a in self._apps.items()
            if app_id not in self._tombstones
            and (a.environment or {}).get(GROUP_MARKER) == group
            and self._group_index(a) is not None
        }
        reserved = {n for n in self._pending if worker_index_of(self.cluster, group, n) is not None}
        return len(listed | reserved)

    def _free_index(self, group: str) -> int:
        """The lowest index no listed app (even one being deleted) and no reserved name holds."""
        taken = {a.subdomain or a.name for a in self._apps.values()} | set(self._pending)
        index = 0
        while worker_app_name(self.cluster, group, index) in taken:
            index += 1
        return index

    def _create(self, spec: ClusterSpec, group: str) -> tuple[str | None, str | None]:
        """Create one worker app; returns (name created or reserved, error)."""
        node = worker_node(spec, group, self._free_index(group))
        self._pending[node.name] = (self._clock() + PENDING_GRACE_SECONDS, False)  # reserved before we ask

        fields = {"name": node.name, "subdomain": node.name, "description": node.description}
        try:
            create_application_or_find(
                self.client,
                self.project_id,
                {**fields, **node.app_fields()},
                owner=(CLUSTER_MARKER, self.cluster),
                attempts=2,
            )
        except CMLError as err:
            backoff = self._backoff.setdefault(group, _Backoff())
            backoff.failures += 1
            delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (backoff.failures - 1))
            backoff.not_before = self._clock() + delay
            unknown = isinstance(err, CreateOutcomeUnknown) or not is_permanent(err)
            if not unknown:
                self._pending.pop(node.name, None)  # refused: the name is free again
            log.warning("create of %s failed (%s); backing off %.0fs", node.name, err, delay)
            return (node.name if unknown else None), f"{node.name}: {err}"
        self._backoff.pop(group, None)
        self._pending[node.name] = (self._clock() + PENDING_GRACE_SECONDS, True)
        log.info("created %s (group %s)", node.name, group)
        return node.name, None

    def _delete(self, app_id: str, name: str) -> None:
        try:
            self.client.delete_application(self.project_id, app_id)
            log.info("deleted %s", name)
        except NotFound:
            pass
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
