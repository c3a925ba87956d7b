"""Guardian of one Ray node's processes for when the launcher itself is SIGKILLed.

Started by the launcher in its own session with a pipe on stdin. When the pipe closes (the
launcher exited or was killed), it SIGKILLs the node's process group and every process carrying
the node's tag. Ray's own clean-up misses the dashboard and runtime-env agents: they are children
of the raylet and outlive it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

NODE_TAG_VARIABLE = "RAY_CAI_NODE_TAG"


def start_reaper(process_group: int, tag: str) -> subprocess.Popen[bytes]:
    """Start the guardian; keep the returned Popen (its stdin) open while the node should live."""
    return subprocess.Popen(
        # By path: the launcher may have found this package through sys.path, which is not inherited.
        [sys.executable, str(Path(__file__).resolve()), str(process_group), tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={key: value for key, value in os.environ.items() if key != NODE_TAG_VARIABLE},
    )


def release_reaper(reaper: subprocess.Popen[bytes] | None) -> None:
    """Tell the guardian to finish (it reaps whatever is left of the node, then exits)."""
    if reaper is None:
        return
    with contextlib.suppress(OSError, ValueError):
        if reaper.stdin is not None:
            reaper.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        reaper.wait(timeout=5)


def reap(process_group: int, tag: str) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process_group, signal.SIGKILL)
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if process.environ().get(NODE_TAG_VARIABLE) == tag:
                process.kill()


def main(argv: list[str]) -> int:
    process_group, tag = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    reap(process_group, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
