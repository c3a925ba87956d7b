"""Deploy time and API cost of `RayCluster` versus cluster size, next to the prior art's naive loop.

Run by hand (not collected by pytest):

    python benchmarks/bench_cluster.py            # --latency 3 --sizes 1,8,32,64 --poll-interval 2

It starts its own local CML workspace in a temporary home, injects an application start latency,
creates a `local` project holding `benchmarks/bench_app.py` (a no-Ray stand-in node used as both
head_script and worker_script; see its docstring), then measures wall time and API calls (the
workspace's request counters, total and by route) of:

* ray-cai (`RayCluster`): `up` for each size (fresh: `down` between sizes), a no-op `up` and a
  `status` on the converged cluster (each from a fresh `RayCluster`, as a new CLI invocation would
  make it), and `down`;
* the baseline, written here with the raw client as the prior art does it: create one app, poll it
  with `get_application` until RUNNING, then the next; status = one `get_application` per app;
  down = per app `:stop`, poll until STOPPED, delete.

Calls are counted once the project id is known: the CLI's project lookup (one paginated
`GET /api/v2/projects`) comes before and is not part of any figure here. Prints a table with the
ratios and PASS/FAIL per target, and writes the raw figures as JSON (`--out`). Every process it
starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.cluster.lock import LOCK_SCRIPT
from ray_serve_cai.cml import APPLICATION_FAILED as FAILED
from ray_serve_cai.cml import APPLICATION_RUNNING as RUNNING
from ray_serve_cai.cml import APPLICATION_STOPPED as STOPPED
from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.config import ClusterSpec, parse_cluster_spec
from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace
from ray_serve_cai.workspace.testing import WorkspaceHandle

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
APP_SCRIPT = "bench_app.py"
DEFAULT_OUT = HERE / "results" / "bench_cluster.json"
T = TypeVar("T")
OPS = ["up", "up-poll0.25", "noop-up", "status", "down", "down-par65"]


@dataclass
class Measurement:
    """One timed operation: wall seconds and the API requests the workspace counted meanwhile."""

    tool: str  # "ray-cai" or "baseline"
    op: str  # one of OPS
    workers: int
    seconds: float
    calls: int
    by_route: dict[str, int]
    polls: int | None = None  # status polls made by `up` (ray-cai only)
    extra: dict[str, Any] = field(default_factory=dict)
    started_epoch: float = 0.0  # wall clock at the start, to place app timestamps on the same axis


def measured(
    handle: WorkspaceHandle, tool: str, op: str, workers: int, action: Callable[[], T]
) -> tuple[Measurement, T]:
    """Run `action` with the counters reset before and read after; the time excludes both calls."""
    handle.reset_counters()
    started_epoch = time.time()
    start = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - start
    counters = handle.counters()
    measurement = Measurement(
        tool,
        op,
        workers,
        seconds,
        int(counters["total"]),
        dict(counters["counts"]),
        started_epoch=started_epoch,
    )
    print(f"  {tool:8} {op:8} workers={workers:<3} {seconds:7.2f} s  {measurement.calls:4} calls", flush=True)
    return measurement, result


def cluster_spec(name: str, workers: int) -> ClusterSpec:
    """A cluster of the stand-in app; no runtime named, so `RayCluster` chooses one (one list call)."""
    data = {
        "ray_cluster": {
            "name": name,
            "num_workers": workers,
            "head_cpu": 1,
            "head_memory": 1,
            "worker_cpu": 1,
            "worker_memory": 1,
            "head_script": APP_SCRIPT,
            "worker_script": APP_SCRIPT,
            "auth": {"token": False},
            "startup_timeout": 900,
        }
    }
    return parse_cluster_spec(data, env={})


# --------------------------------------------------------------------------- ray-cai


def app_timeline(client: CMLClient, project_id: str, cluster: str, started_epoch: float) -> dict[str, float]:
    """When (s after the start of `up`) the cluster's apps were created and reported RUNNING, read
    with one list call made after the counters were read (so not counted)."""
    created, running = [], []
    for app in client.list_applications(project_id):
        if app.environment.get("RAY_CAI_CLUSTER") != cluster:
            continue
        for stamp, into in ((app.created_at, created), (app.running_at, running)):
            if isinstance(stamp, datetime):
                into.append(stamp.timestamp() - started_epoch)
    if not created or not running:
        return {}
    running.sort()
    return {
        "first_created_s": round(min(created), 3),
        "last_created_s": round(max(created), 3),
        "first_running_s": round(running[0], 3),
        "median_running_s": round(running[len(running) // 2], 3),
        "last_running_s": round(running[-1], 3),
    }


def bench_ray_cai(
    handle: WorkspaceHandle, client: CMLClient, project_id: str, sizes: list[int], poll_interval: float
) -> list[Measurement]:
    results: list[Measurement] = []
    largest, smallest = max(sizes), min(sizes)
    for workers in sizes:
        spec = cluster_spec("bench", workers)
        polls = 0

        def count_poll(_: object) -> None:
            nonlocal polls
            polls += 1

        cluster = RayCluster(client, project_id, spec, poll_interval=poll_interval)
        up, (_, status) = measured(
            handle, "ray-cai", "up", workers, lambda c=cluster: c.up(on_progress=count_poll)
        )
        if not status.ready:
            raise RuntimeError(f"up of {workers} workers ended {status.state}: {status.problems}")
        up.polls = polls
        up.extra.update(app_timeline(client, project_id, spec.name, up.started_epoch))
        results.append(up)
        if workers in (smallest, largest):
            again = RayCluster(client, project_id, spec, poll_interval=poll_interval)
            noop, (plan, status) = measured(handle, "ray-cai", "noop-up", workers, again.up)
            if not plan.is_noop or not status.ready:
                raise RuntimeError(f"second up of {workers} workers was not a no-op: {plan.summary()}")
            results.append(noop)
            viewer = RayCluster(client, project_id, spec, poll_interval=poll_interval)
            status_m, status = measured(handle, "ray-cai", "status", workers, viewer.status)
            status_m.extra["state"] = status.state
            results.append(status_m)
        remover = RayCluster(client, project_id, spec, poll_interval=poll_interval)
        down, removed = measured(handle, "ray-cai", "down", workers, remover.down)
        if len(removed) != workers + 1:
            raise RuntimeError(f"down removed {len(removed)} apps, expected {workers + 1}")
        down.extra["left_processes"] = len(handle.processes())
        results.append(down)
    return results


def bench_diagnostics(
    handle: WorkspaceHandle, client: CMLClient, project_id: str, sizes: list[int]
) -> list[Measurement]:
    """Not targets: the same `up`/`down` with the public knobs turned, to show what bounds them.

    `up-poll0.25`: poll every 0.25 s, so the figure is the convergence time itself rather than the
    next multiple of the 2 s poll interval. `down-par65`: `max_parallel=65`, so no app waits for a
    free slot of the default 16.
    """
    results: list[Measurement] = []
    for workers in (min(sizes), max(sizes)):
        spec = cluster_spec("bench", workers)
        fast = RayCluster(client, project_id, spec, poll_interval=0.25)
        up, (_, status) = measured(handle, "ray-cai", "up-poll0.25", workers, fast.up)
        if not status.ready:
            raise RuntimeError(f"diagnostic up of {workers} workers ended {status.state}")
        up.extra.update(app_timeline(client, project_id, spec.name, up.started_epoch))
        results.append(up)
        wide = RayCluster(client, project_id, spec, max_parallel=65)
        down, _ = measured(handle, "ray-cai", "down-par65", workers, wide.down)
        results.append(down)
    return results


# --------------------------------------------------------------------------- baseline (prior art)


class NaiveCluster:
    """The prior art's loop with the raw client: one app at a time, each polled on its own."""

    def __init__(
        self, client: CMLClient, project_id: str, runtime: str, poll_interval: float, name: str = "base"
    ) -> None:
        self.client = client
        self.project_id = project_id
        self.runtime = runtime
        self.poll_interval = poll_interval
        self.name = name
        self.app_ids: list[str] = []

    def _wait_for(self, app_id: str, wanted: str) -> None:
        deadline = time.monotonic() + 900
        while True:
            app = self.client.get_application(self.project_id, app_id)
            if app.status == wanted:
                return
            if app.status == FAILED or time.monotonic() > deadline:
                raise RuntimeError(f"baseline app {app.name} is {app.status}, expected {wanted}")
            time.sleep(self.poll_interval)

    def up(self, workers: int) -> None:
        names = [f"ray-{self.name}-head"] + [f"ray-{self.name}-worker-{i}" for i in range(workers)]
        for index, name in enumerate(names):
            environment = {
                "RAY_CAI_CLUSTER": self.name,
                "RAY_CAI_ROLE": "head" if index == 0 else "worker",
                "RAY_CAI_NODE_NAME": name,
            }
            app = self.client.create_application(
                self.project_id,
                name=name,
                subdomain=name,
                script=APP_SCRIPT,
                cpu=1,
                memory=1,
                environment=environment,
                runtime_identifier=self.runtime,
            )
            self.app_ids.append(app.id)
            self._wait_for(app.id, RUNNING)

    def status(self) -> list[str]:
        return [self.client.get_application(self.project_id, app_id).status or "" for app_id in self.app_ids]

    def down(self) -> None:
        for app_id in self.app_ids:
            self.client.stop_application(self.project_id, app_id)
            self._wait_for(app_id, STOPPED)
            self.client.delete_application(self.project_id, app_id)
        self.app_ids = []


