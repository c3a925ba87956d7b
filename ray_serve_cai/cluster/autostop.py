"""Autostop, the cluster side: the stopped state, the status fields, and the CML calls of the action.

The head decides when the cluster is idle (`ray_serve_cai.node.autostop`); what it decides and does
is visible to every caller through the one list call they already make:

- the setting is `spec.autostop` of the applied record on the head application (`ray-cai autostop`
  rewrites only that field: `set_autostop`), so `status`, `plan` and the next `up` agree;
- a cluster the head stopped carries the *stopped mark* `RAY_CAI_STOPPED` (JSON: when, why, which
  action) in the head application's environment. A stop is not a failure: the watch leaves a
  marked cluster alone, `up` or a deploy clears the mark and starts it (`clear_stopped_mark`) —
  fresh: the head's stored GCS state of before the stop is removed first (head fault tolerance);
- the head also writes its last action to `.ray-cai/<cluster>/autostop.json` in the project, so a
  watch in the project does not re-create a cluster autostop deleted (`deleted_by_autostop`).

Pure functions (`stopped_state`, `autostop_view`, `describe_view`) are table-tested; the I/O
helpers take a `CMLClient` and never log a secret.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ray_serve_cai.atomic import write_json_atomically
from ray_serve_cai.cluster.applied import APPLIED_SPEC_VAR, AppliedRecord, Origin, read_record
from ray_serve_cai.cluster.conditions import Condition
from ray_serve_cai.cluster.errors import ClusterError
from ray_serve_cai.cml import Application, CMLClient, CMLError, CMLSettings, NotFound
from ray_serve_cai.config import AutostopSpec, head_app_name
from ray_serve_cai.config.node_env import CLUSTER_VARIABLE

log = logging.getLogger("ray_serve_cai.cluster")

STOPPED_VAR = "RAY_CAI_STOPPED"
EVENT_FILE_NAME = "autostop.json"
RUNNING = "APPLICATION_RUNNING"
STOPPED = "APPLICATION_STOPPED"
STOPPING = "APPLICATION_STOPPING"
FAILED = "APPLICATION_FAILED"
# Seconds the head waits for its workers to stop (or vanish) before it stops itself anyway.
WORKERS_STOP_TIMEOUT = 120.0


class StoppedMark(BaseModel):
    """Why and when the head stopped the cluster (the `RAY_CAI_STOPPED` value)."""

    model_config = ConfigDict(extra="ignore")

    at: str
    by: str = "autostop"
    action: str = "stop"
    idle_seconds: float = 0.0
    reason: str = ""

    def encode(self) -> str:
        return json.dumps(self.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)


# ------------------------------------------------------------------------------------ reading


def _name(app: Application) -> str:
    return app.subdomain or app.name


def _owned(apps: Iterable[Application], cluster: str) -> list[Application]:
    return [a for a in apps if (a.environment or {}).get(CLUSTER_VARIABLE) == cluster]


def head_of(apps: Iterable[Application], cluster: str) -> Application | None:
    """The cluster's own head application in one observation."""
    name = head_app_name(cluster)
    return next((a for a in _owned(apps, cluster) if _name(a) == name), None)


def stopped_mark(apps: Iterable[Application], cluster: str) -> StoppedMark | None:
    """The stopped mark on the head application, if the head stopped the cluster."""
    head = head_of(apps, cluster)
    raw = (head.environment or {}).get(STOPPED_VAR) if head is not None else None
    if not raw:
        return None
    try:
        return StoppedMark.model_validate_json(raw)
    except ValidationError:
        return StoppedMark(at="", reason="unreadable stopped mark")


def setting_of(record: AppliedRecord | None) -> AutostopSpec | None:
    """The autostop setting of an applied record (None: off, or no record)."""
    if record is None or not record.spec.get("autostop"):
        return None
    try:
        return AutostopSpec.model_validate(record.spec["autostop"])
    except ValidationError:
        return None


def event_path(project_dir: Path | str, cluster: str) -> Path:
    """`<project>/.ray-cai/<cluster>/autostop.json`: the head's last autostop action."""
    return Path(project_dir) / ".ray-cai" / cluster / EVENT_FILE_NAME


