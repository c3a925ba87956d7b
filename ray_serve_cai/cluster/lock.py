"""A cluster-wide lock with an expiry, held while a pass changes applications.

CML offers one atomic primitive across every client of a workspace: an application subdomain is
unique (a second create answers 409). The lock is therefore a tiny application,
`ray-<cluster>-lock`, whose script exits at once (so it holds no resources once stopped) and whose
environment says who holds it and until when. A lock past its expiry is taken over. It is taken
only when a pass has something to change, so a no-op `up` costs no extra API call.
"""

from __future__ import annotations

import getpass
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from ray_serve_cai.cluster.errors import LockHeld
from ray_serve_cai.cml import Application, CMLAPIError, CMLClient, CMLError, NotFound

log = logging.getLogger("ray_serve_cai.cluster")

LOCK_SCRIPT = "cai_integration/ray_lock.py"
LOCK_MARKER = "RAY_CAI_LOCK_CLUSTER"
LOCK_OWNER = "RAY_CAI_LOCK_OWNER"
LOCK_EXPIRES = "RAY_CAI_LOCK_EXPIRES"


@dataclass(frozen=True)
class LockInfo:
    app_id: str
    owner: str
    expires_at: float

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at

    def describe(self) -> str:
        left = self.expires_at - time.time()
        return f"{self.owner} (expires in {left:.0f}s)" if left > 0 else f"{self.owner} (expired)"


def lock_app_name(cluster: str) -> str:
    return f"ray-{cluster}-lock"


def default_owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    where = os.environ.get("CDSW_ENGINE_ID") or socket.gethostname()
    return f"{user}@{where} pid {os.getpid()} ({secrets.token_hex(3)})"


def _lock_info(app: Application) -> LockInfo:
    try:
        expires = float(app.environment.get(LOCK_EXPIRES, "0"))
    except ValueError:
        expires = 0.0
    return LockInfo(app_id=app.id, owner=app.environment.get(LOCK_OWNER, "unknown"), expires_at=expires)


def find_lock(client: CMLClient, project_id: str, cluster: str) -> LockInfo | None:
    name = lock_app_name(cluster)
    for app in client.list_applications(project_id, search_filter={"subdomain": name}):
        if (app.subdomain or app.name) == name:
            return _lock_info(app)
    return None


@contextmanager
def cluster_lock(
    client: CMLClient,
    project_id: str,
    cluster: str,
    *,
    ttl: float,
    wait: float = 0.0,
    owner: str | None = None,
    on_wait: Callable[[LockInfo], None] | None = None,
) -> Iterator[LockInfo]:
    """Hold the cluster's lock for the block; wait up to `wait` seconds for another holder."""
    owner = owner or default_owner()
    deadline = time.monotonic() + wait
    name = lock_app_name(cluster)
    held: LockInfo | None = None
    while held is None:
        expires = time.time() + ttl
        try:
            app = client.create_application(
                project_id,
                name=name,
                subdomain=name,
                script=LOCK_SCRIPT,
                description=f"ray-cai lock of cluster {cluster!r} (deleted when released)",
                cpu=0.5,
                memory=0.5,
                environment={LOCK_MARKER: cluster, LOCK_OWNER: owner, LOCK_EXPIRES: f"{expires:.0f}"},
            )
            held = LockInfo(app_id=app.id, owner=owner, expires_at=expires)
            break
        except CMLError as err:
            if isinstance(err, CMLAPIError) and err.status_code not in (409, 500, 502, 503, 504):
                raise
            current = find_lock(client, project_id, cluster)
            if current is None:
                continue  # released meanwhile, or our create failed without effect: try again
            if current.owner == owner:
                held = current  # our own create went through; its answer was lost
                break
            if current.expired:
                log.warning("taking over the expired lock of cluster %s held by %s", cluster, current.owner)
                _delete(client, project_id, current.app_id)
                continue
            if time.monotonic() >= deadline:
                raise LockHeld(
                    f"cluster {cluster!r} is being changed by {current.describe()}; "
                    "wait for it, or delete the application "
                    f"{name!r} if that run is gone"
                ) from None
            if on_wait:
                on_wait(current)
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    try:
        yield held
    finally:
        _delete(client, project_id, held.app_id)


def _delete(client: CMLClient, project_id: str, app_id: str) -> None:
    with suppress(NotFound):
        client.delete_application(project_id, app_id)