def bench_baseline(
    handle: WorkspaceHandle, client: CMLClient, project_id: str, sizes: list[int], poll_interval: float
) -> list[Measurement]:
    results: list[Measurement] = []
    runtime = handle.runtime_identifier()  # the prior art takes it from its config: not counted
    largest, smallest = max(sizes), min(sizes)
    for workers in sizes:
        naive = NaiveCluster(client, project_id, runtime, poll_interval)
        try:
            up, _ = measured(handle, "baseline", "up", workers, lambda n=naive, w=workers: n.up(w))
            results.append(up)
            if workers in (smallest, largest):
                status_m, statuses = measured(handle, "baseline", "status", workers, naive.status)
                if any(s != RUNNING for s in statuses):
                    raise RuntimeError(f"baseline status saw {set(statuses)}")
                results.append(status_m)
            down, _ = measured(handle, "baseline", "down", workers, naive.down)
            down.extra["left_processes"] = len(handle.processes())
            results.append(down)
        finally:
            for app_id in naive.app_ids:  # only after a failure
                client.delete_application(project_id, app_id)
    return results


# --------------------------------------------------------------------------- report


def find(results: list[Measurement], tool: str, op: str, workers: int) -> Measurement | None:
    return next((m for m in results if (m.tool, m.op, m.workers) == (tool, op, workers)), None)


