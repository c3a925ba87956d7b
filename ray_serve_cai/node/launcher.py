"""Head and worker launchers: the foreground process of a Ray cluster's CML application.

The launcher serves the app HTTP port at once, runs `ray start --block` in its own process group
and supervises it. Head: publish the rendezvous when the GCS is healthy; exit 1 if Ray exits.
Worker: wait for the rendezvous, join, and join again by itself when Ray exits or the head changes.
SIGTERM/SIGINT: copy this node's Ray logs to the project, end the node's process tree, exit 0.
"""

from __future__ import annotations

import logging
import platform
import signal
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from types import FrameType

import ray

from ray_serve_cai.node.files import (
    Rendezvous,
    TokenError,
    ensure_token,
    node_logs_dir,
    ray_auth_env,
    read_rendezvous,
    read_token,
    remove_rendezvous,
    rendezvous_path,
    write_rendezvous,
)
from ray_serve_cai.node.http_app import AppServer, NodeStatus
from ray_serve_cai.node.ray_node import NodePorts, RayNode, wait_for_gcs
from ray_serve_cai.node.serve_proxy import serve_upstreams, start_serve_in_background
from ray_serve_cai.node.settings import NodeSettings, SettingsError

logger = logging.getLogger("ray_serve_cai.node")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ENV = 2
HEAD_START_TIMEOUT_SECONDS = 180.0
SUPERVISE_INTERVAL_SECONDS = 2.0
REJOIN_PAUSE_SECONDS = 2.0


