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

from ray_serve_cai.cluster.errors import ClusterError, LockHeld
from ray_serve_cai.cml import Application, CMLAPIError, CMLClient, CMLError, NotFound
from ray_serve_cai.errors import WaitTimeout
from ray_serve_cai.waiting import poll_until

log = logging.getLogger("ray_serve_cai.cluster")

LOCK_SCRIPT = "cai_integration/ray_lock.py"
LOCK_MARKER = "RAY_CAI_LOCK_CLUSTER"
LOCK_OWNER = "RAY_CAI_LOCK_OWNER"
LOCK_EXPIRES = "RAY_CAI_LOCK_EXPIRES"
LOCK_HOST = "RAY_CAI_LOCK_HOST"
LOCK_PID = "RAY_CAI_LOCK_PID"
# Seconds creates of the lock may keep failing (with nobody holding it) before the pass gives up.
FAILING_CREATE_PATIENCE = 30.0


@dataclass(frozen=True)
class LockInfo:
    app_id: str
    owner: str
    expires_at: float
    host: str = ""
    pid: int = 0

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at

    @property
    def holder_gone(self) -> bool:
        """The holder ran on this machine and its process no longer exists (it was killed)."""
        if not self.pid or self.host != _hostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    @property
    def stale(self) -> bool:
        return self.expired or self.holder_gone

    def describe(self) -> str:
        left = self.expires_at - time.time()
        return f"{self.owner} (expires in {left:.0f}s)" if left > 0 else f"{self.owner} (expired)"


def lock_app_name(cluster: str) -> str:
    return f"ray-{cluster}-lock"


def _hostname() -> str:
    return os.environ.get("CDSW_ENGINE_ID") or socket.gethostname()


def default_owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{_hostname()} pid {os.getpid()} ({secrets.token_hex(3)})"


def lock_info(app: Application) -> LockInfo:
    """The lock an application of the listing says (holder, expiry)."""
    env = app.environment
    try:
        expires = float(env.get(LOCK_EXPIRES, "0"))
        pid = int(env.get(LOCK_PID, "0"))
    except ValueError:
        expires, pid = 0.0, 0
    return LockInfo(
        app_id=app.id,
        owner=env.get(LOCK_OWNER, "unknown"),
        expires_at=expires,
        host=env.get(LOCK_HOST, ""),
        pid=pid,
    )


def remove_stale_lock(client: CMLClient, project_id: str, cluster: str, lock: LockInfo | None) -> bool:
    """Delete the cluster's lock if the observation shows one that is stale (expired, or its holder's
    process on this machine is gone): a run that had nothing left to do still cleans up after a
    killed one. Returns True when a stale lock was removed."""
    if lock is None or not lock.stale:
        return False
    log.warning("removing the stale lock of cluster %s held by %s", cluster, lock.owner)
    _delete(client, project_id, lock.app_id)
    return True


def find_lock(client: CMLClient, project_id: str, cluster: str) -> LockInfo | None:
    name = lock_app_name(cluster)
    for app in client.list_applications(project_id, search_filter={"subdomain": name}):
        if app.key == name:
            return lock_info(app)
    return None


@contextmanager
def cluster_lock(
    client: CMLClient,
    project_id: str,
    cluster: str,
    *,
    ttl: float,
    wait: float = 0.0,
    runtime_identifier: str | None = None,
    owner: str | None = None,
    on_wait: Callable[[LockInfo], None] | None = None,
    patience: float | None = None,
) -> Iterator[LockInfo]:
    """Hold the cluster's lock for the block; wait up to `wait` seconds for another holder.

    A lock past its expiry, or held by a process of this machine that no longer exists, is taken
    over. `runtime_identifier` is needed in ML Runtime projects (every application names one).
    Creates that keep failing with nobody holding the lock are given up after `patience` seconds
    (default `FAILING_CREATE_PATIENCE`; `wait`, when longer)."""
    owner = owner or default_owner()
    name = lock_app_name(cluster)
    # Waiting for another holder is bounded by `wait`; creates that keep failing with nobody holding
    # the lock (5xx, lost answers) are retried a little longer, then given up with the last error.
    patience = max(wait, FAILING_CREATE_PATIENCE if patience is None else patience)
    seen: dict[str, object] = {}

    def try_take() -> LockInfo | None:
        expires = time.time() + ttl
        environment = {
            LOCK_MARKER: cluster,
            LOCK_OWNER: owner,
            LOCK_EXPIRES: f"{expires:.0f}",
            LOCK_HOST: _hostname(),
            LOCK_PID: str(os.getpid()),
        }
        try:
            app = client.create_application(
                project_id,
                name=name,
                subdomain=name,
                script=LOCK_SCRIPT,
                description=f"ray-cai lock of cluster {cluster!r} (deleted when released)",
                cpu=0.5,
                memory=0.5,
                environment=environment,
                runtime_identifier=runtime_identifier,
            )
            return LockInfo(app_id=app.id, owner=owner, expires_at=expires)
        except CMLError as err:
            if isinstance(err, CMLAPIError) and err.status_code not in (409, 500, 502, 503, 504):
                raise
            seen["error"] = err
        current = find_lock(client, project_id, cluster)
        seen["holder"] = current
        if current is None:
            return None  # released meanwhile, or our create failed without effect: try again
        if current.owner == owner:
            return current  # our own create went through; its answer was lost
        if current.stale:
            why = "expired" if current.expired else "its process is gone"
            log.warning("taking over the lock of cluster %s held by %s (%s)", cluster, current.owner, why)
            _delete(client, project_id, current.app_id)
            return None
        if time.monotonic() - started >= wait:
            raise LockHeld(
                f"cluster {cluster!r} is being changed by {current.describe()}; "
                "wait for it, or delete the application "
                f"{name!r} if that run is gone"
            )
        if on_wait:
            on_wait(current)
        return None

    started = time.monotonic()
    try:
        held = poll_until(
            try_take, timeout=patience, interval=0.2, max_interval=2.0, backoff=2.0, what=f"lock {name!r}"
        )
    except WaitTimeout:
        holder = seen.get("holder")
        if isinstance(holder, LockInfo):
            raise LockHeld(
                f"cluster {cluster!r} is being changed by {holder.describe()}; wait for it, "
                f"or delete the application {name!r} if that run is gone"
            ) from None
        raise ClusterError(
            f"could not take the lock of cluster {cluster!r} within {patience:g}s: creating the "
            f"application {name!r} kept failing ({seen.get('error')}); check the workspace and try again"
        ) from None
    try:
        yield held
    finally:
        _delete(client, project_id, held.app_id)


def _delete(client: CMLClient, project_id: str, app_id: str) -> None:
    """Delete the lock application (the client retries a failed DELETE within its deadline); a lock
    already gone is fine, and one that cannot be deleted expires by itself."""
    try:
        with suppress(NotFound):
            client.delete_application(project_id, app_id)
    except CMLError as err:
        log.warning("could not release the cluster lock %s (it expires by itself): %s", app_id, err)