def print_table(results: list[Measurement]) -> None:
    header = (
        f"{'operation':11} {'workers':>7} | {'ray-cai s':>9} {'calls':>5} | "
        f"{'baseline s':>10} {'calls':>5} | {'time x':>7} {'calls x':>7}"
    )
    print("\n" + header)
    print("-" * len(header))
    keys = sorted({(m.op, m.workers) for m in results}, key=lambda k: (OPS.index(k[0]), k[1]))
    for op, workers in keys:
        ours = find(results, "ray-cai", op, workers)
        base = find(results, "baseline", op, workers)
        ours_s = f"{ours.seconds:9.2f} {ours.calls:5}" if ours else f"{'—':>9} {'—':>5}"
        base_s = f"{base.seconds:10.2f} {base.calls:5}" if base else f"{'—':>10} {'—':>5}"
        if ours and base:
            ratio = f"{base.seconds / ours.seconds:7.1f} {base.calls / max(ours.calls, 1):7.1f}"
        else:
            ratio = f"{'—':>7} {'—':>7}"
        print(f"{op:11} {workers:7} | {ours_s} | {base_s} | {ratio}")
    print("(x = baseline / ray-cai: how many times slower / more calls the baseline is)")
    print("\nray-cai up, s after the call: apps created by | first / median / last RUNNING | returned")
    for m in results:
        if m.tool == "ray-cai" and m.op.startswith("up") and "last_running_s" in m.extra:
            e = m.extra
            print(
                f"  {m.op:11} {m.workers:3} workers: {e['last_created_s']:6.2f} | "
                f"{e['first_running_s']:5.2f} / {e['median_running_s']:5.2f} / {e['last_running_s']:5.2f} | "
                f"{m.seconds:5.2f}" + (f"  ({m.polls} polls)" if m.polls else "")
            )


@dataclass
class Target:
    name: str
    passed: bool
    detail: str


