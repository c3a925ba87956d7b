"""One Ray node of this application: the `ray start --block` command, its process and its logs."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from ray_serve_cai.errors import WaitTimeout
from ray_serve_cai.node.ports import (
    WorkerPortBlock,
    on_shared_host,
    pick_free_ports,
    reserve_worker_port_block,
)
from ray_serve_cai.node.process_tree import NODE_TAG_VARIABLE, end_node, node_processes, processes_in_group
from ray_serve_cai.node.reaper import release_reaper, start_reaper
from ray_serve_cai.node.serve_proxy import project_pythonpath
from ray_serve_cai.node.settings import NodeSettings
from ray_serve_cai.waiting import poll_until

NODE_NAME_LABEL = "ray-cai.node-name"
GROUP_LABEL = "ray-cai.group"
CLUSTER_LABEL = "ray-cai.cluster"
RAY_CLI = (sys.executable, "-m", "ray.scripts.scripts")
# Variables that must not leak into Ray processes: the token itself, and addresses of other clusters.
SCRUBBED_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
# gRPC's fork handlers off in Ray's processes (unless the app's environment sets it): Ray Client's
# proxy forks each connection's server with a `preexec_fn` while its gRPC threads are busy, and with
# the handlers on such a child can die by SIGSEGV/SIGABRT before it execs ("Starting Ray client server
# failed"; seen on the head's first client after a start; reproduced with grpcio 1.85 alone: 14 of 447
# such forks died, none of 301 with the handlers off). Every child here execs at once.
GRPC_FORK_VARIABLE = "GRPC_ENABLE_FORK_SUPPORT"

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """Runs in the child before exec: if the launcher is SIGKILLed, `ray start` gets SIGKILL too,
    and our guardian (`reaper.py`) ends the rest of the node."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def node_tag(project_dir: Path | str, cluster: str, node_name: str) -> str:
    """Stable per (project, cluster, node): marks every process of this node, across restarts."""
    key = f"{Path(project_dir).resolve()}|{cluster}|{node_name}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def node_temp_dir(project_dir: Path | str, cluster: str, node_name: str) -> Path:
    """Per-node Ray temp dir. Short on purpose: Ray's unix sockets live under it (108-byte limit)."""
    return Path(tempfile.gettempdir()) / f"ray-cai-{node_tag(project_dir, cluster, node_name)[:12]}"


@dataclass
class NodePorts:
    """Ports this node's Ray processes bind. In a pod (CML, the workspace's pods) only the head's
    ports the settings fix are given and Ray's defaults do the rest; on a shared host every port is
    chosen distinct per node (0: not passed to `ray start`)."""

    node_manager: int = 0
    object_manager: int = 0
    dashboard_agent_listen: int = 0
    dashboard_agent_grpc: int = 0
    runtime_env_agent: int = 0
    metrics_export: int = 0
    worker_ports: WorkerPortBlock | None = None
    gcs: int = 0
    client: int = 0
    dashboard: int = 0

    @classmethod
    def choose(cls, settings: NodeSettings, exclude: set[int] | None = None) -> NodePorts:
        """Fresh ports from the kernel, never one in `exclude` (ports an earlier `ray start` of this
        node failed with) nor a head port the settings fix."""
        head = settings.role == "head"
        if not on_shared_host():
            return cls._in_pod(settings)
        wanted = {
            "gcs": settings.gcs_port,
            "client": settings.client_port,
            "dashboard": settings.dashboard_port,
        }
        fixed = {port for name, port in wanted.items() if head and port}
        free = iter(pick_free_ports(9, exclude=fixed | set(exclude or ())))
        ports = cls(
            node_manager=next(free),
            object_manager=next(free),
            dashboard_agent_listen=next(free),
            dashboard_agent_grpc=next(free),
            runtime_env_agent=next(free),
            metrics_export=next(free),
            worker_ports=reserve_worker_port_block(),
        )
        if head:
            ports.gcs = settings.gcs_port or next(free)
            ports.client = settings.client_port or next(free)
            ports.dashboard = settings.dashboard_port or next(free)
        return ports

    @classmethod
    def _in_pod(cls, settings: NodeSettings) -> NodePorts:
        """Ray's defaults on the pod's own IP; a head port the settings leave at 0 comes from the kernel."""
        if settings.role != "head":
            return cls()
        wanted = [settings.gcs_port, settings.client_port, settings.dashboard_port]
        free = iter(pick_free_ports(wanted.count(0), exclude={p for p in wanted if p}))
        gcs, client, dashboard = (port or next(free) for port in wanted)
        return cls(gcs=gcs, client=client, dashboard=dashboard)

    def picked(self, settings: NodeSettings) -> set[int]:
        """The single ports chosen here (not those the settings fix): what a failed start burns."""
        ports = {
            self.node_manager,
            self.object_manager,
            self.dashboard_agent_listen,
            self.dashboard_agent_grpc,
            self.runtime_env_agent,
            self.metrics_export,
        }
        if settings.role == "head":
            chosen = {
                "gcs": settings.gcs_port,
                "client": settings.client_port,
                "dashboard": settings.dashboard_port,
            }
            ports |= {getattr(self, name) for name, fixed in chosen.items() if not fixed}
        return ports

    def describe(self) -> str:
        names = ("node_manager", "object_manager", "dashboard_agent_listen", "dashboard_agent_grpc",
                 "runtime_env_agent", "metrics_export", "gcs", "client", "dashboard")  # fmt: skip
        text = " ".join(f"{name}={getattr(self, name)}" for name in names if getattr(self, name))
        if self.worker_ports is not None:
            text += f" workers={self.worker_ports.first}-{self.worker_ports.last}"
        return text

    def release(self) -> None:
        if self.worker_ports is not None:
            self.worker_ports.release()


