"""Port choice for many Ray nodes on one host: the local workspace's shared-host mode only.

On CML, and in the local workspace's pods, every node has its own IP and port space: Ray's own
defaults apply and nothing here is used. Where the workspace cannot make pods it runs every node on
one host and says so with `RAY_CAI_SHARED_HOST=1`; then single ports come from the kernel (bind to
port 0) and worker port ranges are blocks below the ephemeral range, reserved with an flock held for
the life of the launcher, so two nodes on one host never share a range.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

WORKER_PORT_FIRST = 20000
WORKER_PORT_LAST = 31999  # below Linux's default ephemeral range (32768-60999)
WORKER_PORT_BLOCK = 500
# Ray Client's proxier starts one server per client on a fixed range (ray.util.client.server.proxier
# MIN/MAX_SPECIFIC_SERVER_PORT): a worker port block there makes `ray.init("ray://…")` fail at random.
RAY_CLIENT_SERVER_PORTS = range(23000, 24000)
SHARED_HOST_VARIABLE = "RAY_CAI_SHARED_HOST"


def on_shared_host(environ: Mapping[str, str] | None = None) -> bool:
    """True when this node shares its host and IP with other nodes (the workspace's shared-host mode)."""
    return (os.environ if environ is None else environ).get(SHARED_HOST_VARIABLE, "").strip() == "1"


def pick_free_ports(count: int, exclude: set[int] | None = None) -> list[int]:
    """`count` distinct ports that are free right now on every interface."""
    excluded = set(exclude or ())
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("", 0))
            port = sock.getsockname()[1]
            if port not in excluded and port not in ports:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def is_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


@dataclass
class WorkerPortBlock:
    """A reserved range [first, last] for Ray worker processes; released by `release()` or exit."""

    first: int
    last: int
    _lock_file: IO[bytes] | None = None

    def release(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                self._lock_file.close()
            self._lock_file = None


def reserve_worker_port_block(lock_dir: Path | None = None) -> WorkerPortBlock | None:
    """Reserve a free block of worker ports on this host, or None when every block is taken."""
    directory = lock_dir or Path(tempfile.gettempdir()) / "ray-cai-ports"
    directory.mkdir(parents=True, exist_ok=True)
    for first in range(WORKER_PORT_FIRST, WORKER_PORT_LAST + 1, WORKER_PORT_BLOCK):
        last = min(first + WORKER_PORT_BLOCK - 1, WORKER_PORT_LAST)
        if first < RAY_CLIENT_SERVER_PORTS.stop and last >= RAY_CLIENT_SERVER_PORTS.start:
            continue
        lock_file = open(directory / f"block-{first}.lock", "ab")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            continue
        # Something outside ray-cai may listen in the block: sample its edges and middle.
        if all(is_port_free(port) for port in (first, (first + last) // 2, last)):
            os.set_inheritable(lock_file.fileno(), False)
            return WorkerPortBlock(first, last, lock_file)
        lock_file.close()
    return None
