"""Head fault tolerance with real Ray in pods: from a head kill to ready, and to the first call that
needs the GCS, over N runs.

Run by hand (not collected by pytest), as root on Linux (pods), from a checkout whose code is
committed (the project is a clone of it):

    python benchmarks/bench_head_ft.py --runs 5            # --mode pod|in-place|both (default both)

A private pods workspace (temporary home; CML's automatic restart of failed applications on, with a
`--restart-delay` of 2 s instead of CML's 300 s, which would only add itself) gets a 1 head
(`head_ray_cpus: 0`) + 2 workers cluster. A probe job (its driver on a worker, as ray-cai places it)
writes and reads the GCS's internal KV every 0.1 s — GCS calls, through the worker's relay — calls
a detached actor on a worker, and appends the time of each success to a file in the project. Each run:

* `pod`: SIGKILL every process of the head application; the workspace restarts it in a new pod
  (new IP) after the delay;
* `in-place`: SIGKILL Ray's GCS and raylet on the head; its launcher starts them again in the pod;

and measures kill → the head's `/ray-cai/status` answers with 3 alive nodes (ready), and kill → the
probe's first success after the kill. Prints the figures and the load, writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace  # noqa: E402
from ray_serve_cai.workspace.processes import WORKLOAD_MARKER, processes_with_marker  # noqa: E402
from ray_serve_cai.workspace.testing import WorkspaceHandle  # noqa: E402

DEFAULT_OUT = HERE / "results" / "bench_head_ft.json"
CLUSTER = "hftb"
PROJECT = "ray-cai-bench-head-ft"
HEAD = f"ray-{CLUSTER}-head"
CONFIG = f"""\
ray_cluster:
  name: {CLUSTER}
  num_workers: 2
  head_cpu: 1
  head_memory: 1
  head_ray_cpus: 0
  worker_cpu: 1
  worker_memory: 1
  startup_timeout: 600
  cml_restart_wait: 0
  join_timeout: 600
