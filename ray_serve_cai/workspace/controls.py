"""Test controls of the workspace (not part of CML): request counters, injected faults, injected latency,
what application URLs pass (`AppUrlPolicy`), restarts; the pod controls are in `pod_controls.py`.

Served under `/_workspace/` (see docs/architecture.md). Faults use a seeded RNG so a test run is
reproducible; they never apply to `/_workspace/` itself.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from ray_serve_cai.workspace.errors import invalid_argument

FAULT_STATUSES_DEFAULT = (500, 502, 503, 429)


def reject_unknown_keys(body: dict[str, Any], known: list[str], what: str) -> None:
    """A typo in a control (`error_rates`) must fail loudly, not silently configure nothing."""
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise invalid_argument(
            f"unknown {what} key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(known)})"
        )


class RequestCounters:
    """Counts `/api/v2/...` requests by `METHOD <route template>`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def record(self, method: str, route_template: str) -> None:
        with self._lock:
            self._counts[f"{method} {route_template}"] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(sorted(self._counts.items()))
        return {"counts": counts, "total": sum(counts.values())}

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


@dataclass
class FaultPlan:
    """What to break, how often. Rates are probabilities per request in [0, 1]."""

    error_rate: float = 0.0
    statuses: list[int] = field(default_factory=lambda: list(FAULT_STATUSES_DEFAULT))
    reset_rate: float = 0.0
    drop_create_response_rate: float = 0.0
    drop_mode: str = "502"  # "502": answer 502 instead; "reset": abort the connection
    retry_after_seconds: int = 1
    seed: int | None = None
    paths: str = "/api/v2/"
    # Deterministic kill points: the N-th matching request (1-based, counted from `configure`) is held
    # for `hang_seconds` before it is served as usual, so a test can kill the client while it waits.
    hang_on_request: int | None = None
    hang_seconds: float = 0.0
    max_faults: int | None = None  # stop injecting errors, resets and drops after this many (None: never)
    only_creates: bool = False  # apply only to create requests (POST of a new project/job/run/application)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> FaultPlan:
        reject_unknown_keys(body, [f.name for f in fields(cls)], "fault plan")
        plan = cls()
        for rate_name in ("error_rate", "reset_rate", "drop_create_response_rate"):
            value = body.get(rate_name, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise invalid_argument(f"{rate_name} must be a number between 0 and 1")
            setattr(plan, rate_name, float(value))
        statuses = body.get("statuses", list(FAULT_STATUSES_DEFAULT))
        if (
            not isinstance(statuses, list)
            or not statuses
            or not all(isinstance(s, int) and 400 <= s <= 599 for s in statuses)
        ):
            raise invalid_argument("statuses must be a non-empty list of HTTP error statuses (400-599)")
        plan.statuses = statuses
        drop_mode = body.get("drop_mode", "502")
        if drop_mode not in ("502", "reset"):
            raise invalid_argument('drop_mode must be "502" or "reset"')
        plan.drop_mode = drop_mode
        retry_after = body.get("retry_after_seconds", 1)
        if not isinstance(retry_after, int) or retry_after < 0:
            raise invalid_argument("retry_after_seconds must be a non-negative integer")
        plan.retry_after_seconds = retry_after
        seed = body.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise invalid_argument("seed must be an integer")
        plan.seed = seed
        paths = body.get("paths", "/api/v2/")
        if not isinstance(paths, str) or not paths.startswith("/") or paths.startswith("/_workspace"):
            raise invalid_argument("paths must be a path prefix outside /_workspace/")
        plan.paths = paths
        hang_on = body.get("hang_on_request")
        if hang_on is not None and (isinstance(hang_on, bool) or not isinstance(hang_on, int) or hang_on < 1):
            raise invalid_argument("hang_on_request must be a positive integer (1 = the first request)")
        plan.hang_on_request = hang_on
        hang_seconds = body.get("hang_seconds", 0.0)
        if isinstance(hang_seconds, bool) or not isinstance(hang_seconds, (int, float)) or hang_seconds < 0:
            raise invalid_argument("hang_seconds must be a non-negative number")
        plan.hang_seconds = float(hang_seconds)
        max_faults = body.get("max_faults")
        if max_faults is not None and (
            isinstance(max_faults, bool) or not isinstance(max_faults, int) or max_faults < 0
        ):
            raise invalid_argument("max_faults must be a non-negative integer")
        plan.max_faults = max_faults
        only_creates = body.get("only_creates", False)
        if not isinstance(only_creates, bool):
            raise invalid_argument("only_creates must be true or false")
        plan.only_creates = only_creates
        return plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "error_rate": self.error_rate,
            "statuses": list(self.statuses),
            "reset_rate": self.reset_rate,
            "drop_create_response_rate": self.drop_create_response_rate,
            "drop_mode": self.drop_mode,
            "retry_after_seconds": self.retry_after_seconds,
            "seed": self.seed,
            "paths": self.paths,
            "hang_on_request": self.hang_on_request,
            "hang_seconds": self.hang_seconds,
            "max_faults": self.max_faults,
            "only_creates": self.only_creates,
        }


