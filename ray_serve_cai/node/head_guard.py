"""The head's side of head fault tolerance: take the lease before the GCS starts, renew it while
the head lives, stop when fenced, release it on a clean stop, and remember failovers.

See `head_lease` (the lease rules), `gcs_storage` (where the GCS state lives) and `gcs_relay`
(how workers follow a head that moved). The launcher calls `acquire` before `ray start`, `start`
once it runs, `release` when it stops; `fenced` says why the head must stop (None: it holds).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray_serve_cai.errors import OperationFailed
from ray_serve_cai.node.gcs_storage import (
    STORAGE_NAME,
    cluster_uid,
    gcs_root,
    head_storage_env,
    read_failover,
    storage_path,
    write_failover,
)
from ray_serve_cai.node.head_lease import (
    HEARTBEAT_SECONDS,
    LEASE_TTL_SECONDS,
    Lease,
    claim_epoch,
    decide,
    fenced,
    gcs_refuses,
    highest_claimed,
    lease_wait_seconds,
    read_lease,
    write_lease,
)

logger = logging.getLogger("ray_serve_cai.node")


class LeaseRefused(OperationFailed):
    """Another live head holds the lease: this head must not start a GCS."""


def utc_iso(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")


class HeadGuard:
    """One head launcher's lease, storage and failover record."""

    def __init__(self, project_dir: Path, cluster: str, node_name: str, ip: str,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.project_dir = project_dir
        self.cluster = cluster
        self.node_name = node_name
        self.ip = ip
        self.clock = clock
        self.holder = uuid.uuid4().hex
        self.uid = cluster_uid(project_dir, cluster)
        self.storage = storage_path(project_dir, cluster, self.uid)
        self.epoch = 0
        self.taken_over: Lease | None = None  # the lease of the head before this one (released or not)
        self.fenced_reason: str | None = None
        self.last_renewed = 0.0
        self.gcs_port = 0
        self.is_serving = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_fenced: Callable[[str], None] = lambda _reason: None

    def env(self) -> dict[str, str]:
        return head_storage_env(self.storage)

    def acquire(self, sleep: Callable[[float], object], on_wait: Callable[[str], None],
                wait_seconds: float | None = None) -> int:  # fmt: skip
        """Take the lease (waiting for a live holder to go, up to the lease wait); the epoch.
        Raises LeaseRefused when another head still holds it."""
        wait = lease_wait_seconds() if wait_seconds is None else wait_seconds
        deadline = time.monotonic() + wait
        gcs_root(self.project_dir, self.cluster).mkdir(parents=True, exist_ok=True)
        while True:
            now = self.clock()
            current = read_lease(self.project_dir, self.cluster)
            gone = (
                current is not None and current.serving and current.holder != self.holder
                and gcs_refuses(current.ip, current.gcs_port)
            )  # fmt: skip
            claimed = highest_claimed(self.project_dir, self.cluster)
            decision = decide(current, self.holder, now, claimed, holder_gone=gone)
            if decision.action == "take" and claim_epoch(
                self.project_dir, self.cluster, decision.epoch, self.holder
            ):
                self.epoch = decision.epoch
                self.taken_over = decision.previous
                self._write(now)
                logger.info("head lease: took epoch %s (%s)", self.epoch, decision.reason)
                return self.epoch
            if decision.action == "wait":
                if time.monotonic() >= deadline:
                    raise LeaseRefused(
                        f"refusing to start a second GCS for cluster {self.cluster!r}: {decision.reason}; "
                        f"waited {wait:.0f}s ({LEASE_WAIT_HINT})"
                    )
                on_wait(f"waiting for the head lease: {decision.reason}")
            sleep(1.0)

    def serving(self, gcs_port: int | None) -> None:
        """Say in the lease whether this head's GCS runs (on `gcs_port`; None: it does not), so a
        new head can tell a dead holder without waiting for the lease to expire."""
        self.gcs_port = gcs_port or 0
        self.is_serving = gcs_port is not None
        try:
            self._write(self.clock())
        except OSError as error:
            logger.warning("head lease: cannot write: %s", error)

    def _write(self, now: float) -> bool:
        lease = Lease(self.epoch, self.holder, self.node_name, self.ip, now, gcs_port=self.gcs_port,
                      serving=self.is_serving)  # fmt: skip
        if write_lease(self.project_dir, self.cluster, lease):
            self.last_renewed = time.monotonic()
            return True
        return False

    def start(self) -> None:
        """Renew the lease every HEARTBEAT_SECONDS in a daemon thread until `release`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._heartbeat, name="head-lease", daemon=True)
            self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            reason = self.check()
            if reason is not None:
                self.fenced_reason = reason
                logger.error("head lease lost: %s; stopping this head's GCS", reason)
                self.on_fenced(reason)
                return

    def check(self) -> str | None:
        """Renew once; why this head must stop, or None."""
        current = read_lease(self.project_dir, self.cluster)
        reason = fenced(current, self.holder, self.epoch)
        if reason is None and highest_claimed(self.project_dir, self.cluster) > self.epoch:
            reason = f"another head claimed epoch {highest_claimed(self.project_dir, self.cluster)}"
        if reason is not None:
            return reason
        try:
            self._write(self.clock())
        except OSError as error:
            logger.warning("head lease: cannot renew: %s", error)
        if time.monotonic() - self.last_renewed > LEASE_TTL_SECONDS:
            return f"could not renew the lease for {LEASE_TTL_SECONDS:.0f}s (another head may take it)"
        return None

    def release(self) -> None:
        """Stop renewing; mark the lease released so the next head takes it at once (once: a later
        call does nothing)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.epoch and self.fenced_reason is None:
            current = read_lease(self.project_dir, self.cluster)
            if current is not None and current.holder == self.holder:
                lease = Lease(self.epoch, self.holder, self.node_name, self.ip, self.clock(), released=True,
                              gcs_port=self.gcs_port)  # fmt: skip
                try:
                    write_lease(self.project_dir, self.cluster, lease)
                except OSError as error:
                    logger.warning("head lease: cannot release: %s", error)

    def record_failover(self, kind: str, down_since: float, ready_at: float) -> dict[str, Any]:
        """Remember a failover (the head's status page and `ray-cai status` show the last one)."""
        record = {
            "kind": kind,
            "at": utc_iso(down_since),
            "seconds": round(max(0.0, ready_at - down_since), 1),
            "epoch": self.epoch,
            "node_name": self.node_name,
        }
        write_failover(self.project_dir, self.cluster, record)
        logger.info("failover (%s) done in %.1fs", kind, record["seconds"])
        return record

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "storage": STORAGE_NAME,
            "path": str(self.storage),
            "epoch": self.epoch,
            "last_failover": read_failover(self.project_dir, self.cluster),
        }


LEASE_WAIT_HINT = "RAY_CAI_HEAD_LEASE_WAIT sets the wait; `ray-cai down` removes a stale lease"

__all__ = ["HeadGuard", "LeaseRefused"]
