"""CPU cost of one `ray-cai` invocation (issue 18: the suite runs the CLI hundreds of times on 2 cores).

Run by hand (not collected by pytest):

    python benchmarks/bench_cli.py [--repeat 10] [--baseline /work/main] [--forked] [--out FILE]

Starts a local workspace in a temporary home (`RAY_CAI_WORKSPACE_HOME` points there, so nothing
touches the default one), creates nothing in it, and runs each command below `--repeat` times (after
one warm-up run) as `python -m ray_serve_cai.cli.main`, one after another. They run in a temporary
directory holding copies of the repository's `ray_cluster_config.yaml` and
`cai_integration/jobs_config.yaml`, not in the repository: `python -m` puts the working directory
first on the import path. Per command: the mean and median user + sys CPU seconds of the child
(deltas of `getrusage(RUSAGE_CHILDREN)`, its own children included) and the mean wall time. As in
the suite (tests/conftest.py), the children read bytecode from a cache of their own
(`PYTHONPYCACHEPREFIX` in the temporary directory), even where the environment says
PYTHONDONTWRITEBYTECODE. With `--baseline TREE` each command also runs with `PYTHONPATH=TREE`
(another checkout, e.g. the main branch) against the same workspace, interleaved with this tree's.
With `--forked` each command also runs as the test suite runs it: forked from a zygote that has
imported the CLI's libraries (`tests/support/cli_fork.py`), tree `forked`. A forked command is not a
child this process waits for, so every row also gives the machine's busy CPU seconds per run
(`/proc/stat`: the workspace server's share of the command included; meaningful on a quiet machine).

| command | what it exercises |
|---|---|
| `--help` | every command group registered |
| `check --local --json` | the workspace's address from its state file, one API call |
| `status --local --json --project bench-missing` | config validated, project lookup, exit 1 |
| `status --json --project bench-missing` (CML_HOST/CML_API_KEY set) | as the tests call it |
| `serve status --local --json --project bench-missing` | also Serve's config schema (Ray imported) |
| `config validate --json` | both config files, no workspace |

Stops the workspace, and every process it started, before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "tests"))

from bench_suite_cpu import TICKS, busy_ticks  # noqa: E402  (this script's own folder)
from support import cli_fork  # noqa: E402

from ray_serve_cai.workspace.daemon import start_workspace, stop_workspace  # noqa: E402

FORKED = "forked"  # the tree label of runs forked from the tests' zygote

MISSING_PROJECT = "bench-missing"  # never created: `status` fails fast with a clear error (exit 1)

# (label, arguments, with CML_HOST/CML_API_KEY in the environment, expected exit codes)
COMMANDS: list[tuple[str, list[str], bool, set[int]]] = [
    ("--help", ["--help"], False, {0}),
    ("check --local --json", ["check", "--local", "--json"], False, {0}),
    (
        "status --local --json --project X",
        ["status", "--local", "--json", "--project", MISSING_PROJECT],
        False,
        {1},
    ),
    ("status --json --project X (CML_HOST)", ["status", "--json", "--project", MISSING_PROJECT], True, {1}),
    (
        "serve status --local --json --project X",
        ["serve", "status", "--local", "--json", "--project", MISSING_PROJECT],
        False,
        {1},
    ),
    ("config validate --json", ["config", "validate", "--json"], False, {0}),
]


def _busy() -> float:
    """Busy CPU seconds of the whole machine so far (bench_suite_cpu's count of /proc/stat)."""
    return busy_ticks() / TICKS


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _env(tree: Path, home: Path, cml: dict[str, str] | None) -> dict[str, str]:
    """As the suite runs the CLI (tests/conftest.py): compiled bytecode read from a cache of its own
    even where the environment says PYTHONDONTWRITEBYTECODE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(
        PYTHONPATH=str(tree),
        PYTHONPYCACHEPREFIX=str(home.parent / "pycache"),
        RAY_CAI_WORKSPACE_HOME=str(home),
        COLUMNS="200",
    )
    env.update(cml or {})
    return env


def _run_once(
    args: list[str], cwd: Path, env: dict[str, str], expected: set[int], forked: bool
) -> tuple[float, float, float]:
    """CPU seconds (user + sys) of the child, the machine's busy seconds and the wall seconds of one
    invocation (a forked one: no child CPU of ours, 0)."""
    cpu_before, busy_before, started = _cpu_children(), _busy(), time.perf_counter()
    if forked:
        zygote = cli_fork.zygote_for(env)
        if zygote is None:
            raise RuntimeError("no zygote forks with this environment (RAY_CAI_TEST_FORK=0?)")
        done = zygote.run(args, cwd=cwd, env=env, timeout=120)
    else:
        done = cli_fork.execute(args, cwd=cwd, env=env, timeout=120)
    wall, cpu = time.perf_counter() - started, _cpu_children() - cpu_before
    busy = _busy() - busy_before
    if done.returncode not in expected:
        raise RuntimeError(f"ray-cai {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return cpu, busy, wall


def measure(
    trees: dict[str, Path], home: Path, cwd: Path, cml: dict[str, str], repeat: int
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for label, args, with_cml, expected in COMMANDS:
        samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
        envs = {name: _env(tree, home, cml if with_cml else None) for name, tree in trees.items()}
        for name, env in envs.items():  # one warm-up run each (page cache, .pyc files)
            _run_once(args, cwd, env, expected, name == FORKED)
        for _ in range(repeat):
            for name, env in envs.items():
                samples[name].append(_run_once(args, cwd, env, expected, name == FORKED))
        for name, runs in samples.items():
            cpu, busy, wall = [c for c, _, _ in runs], [b for _, b, _ in runs], [w for _, _, w in runs]
            rows.append({
                "command": label,
                "tree": name,
                "cpu_s_mean": statistics.mean(cpu),
                "cpu_s_median": statistics.median(cpu),
                "cpu_s_stdev": statistics.stdev(cpu) if len(cpu) > 1 else 0.0,
                "machine_busy_s_mean": statistics.mean(busy),
                "wall_s_mean": statistics.mean(wall),
                "runs": len(runs),
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="runs of each command (after one warm-up)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to compare with")
    parser.add_argument("--forked", action="store_true", help="also forked, as the tests run it")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    options = parser.parse_args(argv)

    trees = {"this": REPO}
    if options.baseline is not None:
        trees["baseline"] = options.baseline.resolve()
    if options.forked:
        trees[FORKED] = REPO
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as temporary:
        home, cwd = Path(temporary) / "workspace", Path(temporary) / "checkout"
        (cwd / "cai_integration").mkdir(parents=True)
        for name in ("ray_cluster_config.yaml", "cai_integration/jobs_config.yaml"):
            shutil.copy(REPO / name, cwd / name)
        os.environ["RAY_CAI_WORKSPACE_HOME"] = str(home)
        os.environ["PYTHONPATH"] = str(REPO)  # the workspace server of this tree, too
        # ... and the zygote of `--forked` starts with the interpreter settings `_env` gives a command
        os.environ["PYTHONPYCACHEPREFIX"] = str(home.parent / "pycache")
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        info = start_workspace(home, app_restart=False)
        try:
            cml = {"CML_HOST": info.url, "CML_API_KEY": info.api_key}
            started, load_before = time.monotonic(), os.getloadavg()[0]
            rows = measure(trees, home, cwd, cml, options.repeat)
            elapsed, load_after = time.monotonic() - started, os.getloadavg()[0]
        finally:
            stop_workspace(home)

    print(f"{'command':<40} {'tree':<9} {'CPU s':>7} {'±':>6} {'median':>7} {'busy s':>7} {'wall s':>7}")
    for row in rows:
        print(
            f"{row['command']:<40} {row['tree']:<9} {row['cpu_s_mean']:7.3f} {row['cpu_s_stdev']:6.3f} "
            f"{row['cpu_s_median']:7.3f} {row['machine_busy_s_mean']:7.3f} {row['wall_s_mean']:7.3f}"
        )
    print(
        f"({options.repeat} runs per command and tree, {elapsed:.0f} s in all; "
        f"1-minute load {load_before:.1f} before, {load_after:.1f} after)"
    )
    if options.out is not None:
        result = {
            "trees": {k: str(v) for k, v in trees.items()},
            "repeat": options.repeat,
            "load": [load_before, load_after],
            "rows": rows,
        }
        options.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
