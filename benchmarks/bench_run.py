"""Real Ray: what a cluster per run costs — `ray-cai run --local -- python -c ...` phase by phase.

Run by hand (not collected by pytest), from a checkout whose code is committed (the local project
is a clone of it):

    python benchmarks/bench_run.py            # --repeat 2 --workers 1

A local workspace in a temporary home. Each round runs a trivial job on a fresh cluster (1 head +
`--workers`), noting when each line of the tool's progress arrives: bring-up (run start → job
submitted), the job (submitted → its end), teardown (end → "tore down"), total; then how long the
project-file API takes to answer `job list --history` and `job logs` once the cluster is gone.
Writes the raw figures as JSON (`--out`) and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace  # noqa: E402

CLUSTER = "benchrun"
PROJECT = "bench-run"
RAY_CAI = [sys.executable, "-m", "ray_serve_cai.cli.main"]
CONFIG = """\
ray_cluster:
  name: {name}
  num_workers: {workers}
  head_cpu: 1
  head_memory: 1
  worker_cpu: 1
  worker_memory: 1
  ports: {{gcs: 0, client: 0, dashboard: 0}}
  startup_timeout: 600
"""
PHASES = {"submitted": "submitted job", "torn_down": "tore down cluster"}


def one_run(env: dict[str, str], config: Path, marker: str) -> dict[str, Any]:
    argv = [*RAY_CAI, "run", "--local", "--project", PROJECT, "--config", str(config)]
    head, tail = marker[:3], marker[3:]  # printed as a sum: Ray's echo of the entrypoint never holds it
    argv += ["--", "python", "-c", f"print('{head}' + '{tail}')"]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen: dict[str, float] = {}
    lines: list[str] = []
    output: list[str] = []

    def read_progress() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            for name, text in PHASES.items():
                if text in line and name not in seen:
                    seen[name] = time.monotonic() - started

    def read_output() -> None:  # the job's own line marks its end (it prints it last)
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            if marker in line and "ended" not in seen:
                seen["ended"] = time.monotonic() - started

    readers = [threading.Thread(target=fn, daemon=True) for fn in (read_progress, read_output)]
    for reader in readers:
        reader.start()
    proc.wait(timeout=1800)
    for reader in readers:
        reader.join(5)
    total = time.monotonic() - started
    if proc.returncode != 0 or "ended" not in seen:
        raise SystemExit(f"run failed (exit {proc.returncode}):\n{''.join(lines)[-3000:]}")
    job_id = next(line.split()[2] for line in lines if "submitted job" in line)
    return {
        "job_id": job_id,
        "bring_up_s": round(seen["submitted"], 1),
        "job_s": round(seen["ended"] - seen["submitted"], 1),
        "teardown_s": round(seen["torn_down"] - seen["ended"], 1),
        "total_s": round(total, 1),
    }


def history_reads(env: dict[str, str], job_id: str) -> dict[str, float]:
    timings = {}
    for name, args in (
        ("job_list_history_s", ["job", "list", "--history", "--json"]),
        ("job_logs_s", ["job", "logs", job_id]),
    ):
        started = time.monotonic()
        proc = subprocess.run(
            [*RAY_CAI, *args, "--local", "--project", PROJECT, "--cluster", CLUSTER],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"{args}: {proc.stderr}")
        timings[name] = round(time.monotonic() - started, 2)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_run.json")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-run-"))
    config = home / "cluster.yaml"
    config.write_text(CONFIG.format(name=CLUSTER, workers=args.workers))
    start_workspace(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_"))}
    env.update(RAY_CAI_WORKSPACE_HOME=str(home), NO_COLOR="1")
    rounds: list[dict[str, Any]] = []
    try:
        for i in range(args.repeat):
            result = one_run(env, config, f"BENCH-{i}")
            result.update(history_reads(env, result["job_id"]))
            rounds.append(result)
            print(json.dumps(result), flush=True)
    finally:
        stop_workspace(home)
    summary = {
        key: statistics.median(r[key] for r in rounds)
        for key in ("bring_up_s", "job_s", "teardown_s", "total_s", "job_list_history_s", "job_logs_s")
    }
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "workers": args.workers,
        "rounds": rounds,
        "median": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