@dataclass
class FaultDecision:
    """What to do with one request: nothing, answer an error, abort, or drop the response of a create."""

    error_status: int | None = None
    reset: bool = False
    drop_response: bool = False
    hang_seconds: float = 0.0  # hold the request this long first, then decide as usual


class FaultInjector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.plan: FaultPlan | None = None
        self._rng = random.Random()
        self.injected: Counter[str] = Counter()
        self._matched = 0  # requests the plan applied to since `configure`

    def configure(self, plan: FaultPlan) -> None:
        with self._lock:
            self.plan = plan
            self._rng = random.Random(plan.seed)
            self.injected.clear()
            self._matched = 0

    def clear(self) -> None:
        with self._lock:
            self.plan = None
            self.injected.clear()
            self._matched = 0

    def decide(self, path: str, *, is_create: bool) -> FaultDecision:
        with self._lock:
            plan = self.plan
            if plan is None or path.startswith("/_workspace") or not path.startswith(plan.paths):
                return FaultDecision()
            if plan.only_creates and not is_create:
                return FaultDecision()
            self._matched += 1
            hang = 0.0
            if plan.hang_on_request is not None and self._matched == plan.hang_on_request:
                self.injected["hang"] += 1
                hang = plan.hang_seconds
            faults_so_far = sum(n for kind, n in self.injected.items() if kind != "hang")
            if plan.max_faults is not None and faults_so_far >= plan.max_faults:
                return FaultDecision(hang_seconds=hang)
            draw = self._rng.random()
            if draw < plan.reset_rate:
                self.injected["reset"] += 1
                return FaultDecision(reset=True, hang_seconds=hang)
            if draw < plan.reset_rate + plan.error_rate:
                status = self._rng.choice(plan.statuses)
                self.injected[f"error {status}"] += 1
                return FaultDecision(error_status=status, hang_seconds=hang)
            if is_create and self._rng.random() < plan.drop_create_response_rate:
                self.injected["dropped create response"] += 1
                return FaultDecision(drop_response=True, hang_seconds=hang)
            return FaultDecision(hang_seconds=hang)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "plan": self.plan.to_dict() if self.plan else None,
                "injected": dict(self.injected),
                "matched_requests": self._matched,
            }


@dataclass
class Latency:
    """Injected delays: before an application's process starts, before a job run's process starts."""

    app_start_seconds: float = 0.0
    job_start_seconds: float = 0.0

    def update(self, body: dict[str, Any]) -> None:
        reject_unknown_keys(body, ["app_start_seconds", "job_start_seconds"], "latency")
        for name in ("app_start_seconds", "job_start_seconds"):
            if name in body:
                value = body[name]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise invalid_argument(f"{name} must be a non-negative number")
                setattr(self, name, float(value))

    def to_dict(self) -> dict[str, float]:
        return {"app_start_seconds": self.app_start_seconds, "job_start_seconds": self.job_start_seconds}


# CML's documented default: a failed application is restarted up to 3 times, 5 minutes apart.
DEFAULT_RESTART_ATTEMPTS = 3
DEFAULT_RESTART_DELAY_SECONDS = 300.0


@dataclass
class RestartPolicy:
    """CML's automatic restart of failed applications ("Enable Application Restart", on by default):
    an application that enters APPLICATION_FAILED by itself is started again after `delay_seconds`,
    at most `max_attempts` times until a user starts it again. Set at start (`ray-cai workspace start
    --app-restart-delay ...`) or with `PUT /_workspace/restart-policy`."""

    enabled: bool = True
    max_attempts: int = DEFAULT_RESTART_ATTEMPTS
    delay_seconds: float = DEFAULT_RESTART_DELAY_SECONDS

    def update(self, body: dict[str, Any]) -> None:
        reject_unknown_keys(body, ["enabled", "max_attempts", "delay_seconds"], "restart policy")
        if "enabled" in body and not isinstance(body["enabled"], bool):
            raise invalid_argument("enabled must be a boolean")
        if "max_attempts" in body:
            value = body["max_attempts"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise invalid_argument("max_attempts must be a non-negative integer")
        if "delay_seconds" in body:
            value = body["delay_seconds"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise invalid_argument("delay_seconds must be a non-negative number")
        self.enabled = bool(body.get("enabled", self.enabled))
        self.max_attempts = int(body.get("max_attempts", self.max_attempts))
        self.delay_seconds = float(body.get("delay_seconds", self.delay_seconds))

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "max_attempts": self.max_attempts,
            "delay_seconds": self.delay_seconds,
        }


@dataclass
class AppUrlPolicy:
    """What the application URLs let through, like a gateway in front of CML's apps would.
    `websocket_upgrades: false` refuses every WebSocket upgrade (HTTP 403) while plain HTTP works:
    `PUT /_workspace/app-urls`, `DELETE` restores the default (upgrades pass, as on CML)."""

    websocket_upgrades: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"websocket_upgrades": self.websocket_upgrades}

    def update(self, body: dict[str, Any]) -> None:
        reject_unknown_keys(body, [f.name for f in fields(self)], "app-urls")
        value = body.get("websocket_upgrades", self.websocket_upgrades)
        if not isinstance(value, bool):
            raise invalid_argument("websocket_upgrades must be a boolean")
        self.websocket_upgrades = value

    def reset(self) -> None:
        self.websocket_upgrades = True
