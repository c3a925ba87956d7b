"""Where the head's GCS keeps its state when head fault tolerance is on, and how the head uses it.

Backend: Ray 2.60's embedded RocksDB (`RAY_gcs_storage=rocksdb`, `RAY_gcs_storage_path`), in the
project: `.ray-cai/<cluster>/gcs/<cluster uid>/`. Why this one, not Redis/Valkey from a PyPI wheel:
it adds no process and no second failure domain (a Redis server would itself need a stable address
and durable files in the project); every head pod of a CML project mounts the same project
filesystem, so a head restarted in a new pod opens the same directory; Ray recovers from it exactly
as from Redis. Verified on this machine with Ray 2.60 (internal KV written, every head process
SIGKILLed, head started again on the same path → the value is back; a detached actor on a worker
kept its state through a head replacement, see tests/ray/test_head_ft_ray.py). Its costs: it is
alpha upstream, tested on ext4 only, and every GCS write is an fsync — `measure_fsync` (used by
`ray-cai doctor`) says what that costs on the project filesystem, and `fcntl_lock_works` whether
RocksDB's LOCK file can hold (one writer per path).

The uid makes the path unique per cluster *instance*: it is created at the first `up` and kept in
the applied record (`cluster_uid`), so a new cluster of the same name never opens an old store;
`down` removes `.ray-cai/<cluster>/gcs/` (with the lease and the failover record).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
import tempfile
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


def measure_fsync(directory: Path | str, writes: int = 50, size: int = 4096) -> dict[str, float]:
    """Write-and-fsync `writes` small records in `directory` (as RocksDB's WAL does per GCS write);
    p50/p99/max in milliseconds. The file is removed afterwards."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=".fsync-probe.", dir=directory)
    samples = []
    try:
        block = os.urandom(size)
        for _ in range(writes):
            started = time.perf_counter()
            os.write(descriptor, block)
            os.fsync(descriptor)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(descriptor)
        Path(name).unlink(missing_ok=True)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 3),
        "max_ms": round(samples[-1], 3),
        "writes": float(writes),
    }


def fcntl_lock_works(directory: Path | str) -> bool:
    """Whether an exclusive fcntl lock (RocksDB's LOCK file) is refused to a second open file
    description in `directory`. Within one host only: across pods needs a second pod."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=".lock-probe.", dir=directory)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        child = os.fork()
        if child == 0:  # a lock held by another process must be refused
            try:
                other = os.open(name, os.O_RDWR)
                fcntl.lockf(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os._exit(0)
            os._exit(1)
        _, code = os.waitpid(child, 0)
        return os.WEXITSTATUS(code) == 0
    except OSError:
        return False
    finally:
        os.close(descriptor)
        Path(name).unlink(missing_ok=True)


__all__ = [
    "WORKER_RECONNECT_TIMEOUT_SECONDS",
    "cluster_uid",
    "fcntl_lock_works",
    "gcs_root",
    "head_storage_env",
    "measure_fsync",
    "read_failover",
    "storage_path",
    "worker_reconnect_env",
    "write_failover",
]
