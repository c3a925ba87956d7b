"""Where the test suite's CPU goes: a command (by default the README's test command) run while every
process on the machine is sampled from /proc, its CPU time summed by kind of process.

On two cores the real-Ray tier is CPU-bound, so the suite's wall time follows the sum of this table
(issue 18). Each process is classed by its current command line (Ray renames its workers once they
hold an actor: `ray::ServeController`, `ray::ProxyActor`...), so a worker's time goes to what it does.

    python benchmarks/bench_suite_cpu.py                        # pytest -n 3 --dist loadgroup (~17 min)
    python benchmarks/bench_suite_cpu.py -- pytest tests/ray/test_quick_start_ray.py
    python benchmarks/bench_suite_cpu.py --out benchmarks/results/suite_cpu.json

Prints the busy core-seconds of the whole machine (from /proc/stat) beside the sum of the classes
(processes that began and ended between two samples are missed: the gap between the two), the wall
time, and the classes in order. Linux only; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_COMMAND = ["pytest", "-n", "3", "--dist", "loadgroup", "-q", "-p", "no:cacheprovider"]

CLI_CLASS = "ray-cai CLI"
CLI_ENTRY = re.compile(r"(?:ray_serve_cai\.cli\.main|bin/ray-cai)\s+(.*)")
TWO_WORD = ("serve", "job", "workspace", "config")  # commands with subcommands


# (class, pattern on the command line), first match wins; Ray's own processes by what they run.
CLASSES: list[tuple[str, str]] = [
    (CLI_CLASS, r"ray_serve_cai\.cli\.main|bin/ray-cai"),
    # The tests' zygote and the commands it forks (tests/support/cli_fork.py): its command line only.
    (f"{CLI_CLASS} (forked by the tests)", r"support\.cli_fork"),
    ("workspace server", r"ray_serve_cai\.workspace serve"),
    ("pod init", r"podinit\.py"),
    ("node launcher", r"ray_(head|worker)\.py|launch_ray_cluster|ray_serve_cai\.node\b"),
    ("Serve gateway / proxy", r"serve_proxy|ray_serve_cai\.node\.gateway|serve_tunnel"),
    ("setup job: pip", r"-m pip |pip/_vendor|setup_environment"),
    ("git", r"(^|/)git( |-)"),
    ("Ray: ray start", r"ray\.scripts\.scripts start"),
    ("Ray: dashboard", r"dashboard/dashboard\.py|ray-dashboard-|ray\.dashboard\.subprocesses"),
    ("Ray: dashboard agent", r"dashboard/agent\.py|ray::DashboardAgent"),
    ("Ray: runtime env agent", r"runtime_env/agent"),
    ("Ray: log monitor", r"log_monitor\.py"),
    ("Ray: autoscaler monitor", r"autoscaler/_private/monitor\.py"),
    ("Ray: client server", r"ray\.util\.client\.server"),
    ("Ray: GCS", r"gcs_server"),
    ("Ray: raylet", r"raylet/raylet"),
    ("Ray: Serve controller", r"ray::ServeController"),
    ("Ray: Serve proxies", r"ray::ProxyActor"),
    ("Ray: Serve replicas", r"ray::ServeReplica"),
    ("Ray: job supervisors", r"ray::JobSupervisor"),
    ("Ray: idle / other workers", r"^ray::|default_worker\.py|setup_worker\.py"),
    ("browser", r"chrom"),
    ("pytest", r"pytest|xdist|import sys;exec"),
    ("other python (jobs, drivers, apps)", r"python"),
]


def cli_command(command: str) -> str:
    """`ray-cai status --json ...` → `status`; `... job submit ...` → `job submit`."""
    match = CLI_ENTRY.search(command)
    words = [w for w in (match.group(1).split() if match else []) if not w.startswith("-")]
    if not words:
        return "(no command)"
    return " ".join(words[:2]) if words[0] in TWO_WORD and len(words) > 1 else words[0]


def classify(command: str) -> str:
    for name, pattern in CLASSES:
        if re.search(pattern, command):
            return name
    return "other"


def busy_ticks() -> int:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    # user nice system, then irq softirq steal: not idle, iowait, nor guest time (counted in user)
    return sum(fields[0:3]) + sum(fields[5:8])


class Sampler:
    """CPU ticks per class: every process's utime + stime, the growth since the last sample."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.seen: dict[tuple[str, str], int] = {}
        self.totals: Counter[str] = Counter()
        self.processes: dict[str, set[tuple[str, str]]] = {}  # each class's processes that used CPU
        self.cli_ticks: Counter[str] = Counter()  # the CLI's ticks by command
        self.cli_calls: dict[str, set[tuple[str, str]]] = {}  # ... and its processes
        self.stop = threading.Event()
        self.first = True

    def sample(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    text = stat.read()
                fields = text[text.rindex(")") + 2 :].split()
                ticks, key = int(fields[11]) + int(fields[12]), (pid, fields[19])
                before = self.seen.get(key, ticks if self.first else 0)
                self.seen[key] = ticks
                if ticks > before:
                    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                        command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
                    kind = classify(command or text[text.index("(") + 1 : text.rindex(")")])
                    self.totals[kind] += ticks - before
                    self.processes.setdefault(kind, set()).add(key)
                    if kind == CLI_CLASS:
                        name = cli_command(command)
                        self.cli_ticks[name] += ticks - before
                        self.cli_calls.setdefault(name, set()).add(key)
            except (OSError, ValueError, IndexError):
                continue  # the process ended meanwhile
        self.first = False

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)
        self.sample()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default 0.5)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("command", nargs="*", help="the command to measure (after --)")
    args = parser.parse_args()
    command = args.command or DEFAULT_COMMAND
    sampler = Sampler(args.interval)
    thread = threading.Thread(target=sampler.run, daemon=True)
    busy, started = busy_ticks(), time.monotonic()
    thread.start()
    code = subprocess.call(command)
    sampler.stop.set()
    thread.join(30)
    wall, machine = time.monotonic() - started, (busy_ticks() - busy) / TICKS
    classes = {name: round(ticks / TICKS, 1) for name, ticks in sampler.totals.most_common()}
    print(f"\n{' '.join(command)}: exit {code}, {wall:.0f} s wall, {machine:.0f} busy core-seconds "
          f"({machine / wall / (os.cpu_count() or 1):.0%} of {os.cpu_count()} cores), "
          f"{sum(classes.values()):.0f} in the classes below")  # fmt: skip
    print("  core-s  share   processes  class")
    for name, seconds in classes.items():
        print(f"  {seconds:8.1f}  {seconds / machine:5.1%}  {len(sampler.processes[name]):6d}  {name}")
    cli = {name: {"core_s": round(ticks / TICKS, 1), "processes": len(sampler.cli_calls[name])}
           for name, ticks in sampler.cli_ticks.most_common()}  # fmt: skip
    if cli:
        print(f"\n{CLI_CLASS} by command (core-s, processes that used CPU while sampled, core-s each):")
        for name, row in list(cli.items())[:15]:
            each = row["core_s"] / max(1, row["processes"])
            print(f"  {row['core_s']:8.1f}  {row['processes']:5d}  {each:5.2f}  {name}")
    if args.out:
        figures = {"command": command, "exit": code, "wall_s": round(wall, 1),
                   "busy_core_s": round(machine, 1), "cores": os.cpu_count(),
                   "classes_core_s": classes, "cli_by_command": cli,
                   "class_processes": {name: len(sampler.processes[name]) for name in classes}}  # fmt: skip
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
