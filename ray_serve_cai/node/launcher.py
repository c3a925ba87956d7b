"""Head and worker launchers: the foreground process of a Ray cluster's CML application.

The launcher serves the app HTTP port while it starts `ray start --block` in its own process group,
and supervises it. Head: publish the rendezvous when the GCS is healthy (asked in process, no
`ray health-check` processes); exit 1 if Ray exits. Worker: wait for the rendezvous and a healthy
GCS, join, and join again by itself when Ray exits or the head changes.

A `ray start` that fails before the node runs (e.g. a port taken by another process between the
choice and Ray's bind) is retried with freshly chosen ports, never one a failed attempt used, at
most `MAX_START_ATTEMPTS` times in a row; then the launcher exits 1. The status page says whether
Ray runs and the last error; `/ray-cai/healthz` (the app's polling endpoint) fails once Ray has not
been running for the start grace period.
SIGTERM/SIGINT: end the node's process tree, keep the last of its Ray logs in the project, exit 0
(`node.history` keeps them there as they grow, and the head's job records).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from types import FrameType

from ray_serve_cai.errors import OperationFailed
from ray_serve_cai.node.autoscaling import autoscaler_state, autoscaling_start
from ray_serve_cai.node.autostop import HooksFactory, ServeTraffic, start_autostop
from ray_serve_cai.node.files import (
    Rendezvous,
    ensure_token,
    ray_auth_env,
    read_rendezvous,
    read_token,
    remove_rendezvous,
    rendezvous_path,
    write_rendezvous,
)
from ray_serve_cai.node.gcs_relay import GcsRelay, Target
from ray_serve_cai.node.gcs_storage import worker_reconnect_env
from ray_serve_cai.node.head_guard import HeadGuard, LeaseRefused
from ray_serve_cai.node.history import ProjectKeeper
from ray_serve_cai.node.http_app import AppServer, NodeStatus
from ray_serve_cai.node.ports import on_shared_host
from ray_serve_cai.node.ray_node import GCS_PROBE, NodePorts, RayNode, wait_for_gcs
from ray_serve_cai.node.serve_proxy import (
    gateway_traffic_path,
    serve_publication,
    serve_upstreams,
    start_serve_ingress,
)
from ray_serve_cai.node.settings import NodeSettings, SettingsError

logger = logging.getLogger("ray_serve_cai.node")
# Ray itself is imported only once the cluster's auth mode and token path are in this process's
# environment: Ray reads them at import, and the in-process GCS client must present the token.
RAY_VERSION = importlib.metadata.version("ray")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ENV = 2
HEAD_START_TIMEOUT_SECONDS = 180.0
SUPERVISE_INTERVAL_SECONDS = 2.0
REJOIN_PAUSE_SECONDS = 1.0
# Consecutive `ray start` attempts that fail before the node runs; then the app fails (exit 1).
MAX_START_ATTEMPTS = 5
# Head fault tolerance: Ray's head processes that die in a live pod are started again in it, at most
# this many times within IN_PLACE_WINDOW_SECONDS; then the app fails and CML restarts it.
MAX_IN_PLACE_RESTARTS = 5
IN_PLACE_WINDOW_SECONDS = 600.0
# The worker's GCS relay (ray_serve_cai.node.gcs_relay) listens here on the pod's IP (head fault
# tolerance is off on a shared host: see NodeSettings.head_ft).
RELAY_PORT = 6380


class NodeFailure(OperationFailed):
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
        # The in-process GCS client reads the auth mode and token path from this environment.
        os.environ.update(self.auth_env)
        self.node = RayNode(settings, NodePorts.choose(settings), self.auth_env)
        self.node.extra_args, self.node.extra_env = autoscaling_start(settings)
        self.failed_starts = 0
        self.status = NodeStatus(
            role=settings.role,
            node_name=settings.node_name,
            cluster=settings.cluster,
            group=settings.group,
            ray_version=RAY_VERSION,
            python_version=platform.python_version(),
            dashboard_port=self.node.ports.dashboard if settings.role == "head" else None,
            ray_running=self.node.has_started,
            dashboard_token=self._dashboard_token,
            start_grace=settings.start_grace,
            list_nodes=GCS_PROBE.alive_nodes,
            autoscaler=lambda: autoscaler_state(settings),
        )
        # autostop (#22): Serve requests through the head's `/serve` and through the gateway are activity
        gateway_note = gateway_traffic_path(settings.project_dir, settings.cluster)
        self.serve_traffic = ServeTraffic(gateway=gateway_note)
        self.hooks: HooksFactory | None = None  # autostop (#22): its CML calls, passed in by ray_head.py
        self.status.mount_wrapper = self.serve_traffic.wrap
        self.http = AppServer(self.status, settings.app_port, upstreams=serve_upstreams(self.status))
        self.serve_ingress = start_serve_ingress(settings, token_file)  # pods: the Serve gateway's door
        # The head's Serve layout, published with its status (chosen at the first publication, once
        # Ray's ports are bound); Serve itself starts on demand.
        self.serve_layout: dict[str, object] = {}
        # Node logs (and, on the head, job records) kept in the project as they grow.
        head = settings.role == "head"
        self.keeper = ProjectKeeper(
            settings.project_dir, settings.cluster, settings.node_name, self.node.current_session_dir,
            dashboard_port=(lambda: self.node.ports.dashboard) if head else None, token=self._dashboard_token,
        ).start()  # fmt: skip

    @property
    def ports(self) -> NodePorts:
        return self.node.ports

    def start_ray(self, head_address: str | None = None) -> None:
        """Start `ray start` while the app HTTP server comes up (both take a while)."""
        process = self.node.start(head_address)
        self.status.start_attempts += 1
        if self.settings.role == "head":
            self.status.dashboard_port = self.ports.dashboard
        logger.info("ray start (pid %s, attempt %s): %s", process.pid, self.status.start_attempts,
                    self.ports.describe())  # fmt: skip

    def start_failed(self) -> None:
        """`ray start` ended (or hung) before the node ran: keep the reason, end what is left,
        choose new ports; raise NodeFailure after MAX_START_ATTEMPTS failures in a row."""
        reason = self.node.failure_reason()
        self.failed_starts += 1
        self.status.note_failure(reason)
        logger.error(
            "ray start failed (%s of %s in a row): %s", self.failed_starts, MAX_START_ATTEMPTS, reason
        )
        self.end_ray()
        if self.failed_starts >= MAX_START_ATTEMPTS:
            raise NodeFailure(
                f"{self.settings.node_name}: ray start failed {self.failed_starts} times in a row; "
                f"last: {reason}"
            )
        self.node.repick_ports()

    def node_runs(self) -> None:
        self.failed_starts = 0
        self.status.note_running()

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
        """The last lines of the node's logs into the project (the keeper has kept the rest)."""
        self.keeper.sync_logs()

    def end_ray(
        self,
        collect_logs: bool = True,
        grace_seconds: float = 4.0,
        ended: Callable[[], None] | None = None,
    ) -> None:
        """End the node's processes first (their logs are then complete), call `ended`, then copy the
        logs (the last step: the one a stop that runs out of grace can lose)."""
        if self.status.ray_down_since is None:
            self.status.note_stopped()
        self.keeper.sync_jobs()  # the job records' last state, while the dashboard still answers
        started = time.monotonic()
        self.node.stop(grace_seconds=grace_seconds)
        stopped = time.monotonic()
        if ended is not None:
            ended()
        if collect_logs:
            self.collect_logs()
        logger.info(
            "ended Ray in %.2fs, copied its logs in %.2fs", stopped - started, time.monotonic() - stopped
        )

    def shutdown(self) -> None:
        if self.serve_ingress is not None:
            self.serve_ingress.stop()
        self.keeper.stop()
        self.http.stop()
        self.ports.release()
        if self.status.ray_down_since is not None:  # Ray ended and its logs are in the project:
            shutil.rmtree(self.node.temp_dir, ignore_errors=True)  # its temp dir goes with the node


