"""`ray-cai plan / up / status / scale / down / connect`: thin commands over `RayCluster` (`check` is
`cli/check.py`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ray_serve_cai.cli.cluster_open import open_cluster
from ray_serve_cai.cli.common import (
    DEFAULT_CONFIG,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    ConfigPath,
    JsonFlag,
    LocalFlag,
    ProjectName,
    err_console,
    fail,
    out_console,
    print_json,
    run_command,
)
from ray_serve_cai.cli.serve import print_serve
from ray_serve_cai.cluster import ClusterStatus, Plan, RayCluster, connect_info, write_cluster_info
from ray_serve_cai.cluster.autostop import describe_view
from ray_serve_cai.cluster.serve import observe_into
from ray_serve_cai.config.edit import save_replicas


class Progress:
    """Live progress while waiting: a line each time the picture changes (works with or without a TTY)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.last = ""
        self.started = time.monotonic()

    def __call__(self, status: ClusterStatus) -> None:
        if not self.enabled:
            return
        line = status.progress_line()
        if line != self.last:
            elapsed = time.monotonic() - self.started
            err_console.print(f"[dim]{elapsed:6.1f}s[/] {escape(line)}")
            self.last = line


def _plan_table(plan: Plan) -> Table:
    table = Table(title="Plan", show_lines=False)
    table.add_column("action")
    table.add_column("application")
    table.add_column("why")
    for action in plan.actions:
        table.add_row(action.kind.value, action.name, action.reason)
    for name in plan.unchanged:
        table.add_row("[dim]keep[/]", name, "[dim]up to date[/]")
    for conflict in plan.conflicts:
        table.add_row("[red]conflict[/]", conflict.name, conflict.describe())
    return table


def _status_table(status: ClusterStatus) -> Table:
    table = Table(title=f"Ray cluster {status.cluster!r}: {status.state}")
    for col in ("node", "role", "group", "application", "status", "in Ray"):
        table.add_column(col)
    for n in status.nodes:
        app_status = (n.app_status or "missing").removeprefix("APPLICATION_").lower()
        if not n.spec_current and n.app_id:
            app_status += " (outdated)"
        table.add_row(n.name, n.role, n.group, n.app_id or "-", app_status, "yes" if n.in_ray else "no")
    for name in status.surplus:
        table.add_row(name, "-", "-", "-", "surplus", "-")
    return table


def _groups_table(status: ClusterStatus) -> Table | None:
    """Per group: apps now, wanted, bounds; for autoscaled groups Ray's autoscaler owns the number."""
    if not any(g["autoscaled"] for g in status.groups):
        return None
    table = Table(title="Worker groups")
    for col in ("group", "current", "desired", "min", "max", "sized by"):
        table.add_column(col)
    for g in status.groups:
        owner = "Ray autoscaler" if g["autoscaled"] else "config (scale)"
        table.add_row(g["group"], str(g["current"]), str(g["desired"]), str(g["min"]), str(g["max"]), owner)
    return table


def _autoscaler_line(status: ClusterStatus) -> str | None:
    decision = status.autoscaler
    if not decision:
        return None
    if "at" not in decision:
        return "autoscaler: no decision yet"
    parts = [f"wants {decision.get('desired', {})}"]
    for key in ("created", "deleted", "errors"):
        if decision.get(key):
            parts.append(f"{key} {', '.join(decision[key])}")
    return f"autoscaler (last decision {decision['at']}): " + "; ".join(parts)


def _print_groups(status: ClusterStatus) -> None:
    table = _groups_table(status)
    if table is not None:
        out_console.print(table)
    line = _autoscaler_line(status)
    if line:
        out_console.print(escape(line))
    if status.autostop:  # autostop (#22): "idle for 12 min, stops in 18 min", what keeps it busy, or stopped
        out_console.print(escape(describe_view(status.autostop)))
    line = _fault_tolerance_line(status.head_fault_tolerance)
    if line:
        out_console.print(escape(line))


def _fault_tolerance_line(state: dict[str, Any] | None) -> str | None:
    """`head fault tolerance: on (rocksdb, epoch 3); last failover: new head at ..., 24.1s`."""
    if not state:
        return None
    if not state.get("enabled"):
        why = state.get("reason") or "a head restart loses Ray's state"
        return f"head fault tolerance: off ({why})"
    epoch = state.get("epoch")
    line = f"head fault tolerance: on ({state.get('storage')}" + (f", epoch {epoch})" if epoch else ")")
    failover = state.get("last_failover")
    if failover:
        # A record of an earlier epoch says so: the head that took over has not written its own yet
        # (it writes it once Ray runs).
        earlier = failover.get("epoch") not in (None, epoch)
        line += "; last failover" + (f" (epoch {failover['epoch']})" if earlier else "")
        line += f": {failover.get('kind')} at {failover.get('at')}, {failover.get('seconds')}s"
    return line


