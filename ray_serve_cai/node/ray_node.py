"""One Ray node of this application: the `ray start --block` command, its process and its logs."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ray_serve_cai.node.ports import WorkerPortBlock, pick_free_ports, reserve_worker_port_block
from ray_serve_cai.node.process_tree import NODE_TAG_VARIABLE, end_node, node_processes, processes_in_group
from ray_serve_cai.node.reaper import release_reaper, start_reaper
from ray_serve_cai.node.serve_proxy import project_pythonpath
from ray_serve_cai.node.settings import NodeSettings

NODE_NAME_LABEL = "ray-cai.node-name"
GROUP_LABEL = "ray-cai.group"
CLUSTER_LABEL = "ray-cai.cluster"
RAY_CLI = (sys.executable, "-m", "ray.scripts.scripts")
# Variables that must not leak into Ray processes: the token itself, and addresses of other clusters.
SCRUBBED_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")

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
    """Ports this node's Ray processes bind; distinct per node so many nodes can share a host."""

    node_manager: int
    object_manager: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    runtime_env_agent: int
    metrics_export: int
    worker_ports: WorkerPortBlock | None = None
    gcs: int = 0
    client: int = 0
    dashboard: int = 0

    @classmethod
    def choose(cls, settings: NodeSettings) -> NodePorts:
        head = settings.role == "head"
        wanted = {
            "gcs": settings.gcs_port,
            "client": settings.client_port,
            "dashboard": settings.dashboard_port,
        }
        fixed = {port for name, port in wanted.items() if head and port}
        free = iter(pick_free_ports(9, exclude=fixed))
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

    def release(self) -> None:
        if self.worker_ports is not None:
            self.worker_ports.release()


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
            f"--node-manager-port={ports.node_manager}",
            f"--object-manager-port={ports.object_manager}",
            f"--dashboard-agent-listen-port={ports.dashboard_agent_listen}",
            f"--dashboard-agent-grpc-port={ports.dashboard_agent_grpc}",
            f"--runtime-env-agent-port={ports.runtime_env_agent}",
            f"--metrics-export-port={ports.metrics_export}",
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
        return command

    def start(self, head_address: str | None = None) -> subprocess.Popen[bytes]:
        """Start `ray start --block` in its own session (its own process group)."""
        self.end_leftovers()
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.head_address = head_address
        self.process = subprocess.Popen(
            self.start_command(head_address),
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # prctl only: no locks are taken between fork and exec
        )
        self.group_file.write_text(f"{self.process.pid}\n")
        self.reaper = start_reaper(self.process.pid, self.tag)
        return self.process

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

    def current_session_dir(self) -> Path | None:
        latest = self.temp_dir / "session_latest"
        try:
            return latest.resolve(strict=True)
        except OSError:
            return None

    def copy_logs(self, destination: Path) -> Path | None:
        """Copy the current session's `logs/` into `destination` (merged with earlier copies)."""
        session = self.current_session_dir()
        if session is None or not (session / "logs").is_dir():
            return None
        destination.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(shutil.Error, OSError):
            shutil.copytree(
                session / "logs",
                destination,
                dirs_exist_ok=True,
                symlinks=False,
                ignore_dangling_symlinks=True,
                ignore=shutil.ignore_patterns("*.sock", "*.socket"),
            )
        (destination / "SESSION").write_text(f"{session.name}\n")
        return destination


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


def gcs_healthy(address: str, auth_env: dict[str, str], timeout: float = 30.0) -> bool:
    """`ray health-check --address <gcs>` with the cluster's auth env (token path, never the token)."""
    if not gcs_port_open(address):
        return False
    env = {key: value for key, value in os.environ.items() if key not in SCRUBBED_VARIABLES}
    env.update(auth_env)
    try:
        result = subprocess.run(
            [*RAY_CLI, "health-check", "--address", address],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def wait_for_gcs(
    address: str,
    auth_env: dict[str, str],
    deadline: float,
    keep_waiting: Callable[[], bool] = lambda: True,
) -> bool:
    """Poll until the GCS at `address` is healthy, `deadline` (monotonic) passes or `keep_waiting()`
    turns False."""
    while time.monotonic() < deadline and keep_waiting():
        remaining = deadline - time.monotonic()
        if gcs_healthy(address, auth_env, timeout=max(5.0, min(30.0, remaining))):
            return True
        time.sleep(1.0)
    return False