def check_targets(results: list[Measurement], poll_interval: float) -> list[Target]:
    ours = [m for m in results if m.tool == "ray-cai"]
    sizes = sorted({m.workers for m in ours})
    small, large = sizes[0], sizes[-1]
    targets: list[Target] = []

    up_small, up_large = find(ours, "ray-cai", "up", small), find(ours, "ray-cai", "up", large)
    if up_small and up_large:
        ratio = up_large.seconds / up_small.seconds
        targets.append(
            Target(
                f"up of {large} workers within 1.5x of {small}",
                ratio <= 1.5,
                f"{up_large.seconds:.2f} s / {up_small.seconds:.2f} s = {ratio:.2f}x",
            )
        )
    for m in (x for x in ours if x.op == "up"):
        intervals = math.ceil(m.seconds / poll_interval)
        budget = m.workers + 10 + intervals
        targets.append(
            Target(
                f"up of {m.workers}: calls <= workers + 10 + one list per poll interval",
                m.calls <= budget,
                f"{m.calls} calls <= {m.workers} + 10 + {intervals} = {budget} ({m.polls} status polls)",
            )
        )
    for m in (x for x in ours if x.op == "noop-up"):
        targets.append(Target(f"no-op up of {m.workers}: <= 3 calls", m.calls <= 3, f"{m.calls} calls"))
    for m in (x for x in ours if x.op == "status"):
        targets.append(
            Target(
                f"status of {m.workers}: <= 2 calls (project lookup excluded)",
                m.calls <= 2,
                f"{m.calls} calls",
            )
        )
    down_small, down_large = find(ours, "ray-cai", "down", small), find(ours, "ray-cai", "down", large)
    if down_small and down_large:
        ratio = down_large.seconds / down_small.seconds
        targets.append(
            Target(
                f"down of {large} workers within 1.5x of {small}",
                ratio <= 1.5,
                f"{down_large.seconds:.2f} s / {down_small.seconds:.2f} s = {ratio:.2f}x",
            )
        )
    return targets


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
    import psutil

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "ray": ray_version,
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=3.0, help="injected app start latency, s")
    parser.add_argument("--sizes", default="1,8,32,64", help="worker counts, comma-separated")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="status poll interval, s (both)")
    parser.add_argument(
        "--baseline-sizes", default=None, help="worker counts for the baseline (default: --sizes)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="measure ray-cai only")
    parser.add_argument(
        "--no-diagnostics", action="store_true", help="skip the up/down runs with other poll/parallel knobs"
    )
    parser.add_argument(
        "--engine-type",
        default="ml_runtime",
        choices=["ml_runtime", "legacy_engine"],
        help="the project's default engine type (ML Runtime projects require a runtime on every app)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the raw JSON")
    return parser.parse_args(argv)


def sizes_of(text: str) -> list[int]:
    return sorted({int(part) for part in text.split(",") if part.strip()})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_of(args.sizes)
    baseline_sizes = [] if args.no_baseline else sizes_of(args.baseline_sizes or args.sizes)
    home = Path(tempfile.mkdtemp(prefix="ray-cai-bench-"))
    files = home / "project-files"
    files.mkdir()
    shutil.copy2(HERE / APP_SCRIPT, files / APP_SCRIPT)
    # The cluster lock's application runs this script (the project is a git clone on CML).
    (files / "cai_integration").mkdir()
    shutil.copy2(REPO / LOCK_SCRIPT, files / LOCK_SCRIPT)
    results: list[Measurement] = []
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_at_start = round(os.getloadavg()[0], 2)
    code = code_state()  # at the start: the library is imported now, others may edit it meanwhile
    try:
        info = start_workspace(home / "workspace")
        handle = WorkspaceHandle(info)
        try:
            handle.set_latency(app_start_seconds=args.latency)
            project = handle.create_project(
                "bench", files_from=files, default_project_engine_type=args.engine_type
            )
            settings = CMLSettings(host=info.url, api_key=info.api_key)
            with CMLClient(settings) as client:
                print(f"workspace {info.url}, latency {args.latency} s, poll interval {args.poll_interval} s")
                results += bench_ray_cai(handle, client, project["id"], sizes, args.poll_interval)
                if not args.no_diagnostics:
                    results += bench_diagnostics(handle, client, project["id"], sizes)
                if baseline_sizes:
                    results += bench_baseline(
                        handle, client, project["id"], baseline_sizes, args.poll_interval
                    )
        finally:
            handle.close()
            stop_workspace(home / "workspace")
    finally:
        shutil.rmtree(home, ignore_errors=True)

    print_table(results)
    targets = check_targets(results, args.poll_interval)
    print()
    for target in targets:
        print(f"{'PASS' if target.passed else 'FAIL'}  {target.name}: {target.detail}")
    report = {
        "started_at": started_at,
        "machine": machine(),
        "code": code,
        "load_1min": {"start": load_at_start, "end": round(os.getloadavg()[0], 2)},
        "settings": {
            "latency_s": args.latency,
            "poll_interval_s": args.poll_interval,
            "sizes": sizes,
            "baseline_sizes": baseline_sizes,
        },
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "measurements": [asdict(m) for m in results],
        "targets": [asdict(t) for t in targets],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nraw figures: {args.out}")
    return 0 if all(t.passed for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
