"""Workspace controls of pods (not part of CML): network faults between pods (partition, `tc netem`
shaping) and session pods (`ray-cai workspace exec`). Served under `/_workspace/network` and
`/_workspace/sessions`, behind the API key like the other controls (`controls.py`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ray_serve_cai.workspace.controls import reject_unknown_keys
from ray_serve_cai.workspace.errors import failed_precondition, invalid_argument, not_found
from ray_serve_cai.workspace.pods import Pod
from ray_serve_cai.workspace.service import WorkspaceService

# ------------------------------------------------------------------------------ network faults (pods)

NETWORK_PREFIX = "/_workspace/network"
_PARTITION_KEYS = ["applications", "seconds"]
_SHAPE_KEYS = ["applications", "delay_ms", "jitter_ms", "loss_percent", "seconds"]


def _number(body: dict[str, Any], key: str, *, low: float, high: float) -> float:
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid_argument(f"{key} must be a number from {low:g} to {high:g}")
    return float(value)


def _pods_of(service: WorkspaceService, body: dict[str, Any]) -> list[Pod]:
    """The pods of the named applications (ids, names or subdomains); each must run in a pod."""
    network = service.supervisor.network
    if network is None:
        raise failed_precondition(
            f"network faults need pods; this workspace runs shared-host ({service.supervisor.network_reason})"
        )
    wanted = body.get("applications")
    if not isinstance(wanted, list) or not wanted or not all(isinstance(w, str) and w for w in wanted):
        raise invalid_argument("applications must be a non-empty list of application ids or names")
    pods: list[Pod] = []
    for name in wanted:
        app = service.apps.get(name) or next(
            (a for a in service.apps.values() if name in (a.name, a.subdomain)), None
        )
        if app is None:
            raise not_found(f"no application {name!r}")
        pod = network.pod(app.pod_ip) if app.pod_ip else None
        if pod is None:
            raise failed_precondition(f"application {name!r} has no pod (status {app.status})")
        pods.append(pod)
    return pods


async def _json_body(request: Request, known: list[str]) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise invalid_argument("request body must be JSON") from None
    if not isinstance(body, dict):
        raise invalid_argument("request body must be a JSON object")
    reject_unknown_keys(body, known, "network")
    return body


def network_router(service: WorkspaceService) -> APIRouter:
    """`/_workspace/network`: GET the pods and faults; POST `/partition`, POST `/shape`; DELETE heals
    every fault. Faults end by themselves after `seconds` (0: when healed) and with the workspace.
    `/shape` with `"applications": ["*"]` shapes every pod, and every pod made until it ends."""
    router = APIRouter(prefix=NETWORK_PREFIX)
    supervisor = service.supervisor

    @router.get("")
    async def get_network() -> JSONResponse:
        return JSONResponse(supervisor.network_state())

    @router.post("/partition")
    async def partition(request: Request) -> JSONResponse:
        body = await _json_body(request, _PARTITION_KEYS)
        seconds = _number(body, "seconds", low=0, high=86400)
        pods = _pods_of(service, body)
        for pod in pods:
            supervisor.network.partition(pod)  # type: ignore[union-attr]  # in the loop: it aborts relays
            supervisor.network.schedule_heal(pod, "partition", seconds)  # type: ignore[union-attr]
        return JSONResponse(supervisor.network_state())

    @router.post("/shape")
    async def shape(request: Request) -> JSONResponse:
        body = await _json_body(request, _SHAPE_KEYS)
        delay = _number(body, "delay_ms", low=0, high=60000)
        jitter = _number(body, "jitter_ms", low=0, high=60000)
        loss = _number(body, "loss_percent", low=0, high=100)
        seconds = _number(body, "seconds", low=0, high=86400)
        if not (delay or jitter or loss):
            raise invalid_argument("shape needs delay_ms, jitter_ms or loss_percent")
        loop = asyncio.get_running_loop()
        if body.get("applications") == ["*"]:  # every pod, and every pod made until healed
            network = supervisor.network
            if network is None:
                _pods_of(service, body)  # says why not
            assert network is not None
            network.shape_all(delay, jitter, loss, seconds, loop)
            return JSONResponse(supervisor.network_state())
        for pod in _pods_of(service, body):
            supervisor.network.shape(pod, delay, jitter, loss, loop)  # type: ignore[union-attr]
            supervisor.network.schedule_heal(pod, "shape", seconds)  # type: ignore[union-attr]
        return JSONResponse(supervisor.network_state())

    @router.delete("")
    async def heal() -> JSONResponse:
        healed = await asyncio.to_thread(supervisor.network.heal) if supervisor.network is not None else 0
        return JSONResponse({**supervisor.network_state(), "healed": healed})

    return router


# ------------------------------------------------------------------------------ session pods (exec)

SESSIONS_PREFIX = "/_workspace/sessions"


def session_router(service: WorkspaceService) -> APIRouter:
    """`POST /_workspace/sessions` `{"project": id or name, "environment": {...}, "owner_pid": N}` opens a
    session pod (`ray-cai workspace exec`); `DELETE /_workspace/sessions/{id}` removes it."""
    router = APIRouter(prefix=SESSIONS_PREFIX)

    @router.post("")
    async def open_session(request: Request) -> JSONResponse:
        body = await _json_body(request, ["project", "environment", "owner_pid"])
        wanted = body.get("project")
        if wanted is not None and (not isinstance(wanted, str) or not wanted):
            raise invalid_argument("project must be a project id or name")
        projects = list(service.projects.values())
        if wanted is None:
            if len(projects) != 1:
                raise invalid_argument(f"project is required: the workspace has {len(projects)} projects")
            project = projects[0]
        else:
            project = service.projects.get(wanted) or next((p for p in projects if p.name == wanted), None)
            if project is None:
                raise not_found(f"no project {wanted!r}")
        environment = body.get("environment") or {}
        if not isinstance(environment, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in environment.items()
        ):
            raise invalid_argument("environment must be an object of strings")
        owner = body.get("owner_pid")
        if isinstance(owner, bool) or not isinstance(owner, int) or owner <= 0:
            raise invalid_argument("owner_pid must be the pid of the process that closes the session")
        context = service._context(project, dict(project.environment))
        answer = await service.supervisor.open_session(
            context, environment, owner, service.home / "logs" / "sessions"
        )
        return JSONResponse(answer, headers={"cache-control": "no-store"})

    @router.delete("/{session_id}")
    async def close_session(session_id: str) -> JSONResponse:
        if not await service.supervisor.close_session(session_id):
            raise not_found(f"no session {session_id!r}")
        return JSONResponse({})

    return router