def run_head(settings: NodeSettings | None = None, autostop_hooks: HooksFactory | None = None) -> int:
    """Run the head node until stopped. Returns the process exit code."""
    settings = settings or NodeSettings.from_env("head")
    launcher = Launcher(settings)
    launcher.hooks = autostop_hooks
    launcher.install_signal_handlers()
    published: list[str] = []  # head ids this launcher published (one per start that got a GCS)
    guard = (
        HeadGuard(settings.project_dir, settings.cluster, settings.node_name, settings.node_ip)
        if settings.head_ft
        else None
    )
    launcher.status.fault_tolerance = guard.status if guard is not None else _ft_off
    if guard is None:
        # A head.json left by a previous head names a dead GCS: withdraw it so workers wait for us.
        remove_rendezvous(settings.project_dir, settings.cluster)
    try:
        launcher.http.begin()
        if guard is not None:
            _take_lease(launcher, guard)
        return _run_head(launcher, published, guard)
    except StopRequested:
        _withdraw(launcher, published)
        # The lease goes as soon as the GCS is gone, before the logs are copied: a stop that runs out
        # of grace (SIGKILL) must not turn a clean restart into a failover the next head waits out.
        launcher.end_ray(ended=guard.release if guard is not None else None)
        if guard is not None and guard.fenced_reason is not None:
            logger.error("stopped: %s", guard.fenced_reason)
            return EXIT_FAILED
        return EXIT_OK
    except LeaseRefused as refused:
        launcher.status.note_failure(str(refused))
        logger.error("%s", refused)
        return EXIT_FAILED
    except NodeFailure as failure:
        logger.error("%s", failure)
        _withdraw(launcher, published)
        launcher.end_ray(ended=guard.release if guard is not None else None)
        return EXIT_FAILED
    finally:
        if guard is not None:
            guard.release()  # if end_ray did not (no Ray started): the next head may start at once
        launcher.shutdown()