"""
PROBE = textwrap.dedent(
    """
    import os, time, ray
    ray.init()

    @ray.remote(num_cpus=1)  # the head has no CPU: the probe lives on a worker
    class Probe:
        def ping(self):
            return 1

    Probe.options(name="probe", namespace="bench", lifetime="detached", get_if_exists=True).remote()
    out = open(os.path.join(os.environ["BENCH_DIR"], "probe.log"), "a", buffering=1)
    end = time.time() + float(os.environ["BENCH_SECONDS"])
    from ray.experimental import internal_kv

    while time.time() < end:
        try:
            # A write and a read of the GCS's KV: RPCs to the GCS itself (while it is down they wait
            # for it, through this worker's relay); then a call of the detached actor on a worker.
            internal_kv._internal_kv_put(b"bench-probe", str(time.time()).encode(), overwrite=True)
            assert internal_kv._internal_kv_get(b"bench-probe")
            actor = ray.get_actor("probe", namespace="bench")
            ray.get(actor.ping.remote(), timeout=5)
            out.write(f"{time.time()}\\n")
        except Exception:
            pass
        time.sleep(0.1)
    """
)


def ray_cai(
    env: dict[str, str], config: Path, *args: str, tail: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "ray_serve_cai.cli.main", *args, "--local", "--project", PROJECT]
    command += ["--config", str(config), *(tail or [])]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def head_app(workspace: WorkspaceHandle, project_id: str) -> dict[str, Any]:
    apps = workspace.api_ok("GET", f"/api/v2/projects/{project_id}/applications", params={"page_size": 100})
    return next(a for a in apps["applications"] if a["subdomain"] == HEAD)


def ready(workspace: WorkspaceHandle, project_id: str) -> bool:
    try:
        app = head_app(workspace, project_id)
        if app["status"] != "APPLICATION_RUNNING":
            return False
        response = workspace.app_request(app, "GET", "/ray-cai/status", timeout=5)
        return response.status_code == 200 and response.json().get("alive_nodes") == 3
    except Exception:
        return False


def victims(workspace: WorkspaceHandle, project_id: str, mode: str) -> list[psutil.Process]:
    found = processes_with_marker(WORKLOAD_MARKER, head_app(workspace, project_id)["id"])
    if mode == "in-place":
        found = [p for p in found if p.name() in ("gcs_server", "raylet")]
    return found


def successes(path: Path) -> list[float]:
    with contextlib.suppress(OSError):
        return [float(line) for line in path.read_text().split()]
    return []


def one_run(
    workspace: WorkspaceHandle, project_id: str, mode: str, probe_log: Path, timeout: float
) -> dict[str, Any]:
    processes = victims(workspace, project_id, mode)
    killed = time.time()
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGKILL)
    time.sleep(1)  # the GCS is gone well before this (SIGKILL)
    deadline = time.monotonic() + timeout
    ready_at = None
    while time.monotonic() < deadline and ready_at is None:
        if ready(workspace, project_id):
            ready_at = time.time()
        time.sleep(0.25)
    first_call = None
    while time.monotonic() < deadline and first_call is None:
        after = [t for t in successes(probe_log) if t > killed + 1.0]
        first_call = after[0] if after else None
        time.sleep(0.25)
    return {
        "mode": mode,
        "killed": len(processes),
        "to_ready_s": None if ready_at is None else round(ready_at - killed, 1),
        "to_first_gcs_call_s": None if first_call is None else round(first_call - killed, 1),
        "load": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mode", choices=("pod", "in-place", "both"), default="both")
    parser.add_argument(
        "--restart-delay", type=float, default=2.0, help="the workspace's (CML's) restart delay"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="per run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-head-ft-"))
    # One automatic restart per killed head, and some to spare (CML's budget is 3 per failure streak).
    attempts = args.runs * 2 + 3
    info = start_workspace(
        home, app_restart=True, app_restart_attempts=attempts, app_restart_delay=args.restart_delay, pods=True
    )
    workspace = WorkspaceHandle(info)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_"))}
    env["RAY_CAI_WORKSPACE_HOME"] = str(home)
    config = home / "ray_cluster_config.yaml"
    config.write_text(CONFIG)
    modes = ["pod", "in-place"] if args.mode == "both" else [args.mode]
    results: list[dict[str, Any]] = []
    try:
        up = ray_cai(env, config, "up", "--timeout", "1200", "--json")
        if up.returncode != 0:
            print(up.stderr[-3000:], file=sys.stderr)
            return 1
        project_id = json.loads(up.stdout)["status"]["project_id"]
        bench_dir = workspace.project_dir(project_id) / ".bench"
        bench_dir.mkdir(exist_ok=True)
        seconds = args.runs * len(modes) * (args.timeout + 60)
        submitted = ray_cai(
            env, config, "job", "submit", "--no-wait", "--json",
            "--metadata", f"bench={CLUSTER}",
            tail=["--", "env", f"BENCH_DIR={bench_dir}", f"BENCH_SECONDS={seconds}", "python", "-c", PROBE],
        )  # fmt: skip
        if submitted.returncode != 0:
            print(submitted.stderr[-3000:], file=sys.stderr)
            return 1
        probe_log = bench_dir / "probe.log"
        deadline = time.monotonic() + 300
        while not successes(probe_log):
            if time.monotonic() > deadline:
                print("the probe job never succeeded once", file=sys.stderr)
                return 1
            time.sleep(1)
        for index in range(args.runs):
            for mode in modes:
                settle = time.monotonic() + args.timeout
                while not ready(workspace, project_id):
                    if time.monotonic() > settle:
                        raise SystemExit(f"the cluster was not ready {args.timeout:.0f}s after run {index}")
                    time.sleep(1)
                time.sleep(3)
                result = one_run(workspace, project_id, mode, probe_log, args.timeout)
                results.append(result)
                print(f"run {index + 1} {mode}: {result}", flush=True)
    finally:
        ray_cai(env, config, "down")
        workspace.close()
        stop_workspace(home)
        shutil.rmtree(home, ignore_errors=True)
    summary: dict[str, Any] = {}
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        for key in ("to_ready_s", "to_first_gcs_call_s"):
            values = [r[key] for r in rows if r[key] is not None]
            if values:
                summary[f"{mode} {key}"] = {
                    "median": round(statistics.median(values), 1), "min": min(values), "max": max(values),
                    "n": len(values), "failed": len(rows) - len(values),
                }  # fmt: skip
    report = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "restart_delay_s": args.restart_delay,
              "runs": results, "summary": summary}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