# `ray start` prints this once the node runs (then `--block` keeps it in the foreground).
STARTED_MARKER = "Ray runtime started"
ERROR_LINE = re.compile(r"error|exception|failed|timed out|address already in use", re.IGNORECASE)
PORT_CONFLICT = re.compile(r"address already in use|errno 98", re.IGNORECASE)
# Session log files read for the last error when `ray start` fails (newest line wins per file).
ERROR_LOG_PATTERNS = (
    "*.err",
    "dashboard_agent*.log",
    "raylet.out",
    "gcs_server.out",
    "runtime_env_agent*.log",
)


class RayOutput:
    """Copies `ray start`'s output to the launcher's own (the app log) and keeps its tail: the
    launcher learns from it that the node started, and why it failed."""

    def __init__(self, stream: IO[bytes], sink: IO[bytes] | None = None, keep: int = 200) -> None:
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.started = threading.Event()
        self.finished = threading.Event()
        self._stream = stream
        self._sink = sink if sink is not None else sys.stdout.buffer
        self._thread = threading.Thread(target=self._pump, name="ray-output", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for raw in iter(self._stream.readline, b""):
                with contextlib.suppress(OSError, ValueError):
                    self._sink.write(raw)
                    self._sink.flush()
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                if STARTED_MARKER in line:
                    self.started.set()
        finally:
            with contextlib.suppress(OSError):
                self._stream.close()
            self.finished.set()

    def last_error(self) -> str | None:
        return next((line.strip() for line in reversed(self.tail) if ERROR_LINE.search(line)), None)

    def wait_finished(self, timeout: float) -> None:
        self.finished.wait(timeout)


def last_log_error(logs_dir: Path, since: float = 0.0) -> str | None:
    """The line that best explains a failure in this session's Ray logs written after `since`, as
    `<file>: <line>`: a port conflict (`Address already in use`) first, else the newest error line."""
    best: tuple[int, float, str] | None = None
    for pattern in ERROR_LOG_PATTERNS:
        for path in logs_dir.glob(pattern):
            try:
                modified = path.stat().st_mtime
                if modified < since:
                    continue
                with open(path, "rb") as handle:
                    handle.seek(max(0, path.stat().st_size - 64 * 1024))
                    lines = handle.read().decode(errors="replace").splitlines()
            except OSError:
                continue
            errors = [text.strip() for text in lines if ERROR_LINE.search(text)]
            if not errors:
                continue
            conflicts = [text for text in errors if PORT_CONFLICT.search(text)]
            line = (conflicts or errors)[-1]
            candidate = (1 if conflicts else 0, modified, f"{path.name}: {line[-300:]}")
            if best is None or candidate[:2] > best[:2]:
                best = candidate
    return best[2] if best else None


@dataclass
class RayNode:
    """The `ray start --block` process of this application and everything it spawned."""

    settings: NodeSettings
    ports: NodePorts
    auth_env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    reaper: subprocess.Popen[bytes] | None = None
    head_address: str | None = None
    session_dirs: list[Path] = field(default_factory=list)
    output: RayOutput | None = None
    started_at: float = 0.0
    burnt_ports: set[int] = field(default_factory=set)
    # Added by ray_serve_cai.node.autoscaling: `ray start` options and environment of autoscaling.
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return node_tag(self.settings.project_dir, self.settings.cluster, self.settings.node_name)

    @property
    def temp_dir(self) -> Path:
        return node_temp_dir(self.settings.project_dir, self.settings.cluster, self.settings.node_name)

    @property
    def group_file(self) -> Path:
        """Remembers the process group of the last `ray start`, for a launcher that restarts."""
        return self.temp_dir / "ray-cai-process-group"

    def environment(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in SCRUBBED_VARIABLES}
        env.update(self.auth_env)
        env[NODE_TAG_VARIABLE] = self.tag
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.setdefault(GRPC_FORK_VARIABLE, "false")
        env.update(self.extra_env)
        env["PYTHONPATH"] = project_pythonpath(env, self.settings.project_dir)  # Serve imports project code
        return env

    def start_command(self, head_address: str | None = None) -> list[str]:
        settings, ports = self.settings, self.ports
        command = [*RAY_CLI, "start", "--block", "--log-style=record", "--disable-usage-stats"]
        if settings.role == "head":
            command += [
                "--head",
                f"--port={ports.gcs}",
                f"--ray-client-server-port={ports.client}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={ports.dashboard}",
            ]
        else:
            if head_address is None:
                raise ValueError("a worker needs the head's GCS address")
            command.append(f"--address={head_address}")
        labels = {
            NODE_NAME_LABEL: settings.node_name,
            GROUP_LABEL: settings.group,
            CLUSTER_LABEL: settings.cluster,
        }
        command += [
            f"--node-ip-address={settings.node_ip}",
            f"--node-name={settings.node_name}",
            "--labels=" + ",".join(f"{key}={value}" for key, value in labels.items()),
            f"--num-gpus={settings.num_gpus}",
            f"--temp-dir={self.temp_dir}",
        ]
        command += [  # shared host only: in a pod Ray's defaults apply
            f"--{flag}={port}"
            for flag, port in (
                ("node-manager-port", ports.node_manager),
                ("object-manager-port", ports.object_manager),
                ("dashboard-agent-listen-port", ports.dashboard_agent_listen),
                ("dashboard-agent-grpc-port", ports.dashboard_agent_grpc),
                ("runtime-env-agent-port", ports.runtime_env_agent),
                ("metrics-export-port", ports.metrics_export),
            )
            if port
        ]
        if settings.num_cpus is not None:
            command.append(f"--num-cpus={settings.num_cpus}")
        if settings.memory_bytes is not None:
            command.append(f"--memory={settings.memory_bytes}")
            # Ray's default object store (30% of the host) ignores the node's size on a shared host.
            command.append(f"--object-store-memory={max(100 * 1024**2, int(settings.memory_bytes * 0.3))}")
        if ports.worker_ports is not None:
            command += [
                f"--min-worker-port={ports.worker_ports.first}",
                f"--max-worker-port={ports.worker_ports.last}",
            ]
        return command + self.extra_args

    def start(self, head_address: str | None = None) -> subprocess.Popen[bytes]:
        """Start `ray start --block` in its own session (its own process group)."""
        self.end_leftovers()
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.head_address = head_address
        self.started_at = time.time()
        self.process = subprocess.Popen(
            self.start_command(head_address),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # prctl only: no locks are taken between fork and exec
        )
        assert self.process.stdout is not None
        self.output = RayOutput(self.process.stdout)
        self.group_file.write_text(f"{self.process.pid}\n")
        self.reaper = start_reaper(self.process.pid, self.tag)
        return self.process

    def has_started(self) -> bool:
        """`ray start` said the node runs, and it still does."""
        return self.is_running() and self.output is not None and self.output.started.is_set()

    def repick_ports(self) -> None:
        """After a failed start: burn this attempt's ports and choose new ones (and a new worker
        port block), so a port another process took cannot make the next start fail the same way."""
        self.burnt_ports |= self.ports.picked(self.settings)
        fresh = NodePorts.choose(self.settings, exclude=self.burnt_ports)
        self.ports.release()  # after the new block is held: the new block is a different one
        self.ports = fresh

    def failure_reason(self) -> str:
        """Why the last `ray start` failed, from its output and this session's Ray logs."""
        exit_code = self.exit_code()
        parts = [f"ray start exited with code {exit_code}" if exit_code is not None else "ray start hung"]
        if self.output is not None:
            self.output.wait_finished(2.0)
            line = self.output.last_error()
            if line:
                parts.append(line[-300:])
        session = self.current_session_dir()
        if session is not None:
            logged = last_log_error(session / "logs", since=self.started_at - 1)
            if logged:
                parts.append(logged)
        return "; ".join(parts)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def end_leftovers(self) -> int:
        """Kill processes of this node left by an earlier launcher (e.g. one that was SIGKILLed).

        Tagged processes are found by environment; Ray's agents rewrite their process title (and
        with it the readable environment), so members of the last `ray start` group whose name
        says Ray are taken too.
        """
        leftovers = node_processes(None, self.tag)
        with contextlib.suppress(OSError, ValueError):
            old_group = int(self.group_file.read_text().strip())
            members = processes_in_group(old_group)
            # A reused pid could lead another node's group: never touch a group tagged otherwise.
            if not any(_tag_of(process) not in (None, self.tag) for process in members):
                leftovers += [process for process in members if _looks_like_ray(process)]
        for process in leftovers:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(leftovers, timeout=3)
        return len(leftovers)

    def stop(self, grace_seconds: float = 4.0) -> None:
        """End the node's whole process tree, however it got there."""
        root = self.process.pid if self.process is not None else None
        end_node(root, self.tag, grace_seconds=grace_seconds)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2)
        release_reaper(self.reaper)
        self.reaper = None
        if self.output is not None:
            self.output.wait_finished(1.0)

    def current_session_dir(self) -> Path | None:
        latest = self.temp_dir / "session_latest"
        try:
            return latest.resolve(strict=True)
        except OSError:
            return None