def _ft_off() -> dict[str, object]:
    if on_shared_host():
        return {"enabled": False, "storage": "memory", "epoch": None, "reason": "shared host (no pods)"}
    return {"enabled": False, "storage": "memory", "epoch": None}


def _take_lease(launcher: Launcher, guard: HeadGuard) -> None:
    """Hold the lease before the GCS starts (waiting out an overlapping old head), renew it from
    then on, and point the GCS at the cluster's stored state."""
    said: list[str] = []

    def on_wait(reason: str) -> None:
        launcher.status.phase = reason
        if not said or said[-1].split(" (")[0] != reason.split(" (")[0]:
            logger.info("%s", reason)
            said.append(reason)

    guard.acquire(launcher.sleep, on_wait)
    guard.on_fenced = lambda _reason: launcher.stop_event.set()
    guard.start()
    launcher.status.phase = "starting"
    settings = launcher.settings
    # The previous head's head.json names a GCS that is gone: withdraw it now that we hold the lease.
    remove_rendezvous(settings.project_dir, settings.cluster)
    launcher.node.extra_env.update(guard.env())
    logger.info("head fault tolerance: epoch %s, GCS state in %s", guard.epoch, guard.storage)


def _withdraw(launcher: Launcher, published: list[str]) -> None:
    """Workers must not join a GCS that is going away: withdraw our rendezvous first."""
    for head_id in published:
        remove_rendezvous(launcher.settings.project_dir, launcher.settings.cluster, head_id=head_id)


def _run_head(launcher: Launcher, published: list[str], guard: HeadGuard | None = None) -> int:
    settings = launcher.settings
    had_state = guard is not None and guard.storage.is_dir()
    _start_head(launcher, published, guard)
    if guard is not None and had_state:
        previous = guard.taken_over
        if previous is not None:  # a head ran before this one: since its last sign of life
            kind = "restart" if previous.released else "new head"  # stopped cleanly, or was lost
            guard.record_failover(kind, previous.renewed_at, time.time())
    # autostop (#22): the head measures idleness and, past the timeout, stops or deletes the cluster.
    start_autostop(
        launcher.status, launcher.serve_traffic, GCS_PROBE.client,
        project_dir=settings.project_dir, env=os.environ, hooks=launcher.hooks,
    )  # fmt: skip
    restarts: list[float] = []
    while True:
        launcher.sleep(SUPERVISE_INTERVAL_SECONDS)
        exit_code = launcher.node.exit_code()
        if exit_code is None:
            continue
        message = f"ray start on head {settings.node_name} exited with code {exit_code}"
        now = time.monotonic()
        restarts = [at for at in restarts if now - at < IN_PLACE_WINDOW_SECONDS] + [now]
        if guard is None or len(restarts) > MAX_IN_PLACE_RESTARTS:
            raise NodeFailure(message + ("" if guard is None else f" ({len(restarts)} times in 10 minutes)"))
        down_since = time.time()
        logger.warning("%s: starting Ray's head processes again in this pod (same storage)", message)
        guard.serving(None)  # while Ray restarts here, a refusing GCS port must not look like a dead head
        _withdraw(launcher, published)
        launcher.end_ray()
        _start_head(launcher, published, guard)
        guard.record_failover("in place", down_since, time.time())


