"""Exactly one GCS per cluster: the head lease, with an epoch, in the project.

Ray requires that only one GCS is alive at a time (and RocksDB tolerates one writer per path);
on CML a restarting head application can overlap its old pod, and a stray start can happen. So a
head starts its GCS only while it holds the lease `.ray-cai/<cluster>/gcs/head.lease`:

- the lease says who holds it (`holder`, new per launcher), its `epoch`, node name and IP, and
  when it was last renewed (`renewed_at`, wall clock: pods of a CML workspace share NTP time);
- a head takes the lease when there is none, when it was released (a head that stopped cleanly),
  or when it was not renewed for `LEASE_TTL_SECONDS` (a head that was killed or lost its pod);
  taking it claims the next epoch with an exclusive create of `epochs/<N>` (only one claimant can
  win an epoch, even when two heads read the same stale lease), then writes the lease atomically;
- the holder renews it every `HEARTBEAT_SECONDS`; when it finds a higher epoch (it was fenced) or
  could not renew for a whole TTL, it stops its GCS and exits;
- a head that finds the lease held by a live head waits up to the lease wait (for an overlap to
  end), then refuses: it never starts its GCS, says why on its status page and in its log, exits 1.

The rendezvous (`head.json`) carries the epoch; workers follow only the newest epoch they saw.
`decide` is pure (tested in tests/unit); the rest is file I/O.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ray_serve_cai.atomic import write_atomically
from ray_serve_cai.node.gcs_storage import gcs_root

LEASE_FILE_NAME = "head.lease"
EPOCHS_DIR_NAME = "epochs"
LEASE_TTL_SECONDS = 15.0
HEARTBEAT_SECONDS = 3.0
DEFAULT_LEASE_WAIT_SECONDS = 60.0  # longer than a TTL: an overlapping old head has time to go
LEASE_WAIT_VARIABLE = "RAY_CAI_HEAD_LEASE_WAIT"


@dataclass(frozen=True)
class Lease:
    """The content of `head.lease`."""

    epoch: int
    holder: str
    node_name: str
    ip: str
    renewed_at: float
    released: bool = False
    gcs_port: int = 0
    serving: bool = False  # the holder's GCS runs (False while it starts or restarts in place)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Lease:
        return cls(
            epoch=int(data["epoch"]),
            holder=str(data["holder"]),
            node_name=str(data.get("node_name", "")),
            ip=str(data.get("ip", "")),
            renewed_at=float(data["renewed_at"]),
            released=bool(data.get("released", False)),
            gcs_port=int(data.get("gcs_port", 0)),
            serving=bool(data.get("serving", False)),
        )

    def describe(self, now: float) -> str:
        return (
            f"head {self.node_name or '?'} at {self.ip or '?'} holds the lease "
            f"(epoch {self.epoch}, renewed {max(0.0, now - self.renewed_at):.0f}s ago)"
        )


@dataclass(frozen=True)
class Decision:
    """What a head does about the lease: `take` epoch N, `renew` its own, or `wait` (why)."""

    action: Literal["take", "renew", "wait"]
    epoch: int
    reason: str = ""
    previous: Lease | None = None  # the lease taken over (released: a clean restart; else a failover)


def decide(current: Lease | None, holder: str, now: float, highest_claimed: int = 0,
           ttl: float = LEASE_TTL_SECONDS, holder_gone: bool = False) -> Decision:  # fmt: skip
    """The lease decision of head `holder` at wall time `now`, given the lease on disk and the
    highest epoch ever claimed (a lease may be missing while epochs exist). `holder_gone`: the
    holder said its GCS runs, and its GCS port refuses connections (its pod or its GCS is gone):
    no need to wait for the lease to expire."""
    top = max(highest_claimed, current.epoch if current is not None else 0)
    if current is None:
        return Decision("take", top + 1, "no lease")
    if current.holder == holder and not current.released:
        if highest_claimed > current.epoch:
            return Decision("wait", current.epoch, f"epoch {highest_claimed} was claimed by another head")
        return Decision("renew", current.epoch)
    if current.released:
        return Decision("take", top + 1, f"epoch {current.epoch} was released", current)
    age = now - current.renewed_at
    if holder_gone and current.serving:
        return Decision("take", top + 1, f"the GCS of epoch {current.epoch} refuses connections", current)
    if age > ttl:
        return Decision("take", top + 1, f"epoch {current.epoch} expired {age - ttl:.0f}s ago", current)
    return Decision("wait", current.epoch, current.describe(now), current)


def fenced(current: Lease | None, holder: str, epoch: int) -> str | None:
    """Why the holder of `epoch` must stop its GCS (None: it still holds the lease)."""
    if current is None:
        return None  # removed (by `down`): the head is being deleted anyway
    if current.epoch > epoch or (current.epoch == epoch and current.holder != holder):
        return f"the lease moved to epoch {current.epoch}: {current.describe(current.renewed_at)}"
    return None


def gcs_refuses(ip: str, port: int, timeout: float = 2.0) -> bool:
    """True when nothing listens at ip:port (refused, or the address is unreachable): the GCS there
    is gone. A timeout (e.g. a partition) is not proof: False."""
    if not ip or not port:
        return False
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return False
    except (ConnectionRefusedError, OSError) as error:
        if isinstance(error, TimeoutError | socket.timeout):
            return False
        return isinstance(error, ConnectionRefusedError) or error.errno in (
            errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
        )  # fmt: skip


def lease_path(project_dir: Path | str, cluster: str) -> Path:
    return gcs_root(project_dir, cluster) / LEASE_FILE_NAME


def read_lease(project_dir: Path | str, cluster: str) -> Lease | None:
    try:
        return Lease.from_mapping(json.loads(lease_path(project_dir, cluster).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def highest_claimed(project_dir: Path | str, cluster: str) -> int:
    directory = gcs_root(project_dir, cluster) / EPOCHS_DIR_NAME
    try:
        return max((int(name) for name in os.listdir(directory) if name.isdigit()), default=0)
    except OSError:
        return 0


def claim_epoch(project_dir: Path | str, cluster: str, epoch: int, holder: str) -> bool:
    """Claim `epoch` with an exclusive create; False when another head claimed it first."""
    directory = gcs_root(project_dir, cluster) / EPOCHS_DIR_NAME
    directory.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(directory / str(epoch), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(descriptor, holder.encode())
    finally:
        os.close(descriptor)
    return True


def write_lease(project_dir: Path | str, cluster: str, lease: Lease) -> bool:
    """Write the lease atomically, only while the cluster's GCS directory exists (never after
    `down` removed it). True when written."""
    path = lease_path(project_dir, cluster)
    if not path.parent.is_dir():
        return False
    write_atomically(path, lease.to_json())
    return True


def lease_wait_seconds(environ: dict[str, str] | None = None) -> float:
    raw = (os.environ if environ is None else environ).get(LEASE_WAIT_VARIABLE, "").strip()
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_LEASE_WAIT_SECONDS
    except ValueError:
        return DEFAULT_LEASE_WAIT_SECONDS


__all__ = [
    "HEARTBEAT_SECONDS",
    "LEASE_TTL_SECONDS",
    "Decision",
    "Lease",
    "claim_epoch",
    "decide",
    "fenced",
    "gcs_refuses",
    "highest_claimed",
    "lease_path",
    "lease_wait_seconds",
    "read_lease",
    "write_lease",
]
