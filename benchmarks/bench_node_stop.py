"""Real Ray: how long one node takes to stop (SIGTERM to its launcher → the launcher's exit).

Run by hand (not collected by pytest), under the real-Ray lock on a shared machine:

    flock /tmp/ray-heavy.lock python benchmarks/bench_node_stop.py [REPO]

Starts a head and one worker launcher (`cai_integration/ray_head.py` / `ray_worker.py` of REPO,
default this checkout) in a temporary project, as the local workspace would, waits until the
worker's `ray start` reports the node runs, then stops the worker and then the head and prints
each stop's seconds and exit code, the launcher's own "ended Ray in …, copied its logs in …"
lines, and how many log files each node copied. This script is the launchers' parent, so it reaps
them at once: on a machine whose pid 1 reaps orphans slowly, a shell's `kill; while kill -0`
measures that instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(repo: Path, project: Path, role: str, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CDSW_"))}
    env |= {
        "PYTHONPATH": str(repo),
        "CDSW_IP_ADDRESS": "127.0.0.1",
        "CDSW_APP_PORT": str(free_port()),
        "RAY_CAI_CLUSTER": "demo",
        "RAY_CAI_ROLE": role,
        "RAY_CAI_GROUP": "head" if role == "head" else "cpu",
        "RAY_CAI_NODE_NAME": name,
        "RAY_CAI_NUM_CPUS": "1",
        "RAY_CAI_MEMORY_GB": "1",
        "RAY_CAI_GCS_PORT": "0",
        "RAY_CAI_CLIENT_PORT": "0",
        "RAY_CAI_DASHBOARD_PORT": "0",
    }
    output = project / f"{name}.out"
    script = repo / "cai_integration" / ("ray_head.py" if role == "head" else "ray_worker.py")
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, str(script)], cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return process, output


def wait_for_text(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {text!r} in {path} after {timeout:g} s")
        time.sleep(0.1)


def main() -> int:
    repo = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO
    project = Path(tempfile.mkdtemp(prefix="bench-node-stop-"))
    started = time.monotonic()
    head, head_out = start(repo, project, "head", "ray-demo-head")
    worker = None
    try:
        wait_for_text(head_out, "rendezvous")
        worker, worker_out = start(repo, project, "worker", "ray-demo-cpu-0")
        wait_for_text(worker_out, "Ray runtime started")
        print(f"head + 1 worker up in {time.monotonic() - started:.2f} s (load {os.getloadavg()[0]:.2f})")
        time.sleep(2)
        for name, process, output in (("worker", worker, worker_out), ("head", head, head_out)):
            begun = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=30)
            print(f"{name} stop: {time.monotonic() - begun:.2f} s, exit code {code}")
            for line in output.read_text(errors="replace").splitlines():
                if "ended Ray in" in line:
                    print(f"  {line.strip()}")
        logs = project / ".ray-cai" / "demo" / "logs"
        print("log files copied:", {node.name: len(list(node.iterdir())) for node in logs.iterdir()})
    finally:
        for process in (worker, head):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