def _print_differences(differences: list[str]) -> None:
    """What this caller's config asks for that is not what is deployed (and where that came from)."""
    if differences:
        err_console.print("[yellow]your config differs from what is deployed:[/]")
        for line in differences:
            err_console.print(f"  {escape(line)}")


def _plan_json(plan: Plan) -> dict[str, object]:
    return {
        "actions": [{"action": a.kind.value, "name": a.name, "reason": a.reason} for a in plan.actions],
        "unchanged": list(plan.unchanged),
        "conflicts": [c.describe() for c in plan.conflicts],
        "summary": plan.summary(),
    }


def _print_ready(status: ClusterStatus, info_path: Path | None) -> None:
    connect = connect_info(status)
    out_console.print(_status_table(status))
    _print_groups(status)
    print_serve(status)
    out_console.print(f"dashboard: {status.dashboard_url}")
    if connect["address"]:
        out_console.print(f"connect:   ray.init(address={connect['address']!r})  (see `ray-cai connect`)")
    if info_path:
        out_console.print(f"cluster info written to {info_path}")


def plan(
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
) -> None:
    """Show what `up` would change. Writes nothing."""

    def run() -> None:
        with open_cluster(config, local, project) as cluster:
            observation = cluster.observe(ray=False)
            result = cluster.plan(observation)
            differences = cluster.differences(observation)
        if json_out:
            print_json({**_plan_json(result), "differences": differences})
        else:
            _print_differences(differences)
            out_console.print(_plan_table(result))
            out_console.print("nothing to do" if result.is_noop else f"summary: {result.summary()}")
        if result.conflicts:
            raise typer.Exit(EXIT_FAILED)

    run_command(run)


def _converge(
    config: Path,
    local: bool,
    project: str | None,
    json_out: bool,
    wait: bool,
    timeout: float | None,
    info_file: Path,
    replicas: int | None = None,
    group: str | None = None,
    watch_interval: float | None = None,
) -> None:
    def run() -> None:
        with open_cluster(config, local, project, replicas=replicas, group=group, create=True) as cluster:
            plan_done, status = cluster.up(wait=wait, timeout=timeout, on_progress=Progress())
            if replicas is not None:
                _save_size(config, replicas, group)
            if watch_interval is not None:
                if status.ready:
                    write_cluster_info(status, info_file)
                _watch(cluster, watch_interval)
                return
        info_path = write_cluster_info(status, info_file) if status.ready else None
        if json_out:
            print_json({"plan": _plan_json(plan_done), "status": status.as_dict(), "info_file": info_path})
        elif status.ready:
            _print_ready(status, info_path)
        else:
            out_console.print(_status_table(status))
            print_serve(status)
            for problem in status.problems:
                err_console.print(f"[yellow]{escape(problem)}[/]")
        if wait and not status.ready:
            raise typer.Exit(EXIT_FAILED)

    run_command(run)


def _save_size(config: Path, replicas: int, group: str | None) -> None:
    """Keep the config file the source of truth: `status` and the next `up` want the new size too."""
    saved = save_replicas(config, replicas, group)
    err_console.print(
        f"saved {saved} = {replicas} in {config} (`ray-cai deploy` from this checkout sends it as it is; "
        "commit it for deploys from CI)"
    )
    if os.environ.get("RAY_NUM_WORKERS"):
        err_console.print("[yellow]note: RAY_NUM_WORKERS is set in the environment and overrides the file[/]")


