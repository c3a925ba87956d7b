"""Real Ray: `RayCluster.up()` on the local workspace versus starting the same nodes by hand.

Run by hand (not collected by pytest), from a checkout whose node layer is committed:

    python benchmarks/bench_ray.py                # --sizes 2,4 --repeat 3

For each size (1 head + N workers), in the same run:

* ray-cai: a local workspace (temporary home; pods where the machine allows — the workspace's
  default — and then, with `--shared-host` (on by default), the same runs in a shared-host workspace,
  reported beside them as `ray-cai-shared-host`: "ray-cai up by workspace mode"), with a project
  created from git (`git_url` = this repository, so the committed `cai_integration/ray_head.py` /
  `ray_worker.py` run); `up` runs in a child process so its own peak RSS (`ru_maxrss`) is measured
  alone; the time is from the call of `RayCluster.up()` to its return, i.e. until the head's
  `/ray-cai/status` reports every node alive. Then `down`.
* by hand: `ray start --head` then one `ray start --address …` per worker, one after another (each
  returns once its node runs), every node with its own free ports, then the dashboard polled every
  0.25 s until it lists every node ALIVE. Same token authentication as ray-cai. Every `ray start`
  runs in its own session; afterwards each session's process group is killed (and any process
  carrying this run's marker variable), never `ray stop`, so another Ray on the machine is untouched.
* by hand, all at once ("hand-parallel"): the practical limit on this machine — the head by hand,
  then every worker's `ray start` at the same time.

Extra runs: `--cml-like N` (default 16 workers, 0 = none) brings up 1 + N with the workspace's
application start latency set to `--latency` (30 s), as on CML where a pod takes that long to
start; `--rounds R` runs R consecutive `up`/`down` rounds of 1 + 4 and counts nodes that never
joined.

Targets: 1 + 4 ray-cai <= 0.7 x one-after-another and <= 1.1 x all-at-once; cluster CPU seconds
to ready <= 1.15 x bare `ray start` (one after another) at every size; CML-like ready <=
latency + 15 s; every round ready. Prints tables and writes the raw figures as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "bench_ray.json"
NODE_FILES = ("cai_integration/ray_head.py", "cai_integration/ray_worker.py")
HAND_MARKER = "RAY_CAI_BENCH_HAND"
API_KEY_VARIABLE = "RAY_CAI_BENCH_API_KEY"  # the child gets the key in its environment, never in argv
HAND_POLL_SECONDS = 0.25


@dataclass
class Run:
    tool: str  # "ray-cai" or "hand"
    workers: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def cpu_seconds(variable: str, value: str) -> float:
    """CPU time (user + system, plus that of reaped children) of every live process whose
    environment has `variable=value`: the work a cluster's processes did so far. Processes that
    already exited un-reaped by a marked parent are missed, so this is a lower bound."""
    total = 0.0
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if process.environ().get(variable) == value:
                times = process.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
    return round(total, 2)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- ray-cai (child process)


def cluster_data(workers: int, startup_timeout: float = 300) -> dict[str, Any]:
    return {
        "ray_cluster": {
            "name": "rbench",
            "num_workers": workers,
            "head_cpu": 1,
            "head_memory": 2,
            "worker_cpu": 1,
            "worker_memory": 2,
            # 0 = free ports picked at start: never collide with another Ray on this machine.
            "ports": {"gcs": 0, "client": 0, "dashboard": 0},
            "startup_timeout": startup_timeout,
            "join_timeout": 300,
        }
    }


def child_up(url: str, project_id: str, workers: int, poll_interval: float) -> dict[str, Any]:
    """Runs in the child: import, then time `up` alone; report its peak RSS."""
    from ray_serve_cai.cluster import RayCluster
    from ray_serve_cai.cml import CMLClient, CMLSettings
    from ray_serve_cai.config import parse_cluster_spec

    spec = parse_cluster_spec(cluster_data(workers), env={})
    settings = CMLSettings(host=url, api_key=os.environ[API_KEY_VARIABLE])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    polls = 0

    def count(_: object) -> None:
        nonlocal polls
        polls += 1

    with CMLClient(settings) as client:
        cluster = RayCluster(client, project_id, spec, poll_interval=poll_interval)
        started_epoch = time.time()
        start = time.perf_counter()
        _, status = cluster.up(on_progress=count)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "started_epoch": started_epoch,
        "ready": status.ready,
        "alive_nodes": status.ray.get("alive_nodes"),
        "polls": polls,
        "peak_rss_mib_before_up": round(rss_before / 1024, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_ray_cai(handle: Any, project_id: str, workers: int, poll_interval: float) -> Run:
    from ray_serve_cai.cluster import RayCluster
    from ray_serve_cai.cml import CMLClient, CMLSettings
    from ray_serve_cai.config import parse_cluster_spec

    handle.reset_counters()
    load_before = load_average()
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child-up",
        "--url", handle.url, "--project-id", project_id,
        "--workers", str(workers), "--poll-interval", str(poll_interval),
    ]  # fmt: skip
    env = {**os.environ, API_KEY_VARIABLE: handle.api_key}
    child = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    counters = handle.counters()
    cluster_cpu = cpu_seconds("RAY_CAI_CLUSTER", "rbench")
    if child.returncode != 0:
        raise RuntimeError(f"ray-cai up of {workers} workers failed:\n{child.stderr[-4000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    if not result["ready"]:
        raise RuntimeError(f"ray-cai up of {workers} workers returned without a ready cluster: {result}")
    started_epoch = result.pop("started_epoch")
    run = Run("ray-cai", workers, result.pop("seconds"), result)
    run.extra["api_calls"] = counters["total"]
    run.extra["poll_interval_s"] = poll_interval
    run.extra["cluster_cpu_s"] = cluster_cpu
    run.extra["load_1min_before"] = load_before

    settings = CMLSettings(host=handle.url, api_key=handle.api_key)
    with CMLClient(settings) as client:
        run.extra["timeline"] = timeline(client, handle, project_id, started_epoch)
        start = time.perf_counter()
        RayCluster(client, project_id, parse_cluster_spec(cluster_data(workers), env={})).down()
        run.extra["down_seconds"] = round(time.perf_counter() - start, 2)
    run.extra["left_processes"] = len(handle.processes())
    return run


def timeline(client: Any, handle: Any, project_id: str, started_epoch: float) -> dict[str, float]:
    """Seconds after the call of `up`: apps created, head RUNNING, rendezvous published (head.json
    mtime: the head's GCS is healthy), last worker app RUNNING. Read after the counters (not counted)."""
    marks: dict[str, float] = {}
    apps = [
        a for a in client.list_applications(project_id) if a.environment.get("RAY_CAI_CLUSTER") == "rbench"
    ]
    created = [a.created_at.timestamp() for a in apps if isinstance(a.created_at, datetime)]
    if created:
        marks["apps_created_by_s"] = max(created) - started_epoch
    for app in apps:
        if not isinstance(app.running_at, datetime):
            continue
        at = app.running_at.timestamp() - started_epoch
        if app.environment.get("RAY_CAI_ROLE") == "head":
            marks["head_app_running_s"] = at
        else:
            marks["last_worker_app_running_s"] = max(at, marks.get("last_worker_app_running_s", 0.0))
    rendezvous = handle.project_dir(project_id) / ".ray-cai" / "rbench" / "head.json"
    if rendezvous.exists():
        marks["rendezvous_published_s"] = rendezvous.stat().st_mtime - started_epoch
    return {k: round(v, 2) for k, v in marks.items()}


# --------------------------------------------------------------------------- by hand


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_ports() -> list[str]:
    """Every per-node port Ray would otherwise take at a fixed default, so nodes can share a host."""
    return [
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
    ]  # fmt: skip


class HandCluster:
    """Nodes started with `ray start`, each in its own session; ended by killing those groups."""

    def __init__(self) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rbh-", dir="/tmp"))  # short: Ray's socket paths
        token_path = self.temp_dir / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)
        self.token = token_path.read_text()
        self.marker = uuid.uuid4().hex
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
            HAND_MARKER: self.marker,
        }
        self.groups: list[int] = []
        self.gcs_port = free_port()
        self.dashboard_port = free_port()

    def _ray_start(self, arguments: list[str]) -> None:
        self._finish(self._spawn(arguments), arguments)

    def _finish(self, process: subprocess.Popen[bytes], arguments: list[str]) -> None:
        output, _ = process.communicate(timeout=300)
        if process.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(arguments[:2])} failed:\n{output.decode()[-3000:]}")

    def _spawn(self, arguments: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["ray", "start", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--memory", str(2 * 2**30),
             "--disable-usage-stats",
             *node_ports(), *arguments],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.groups.append(process.pid)
        return process

    def start(self, workers: int, parallel: bool = False) -> None:
        self._ray_start(
            ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
             "--temp-dir", str(self.temp_dir)]
        )  # fmt: skip
        worker_arguments = ["--address", f"127.0.0.1:{self.gcs_port}"]
        if parallel:
            started = [self._spawn(worker_arguments) for _ in range(workers)]
            for process in started:
                self._finish(process, worker_arguments)
            return
        for _ in range(workers):
            self._ray_start(worker_arguments)

    def alive_nodes(self, client: httpx.Client) -> int:
        try:
            response = client.get(f"http://127.0.0.1:{self.dashboard_port}/nodes?view=summary", timeout=5)
            summary = response.json()["data"]["summary"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return 0
        return sum(1 for node in summary if node.get("raylet", {}).get("state") == "ALIVE")

    def wait_alive(self, nodes: int, timeout: float = 300) -> None:
        headers = {"X-Ray-Authorization": f"Bearer {self.token}"}
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, headers=headers) as client:
            while self.alive_nodes(client) < nodes:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the hand-started cluster did not reach {nodes} alive nodes")
                time.sleep(HAND_POLL_SECONDS)

    def marked_processes(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if process.environ().get(HAND_MARKER) == self.marker:
                    found.append(process)
        return found

    def stop(self) -> int:
        """Kill every group we started, then anything else carrying our marker; return survivors."""
        marked = self.marked_processes()
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        for process in marked:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(marked, timeout=10)
        left = len([p for p in self.marked_processes() if p.status() != psutil.STATUS_ZOMBIE])
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left


def run_hand(workers: int, parallel: bool = False) -> Run:
    cluster = HandCluster()
    load_before = load_average()
    try:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        cluster.start(workers, parallel=parallel)
        started = time.perf_counter() - start
        cluster.wait_alive(workers + 1)
        seconds = time.perf_counter() - start
        # The `ray start` commands themselves exited and were reaped here: add their CPU time.
        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_cpu = (now.ru_utime - reaped.ru_utime) + (now.ru_stime - reaped.ru_stime)
        cluster_cpu = round(cpu_seconds(HAND_MARKER, cluster.marker) + cli_cpu, 2)
    finally:
        left = cluster.stop()
    extra = {
        "ray_start_seconds": round(started, 2),
        "cluster_cpu_s": cluster_cpu,
        "load_1min_before": load_before,
        "left_processes": left,
    }
    return Run("hand-parallel" if parallel else "hand", workers, seconds, extra)


# --------------------------------------------------------------------------- main


def node_layer_committed(repo: Path) -> list[str]:
    """The node launcher files missing from the repository's HEAD (a git project clones HEAD)."""
    missing = []
    for path in NODE_FILES:
        found = subprocess.run(
            ["git", "-C", str(repo), "cat-file", "-e", f"HEAD:{path}"], capture_output=True, check=False
        )
        if found.returncode != 0:
            missing.append(path)
    return missing


def code_state() -> dict[str, Any]:
    """The commit measured, and library files with uncommitted edits (others work in this checkout)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_library_files": git(
            "status", "--porcelain", "--", "ray_serve_cai", "cai_integration"
        ).splitlines(),
    }


def machine() -> dict[str, Any]:
    import ray

    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "platform": platform.platform(),
    }


def print_table(runs: list[Run]) -> list[dict[str, Any]]:
    """Medians per size and tool, and the targets (each a dict with `passed`)."""
    sizes = sorted({r.workers for r in runs})
    header = (
        f"{'nodes':>7} | {'ray-cai s':>9} {'cpu s':>6} | {'hand s':>7} {'cpu s':>6} | "
        f"{'at once s':>9} {'cpu s':>6} | {'/hand':>5} {'/at once':>8} {'cpu/hand':>8}"
    )
    print("\n" + header + "   (medians; cpu s = CPU time of the cluster's processes when ready)")
    print("-" * len(header))
    targets: list[dict[str, Any]] = []
    for workers in sizes:

        def median(tool: str, key: str | None = None, workers: int = workers) -> float:
            chosen = [r for r in runs if r.tool == tool and r.workers == workers]
            if not chosen:
                return float("nan")
            return statistics.median(r.seconds if key is None else r.extra[key] for r in chosen)

        ours, hand, together = median("ray-cai"), median("hand"), median("hand-parallel")
        cpu_ours, cpu_hand = median("ray-cai", "cluster_cpu_s"), median("hand", "cluster_cpu_s")
        cpu_together = median("hand-parallel", "cluster_cpu_s")
        print(
            f"{'1 + ' + str(workers):>7} | {ours:9.2f} {cpu_ours:6.1f} | {hand:7.2f} {cpu_hand:6.1f} | "
            f"{together:9.2f} {cpu_together:6.1f} | {ours / hand:5.2f} {ours / together:8.2f} "
            f"{cpu_ours / cpu_hand:8.2f}"
        )
        targets.append(
            _target(f"1 + {workers}: cluster CPU s <= 1.15 x bare ray start", cpu_ours / cpu_hand, 1.15)
        )
        if workers == 4:
            targets.append(_target("1 + 4: ray-cai <= 0.7 x one after another", ours / hand, 0.7))
            targets.append(_target("1 + 4: ray-cai <= 1.1 x all at once", ours / together, 1.1))
    return targets


def print_modes(runs: list[Run], network: str) -> dict[str, dict[str, float]]:
    """ray-cai's medians per size in each workspace mode (pods: the main runs where the machine makes
    pods; shared-host: the `--shared-host` runs), side by side; the medians as JSON."""
    main_mode = "pods" if network == "pods" else "shared-host"
    modes = {main_mode: "ray-cai", **({"shared-host": "ray-cai-shared-host"} if main_mode == "pods" else {})}
    table: dict[str, dict[str, float]] = {}
    for mode, tool in modes.items():
        for workers in sorted({r.workers for r in runs if r.tool == tool}):
            chosen = [r for r in runs if r.tool == tool and r.workers == workers]
            figures = table.setdefault(mode, {})
            figures[f"1+{workers}"] = round(statistics.median(r.seconds for r in chosen), 2)
            cpu = statistics.median(r.extra["cluster_cpu_s"] for r in chosen)
            figures[f"1+{workers} cpu_s"] = round(cpu, 1)
    print("\nray-cai up by workspace mode (medians, s to ready / cluster CPU s):")
    for mode, figures in table.items():
        sizes = [k for k in figures if not k.endswith("cpu_s")]
        cells = ", ".join(f"{k}: {figures[k]:.2f} s / {figures[k + ' cpu_s']:.1f}" for k in sizes)
        print(f"  {mode:<12} {cells}")
    return table


def _target(name: str, value: float, limit: float) -> dict[str, Any]:
    return {"target": name, "value": round(value, 3), "limit": limit, "passed": value <= limit}


def run_rounds(handle: Any, project_id: str, rounds: int, poll_interval: float) -> dict[str, Any]:
    """`rounds` consecutive up/down of 1 + 4; a round fails when up does not end ready."""
    seconds: list[float] = []
    failures: list[str] = []
    for index in range(rounds):
        try:
            run = run_ray_cai(handle, project_id, 4, poll_interval)
            seconds.append(round(run.seconds, 2))
            print(f"  round {index + 1}/{rounds}: ready in {run.seconds:.2f} s", flush=True)
        except RuntimeError as error:
            failures.append(str(error)[-1500:])
            print(f"  round {index + 1}/{rounds}: FAILED {str(error)[-600:]}", flush=True)
            _down(handle, project_id, 4)
    return {"rounds": rounds, "ready": len(seconds), "seconds": seconds, "failures": failures}


def _down(handle: Any, project_id: str, workers: int) -> None:
    from ray_serve_cai.cluster import RayCluster
    from ray_serve_cai.cml import CMLClient, CMLSettings
    from ray_serve_cai.config import parse_cluster_spec

    with CMLClient(CMLSettings(host=handle.url, api_key=handle.api_key)) as client:
        RayCluster(client, project_id, parse_cluster_spec(cluster_data(workers), env={})).down()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2,4", help="worker counts, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size and tool (median reported)")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="RayCluster's poll interval, s")
    parser.add_argument(
        "--diagnostic-poll",
        type=float,
        default=0.25,
        help="extra ray-cai run per size at this poll (0: none)",
    )
    parser.add_argument("--tools", default="ray-cai,hand,hand-parallel", help="which starts to time")
    parser.add_argument("--cml-like", type=int, default=16, help="workers of the CML-like run (0: none)")
    parser.add_argument("--latency", type=float, default=30.0, help="app start latency of the CML-like run")
    parser.add_argument("--rounds", type=int, default=0, help="consecutive up/down rounds of 1 + 4")
    parser.add_argument(
        "--shared-host",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time ray-cai in a shared-host workspace (tool ray-cai-shared-host), beside pods",
    )
    parser.add_argument("--repo", type=Path, default=REPO, help="git repository the project is cloned from")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the raw JSON")
    parser.add_argument("--child-up", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--project-id", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_up:
        print(json.dumps(child_up(args.url, args.project_id, args.workers, args.poll_interval)))
        return 0

    from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace
    from ray_serve_cai.workspace.testing import WorkspaceHandle

    missing = node_layer_committed(args.repo)
    if missing:
        print(f"the node layer is not committed yet in {args.repo} (missing at HEAD: {', '.join(missing)})")
        return 3
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    code = code_state()  # at the start: the library is imported now, others may edit it meanwhile
    home = Path(tempfile.mkdtemp(prefix="ray-cai-bench-ray-"))
    runs: list[Run] = []
    diagnostics: list[Run] = []
    cml_like: Run | None = None
    rounds: dict[str, Any] | None = None
    failed_hand: list[dict[str, Any]] = []
    load_at_start = os.getloadavg()
    try:
        info = start_workspace(home / "workspace")  # pods where the machine can make them
        print(f"workspace network: {info.network} ({info.network_reason})", flush=True)
        handle = WorkspaceHandle(info)
        try:
            project = handle.create_project("bench-ray", git_url=str(args.repo), timeout=300)
            if project["creation_status"] != "success":
                raise RuntimeError(f"project from git: {project.get('error_message')}")
            for workers in sizes if args.diagnostic_poll else []:
                # Not a target: the same up polled every --diagnostic-poll s shows when Ray was
                # complete, apart from the rounding up to the next 2 s poll.
                run = run_ray_cai(handle, project["id"], workers, args.diagnostic_poll)
                run.tool = "ray-cai-fastpoll"
                diagnostics.append(run)
                print(f"  {run.tool} 1 + {workers} workers: {run.seconds:6.2f} s  {run.extra}", flush=True)
            tools = [t.strip() for t in args.tools.split(",") if t.strip()]
            for _ in range(args.repeat):
                for workers in sizes:
                    for tool in tools:
                        if tool == "ray-cai":
                            run = run_ray_cai(handle, project["id"], workers, args.poll_interval)
                        else:
                            try:
                                run = run_hand(workers, parallel=tool == "hand-parallel")
                            except RuntimeError as error:  # a bare `ray start` that never joined
                                print(f"  {tool} 1 + {workers} FAILED: {str(error)[-300:]}", flush=True)
                                failed_hand.append(
                                    {"tool": tool, "workers": workers, "error": str(error)[-1500:]}
                                )
                                continue
                        runs.append(run)
                        print(
                            f"  {run.tool:8} 1 + {workers} workers: {run.seconds:6.2f} s  {run.extra}",
                            flush=True,
                        )
            if args.cml_like:
                handle.set_latency(app_start_seconds=args.latency)
                try:
                    run = run_ray_cai(handle, project["id"], args.cml_like, args.poll_interval)
                finally:
                    handle.set_latency()
                run.tool = "ray-cai-cml-like"
                run.extra["app_start_latency_s"] = args.latency
                cml_like = run
                print(f"  cml-like 1 + {args.cml_like}: {run.seconds:6.2f} s  {run.extra}", flush=True)
            if args.rounds:
                rounds = run_rounds(handle, project["id"], args.rounds, args.poll_interval)
        finally:
            handle.close()
            stop_workspace(home / "workspace")
        if args.shared_host and info.network == "pods" and "ray-cai" in args.tools:
            # The other mode, for comparison: every node on the host (free ports, port blocks).
            shared = WorkspaceHandle(start_workspace(home / "workspace-shared", pods=False))
            try:
                project = shared.create_project("bench-ray", git_url=str(args.repo), timeout=300)
                for _ in range(args.repeat):
                    for workers in sizes:
                        run = run_ray_cai(shared, project["id"], workers, args.poll_interval)
                        run.tool = "ray-cai-shared-host"
                        diagnostics.append(run)
                        print(
                            f"  {run.tool} 1 + {workers} workers: {run.seconds:6.2f} s  {run.extra}",
                            flush=True,
                        )
            finally:
                shared.close()
                stop_workspace(home / "workspace-shared")
    finally:
        shutil.rmtree(home, ignore_errors=True)

    targets = print_table(runs) if runs else []
    if cml_like is not None:
        limit = args.latency + 15
        print(
            f"\nCML-like (app start latency {args.latency:g} s, 1 + {args.cml_like}): "
            f"{cml_like.seconds:.2f} s"
        )
        targets.append(
            _target(f"CML-like 1 + {args.cml_like} ready <= latency + 15 s", cml_like.seconds, limit)
        )
    if rounds is not None:
        print(f"\n{rounds['ready']}/{rounds['rounds']} rounds of 1 + 4 ready; seconds: {rounds['seconds']}")
        targets.append(_target("up/down rounds of 1 + 4 that failed", len(rounds["failures"]), 0))
    for target in targets:
        print(f"  {'PASS' if target['passed'] else 'FAIL'}  {target['target']}: {target['value']}")
    modes = print_modes([*runs, *diagnostics], info.network)
    print("\nray-cai timeline, s after the call of up (apps created / head RUNNING / rendezvous / returned):")
    for run in [*diagnostics, *runs, *([cml_like] if cml_like else [])]:
        if run.tool.startswith("ray-cai"):
            t = run.extra.get("timeline", {})
            print(
                f"  {run.tool:<20} 1 + {run.workers} poll {run.extra['poll_interval_s']} s: "
                f"{t.get('apps_created_by_s')} / "
                f"{t.get('head_app_running_s')} / {t.get('rendezvous_published_s')} / {run.seconds:.2f}"
                f"  ({run.extra['polls']} polls, {run.extra['api_calls']} API calls)"
            )
    rss = [r.extra["peak_rss_mib"] for r in runs if r.tool == "ray-cai"]
    if rss:
        print(f"\nray-cai peak RSS during up (child process): max {max(rss)} MiB")
    downs = {r.workers: r.extra["down_seconds"] for r in runs if r.tool == "ray-cai"}
    print(f"ray-cai down, s (last run per size): {downs}")
    print(f"load average at start {load_at_start}, at end {os.getloadavg()}")
    report = {
        "started_at": started_at,
        "machine": machine(),
        "code": code,
        "settings": {
            "sizes": sizes,
            "repeat": args.repeat,
            "poll_interval_s": args.poll_interval,
            "network": info.network,
        },
        "load_average_start": load_at_start,
        "load_average_end": os.getloadavg(),
        "modes": modes,
        "runs": [asdict(r) for r in runs],
        "diagnostics": [asdict(r) for r in diagnostics],
        "cml_like": asdict(cml_like) if cml_like else None,
        "rounds": rounds,
        "failed_hand_starts": failed_hand,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"raw figures: {args.out}")
    return 0 if all(t["passed"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