def _start_head(launcher: Launcher, published: list[str], guard: HeadGuard | None) -> None:
    """Start Ray's head until it runs (retrying a failed start with new ports)."""
    settings = launcher.settings
    while True:
        launcher.start_ray()
        launcher.http.wait_started()
        address = f"{settings.node_ip}:{launcher.ports.gcs}"
        deadline = time.monotonic() + HEAD_START_TIMEOUT_SECONDS

        def keep_waiting() -> bool:
            return launcher.node.is_running() and not launcher.stop_event.is_set()

        healthy = wait_for_gcs(address, deadline, keep_waiting=keep_waiting, sleep=launcher.stop_event.wait)
        if launcher.stop_event.is_set():
            raise StopRequested
        if healthy:
            # Published as soon as the GCS is healthy: workers join while the head finishes starting.
            published.append(_publish(launcher, address, guard.epoch if guard is not None else 0))
            if _wait_started(launcher, deadline):
                break
            _withdraw(launcher, published)
        launcher.start_failed()
    launcher.node_runs()
    if guard is not None:
        guard.serving(launcher.ports.gcs)
    logger.info("head %s runs at %s", launcher.status.head_id, address)


def _publish(launcher: Launcher, address: str, epoch: int = 0) -> str:
    """Write the rendezvous (a new head id) and the status page's connect facts; the head id."""
    settings, ports = launcher.settings, launcher.ports
    rendezvous = Rendezvous(
        ip=settings.node_ip,
        gcs_port=ports.gcs,
        client_port=ports.client,
        dashboard_port=ports.dashboard,
        ray_version=RAY_VERSION,
        python_version=platform.python_version(),
        head_id=uuid.uuid4().hex,
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        auth=settings.auth,
        node_name=settings.node_name,
        epoch=epoch,
        fault_tolerant=settings.head_ft,
    )
    launcher.status.head_id = rendezvous.head_id
    launcher.status.gcs_address = address
    if not launcher.serve_layout:
        rays = {*ports.picked(settings), ports.gcs, ports.client, ports.dashboard}
        launcher.serve_layout = serve_publication(rays)
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
        **launcher.serve_layout,
    }
    logger.info("head %s: GCS healthy at %s; rendezvous %s", rendezvous.head_id, address, path)
    return rendezvous.head_id


def _wait_started(launcher: Launcher, deadline: float) -> bool:
    """Until `ray start` says the node runs (True), exits, or the deadline passes (False)."""
    output = launcher.node.output
    while output is not None and not output.started.is_set():
        if not launcher.node.is_running() or time.monotonic() >= deadline:
            return launcher.node.has_started()
        launcher.sleep(0.1)
    return launcher.node.is_running()


def run_worker(settings: NodeSettings | None = None) -> int:
    """Run a worker node until stopped, joining (and re-joining) the published head."""
    settings = settings or NodeSettings.from_env("worker")
    launcher = Launcher(settings)
    launcher.install_signal_handlers()
    try:
        launcher.http.begin()
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
    relay = _start_relay(launcher) if settings.head_ft else None
    try:
        _join_loop(launcher, relay)
    finally:
        if relay is not None:
            relay.stop()


def _start_relay(launcher: Launcher) -> GcsRelay:
    """The worker's GCS relay (its Ray reaches the newest head through it) and the reconnect window."""
    settings = launcher.settings

    def newest_head() -> Target | None:
        current = read_rendezvous(settings.project_dir, settings.cluster)
        if current is None:
            return None
        return Target(current.ip, current.gcs_port, current.head_id, current.epoch)

    relay = GcsRelay(settings.node_ip, RELAY_PORT, newest_head)
    relay.start()
    launcher.node.extra_env.update(worker_reconnect_env())
    logger.info("GCS relay on %s (head fault tolerance: Ray rides through a head restart)", relay.address)
    return relay


