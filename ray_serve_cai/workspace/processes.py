"""Workload processes: start each one in its own session with marker variables, and end whole trees.

A workload (job run or application start) is a process tree, not a process: Ray daemons and other
grandchildren may leave the process group (`setsid`) or be re-parented to init. Every workload
process therefore carries `RAY_CAI_WORKLOAD_ID=<id>` and `RAY_CAI_WORKSPACE_TAG=<tag of this
workspace>` in its environment, which its descendants inherit; ending a workload kills its process
group, its live descendants and every process carrying its marker.

Each workload runs under a small `sh` that writes the script's exit code to an exit file next to
its log: a workload re-adopted after a restart of the server is not the new server's child, so its
exit code is read from there (`AdoptedProcess`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import psutil

from ray_serve_cai.errors import WaitTimeout
from ray_serve_cai.waiting import poll_until

# How long a stopped workload gets between SIGTERM and SIGKILL (launchers copy their logs meanwhile).
DEFAULT_STOP_GRACE_SECONDS = 10.0

WORKLOAD_MARKER = "RAY_CAI_WORKLOAD_ID"
WORKSPACE_MARKER = "RAY_CAI_WORKSPACE_TAG"


_recent_ports: deque[int] = deque(maxlen=4096)
_ports_lock = threading.Lock()


def reserve_ports(ports: Iterable[int]) -> None:
    """Ports recorded for apps (e.g. loaded after a restart) that `free_port` must not hand out."""
    with _ports_lock:
        known = set(_recent_ports)
        _recent_ports.extend(p for p in dict.fromkeys(ports) if p not in known)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and was not handed out recently: apps start
    in parallel, and the kernel may offer a port again before the app that got it has bound it."""
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in _recent_ports:
                _recent_ports.append(port)
                return port


# `sh -c EXIT_WRAPPER workload <exit file> <command...>`: runs the command, then records its exit code.
# The trap keeps the shell alive on SIGTERM/SIGINT/SIGHUP until the command ended (a trap, not an
# ignore, so the command itself keeps the default dispositions).
EXIT_WRAPPER = 'f=$1; shift; trap : TERM INT HUP; "$@"; rc=$?; echo "$rc" > "$f"; exit "$rc"'