class NodeFailure(RuntimeError):
    """The node cannot run (version mismatch, no head in time, Ray exited on the head)."""


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived."""


class Launcher:
    """Shared machinery of both roles: settings, token, HTTP, the Ray node, stop handling."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.stop_event = threading.Event()
        token_file = (
            ensure_token(settings.project_dir, settings.cluster) if settings.auth == "token" else None
        )
        self.token_file = token_file
        self.auth_env = ray_auth_env(settings.auth, token_file)
        self.ports = NodePorts.choose(settings)
        self.node = RayNode(settings, self.ports, self.auth_env)
        self.status = NodeStatus(
            role=settings.role,
            node_name=settings.node_name,
            cluster=settings.cluster,
            group=settings.group,
            ray_version=ray.__version__,
            python_version=platform.python_version(),
            dashboard_port=self.ports.dashboard if settings.role == "head" else None,
            ray_running=self.node.is_running,
            dashboard_token=self._dashboard_token,
        )
        self.http = AppServer(self.status, settings.app_port, upstreams=serve_upstreams(self.status))

    def _dashboard_token(self) -> str | None:
        if self.settings.auth != "token":
            return None
        return read_token(self.settings.project_dir, self.settings.cluster)

    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, _: FrameType | None) -> None:
            logger.info("received %s: stopping", signal.Signals(signum).name)
            self.stop_event.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake up (raising StopRequested) as soon as a stop is requested."""
        if self.stop_event.wait(seconds):
            raise StopRequested

    def collect_logs(self) -> None:
        destination = node_logs_dir(self.settings.project_dir, self.settings.cluster, self.settings.node_name)
        copied = self.node.copy_logs(destination)
        if copied is not None:
            logger.info("copied Ray logs to %s", copied)

    def end_ray(self, collect_logs: bool = True, grace_seconds: float = 4.0) -> None:
        if collect_logs:
            self.collect_logs()
        self.node.stop(grace_seconds=grace_seconds)

    def shutdown(self) -> None:
        self.http.stop()
        self.ports.release()


def run_head(settings: NodeSettings | None = None) -> int:
    """Run the head node until stopped. Returns the process exit code."""
    settings = settings or NodeSettings.from_env("head")
    launcher = Launcher(settings)
    launcher.install_signal_handlers()
    launcher.http.start()
    head_id = uuid.uuid4().hex
    # A head.json left by a previous head names a dead GCS: withdraw it so workers wait for us.
    remove_rendezvous(settings.project_dir, settings.cluster)
    try:
        return _run_head(launcher, head_id)
    except StopRequested:
        launcher.end_ray()
        remove_rendezvous(settings.project_dir, settings.cluster, head_id=head_id)
        return EXIT_OK
    except NodeFailure as failure:
        logger.error("%s", failure)
        launcher.end_ray()
        remove_rendezvous(settings.project_dir, settings.cluster, head_id=head_id)
        return EXIT_FAILED
    finally:
        launcher.shutdown()


def _run_head(launcher: Launcher, head_id: str) -> int:
    settings, ports = launcher.settings, launcher.ports
    process = launcher.node.start()
    logger.info(
        "started ray head (pid %s), GCS port %s, dashboard port %s", process.pid, ports.gcs, ports.dashboard
    )
    address = f"{settings.node_ip}:{ports.gcs}"
    deadline = time.monotonic() + HEAD_START_TIMEOUT_SECONDS
    healthy = wait_for_gcs(
        address,
        launcher.auth_env,
        deadline,
        keep_waiting=lambda: launcher.node.is_running() and not launcher.stop_event.is_set(),
    )
    if launcher.stop_event.is_set():
        raise StopRequested
    if not healthy:
        exit_code = launcher.node.exit_code()
        reason = (
            f"ray start exited with code {exit_code}" if exit_code is not None else "GCS not healthy in time"
        )
        raise NodeFailure(f"head {settings.node_name} failed to start: {reason}")
    rendezvous = Rendezvous(
        ip=settings.node_ip,
        gcs_port=ports.gcs,
        client_port=ports.client,
        dashboard_port=ports.dashboard,
        ray_version=ray.__version__,
        python_version=platform.python_version(),
        head_id=head_id,
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        auth=settings.auth,
        node_name=settings.node_name,
    )
    launcher.status.head_id = head_id
    path = write_rendezvous(settings.project_dir, settings.cluster, rendezvous)
    launcher.status.connect = {
        "gcs_address": rendezvous.gcs_address,
        "client_address": rendezvous.client_address,
        "auth_mode": settings.auth,
        **(
            {"token_path": launcher.auth_env["RAY_AUTH_TOKEN_PATH"]}
            if "RAY_AUTH_TOKEN_PATH" in launcher.auth_env
            else {}
        ),
    }
    logger.info("head %s ready at %s; rendezvous %s", head_id, address, path)
    start_serve_in_background(launcher.status.connect, address, launcher.node.environment())
    while True:
        launcher.sleep(SUPERVISE_INTERVAL_SECONDS)
        exit_code = launcher.node.exit_code()
        if exit_code is not None:
            raise NodeFailure(f"ray start on head {settings.node_name} exited with code {exit_code}")


def run_worker(settings: NodeSettings | None = None) -> int:
    """Run a worker node until stopped, joining (and re-joining) the published head."""
    settings = settings or NodeSettings.from_env("worker")
    launcher = Launcher(settings)
    launcher.install_signal_handlers()
    launcher.http.start()
    try:
        _run_worker(launcher)
    except StopRequested:
        launcher.end_ray()
        return EXIT_OK
    except NodeFailure as failure:
        logger.error("%s", failure)
        launcher.end_ray()
        return EXIT_FAILED
    finally:
        launcher.shutdown()
    return EXIT_OK


def _run_worker(launcher: Launcher) -> None:
    settings = launcher.settings
    while True:
        rendezvous = _wait_for_rendezvous(launcher)
        _check_versions(rendezvous)
        deadline = time.monotonic() + max(settings.join_timeout, 10.0)

        def same_head(expected: str = rendezvous.head_id) -> bool:
            current = read_rendezvous(settings.project_dir, settings.cluster)
            return current is not None and current.head_id == expected and not launcher.stop_event.is_set()

        if not wait_for_gcs(rendezvous.gcs_address, launcher.auth_env, deadline, keep_waiting=same_head):
            if launcher.stop_event.is_set():
                raise StopRequested
            if not same_head():
                logger.info("head changed while waiting for its GCS; waiting for the new one")
                continue
            raise NodeFailure(
                f"worker {settings.node_name}: GCS of head {rendezvous.head_id} at {rendezvous.gcs_address} "
                f"not healthy after {settings.join_timeout:.0f}s"
            )
        process = launcher.node.start(rendezvous.gcs_address)
        launcher.status.head_id = rendezvous.head_id
        logger.info(
            "joining head %s at %s (ray pid %s)", rendezvous.head_id, rendezvous.gcs_address, process.pid
        )
        reason = _supervise_worker(launcher, rendezvous.head_id)
        logger.info("%s: restarting this Ray node", reason)
        launcher.end_ray()
        launcher.status.head_id = None
        launcher.sleep(REJOIN_PAUSE_SECONDS)


def _supervise_worker(launcher: Launcher, head_id: str) -> str:
    """Block until Ray must be restarted; return why."""
    settings = launcher.settings
    while True:
        launcher.sleep(SUPERVISE_INTERVAL_SECONDS)
        exit_code = launcher.node.exit_code()
        if exit_code is not None:
            return f"ray start exited with code {exit_code}"
        current = read_rendezvous(settings.project_dir, settings.cluster)
        if current is None:
            return "the head withdrew its rendezvous"
        if current.head_id != head_id:
            return f"a new head {current.head_id} replaced {head_id}"


def _wait_for_rendezvous(launcher: Launcher) -> Rendezvous:
    settings = launcher.settings
    deadline = time.monotonic() + settings.join_timeout
    announced = False
    while True:
        rendezvous = read_rendezvous(settings.project_dir, settings.cluster)
        if rendezvous is not None:
            return rendezvous
        if time.monotonic() >= deadline:
            raise NodeFailure(
                f"worker {settings.node_name}: no head rendezvous at "
                f"{rendezvous_path(settings.project_dir, settings.cluster)} "
                f"after {settings.join_timeout:.0f}s (RAY_CAI_JOIN_TIMEOUT); "
                f"is the head app ray-{settings.cluster}-head running?"
            )
        if not announced:
            logger.info("waiting up to %.0fs for the head rendezvous", settings.join_timeout)
            announced = True
        launcher.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def _check_versions(rendezvous: Rendezvous) -> None:
    python_version = platform.python_version()
    if rendezvous.ray_version != ray.__version__ or rendezvous.python_version != python_version:
        raise NodeFailure(
            f"version mismatch with head {rendezvous.head_id}: head runs Ray {rendezvous.ray_version} on "
            f"Python {rendezvous.python_version}, this node Ray {ray.__version__} "
            f"on Python {python_version}; "
            "use the same runtime image for head and workers"
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m ray_serve_cai.node head|worker` (role defaults to RAY_CAI_ROLE)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s ray-cai node %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if len(args) > 1 or (args and args[0] not in ("head", "worker")):
        print("usage: python -m ray_serve_cai.node [head|worker]", file=sys.stderr)
        return EXIT_BAD_ENV
    try:
        settings = NodeSettings.from_env(args[0] if args else None)
    except SettingsError as error:
        print(f"ray-cai node: bad environment: {error}", file=sys.stderr)
        return EXIT_BAD_ENV
    try:
        return run_head(settings) if settings.role == "head" else run_worker(settings)
    except (TokenError, OSError, RuntimeError) as error:
        # Setup failures (token file, app port taken, ...): one clear line, not a traceback.
        print(f"ray-cai node {settings.node_name}: cannot start: {error}", file=sys.stderr)
        return EXIT_FAILED
