"""What each part of the real-Ray tier costs: its modules run one set at a time, each measured by
`bench_suite_cpu.py` (busy core-seconds of the machine, by kind of process), with how many Ray nodes
and heads it started.

A set is what shares a cluster: the modules that take the shared `ray_cluster` run together, so do
those that take `pods_ray_cluster`; every other module is a set of its own. Alone on the machine,
a set's wall time is close to its uncontended floor (its waits: idle timeouts, partitions, restarts)
and its core-seconds are what it adds to the suite's sum, which on 2 cores sets the suite's time
(issue 18).

    python benchmarks/bench_suite_modules.py                     # every set (~25 min)
    python benchmarks/bench_suite_modules.py --only serve,autostop   # sets: shared, pods, node, serve, ...
    python benchmarks/bench_suite_modules.py --out benchmarks/results/bench_suite_modules.json

Linux only; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RAY_TIER = ROOT / "tests" / "ray"
SHARED_FIXTURES = {"pods_ray_cluster": "pods", "ray_cluster": "shared"}  # fixture → set name


def module_sets() -> dict[str, list[Path]]:
    """Set name → its modules: one set per shared cluster fixture, then every other module alone."""
    sets: dict[str, list[Path]] = {}
    for module in sorted(RAY_TIER.glob("test_*.py")):
        text = module.read_text()
        # a test or fixture that takes it: `(ray_cluster: LocalCluster` or `, ray_cluster: ...`
        fixture = next((f for f in SHARED_FIXTURES if re.search(rf"[(,]\s*{f}\s*:", text)), None)
        name = SHARED_FIXTURES[fixture] if fixture else module.stem.removeprefix("test_")
        name = name.removesuffix("_e2e").removesuffix("_ray")
        sets.setdefault(name, []).append(module)
    return sets


def measure(name: str, modules: list[Path], out_dir: Path) -> dict[str, Any]:
    out = out_dir / f"{name}.json"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
               *(str(m.relative_to(ROOT)) for m in modules)]  # fmt: skip
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_suite_cpu.py"), "--out", str(out), "--", *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if run.returncode != 0:  # what failed, as pytest said it
        print(f"{name}: exit {run.returncode}\n" + "\n".join(run.stdout.splitlines()[-80:]), file=sys.stderr)
    if not out.exists():
        return {"set": name, "modules": [m.name for m in modules], "error": "no figures written"}
    figures = json.loads(out.read_text())
    counts = figures.get("class_processes", {})
    return {
        "set": name,
        "modules": [m.name for m in modules],
        "exit": figures["exit"],
        "wall_s": round(time.monotonic() - started, 1),
        "busy_core_s": figures["busy_core_s"],
        "ray_starts": counts.get("Ray: ray start", 0),
        "heads": counts.get("Ray: GCS", 0),
        "classes_core_s": figures["classes_core_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="comma-separated set names (default: every set)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    sets = module_sets()
    chosen = args.only.split(",") if args.only else list(sets)
    unknown = [name for name in chosen if name not in sets]
    if unknown:
        print(f"--only: no set named {', '.join(unknown)} (sets: {', '.join(sets)})", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for name in chosen:
            row = measure(name, sets[name], Path(out_dir))
            rows.append(row)
            figures = {key: row.get(key) for key in ("exit", "wall_s", "busy_core_s", "ray_starts", "error")}
            print(f"{name}: {figures}", file=sys.stderr, flush=True)  # progress
    print(f"\n{'set':<18} {'exit':>4} {'wall s':>7} {'core-s':>7} {'nodes':>5} {'heads':>5}  modules")
    for row in rows:
        if "error" in row:
            print(f"{row['set']:<18} {row['error']}")
            continue
        print(f"{row['set']:<18} {row['exit']:>4} {row['wall_s']:>7.0f} {row['busy_core_s']:>7.0f} "
              f"{row['ray_starts']:>5} {row['heads']:>5}  {' '.join(row['modules'])}")  # fmt: skip
    wall, total = (sum(row.get(key, 0) for row in rows) for key in ("wall_s", "busy_core_s"))
    print(f"{'all':<18} {'':>4} {wall:>7.0f} {total:>7.0f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 1 if any(row.get("exit") != 0 for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