class Leader(Protocol):
    """What supervising a workload needs of its group leader: a `Popen`, or an `AdoptedProcess`."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int | None: ...


def exit_file_of(log_path: Path) -> Path:
    return log_path.with_suffix(".exit")


def spawn_workload(
    command: Sequence[str], *, cwd: Path, env: Mapping[str, str], log_path: Path, record_exit: bool = True
) -> subprocess.Popen[bytes]:
    """Start `command` in a new session, stdout and stderr appended to `log_path`, its exit code
    written to `exit_file_of(log_path)` when it ends (by a wrapping `sh`, unless `record_exit` is
    False: a pod's init writes it itself)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    exit_file = exit_file_of(log_path)
    with contextlib.suppress(FileNotFoundError):
        exit_file.unlink()
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            ["/bin/sh", "-c", EXIT_WRAPPER, "workload", str(exit_file), *command]
            if record_exit
            else list(command),
            cwd=str(cwd),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


def process_start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


class AdoptedProcess:
    """A workload leader started by an earlier server (now a child of init): polled through psutil,
    its exit code read from its exit file. Identified by pid AND start time, so a reused pid is not it."""

    def __init__(self, pid: int, started: float, exit_file: Path) -> None:
        self.pid = pid
        self.started = started
        self.exit_file = exit_file
        self._returncode: int | None = None
        self._ended = False

    @classmethod
    def find(cls, pid: int | None, started: float | None, exit_file: Path) -> AdoptedProcess | None:
        """The live process `pid` that started at `started`, or None when it is gone."""
        if pid is None or started is None:
            return None
        adopted = cls(pid, started, exit_file)
        return adopted if adopted.poll() is None else None

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def _alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return (
                abs(process.create_time() - self.started) < 0.05 and process.status() != psutil.STATUS_ZOMBIE
            )
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return False

    def poll(self) -> int | None:
        """None while it runs; then its exit code (from the exit file; -1 when it left none)."""
        if self._ended:
            return self._returncode
        if self._alive():
            return None
        self._ended = True
        self._returncode = read_exit_code(self.exit_file)
        if self._returncode is None:
            self._returncode = -1
        return self._returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Like `Popen.wait`; `None` waits as long as the process runs (supervision, not a bounded wait)."""
        try:
            poll_until(
                lambda: self.poll() is not None,
                timeout=float("inf") if timeout is None else timeout,
                interval=0.05,
                what=f"process {self.pid} to end",
            )
        except WaitTimeout:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0) from None
        return self._returncode


def read_exit_code(exit_file: Path) -> int | None:
    try:
        return int(exit_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _scan_markers(name: str) -> dict[str, list[psutil.Process]]:
    """Every live process (but this one) by the value of `name` in its environment."""
    found: dict[str, list[psutil.Process]] = {}
    own_pid = os.getpid()
    for process in psutil.process_iter():
        if process.pid == own_pid:
            continue
        try:
            value = process.environ().get(name)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        if value is not None:
            found.setdefault(value, []).append(process)
    return found


class _SharedScan:
    """One scan of the machine's processes serves every caller that asked before it started.

    Reading every process's environment is the expensive part of stopping a workload; when many
    workloads stop at once (a 64-node `down`), they share scans instead of each doing its own, and
    each caller still gets a scan that started after its call, so no process is missed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._scanning = False
        self._results: dict[str, tuple[float, dict[str, list[psutil.Process]]]] = {}

    def get(self, name: str) -> dict[str, list[psutil.Process]]:
        asked = time.monotonic()
        with self._cond:
            while True:
                started, result = self._results.get(name, (-1.0, {}))
                if started >= asked:
                    return result
                if not self._scanning:
                    self._scanning = True
                    break
                self._cond.wait()
        started = time.monotonic()
        scanned: dict[str, list[psutil.Process]] | None = None
        try:
            scanned = _scan_markers(name)
            return scanned
        finally:
            with self._cond:
                self._scanning = False
                if scanned is not None:
                    self._results[name] = (started, scanned)
                self._cond.notify_all()


_shared_scan = _SharedScan()


def processes_with_marker(name: str, value: str) -> list[psutil.Process]:
    """Live processes whose (initial) environment has `name=value`; unreadable ones are skipped."""
    return list(_shared_scan.get(name).get(value, []))


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


def _created_before(process: psutil.Process, moment: float, pgid: int | None) -> bool:
    """Started before `moment`, or a member of the group being ended (a fork of the dying tree)."""
    try:
        if pgid is not None and os.getpgid(process.pid) == pgid:
            return True
        return process.create_time() <= moment
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return False


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _signal_all(processes: Iterable[psutil.Process], signum: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            process.send_signal(signum)


def _alive(processes: Iterable[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return alive


def end_process_tree(
    leader: Leader | None,
    *,
    marker_value: str | None,
    grace_seconds: float,
    marker_name: str = WORKLOAD_MARKER,
) -> None:
    """SIGTERM the workload's group, descendants and marked processes; SIGKILL what is left after the grace.

    Blocking; call it from a worker thread. The leader is reaped so no zombie remains.
    """
    targets: dict[int, psutil.Process] = {}
    pgid: int | None = None
    sweep_started = time.time()
    if leader is not None and leader.poll() is None:
        pgid = leader.pid  # start_new_session=True makes the leader its own group leader
        targets.update({p.pid: p for p in _descendants(leader.pid)})
    if marker_value:
        targets.update({p.pid: p for p in processes_with_marker(marker_name, marker_value)})

    if pgid is not None:
        _signal_group(pgid, signal.SIGTERM)
    _signal_all(targets.values(), signal.SIGTERM)

    def all_ended() -> bool:
        if leader is not None:
            leader.poll()
        return not _alive(targets.values())

    with contextlib.suppress(WaitTimeout):  # the grace is over: what is left gets SIGKILL
        poll_until(all_ended, timeout=max(grace_seconds, 0.0), interval=0.05, what="the workload to end")

    # Anything still alive, plus what a dying process forked with the marker while we waited — but
    # not a new engine of the same workload (a restart right after it failed), started since.
    if marker_value:
        stragglers = processes_with_marker(marker_name, marker_value)
        targets.update({p.pid: p for p in stragglers if _created_before(p, sweep_started, pgid)})
    remaining = _alive(targets.values())
    if pgid is not None:
        _signal_group(pgid, signal.SIGKILL)
    _signal_all(remaining, signal.SIGKILL)
    psutil.wait_procs(remaining, timeout=5)
    if leader is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=5)