def _looks_like_ray(process: psutil.Process) -> bool:
    try:
        return process.name().startswith(("ray", "gcs_server")) or "ray" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _tag_of(process: psutil.Process) -> str | None:
    try:
        return process.environ().get(NODE_TAG_VARIABLE)
    except (psutil.Error, OSError):
        return None


def gcs_port_open(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class GcsProbe:
    """Asks a GCS, in this process, what `ray health-check` would (it answers, and the cluster
    metadata with its Ray version is there), without a new Python process per check.

    One `ray._raylet.GcsClient` per address; it is dropped on any error (a new head on the same
    address has another cluster id). The process environment must carry the cluster's auth mode
    and token path (the launcher sets them) before the first client is made.
    """

    def __init__(self) -> None:
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def client(self, address: str) -> Any:
        with self._lock:
            client = self._clients.get(address)
        if client is None:
            from ray._raylet import GcsClient

            # Only once the port accepts connections: against nothing, the constructor blocks ~40 s.
            client = GcsClient(address=address)
            with self._lock:
                self._clients[address] = client
        return client

    def forget(self, address: str) -> None:
        with self._lock:
            self._clients.pop(address, None)

    def healthy(self, address: str, timeout: float = 5.0) -> bool:
        if not gcs_port_open(address):
            self.forget(address)
            return False
        try:
            import ray
            from ray._common.usage import usage_constants
            from ray._private import ray_constants

            metadata = self.client(address).internal_kv_get(
                usage_constants.CLUSTER_METADATA_KEY,
                namespace=ray_constants.KV_NAMESPACE_CLUSTER,
                timeout=timeout,
            )
        except Exception:  # RpcError, a GCS going away mid-call: not healthy (yet)
            self.forget(address)
            return False
        if not metadata:
            return False  # the head's GCS answers but has not recorded its cluster metadata yet
        with contextlib.suppress(ValueError, TypeError):
            import json

            return json.loads(metadata).get("ray_version") == ray.__version__
        return False

    def alive_nodes(self, address: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Every node the GCS knows, as rows shaped like the dashboard's `/api/v0/nodes`."""
        from ray.core.generated import gcs_pb2

        try:
            infos = self.client(address).get_all_node_info(timeout=timeout)
        except Exception:
            self.forget(address)
            raise
        rows = []
        for node_id, info in infos.items():
            rows.append(
                {
                    "node_id": node_id.hex(),
                    "node_ip": info.node_manager_address,
                    "node_name": info.node_name,
                    "state": "ALIVE" if info.state == gcs_pb2.GcsNodeInfo.ALIVE else "DEAD",
                    "is_head_node": bool(info.is_head_node),
                    "labels": dict(info.labels),
                    "resources_total": dict(info.resources_total),
                    "start_time_ms": int(info.start_time_ms) or None,
                }
            )
        return rows


GCS_PROBE = GcsProbe()


def wait_for_gcs(
    address: str,
    deadline: float,
    keep_waiting: Callable[[], bool] = lambda: True,
    sleep: Callable[[float], object] = time.sleep,
    probe: GcsProbe = GCS_PROBE,
) -> bool:
    """Poll (in process, with backoff from 0.1 s to 1 s) until the GCS at `address` is healthy,
    `deadline` (monotonic) passes or `keep_waiting()` turns False. True only when healthy."""

    def check() -> str | None:
        if not keep_waiting():
            return "gave up"
        return "healthy" if probe.healthy(address) else None

    try:
        outcome = poll_until(
            check,
            timeout=max(0.0, deadline - time.monotonic()),
            interval=0.1,
            backoff=1.5,
            max_interval=1.0,
            what=f"the GCS at {address}",
            sleep=lambda seconds: sleep(seconds),
        )
    except WaitTimeout:
        return False
    return outcome == "healthy" and keep_waiting()
