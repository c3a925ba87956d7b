"""`ray-cai doctor`'s probe job (stdlib only): from its own pod it checks what the probe application
offers — TCP to the app's pod IP on Ray's ports, `flock` across pods, atomic rename across pods —
and times fsync on the project filesystem, saying which filesystem that is. Writes
`.ray-cai-doctor/job-result.json`; the doctor downloads it through CML's file API.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import statistics
import time
from pathlib import Path

STATE = Path(".ray-cai-doctor")
APP_WAIT_SECONDS = 120.0


def wait_for_app() -> dict[str, object]:
    deadline = time.monotonic() + APP_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            return json.loads((STATE / "app.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
    raise SystemExit(
        f"the probe application did not write {STATE / 'app.json'} within {APP_WAIT_SECONDS:.0f}s"
    )


def tcp(ip: str, ports: dict[str, int]) -> dict[str, str]:
    results = {}
    for wanted, actual in ports.items():
        try:
            with socket.create_connection((ip, int(actual)), timeout=5) as connection:
                connection.settimeout(5)
                banner = connection.recv(64)
            results[wanted] = (
                "ok" if banner.startswith(b"ray-cai-doctor") else f"unexpected answer {banner[:20]!r}"
            )
        except OSError as error:
            results[wanted] = f"{type(error).__name__}: {error}"
    return results


def flock_is_exclusive() -> bool:
    """True when the app's lock (held in another pod) keeps this pod out."""
    with open(STATE / "lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def rename_reads(rounds: int = 300) -> dict[str, int]:
    """Read the file the app keeps replacing: every read must be one whole version."""
    torn = versions = 0
    last = -1
    for _ in range(rounds):
        try:
            counter = int(json.loads((STATE / "rename.json").read_text())["counter"])
        except (OSError, ValueError, KeyError):
            torn += 1
        else:
            versions += counter != last
            last = counter
        time.sleep(0.003)
    return {"reads": rounds, "torn": torn, "versions": versions}


def fsync_latency(rounds: int = 50) -> dict[str, float]:
    """Small write + fsync, as RocksDB's WAL does for every GCS write (head fault tolerance)."""
    times = []
    path = STATE / "fsync.bin"
    with open(path, "wb") as handle:
        for _ in range(rounds):
            handle.write(os.urandom(4096))
            started = time.perf_counter()
            handle.flush()
            os.fsync(handle.fileno())
            times.append((time.perf_counter() - started) * 1000)
    path.unlink()
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
        "max_ms": round(max(times), 2),
    }


def project_filesystem() -> dict[str, str]:
    """The filesystem the project directory (the working directory) is on: its mount point, type
    (RocksDB, the GCS store of head fault tolerance, is tested upstream on ext4 only) and options."""
    here = os.path.realpath(".")
    found = {"mount": "", "type": "?", "options": ""}
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 4:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = here == point or here.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(found["mount"]):
                    found = {"mount": point, "type": fields[2], "options": fields[3]}
    except OSError:
        pass
    return found


def main() -> None:
    app = wait_for_app()
    result = {
        "job_ip": os.environ.get("CDSW_IP_ADDRESS"),
        "app_ip": app["ip"],
        "ports": app["ports"],  # wanted → the one the app got (a shared host may have taken some)
        "tcp": tcp(str(app["ip"]), dict(app["ports"])),  # type: ignore[arg-type]
        "flock_exclusive": flock_is_exclusive(),
        "rename": rename_reads(),
        "fsync": fsync_latency(),
        "filesystem": project_filesystem(),
    }
    temporary = STATE / ".job-result.json.tmp"
    temporary.write_text(json.dumps(result))
    os.replace(temporary, STATE / "job-result.json")


if __name__ == "__main__":
    main()