def deleted_by_autostop(apps: Iterable[Application], cluster: str, project_dir: Path | str | None) -> bool:
    """The cluster has no application left and the head's last action was `down`: a watch in the
    project must not re-create it (as it would after a failure)."""
    if _owned(apps, cluster) or project_dir is None:
        return False
    try:
        event = json.loads(event_path(project_dir, cluster).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(event, dict) and event.get("action") == "down"


# ------------------------------------------------------------------------------------ pure status


def stopped_state(mark: StoppedMark | None, statuses: Sequence[str]) -> str | None:
    """`stopped` when the head marked the cluster stopped and no application of it is active any
    more, `stopping` while some still run; None without a mark (the state is derived as usual)."""
    if mark is None or mark.action != "stop":
        return None
    active = [s for s in statuses if s not in (STOPPED, FAILED)]
    return "stopping" if active else "stopped"


def autostop_view(
    setting: AutostopSpec | None, head_report: Mapping[str, Any] | None, mark: StoppedMark | None
) -> dict[str, Any]:
    """The `autostop` object of `status --json`: the recorded setting, and what the head last
    measured (`idle_seconds`, `busy` reasons) — `fires_in_seconds` is what is left of the idle
    timeout (None while busy or when off); `stopped` is the mark when the head stopped the cluster."""
    report = dict(head_report or {})
    idle = report.get("idle_seconds")
    busy = list(report.get("busy") or [])
    fires_in: float | None = None
    if setting is not None and isinstance(idle, int | float) and not busy and mark is None:
        fires_in = max(0.0, round(setting.idle_timeout - float(idle), 1))
    return {
        "idle_timeout": setting.idle_timeout if setting else None,
        "action": setting.action if setting else None,
        "check_interval": setting.check_interval if setting else None,
        "idle_seconds": idle if isinstance(idle, int | float) else None,
        "fires_in_seconds": fires_in,
        "busy": busy,
        "error": report.get("error"),
        "stopped": mark.model_dump(mode="json") if mark is not None else None,
    }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_view(view: Mapping[str, Any]) -> str:
    """One line for `ray-cai status`: "idle for 12 min, stops in 18 min", what keeps it busy, or off."""
    stopped = view.get("stopped")
    if stopped:
        seconds = stopped.get("idle_seconds") or 0
        idle = f" after {_duration(seconds)} idle" if seconds else ""
        what = "deleted" if stopped.get("action") == "down" else "stopped"
        when = f"at {stopped.get('at')}{idle}"
        return f"autostop: {what} by {stopped.get('by')} {when}; start it with `ray-cai up`"
    timeout, action = view.get("idle_timeout"), view.get("action")
    verb = "deleted" if action == "down" else "stops"
    setting = f" (idle_timeout {_duration(timeout)}, action {action})" if timeout else ""
    if view.get("busy"):
        what = "; ".join(view["busy"])
        return f"autostop: busy — {what}{setting}" if timeout else f"autostop: off (busy — {what})"
    idle = view.get("idle_seconds")
    if idle is None:
        why = f": {view['error']}" if view.get("error") else ""
        return f"autostop: the head reports no idle time yet{why}{setting}" if timeout else "autostop: off"
    if not timeout:
        return f"autostop: off (idle for {_duration(idle)})"
    fires_in = view.get("fires_in_seconds") or 0.0
    when = f"in {_duration(fires_in)}" if fires_in > 0 else "at the next check"
    return f"autostop: idle for {_duration(idle)}, {verb} {when}{setting}"


def apply_to_status(status: Any, apps: Sequence[Application], record: AppliedRecord | None) -> None:
    """Set the autostop fields of a `ClusterStatus` derived from one observation: the `autostop`
    view, and the state `stopped` (or `stopping`) with a `Stopped` condition when the head stopped
    the cluster. Pure (no I/O): the head's report is already in `status.ray`."""
    cluster = status.cluster
    mark = stopped_mark(apps, cluster)
    owned = _owned(apps, cluster)
    status.autostop = autostop_view(setting_of(record), status.ray.get("autostop"), mark)
    state = stopped_state(mark, [a.status or "" for a in owned])
    if state is None or mark is None:
        return
    status.state = state
    message = f"stopped by {mark.by} at {mark.at}" + (f" ({mark.reason})" if mark.reason else "")
    hint = "start it with `ray-cai up`" if state == "stopped" else "its applications are stopping"
    # Not running is what a stopped cluster is: say so instead of "not answering" / "not in Ray".
    expected = {"HeadReady", "RayNodesAlive"} if state == "stopped" else set()
    kept = [
        Condition(c.type, c.status, "Stopped", "") if c.type in expected and not c.status else c
        for c in status.conditions
        if c.type != "Ready"
    ]
    status.conditions = [
        *kept,
        Condition("Stopped", True, "Autostop", f"{message}; {hint}"),
        Condition("Ready", False, state.capitalize(), hint),
    ]
    status.problems = [p for p in status.problems if "head status endpoint" not in p]


# ------------------------------------------------------------------------------------ writing


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _patch_head_env(
    client: CMLClient, project_id: str, head: Application, env: dict[str, str], *, missing_ok: bool = False
) -> None:
    try:
        client.update_application(project_id, head.id, environment=env)
    except NotFound:
        if not missing_ok:
            raise ClusterError(f"the head application {_name(head)!r} is gone") from None
    except CMLError as err:
        raise ClusterError(f"could not update the environment of {_name(head)!r}: {err}") from None


def head_is_down(apps: Iterable[Application], cluster: str) -> bool:
    """True when the cluster has no head application that may still run (none, stopped or failed)."""
    head = head_of(apps, cluster)
    return head is None or head.status in (STOPPED, FAILED)


def clear_stopped_mark(client: CMLClient, project_id: str, cluster: str, apps: Sequence[Application]) -> bool:
    """Remove the stopped mark (a deliberate start: `up`, deploy); True when there was one."""
    head = head_of(apps, cluster)
    if head is None or STOPPED_VAR not in (head.environment or {}):
        return False
    env = {k: v for k, v in (head.environment or {}).items() if k != STOPPED_VAR}
    log.info("clearing the autostop mark of cluster %r: it is started again", cluster)
    _patch_head_env(client, project_id, head, env, missing_ok=True)
    return True


def set_autostop(
    client: CMLClient, project_id: str, cluster: str, setting: AutostopSpec | None
) -> AppliedRecord:
    """Record a new autostop setting (None: off) in the applied spec on the head application (a
    PATCH of its environment: nothing restarts; the head reads it at its next check). Only that
    field changes: the recorded config base is kept, so the next `up` with an unchanged file keeps
    this setting while a file that changes `autostop` wins (see `cluster.applied.merge_request`)."""
    apps = client.list_applications(project_id)
    head = head_of(apps, cluster)
    record = read_record(apps, cluster)
    if head is None or record is None:
        raise ClusterError(
            f"cluster {cluster!r} is not deployed (no head application with an applied spec); set "
            "ray_cluster.autostop in the config file and run `ray-cai up`"
        )
    spec = dict(record.spec)
    spec["autostop"] = setting.model_dump(mode="json") if setting is not None else None
    origin = Origin(
        source="autostop",
        commit=record.origin.commit,
        overrides=dict(record.origin.overrides),
        by=record.origin.by,
        at=_now(),
    )
    new = record.model_copy(update={"spec": spec, "origin": origin})
    new.cluster_spec()  # still a valid spec
    env = {**(head.environment or {}), APPLIED_SPEC_VAR: new.encode()}
    _patch_head_env(client, project_id, head, env)
    return new


# ------------------------------------------------------------------------------------ the action


def workload_client(env: Mapping[str, str] | None = None) -> CMLClient:
    """A client with the workload's own API access (`CDSW_APIV2_KEY`, `CDSW_PROJECT_ID`, and
    `CDSW_API_URL` or `CDSW_DOMAIN`), as the autoscaler's node provider has; CMLError when missing."""
    env = os.environ if env is None else env
    value = {name: (env.get(name) or "").strip() for name in ("CDSW_APIV2_KEY", "CDSW_PROJECT_ID")}
    host = (env.get("CDSW_API_URL") or env.get("CDSW_DOMAIN") or "").strip()
    missing = [n for n, v in value.items() if not v] + ([] if host else ["CDSW_API_URL or CDSW_DOMAIN"])
    if missing:
        raise CMLError(f"autostop needs {', '.join(missing)} in the head's environment")
    extra: dict[str, Any] = {}
    if bundle := (env.get("CML_CA_BUNDLE") or env.get("REQUESTS_CA_BUNDLE") or "").strip():
        extra["verify"] = bundle
    settings = CMLSettings.create(
        host=host,
        api_key=value["CDSW_APIV2_KEY"],
        project_id=value["CDSW_PROJECT_ID"],
        timeout=15.0,
        retry_deadline=10.0,
        **extra,
    )
    return CMLClient(settings)


@dataclass(frozen=True)
class Recorded:
    """What the head reads each check: the setting, and whether the cluster is marked stopped."""

    setting: AutostopSpec | None
    stopped: bool


def read_recorded(client: CMLClient, project_id: str, cluster: str) -> Recorded:
    """One list call: the autostop setting recorded on the head application, and its stopped mark."""
    apps = client.list_applications(project_id)
    return Recorded(setting_of(read_record(apps, cluster)), stopped_mark(apps, cluster) is not None)


def head_hooks(
    cluster: str, project_dir: Path, env: Mapping[str, str]
) -> tuple[Callable[[], Recorded], Callable[[str, float], str]]:
    """What the head's autostop monitor (`ray_serve_cai.node.autostop`) needs from the CML API, with
    the workload's own key: `read_recorded()` (one list call per check) and `act(action,
    idle_seconds)`. Passed in by the head's entry script; CMLError when the environment has no key."""
    client = workload_client(env)
    project_id = (env.get("CDSW_PROJECT_ID") or "").strip()

    def read() -> Recorded:
        return read_recorded(client, project_id, cluster)

    def act(action: str, idle_seconds: float) -> str:
        idle = idle_seconds
        return run_action(client, project_id, cluster, action, idle_seconds=idle, project_dir=project_dir)

    return read, act


def run_action(
    client: CMLClient,
    project_id: str,
    cluster: str,
    action: str,
    *,
    idle_seconds: float,
    project_dir: Path | str | None = None,
    workers_timeout: float = WORKERS_STOP_TIMEOUT,
) -> str:
    """Carry out the head's decision: mark the cluster stopped, stop (or delete) every worker
    application in parallel, wait until they are, then stop (or delete) the head application — the
    caller's own, so it is the last call it makes (Ray's autoscaler, on the head, goes with it).

    Returns what happened in one line. Raises ClusterError when the cluster is no longer there."""
    apps = client.list_applications(project_id)
    head = head_of(apps, cluster)
    if head is None:
        raise ClusterError(f"cluster {cluster!r} has no head application any more")
    mark = StoppedMark(
        at=_now(),
        action=action,
        idle_seconds=round(idle_seconds, 1),
        reason=f"idle for {_duration(idle_seconds)}",
    )
    if project_dir is not None:
        try:
            write_json_atomically(event_path(project_dir, cluster), mark.model_dump(mode="json"))
        except OSError as err:
            log.warning("cannot write %s: %s", event_path(project_dir, cluster), err)
    _patch_head_env(client, project_id, head, {**(head.environment or {}), STOPPED_VAR: mark.encode()})
    workers = [a for a in _owned(apps, cluster) if a.id != head.id]
    verb = "deleting" if action == "down" else "stopping"
    log.info("autostop: %s %d worker app(s) of cluster %r, then the head", verb, len(workers), cluster)
    _each(workers, lambda app: _act_on(client, project_id, app, action))
    _wait_workers(client, project_id, cluster, head.id, action, workers_timeout)
    # An `up` may have started the cluster again meanwhile (it clears the mark): then stay.
    if stopped_mark(client.list_applications(project_id), cluster) is None:
        return "autostop cancelled: the cluster was started again while it stopped"
    log.info("autostop: %s the head application %s", verb, _name(head))
    _act_on(client, project_id, head, action)
    return f"{'deleted' if action == 'down' else 'stopped'} {len(workers) + 1} application(s)"


def _act_on(client: CMLClient, project_id: str, app: Application, action: str) -> None:
    try:
        if action == "down":
            client.delete_application(project_id, app.id)
        elif app.status not in (STOPPED, FAILED):
            client.stop_application(project_id, app.id)
    except NotFound:
        return


def _each(apps: Sequence[Application], fn: Any) -> None:
    if not apps:
        return
    with ThreadPoolExecutor(max_workers=min(16, len(apps))) as pool:
        errors = [f.exception() for f in [pool.submit(fn, a) for a in apps]]
    failures = [e for e in errors if e is not None]
    if failures:
        raise ClusterError("; ".join(str(e) for e in failures)) from failures[0]


def _wait_workers(
    client: CMLClient, project_id: str, cluster: str, head_id: str, action: str, timeout: float
) -> None:
    """Until no worker of the cluster is active (stop) or listed (down); a deadline, then go on."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            apps = [a for a in _owned(client.list_applications(project_id), cluster) if a.id != head_id]
        except CMLError as err:
            log.warning("autostop: cannot list applications (%s)", err)
            apps = []
        left = [a for a in apps if action == "down" or a.status not in (STOPPED, FAILED)]
        if not left:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(f"{_name(a)} ({a.status})" for a in left)
            log.warning("autostop: workers still %s after %.0fs: %s", action, timeout, names)
            return
        time.sleep(1.0)


__all__ = [
    "STOPPED_VAR",
    "Recorded",
    "StoppedMark",
    "apply_to_status",
    "autostop_view",
    "clear_stopped_mark",
    "deleted_by_autostop",
    "describe_view",
    "event_path",
    "head_hooks",
    "head_is_down",
    "read_recorded",
    "run_action",
    "set_autostop",
    "setting_of",
    "stopped_mark",
    "stopped_state",
    "workload_client",
]
