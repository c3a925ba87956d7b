"""Ending a Ray node for good: a node is a process tree, not a process.

Ray's dashboard and runtime-env agents can outlive a killed raylet, so a node is found three ways:
its process group, the descendants of its `ray start`, and an environment tag every process of the
node inherits (`RAY_CAI_NODE_TAG`). Never `ray stop`: it would end every node on the host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil

NODE_TAG_VARIABLE = "RAY_CAI_NODE_TAG"


def processes_with_tag(tag: str) -> list[psutil.Process]:
    """Every live process whose environment carries `RAY_CAI_NODE_TAG=<tag>` (except this one)."""
    found: list[psutil.Process] = []
    own_pid = os.getpid()
    for process in psutil.process_iter():
        if process.pid == own_pid:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if process.environ().get(NODE_TAG_VARIABLE) == tag:
                found.append(process)
    return found


def processes_in_group(pgid: int) -> list[psutil.Process]:
    found: list[psutil.Process] = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid:
                found.append(process)
    return found


def node_processes(root_pid: int | None, tag: str | None) -> list[psutil.Process]:
    """The node's processes: `root_pid`, its group and descendants, and everything tagged `tag`."""
    by_pid: dict[int, psutil.Process] = {}
    if root_pid is not None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(root_pid)
            by_pid[root.pid] = root
            for child in root.children(recursive=True):
                by_pid[child.pid] = child
        for process in processes_in_group(root_pid):
            by_pid[process.pid] = process
    if tag:
        for process in processes_with_tag(tag):
            by_pid[process.pid] = process
    by_pid.pop(os.getpid(), None)
    return [process for process in by_pid.values() if _alive(process)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# `ray start` drains its node first (~0.5 s), then stops its processes one by one, waiting up to
# 1 s for each. After this long the rest of its group is told to stop too, all at once.
DRAIN_SECONDS = 0.75


def end_node(root_pid: int | None, tag: str | None, grace_seconds: float = 4.0) -> int:
    """SIGTERM the node's `ray start` (it drains, then stops its children); after its drain,
    SIGTERM its whole process group so the children stop in parallel; after `grace_seconds`,
    SIGKILL whatever of the node is left. Returns how many processes were killed."""
    if root_pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(root_pid, signal.SIGTERM)
        started = time.monotonic()
        if not _exits_within(root_pid, min(DRAIN_SECONDS, grace_seconds)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(root_pid, signal.SIGTERM)
            _exits_within(root_pid, grace_seconds - (time.monotonic() - started))
    survivors = node_processes(root_pid, tag)
    if root_pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root_pid, signal.SIGKILL)
    for process in survivors:
        with contextlib.suppress(psutil.Error):
            process.kill()
    wait_gone(survivors, timeout=3)
    # Children spawned while we were killing (a raylet restarting an agent) carry the tag too.
    stragglers = node_processes(None, tag)
    for process in stragglers:
        with contextlib.suppress(psutil.Error):
            process.kill()
    wait_gone(stragglers, timeout=2)
    return len(survivors) + len(stragglers)


def _exits_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + max(0.0, seconds)
    while _alive_pid(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def wait_gone(processes: list[psutil.Process], timeout: float) -> bool:
    """Until every process has exited or is a zombie (a killed process whose parent is gone waits
    for init to reap it; `psutil.wait_procs` would wait for that too). True when all are gone."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while any(_alive(process) for process in processes):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return True


def _alive_pid(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False
