"""What a loop remembers between passes, to act on what one observation cannot show: how long an
app has been stuck in STARTING, running but not in Ray, or failed (left to CML's own restart).

Each function takes the pass's `Observation` and the `ClusterStatus` derived from it — nothing here
observes, plans the spec or derives a status again. The clock is injectable for table tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ray_serve_cai.cluster.observation import Observation
from ray_serve_cai.cluster.plan import Action, ActionKind
from ray_serve_cai.cluster.status import ClusterStatus, observed_app
from ray_serve_cai.cml import APPLICATION_FAILED, APPLICATION_RUNNING, APPLICATION_STARTING

log = logging.getLogger("ray_serve_cai.cluster")

NodeError = Callable[[str], str]  # a node's last error from its health page ('' when none)


@dataclass
class OutsideRay:
    """Seconds each node has been running its current spec but not in Ray, as far as this caller
    has seen (the first sighting is kept). Workers count only while the head reports Ray's view:
    without it nothing is known about them."""

    clock: Callable[[], float] = time.monotonic
    since: dict[str, float] = field(default_factory=dict)

    def update(self, status: ClusterStatus) -> dict[str, float]:
        now = self.clock()
        viewed = "nodes" in status.ray
        outside = {
            n.name
            for n in status.nodes
            if n.app_status == APPLICATION_RUNNING
            and n.spec_current
            and not n.in_ray
            and (viewed or n.role == "head")
        }
        for name in list(self.since):
            if name not in outside:
                del self.since[name]
        return {name: now - self.since.setdefault(name, now) for name in sorted(outside)}

    def restarted(self, names: list[str]) -> None:
        """The restart takes a while to show: count afresh from now."""
        now = self.clock()
        for name in names:
            self.since[name] = now


def restarts_outside_ray(
    observation: Observation, status: ClusterStatus, late: Mapping[str, float], node_error: NodeError
) -> list[Action]:
    """Restart actions for the named nodes that still run (one health request each, for the reason)."""
    nodes = {n.name: n for n in status.desired}
    actions = []
    for name, seconds in sorted(late.items()):
        app = observation.app(name)
        if app is None or name not in nodes or app.status != APPLICATION_RUNNING:
            continue
        error = node_error(name)
        reason = f"running but not in Ray for {seconds:.0f}s" + (f": {error}" if error else "")
        log.warning("replacing %s: %s", name, reason)
        actions.append(
            Action(ActionKind.RESTART, name, node=nodes[name], app=observed_app(app), reason=reason)
        )
    return actions


@dataclass
class Healer:
    """The watch's memory: apps stuck in STARTING, apps running but not in Ray, and failed apps
    left to CML's own restart for `cml_restart_wait` seconds."""

    startup_timeout: float
    cml_restart_wait: float
    clock: Callable[[], float] = time.monotonic
    starting_since: dict[str, float] = field(default_factory=dict)
    failed_since: dict[str, float] = field(default_factory=dict)
    outside: OutsideRay = field(default_factory=OutsideRay)

    def __post_init__(self) -> None:
        self.outside.clock = self.clock

    def left_to_cml(self, action: Action) -> bool:
        """CML restarts a failed application by itself: observe, then act — the watch restarts it
        only once it stayed failed for `cml_restart_wait` seconds."""
        if (
            action.kind is not ActionKind.RESTART
            or action.app is None
            or action.app.status != APPLICATION_FAILED
        ):
            return False
        now = self.clock()
        waited = now - self.failed_since.setdefault(action.app.id, now)
        if waited < self.cml_restart_wait:
            log.info("%s failed %.0fs ago: left to CML's automatic restart for now", action.name, waited)
            return True
        return False  # its entry goes once the app is no longer failed (see `actions`)

    def actions(self, observation: Observation, status: ClusterStatus, node_error: NodeError) -> list[Action]:
        """The restarts one observation cannot justify alone: stuck in STARTING or outside Ray
        past `startup_timeout`."""
        failed = {a.id for a in observation.apps if a.status == APPLICATION_FAILED}
        for app_id in [i for i in self.failed_since if i not in failed]:
            del self.failed_since[app_id]  # restarted (by CML, or by us) or gone
        seconds = self.outside.update(status)
        late = {name: s for name, s in seconds.items() if s > self.startup_timeout}
        self.outside.restarted(list(late))
        return self.stuck_in_starting(observation, status) + restarts_outside_ray(
            observation, status, late, node_error
        )

    def stuck_in_starting(self, observation: Observation, status: ClusterStatus) -> list[Action]:
        now = self.clock()
        nodes = {n.name: n for n in status.desired}
        starting = {a.id: a for a in observation.apps if a.status == APPLICATION_STARTING and a.key in nodes}
        for app_id in [i for i in self.starting_since if i not in starting]:
            del self.starting_since[app_id]
        actions = []
        for app in starting.values():
            since = self.starting_since.setdefault(app.id, now)
            if now - since > self.startup_timeout:
                reason = f"stuck in STARTING for {now - since:.0f}s"
                actions.append(
                    Action(
                        ActionKind.RESTART, app.key, node=nodes[app.key], app=observed_app(app), reason=reason
                    )
                )
                self.starting_since[app.id] = now
        return actions


__all__ = ["Healer", "OutsideRay", "restarts_outside_ray"]
