"""Real Ray autostop on the local workspace: from idle to stopped, and from stopped to ready again.

Run by hand (not collected by pytest), from a checkout whose autostop code is committed:

    python benchmarks/bench_autostop.py              # --idle 20 --interval 2 --repeat 2

A private local workspace (temporary home) gets a project cloned from this repository; `up` creates
a head + 1 worker cluster (1 CPU, 1 GiB each) whose config says `autostop: {idle_timeout: 3600,
check_interval: INTERVAL}`; then, `--repeat` times:

* the idle timeout is set to `--idle` on the running cluster (`set_autostop`, what `ray-cai autostop
  --idle` does: nothing restarts);
* a 3 s job runs through the head's app URL (Ray's Jobs REST); its end is the last busy moment;
* idle → stopped: the job ended → every application of the cluster STOPPED (the list is polled
  every 0.2 s). Expected: the idle timeout + at most one check interval + the stop itself;
* stopped → ready: `RayCluster.up()` (clears the stopped mark, restarts every app) until Ray reports
  every node alive.

Prints the figures and writes them as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "bench_autostop.json"
CLUSTER = "sbench"
HEAD = f"ray-{CLUSTER}-head"


def cluster_data(interval: float) -> dict[str, Any]:
    return {
        "ray_cluster": {
            "name": CLUSTER,
            "num_workers": 1,
            "head_cpu": 1,
            "head_memory": 1,
            "worker_cpu": 1,
            "worker_memory": 1,
            "ports": {"gcs": 0, "client": 0, "dashboard": 0},
            "startup_timeout": 600,
            "cml_restart_wait": 0,
            "autostop": {"idle_timeout": 3600, "check_interval": interval},
        }
    }


def all_stopped(client: Any, project_id: str) -> bool:
    apps = [
        a
        for a in client.list_applications(project_id)
        if (a.environment or {}).get("RAY_CAI_CLUSTER") == CLUSTER
    ]
    return bool(apps) and all(a.status == "APPLICATION_STOPPED" for a in apps)


def run_job(client: Any, seconds: float) -> None:
    from ray_serve_cai.access.head import AppEndpoint
    from ray_serve_cai.access.jobs import JobsClient, JobSubmission

    endpoint = AppEndpoint.from_client(client, client.app_url(HEAD))
    with JobsClient(endpoint) as jobs:
        job_id = jobs.submit(JobSubmission(entrypoint=f"python -c 'import time; time.sleep({seconds})'"))
        deadline = time.monotonic() + 120
        while not jobs.get(job_id).is_terminal:
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} did not end within 120 s")
            time.sleep(0.2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=20.0, help="the idle timeout set on the cluster (s)")
    parser.add_argument("--interval", type=float, default=2.0, help="the head's check interval (s)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray_serve_cai.cluster import ClusterError, RayCluster
    from ray_serve_cai.cluster.autostop import set_autostop
    from ray_serve_cai.cml import CMLClient, CMLSettings
    from ray_serve_cai.config import AutostopSpec, parse_cluster_spec
    from ray_serve_cai.waiting import poll_until
    from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace
    from ray_serve_cai.workspace.testing import WorkspaceHandle

    commit = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    home = Path(tempfile.mkdtemp(prefix="ray-cai-bench-autostop-"))
    rounds: list[dict[str, float]] = []
    failed: list[str] = []
    first_up = 0.0
    try:
        info = start_workspace(home / "workspace", app_restart=False)
        handle = WorkspaceHandle(info)
        try:
            project = handle.create_project("bench-autostop", git_url=str(args.repo), timeout=300)
            if project["creation_status"] != "success":
                raise RuntimeError(f"project from git: {project.get('error_message')}")
            pid = project["id"]
            spec = parse_cluster_spec(cluster_data(args.interval), env={})
            with CMLClient(CMLSettings(host=handle.url, api_key=handle.api_key)) as client:
                cluster = RayCluster(client, pid, spec, poll_interval=0.5)
                try:
                    started = time.monotonic()
                    cluster.up()
                    first_up = time.monotonic() - started
                    print(f"first up: {first_up:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
                    for i in range(args.repeat):
                        set_autostop(
                            client,
                            pid,
                            CLUSTER,
                            AutostopSpec(idle_timeout=args.idle, check_interval=args.interval),
                        )
                        run_job(client, 3.0)
                        idle_from = time.monotonic()
                        poll_until(
                            lambda: all_stopped(client, pid),
                            timeout=args.idle + 10 * args.interval + 120,
                            interval=0.2,
                            what="every application STOPPED",
                        )
                        idle_to_stopped = time.monotonic() - idle_from
                        # before `up`: a long timeout again, so the bring-up itself is never cut short
                        set_autostop(
                            client,
                            pid,
                            CLUSTER,
                            AutostopSpec(idle_timeout=3600, check_interval=args.interval),
                        )
                        started = time.monotonic()
                        try:
                            cluster.up()  # waits until ready, else raises
                        except ClusterError as err:  # e.g. a Ray start timing out on a loaded machine
                            failed.append(
                                f"round {i + 1}: up after the stop failed: {str(err).splitlines()[0]}"
                            )
                            print(f"  {failed[-1]} (idle → stopped was {idle_to_stopped:.2f} s)", flush=True)
                            break
                        stop_to_ready = time.monotonic() - started
                        figures = {
                            "idle_to_stopped": round(idle_to_stopped, 2),
                            "stopped_to_ready": round(stop_to_ready, 2),
                        }
                        rounds.append(figures)
                        print(f"  round {i + 1}: {figures} (load {os.getloadavg()[0]:.2f})", flush=True)
                finally:
                    cluster.down()
        finally:
            handle.close()
            stop_workspace(home / "workspace")
    finally:
        shutil.rmtree(home, ignore_errors=True)

    medians = {
        k: round(statistics.median(r[k] for r in rounds), 2) for k in ("idle_to_stopped", "stopped_to_ready")
    }
    print(
        f"\nautostop, median of {len(rounds)} rounds "
        f"(idle timeout {args.idle:g} s, check interval {args.interval:g} s):"
    )
    print(f"  idle → every app STOPPED   {medians['idle_to_stopped']:6.1f} s   (timeout + check + the stop)")
    print(f"  stopped → up → ready       {medians['stopped_to_ready']:6.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "commit": commit,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "idle_timeout": args.idle,
                "check_interval": args.interval,
                "first_up": round(first_up, 2),
                "rounds": rounds,
                "failed": failed,
                "medians": medians,
                "cpus": os.cpu_count(),
            },
            indent=2,
        )
        + "\n"
    )
    ok = medians["idle_to_stopped"] <= args.idle + args.interval + 30
    print(f"  target: idle → stopped <= timeout + one check + 30 s for the stop: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