def _join_loop(launcher: Launcher, relay: GcsRelay | None) -> None:
    settings = launcher.settings
    while True:
        launcher.status.phase = "waiting for the head"
        rendezvous = _wait_for_rendezvous(launcher)
        launcher.http.wait_started()
        _check_versions(rendezvous)
        launcher.status.phase = "starting"
        deadline = time.monotonic() + max(settings.join_timeout, 10.0)

        def same_head(expected: str = rendezvous.head_id) -> bool:
            current = read_rendezvous(settings.project_dir, settings.cluster)
            return current is not None and current.head_id == expected and not launcher.stop_event.is_set()

        healthy = wait_for_gcs(
            rendezvous.gcs_address, deadline, keep_waiting=same_head, sleep=launcher.stop_event.wait
        )
        if not healthy:
            if launcher.stop_event.is_set():
                raise StopRequested
            if not same_head():
                logger.info("head changed while waiting for its GCS; waiting for the new one")
                continue
            raise NodeFailure(
                f"worker {settings.node_name}: GCS of head {rendezvous.head_id} at {rendezvous.gcs_address} "
                f"not healthy after {settings.join_timeout:.0f}s"
            )
        address = relay.address if relay is not None else rendezvous.gcs_address
        launcher.start_ray(address)
        launcher.status.head_id = rendezvous.head_id
        logger.info("joining head %s at %s", rendezvous.head_id, address)
        reason, failed = _supervise_worker(launcher, rendezvous.head_id, follow_head=relay is None)
        if failed:
            launcher.start_failed()
        else:
            # The node ran (or the head changed under it): it joins again with the same ports.
            logger.info("%s: restarting this Ray node", reason)
            launcher.end_ray()
        launcher.status.head_id = None
        launcher.sleep(REJOIN_PAUSE_SECONDS)


def _supervise_worker(launcher: Launcher, head_id: str, follow_head: bool = True) -> tuple[str, bool]:
    """Block until Ray must be restarted; return why, and whether `ray start` failed before the
    node ran (a failed start, retried with other ports) rather than ending after it ran.
    `follow_head` False (head fault tolerance): a new head is no reason to restart; Ray reconnects
    through the relay, and only its own exit (e.g. the reconnect window passed) restarts it."""
    settings = launcher.settings
    running = False
    while True:
        output = launcher.node.output
        # Wake as soon as `ray start` reports the node runs, else every SUPERVISE_INTERVAL_SECONDS.
        if not running and output is not None and output.started.wait(SUPERVISE_INTERVAL_SECONDS):
            running = True
            launcher.node_runs()
        else:
            launcher.sleep(SUPERVISE_INTERVAL_SECONDS)
        if launcher.stop_event.is_set():
            raise StopRequested
        exit_code = launcher.node.exit_code()
        current = read_rendezvous(settings.project_dir, settings.cluster)
        if exit_code is not None:
            head_still_there = current is not None and current.head_id == head_id
            return f"ray start exited with code {exit_code}", not running and head_still_there
        if not follow_head:
            if current is not None and current.head_id != launcher.status.head_id:
                logger.info(
                    "following head %s (epoch %s) through the GCS relay", current.head_id, current.epoch
                )
                launcher.status.head_id = current.head_id
            continue
        if current is None:
            return "the head withdrew its rendezvous", False
        if current.head_id != head_id:
            return f"a new head {current.head_id} replaced {head_id}", False


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
    if rendezvous.ray_version != RAY_VERSION or rendezvous.python_version != python_version:
        raise NodeFailure(
            f"version mismatch with head {rendezvous.head_id}: head runs Ray {rendezvous.ray_version} on "
            f"Python {rendezvous.python_version}, this node Ray {RAY_VERSION} "
            f"on Python {python_version}; "
            "use the same runtime image for head and workers"
        )


def main(argv: list[str] | None = None, *, autostop_hooks: HooksFactory | None = None) -> int:
    """`python -m ray_serve_cai.node head|worker` (role defaults to RAY_CAI_ROLE). `autostop_hooks`:
    the head's CML calls for autostop (`cai_integration/ray_head.py` passes them)."""
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
        code = run_head(settings, autostop_hooks) if settings.role == "head" else run_worker(settings)
    except (OperationFailed, OSError, RuntimeError) as error:
        # Setup failures (token file, app port taken, ...): one clear line, not a traceback.
        print(f"ray-cai node {settings.node_name}: cannot start: {error}", file=sys.stderr)
        return EXIT_FAILED
    if argv is None or "ray._raylet" in sys.modules:
        # The node is down and its logs are copied. Ray's and gRPC's exit handlers (the in-process
        # GCS client's channels) add ~2 s to every stop, which `down` would wait for: skip them.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