def _watch(cluster: RayCluster, interval: float) -> None:
    """Reconcile every `interval` seconds until Ctrl-C or SIGTERM; one line per pass that acted."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    err_console.print(f"watching cluster {cluster.spec.name!r} every {interval:g}s (Ctrl-C to stop)")

    progress = Progress()  # one for the whole watch: repeated lines are suppressed, elapsed counts on

    def on_pass(plan: Plan, status: ClusterStatus) -> None:
        if plan.actions:
            healed = ", ".join(a.describe().strip() for a in plan.actions)
            err_console.print(f"healed: {escape(healed)}")
        progress(status)

    with contextlib.suppress(KeyboardInterrupt):
        cluster.watch(interval=interval, on_pass=on_pass, should_stop=stop.is_set)
    err_console.print("stopped watching")


WaitOption = typer.Option(True, "--wait/--no-wait", help="Wait until Ray reports every node alive.")
TimeoutOption = typer.Option(None, "--timeout", help="Seconds to wait (default: startup_timeout).")
InfoOption = typer.Option(
    Path("ray_cluster_info.json"), "--info-file", help="Where to write the cluster info."
)


def up(
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
    wait: bool = WaitOption,
    timeout: float | None = TimeoutOption,
    info_file: Path = InfoOption,
    watch: bool = typer.Option(
        False, "--watch", help="Keep reconciling afterwards: replace dead or stuck apps (Ctrl-C stops)."
    ),
    interval: float = typer.Option(30.0, "--interval", help="Seconds between passes with --watch."),
) -> None:
    """Create or converge the cluster, then wait until Ray reports every node alive."""
    if interval <= 0:
        fail("--interval: must be more than 0 seconds", EXIT_BAD_INPUT)
    _converge(
        config, local, project, json_out, wait, timeout, info_file, watch_interval=interval if watch else None
    )


def scale(
    replicas: int = typer.Argument(..., help="Number of workers (in the group)."),
    group: str | None = typer.Option(None, "--group", "-g", help="Worker group (needed with several)."),
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
    wait: bool = WaitOption,
    timeout: float | None = TimeoutOption,
    info_file: Path = InfoOption,
) -> None:
    """Set the number of workers of a group and save it in the config file; unchanged nodes are not
    touched. `deploy` sends the config of the checkout it runs in, uncommitted edits included.

    Refused (exit 2) for an autoscaled group: Ray's autoscaler sets its size between
    min_replicas and max_replicas; change those in the config and run `up` instead."""
    if replicas < 0:
        fail("REPLICAS: must be 0 or more", EXIT_BAD_INPUT)
    _converge(config, local, project, json_out, wait, timeout, info_file, replicas, group)


STATUS_WAIT_INTERVAL = 2.0  # seconds between observations of `status --wait`


def _status_until_ready(cluster: RayCluster, wait: float, json_out: bool) -> ClusterStatus:
    """The cluster's status, observed every `STATUS_WAIT_INTERVAL` until it is ready or `wait`
    seconds have passed (the last one seen then); progress on stderr. Acts on nothing."""
    progress = Progress(enabled=wait > 0 and not json_out)
    deadline = time.monotonic() + wait
    while True:
        result = observe_into(cluster.serve_scope, cluster.status())
        progress(result)
        remaining = deadline - time.monotonic()
        if result.ready or remaining <= 0:
            if not result.ready and wait > 0:
                err_console.print(f"[yellow]not ready after waiting {wait:g}s[/]")
            return result
        time.sleep(min(STATUS_WAIT_INTERVAL, remaining))


def status(
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
    wait: float = typer.Option(
        0,
        "--wait",
        metavar="SECONDS",
        min=0,
        help="Wait up to SECONDS for the cluster to be ready (after a restart, in a script), observing it "
        "every 2 s; then report as without it. Changes nothing.",
    ),
) -> None:
    """Apps plus Ray's own view. Exit 0 only when the cluster is ready."""

    def run() -> None:
        with open_cluster(config, local, project) as cluster:
            result = _status_until_ready(cluster, wait, json_out)
        if json_out:
            print_json(result.as_dict())
        else:
            out_console.print(_status_table(result))
            _print_groups(result)
            print_serve(result)
            if result.dashboard_url:
                out_console.print(f"dashboard: {result.dashboard_url}")
            if result.applied:
                origin = result.applied["origin"]
                sizes = ", ".join(f"{g}: {n}" for g, n in result.applied["workers"].items()) or "no workers"
                out_console.print(
                    f"deployed: {escape(sizes)} (by {escape(origin.get('by') or '?')} at {origin.get('at')},"
                    f" {origin.get('source')})"
                )
            _print_differences(result.differences)
            for condition in result.conditions:
                if not condition.status:
                    detail = f": {condition.message}" if condition.message else ""
                    err_console.print(f"[yellow]{condition.type} {condition.reason}{escape(detail)}[/]")
            for problem in result.problems:
                err_console.print(f"[yellow]{escape(problem)}[/]")
        raise typer.Exit(EXIT_OK if result.ready else EXIT_FAILED)

    run_command(run)


def down(
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
) -> None:
    """Stop and delete the cluster's applications (nodes first copy their Ray logs into the project)."""

    def run() -> None:
        with open_cluster(config, local, project) as cluster:
            removed = cluster.down()
        if json_out:
            print_json({"removed": removed})
        else:
            out_console.print(f"removed {len(removed)} application(s): {', '.join(removed) or '-'}")
            out_console.print(f"node logs: .ray-cai/{cluster.spec.name}/logs/ in the project")

    run_command(run)


def connect(
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
) -> None:
    """Print the address and environment a Ray client in the same project needs."""

    def run() -> None:
        with open_cluster(config, local, project) as cluster:
            result = cluster.status()
        info = connect_info(result)
        if json_out:
            print_json(info)
        elif not info["address"]:
            fail(f"cluster {result.cluster!r} is {result.state}: no head to connect to (run `ray-cai up`)")
        else:
            for key, value in info["env"].items():
                sys.stdout.write(f"export {key}={value}\n")
            err_console.print("# then: python -c 'import ray; ray.init(); print(ray.cluster_resources())'")
        if not info["address"]:
            raise typer.Exit(EXIT_FAILED)

    run_command(run)


def register(app: typer.Typer) -> None:
    for fn in (plan, up, status, scale, down, connect):
        app.command(fn.__name__)(fn)


__all__ = ["open_cluster", "register"]
