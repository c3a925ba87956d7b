"""Real Ray autoscaling on the local workspace: from pending demand to a task running on a new worker
application, and from idle to the worker application deleted.

Run by hand (not collected by pytest), from a checkout whose autoscale layer is committed:

    python benchmarks/bench_autoscale.py              # --repeat 2 --interval 5 --idle 20 --app-latency 3

A private local workspace (temporary home) gets a project cloned from this repository; `up` creates a
cluster whose only group is autoscaled (min 0 / max 1, 1 CPU), with `head_ray_cpus: 0`, the given
idle timeout and the head's `AUTOSCALER_UPDATE_INTERVAL_S` = `--interval`; every app start is
delayed by `--app-latency` s (`PUT /_workspace/latency`, standing for CML's pod scheduling). Then,
`--repeat` times: a Ray client submits one 1-CPU task (the demand) and the benchmark watches, every
0.1 s, the workspace's app list and the head's `/ray-cai/status`:

* reaction: demand submitted → the worker app exists (Ray's monitor saw the demand, the provider
  created the app). Target: at most one update interval plus one list call.
* app start: app created → RUNNING (includes the injected latency).
* Ray join: RUNNING → the node alive in Ray.
* dispatch: node alive → the task started on it.
* idle → deleted: the task ended → the app gone from the list (the idle timeout plus at most one
  update interval is expected).

Prints a table and writes the raw figures as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "bench_autoscale.json"
CLUSTER = "abench"
HEAD = f"ray-{CLUSTER}-head"
WORKER = f"ray-{CLUSTER}-worker-0"

DRIVER = textwrap.dedent(
    """
    import json, os, sys, time, ray
    ray.init(logging_level="error")

    @ray.remote(num_cpus=1)
    def work(seconds):
        started = time.time()
        time.sleep(seconds)
        return {"started": started, "ended": time.time(), "node": os.environ.get("RAY_CAI_NODE_NAME")}

    submitted = time.time()
    result = ray.get(work.remote(float(sys.argv[1])), timeout=600)
    print(json.dumps({"submitted": submitted, **result}))
    """
)


@dataclass
class Cycle:
    reaction: float
    app_start: float
    ray_join: float
    dispatch: float
    demand_to_running: float
    idle_to_deleted: float
    extra: dict[str, Any] = field(default_factory=dict)


def cluster_data(interval: float, idle: float) -> dict[str, Any]:
    return {
        "ray_cluster": {
            "name": CLUSTER,
            "min_workers": 0,
            "max_workers": 1,
            "head_cpu": 1,
            "head_memory": 1,
            "head_ray_cpus": 0,
            "worker_cpu": 1,
            "worker_memory": 1,
            "ports": {"gcs": 0, "client": 0, "dashboard": 0},
            "startup_timeout": 300,
            "join_timeout": 300,
            "autoscaling": {"idle_timeout": idle},
            "environment": {"AUTOSCALER_UPDATE_INTERVAL_S": str(int(interval))},
        }
    }


class Timeline:
    """Polls the app list and the head's status every 0.1 s; first time each event is seen."""

    def __init__(self, client: Any, project_id: str) -> None:
        self.client = client
        self.project_id = project_id
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def mark(self, event: str) -> None:
        self.seen.setdefault(event, time.time())

    def _run(self) -> None:
        while not self._stop.is_set():
            apps = {a.subdomain: a for a in self.client.list_applications(self.project_id)}
            worker = apps.get(WORKER)
            if worker is not None:
                self.mark("created")
                if worker.status == "APPLICATION_RUNNING":
                    self.mark("running")
                    response = self.client.app_request(HEAD, "GET", "/ray-cai/status")
                    if response.status_code == 200 and any(
                        n.get("node_name") == WORKER and n.get("alive")
                        for n in response.json().get("nodes", [])
                    ):
                        self.mark("alive")
            elif "created" in self.seen:
                self.mark("deleted")
            self._stop.wait(0.1)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def one_cycle(client: Any, project_id: str, connect_env: dict[str, str], task_seconds: float) -> Cycle:
    from ray_serve_cai.waiting import poll_until

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CDSW_"))}
    with Timeline(client, project_id) as timeline:
        run = subprocess.run(
            [sys.executable, "-c", DRIVER, str(task_seconds)],
            env={**env, **connect_env},
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if run.returncode != 0:
            raise RuntimeError(f"driver failed: {run.stderr[-2000:]}")
        task = json.loads(run.stdout.strip().splitlines()[-1])
        poll_until(
            lambda: "deleted" in timeline.seen, timeout=600, interval=0.2, what="the idle worker deleted"
        )
    seen = timeline.seen
    return Cycle(
        reaction=round(seen["created"] - task["submitted"], 2),
        app_start=round(seen["running"] - seen["created"], 2),
        ray_join=round(seen["alive"] - seen["running"], 2),
        dispatch=round(task["started"] - seen["alive"], 2),
        demand_to_running=round(task["started"] - task["submitted"], 2),
        idle_to_deleted=round(seen["deleted"] - task["ended"], 2),
        extra={"node": task["node"]},
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--interval", type=float, default=5.0, help="AUTOSCALER_UPDATE_INTERVAL_S")
    parser.add_argument("--idle", type=float, default=20.0, help="idle_timeout (s)")
    parser.add_argument("--app-latency", type=float, default=3.0, help="injected app start latency (s)")
    parser.add_argument("--task-seconds", type=float, default=2.0)
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray_serve_cai.cluster import RayCluster, connect_info
    from ray_serve_cai.cml import CMLClient, CMLSettings
    from ray_serve_cai.config import parse_cluster_spec
    from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace
    from ray_serve_cai.workspace.testing import WorkspaceHandle

    commit = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    home = Path(tempfile.mkdtemp(prefix="ray-cai-bench-autoscale-"))
    cycles: list[Cycle] = []
    try:
        info = start_workspace(home / "workspace")
        handle = WorkspaceHandle(info)
        try:
            project = handle.create_project("bench-autoscale", git_url=str(args.repo), timeout=300)
            if project["creation_status"] != "success":
                raise RuntimeError(f"project from git: {project.get('error_message')}")
            spec = parse_cluster_spec(cluster_data(args.interval, args.idle), env={})
            settings = CMLSettings(host=handle.url, api_key=handle.api_key)
            with CMLClient(settings) as client:
                cluster = RayCluster(client, project["id"], spec, poll_interval=0.5)
                _, status = cluster.up()
                handle.set_latency(app_start_seconds=args.app_latency)
                connect_env = connect_info(status)["env"]
                try:
                    for i in range(args.repeat):
                        cycle = one_cycle(client, project["id"], connect_env, args.task_seconds)
                        cycles.append(cycle)
                        print(f"  cycle {i + 1}: {asdict(cycle)}", flush=True)
                finally:
                    handle.set_latency(app_start_seconds=0)
                    cluster.down()
        finally:
            handle.close()
            stop_workspace(home / "workspace")
    finally:
        shutil.rmtree(home, ignore_errors=True)

    keys = ("reaction", "app_start", "ray_join", "dispatch", "demand_to_running", "idle_to_deleted")
    print(
        f"\nautoscaling, median of {len(cycles)} cycles (update interval {args.interval:g} s, idle timeout "
        f"{args.idle:g} s, injected app start {args.app_latency:g} s):"
    )
    medians = {k: round(statistics.median(getattr(c, k) for c in cycles), 2) for k in keys}
    for key in keys:
        print(f"  {key:18} {medians[key]:7.2f} s   ({', '.join(f'{getattr(c, key):.2f}' for c in cycles)})")
    print(
        f"  target: reaction <= {args.interval:g} s + one list call: "
        f"{'PASS' if medians['reaction'] <= args.interval + 1.0 else 'FAIL'}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "commit": commit,
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                "settings": vars(args) | {"repo": str(args.repo), "out": str(args.out)},
                "cycles": [asdict(c) for c in cycles],
                "medians": medians,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"raw figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
