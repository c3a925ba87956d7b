"""Real Ray: how fast a job's log lines arrive through the head's application URL versus directly.

Run by hand (not collected by pytest), from a checkout whose node layer is committed:

    python benchmarks/bench_jobs.py            # --repeat 3 --lines 20 --interval 0.5

A local workspace (temporary home) and a head-only cluster (`ray-cai up --local`). A job prints
`STAMP <i> <time.time()>` every `--interval` seconds; the follower (the WebSocket tail
`/api/jobs/<id>/logs/tail` with the `websockets` client, the code path of `ray-cai job submit`) notes
when each line arrives. Same host, same clock: latency = arrival - stamp. Two paths, interleaved:

* app URL: the workspace's app listener -> the head's HTTP server (`_proxy.py`) -> the dashboard,
  with `Authorization: Bearer <workspace key>` (what a laptop or a CI runner does);
* direct: the dashboard port on loopback with `X-Ray-Authorization: Bearer <Ray token>`.

Both include Ray's own log polling (the job agent re-reads the driver log about once a second), so
the difference between them is what the door costs. Also: submit -> first line. Writes the raw
figures as JSON (`--out`) and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from ray_serve_cai.cml import CMLClient, CMLSettings  # noqa: E402
from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace  # noqa: E402
from ray_serve_cai.workspace.testing import WorkspaceHandle  # noqa: E402

CLUSTER = "benchjobs"
PROJECT = "bench-jobs"
CONFIG = f"""\
ray_cluster:
  name: {CLUSTER}
  num_workers: 0
  head_cpu: 1
  head_memory: 1
  ports: {{gcs: 0, client: 0, dashboard: 0}}
  startup_timeout: 300
"""
JOB = (
    "import time\n"
    "for i in range({n}):\n"
    "    print(f'STAMP {{i}} {{time.time():.6f}}', flush=True)\n"
    "    time.sleep({s})\n"
)


def follow(base: str, headers: dict[str, str], lines: int, interval: float) -> dict[str, Any]:
    """Submit the stamping job at `base` and follow it over the WebSocket tail."""
    from websockets.exceptions import ConnectionClosedOK
    from websockets.sync.client import connect

    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    body = {
        "entrypoint": f"python -c {shlex.quote(JOB.format(n=lines, s=interval))}",
        "submission_id": job_id,
    }
    with httpx.Client(base_url=base, headers=headers, timeout=30, trust_env=False) as http:
        submitted = time.time()
        http.post("/api/jobs/", json=body).raise_for_status()
    latencies: list[float] = []
    first_line_after = None
    buffer = ""
    ws_url = base.replace("http://", "ws://", 1) + f"/api/jobs/{job_id}/logs/tail"
    with connect(ws_url, additional_headers=headers, proxy=None, max_size=None, compression=None) as ws:
        while len(latencies) < lines:
            try:
                chunk = ws.recv(timeout=120)
            except ConnectionClosedOK:
                with httpx.Client(base_url=base, headers=headers, timeout=30, trust_env=False) as http:
                    job = http.get(f"/api/jobs/{job_id}").json()
                    logs = http.get(f"/api/jobs/{job_id}/logs").json()["logs"]
                seen = f"{len(latencies)} lines, job {job['status']}: {job['message']}"
                raise RuntimeError(f"the tail closed early: {seen}\n{logs}") from None
            arrived = time.time()
            buffer += chunk if isinstance(chunk, str) else chunk.decode()
            *complete, buffer = buffer.split("\n")
            for line in complete:
                if line.startswith("STAMP "):
                    _, _, stamp = line.split()
                    latencies.append(arrived - float(stamp))
                    if first_line_after is None:
                        first_line_after = arrived - submitted
    return {"job": job_id, "first_line_after_submit_s": first_line_after, "latencies_s": latencies}


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    latencies = sorted(x for run in runs for x in run["latencies_s"])
    return {
        "lines": len(latencies),
        "latency_median_s": statistics.median(latencies),
        "latency_p95_s": latencies[int(0.95 * (len(latencies) - 1))],
        "latency_max_s": latencies[-1],
        "first_line_median_s": statistics.median(r["first_line_after_submit_s"] for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lines", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_jobs.json")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    config = home / "ray_cluster_config.yaml"
    config.write_text(CONFIG)
    info = start_workspace(home)
    handle = WorkspaceHandle(info)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_"))}
    env["RAY_CAI_WORKSPACE_HOME"] = str(home)
    target = ["--local", "-p", PROJECT, "-c", str(config)]
    cli = [sys.executable, "-m", "ray_serve_cai.cli.main"]
    results: dict[str, list[dict[str, Any]]] = {"app URL": [], "direct": []}
    try:
        up = subprocess.run(
            [*cli, "up", *target, "--json"], cwd=REPO, env=env, capture_output=True, text=True
        )
        if up.returncode != 0:
            print(up.stderr, file=sys.stderr)
            return 1
        project_id = json.loads(up.stdout)["status"]["project_id"]
        with CMLClient(CMLSettings(host=info.url, api_key=info.api_key)) as client:
            head = next(a for a in client.list_applications(project_id) if a.name == f"ray-{CLUSTER}-head")
            app_url = client.app_url(head)
        state = handle.project_dir(project_id) / ".ray-cai" / CLUSTER
        dashboard = f"http://127.0.0.1:{json.loads((state / 'head.json').read_text())['dashboard_port']}"
        token = (state / "auth_token").read_text().strip()
        paths = {
            "app URL": (app_url, {"Authorization": f"Bearer {info.api_key}"}),
            "direct": (dashboard, {"X-Ray-Authorization": f"Bearer {token}"}),
        }
        for _ in range(args.repeat):
            for name, (base, headers) in paths.items():
                results[name].append(follow(base, headers, args.lines, args.interval))
    finally:
        subprocess.run([*cli, "down", *target], cwd=REPO, env=env, capture_output=True, text=True)
        handle.close()
        stop_workspace(home)

    figures = {name: summary(runs) for name, runs in results.items()}
    print(f"{'path':<10} {'lines':>5} {'median':>8} {'p95':>8} {'max':>8} {'submit->1st':>12}")
    for name, f in figures.items():
        print(
            f"{name:<10} {f['lines']:>5} {f['latency_median_s']:>7.3f}s {f['latency_p95_s']:>7.3f}s "
            f"{f['latency_max_s']:>7.3f}s {f['first_line_median_s']:>11.2f}s"
        )
    overhead = figures["app URL"]["latency_median_s"] - figures["direct"]["latency_median_s"]
    print(f"median log-line latency added by the app URL: {overhead * 1000:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "options": {"repeat": args.repeat, "lines": args.lines, "interval": args.interval},
                "figures": figures,
                "runs": results,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
