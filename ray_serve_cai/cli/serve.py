"""`ray-cai serve status / deploy / delete`: the cluster's Ray Serve applications.

The Serve config is the file `ray_cluster.serve.config` names (Ray Serve's own format); `up`, `deploy`
and the supervising watch keep it applied. These commands look at it and act on it now.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from ray_serve_cai.access.serve import ServeAPIError
from ray_serve_cai.cli.cluster_open import open_cluster, project_dir
from ray_serve_cai.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    ConfigOption,
    JsonOption,
    LocalOption,
    ProjectOption,
    err_console,
    fail,
    out_console,
    print_json,
    run_command,
)
from ray_serve_cai.cluster import ClusterStatus, RayCluster
from ray_serve_cai.cluster import serve as serve_ops
from ray_serve_cai.cluster.serve import ServeView
from ray_serve_cai.config.serve import load_serve_config
from ray_serve_cai.errors import WaitTimeout

app = typer.Typer(
    no_args_is_help=True, help="The cluster's Ray Serve applications (`serve status` prints the endpoint)."
)


def serve_table(serve: dict[str, Any]) -> Table:
    table = Table(title=f"Serve applications ({serve.get('url')})")
    for col in ("application", "status", "route", "deployments", "message"):
        table.add_column(col)
    for name, application in serve.get("applications", {}).items():
        deployments = ", ".join(
            f"{dep}: {info['status']} {_replicas(info)}".strip()
            for dep, info in application.get("deployments", {}).items()
        )
        table.add_row(
            name,
            str(application.get("status")),
            str(application.get("route_prefix") or "-"),
            deployments or "-",
            application.get("message") or "",
        )
    return table


def _replicas(info: dict[str, Any]) -> str:
    states = info.get("replicas") or {}
    running = states.get("RUNNING", 0)
    return f"({running}/{info.get('target_num_replicas') or sum(states.values())} replicas)"


def print_serve(status: ClusterStatus) -> None:
    """The Serve section of `ray-cai status` / `up` output, when the cluster has one."""
    if status.serve is not None:
        out_console.print(serve_table(status.serve))
        out_console.print(f"serve endpoint: {status.serve.get('url')}")


class _ViewProgress:
    def __init__(self) -> None:
        self.last = ""
        self.started = time.monotonic()

    def __call__(self, view: ServeView) -> None:
        line = ", ".join(f"{n} {a['status']}" for n, a in view.applications.items()) or (view.error or "")
        if line and line != self.last:
            err_console.print(f"[dim]{time.monotonic() - self.started:6.1f}s[/] serve: {escape(line)}")
            self.last = line


def _exit_for(view: ServeView) -> None:
    ok = view.error is None and bool(view.applications) and view.all_running
    raise typer.Exit(EXIT_OK if ok else EXIT_FAILED)


def _print_view(view: ServeView, json_out: bool) -> None:
    if json_out:
        print_json(view.as_dict())
        return
    if view.applications:
        out_console.print(serve_table(view.as_dict()))
    else:
        out_console.print("no Serve applications")
    out_console.print(f"serve endpoint: {view.url}")
    for problem in view.problems():
        err_console.print(f"[yellow]{escape(problem)}[/]")


@app.command("status")
def status(
    config: Path = ConfigOption,
    local: bool = LocalOption,
    project: str | None = ProjectOption,
    json_out: bool = JsonOption,
) -> None:
    """Each Serve application's status, route, deployments and Serve's own message (the reason when
    one failed). Exit 0 only when there are applications and every one is RUNNING."""

    def run() -> None:
        with open_cluster(config, local, project) as cluster:
            cluster.observe(ray=False)  # one list call: the client learns the head's URL
            scope = cluster.serve_scope
            view = serve_ops.observe(scope, serve_ops.desired_serve(scope))
        _print_view(view, json_out)
        _exit_for(view)

    run_command(run)


def _ready_head(cluster: RayCluster) -> ClusterStatus:
    status = cluster.status()
    if not status.ready:
        fail(f"cluster {status.cluster!r} is not ready ({status.progress_line()}): run `ray-cai up` first")
    return status


@app.command("deploy")
def deploy(
    file: Path | None = typer.Argument(
        None, help="Serve config file (project-relative; default: ray_cluster.serve.config)."
    ),
    config: Path = ConfigOption,
    local: bool = LocalOption,
    project: str | None = ProjectOption,
    json_out: bool = JsonOption,
    force: bool = typer.Option(False, "--force", help="PUT even when Serve already runs this config."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the applications settle."),
    timeout: float = typer.Option(600, "--timeout", help="Seconds to wait for the applications."),
) -> None:
    """Apply the Serve config now (only when Serve does not already run it, unless --force), then wait
    until every application runs or one fails. Exit 0 only when every application is RUNNING."""

    def run() -> None:
        given = load_serve_config(str(file), project_dir()) if file is not None else None  # before any call
        with open_cluster(config, local, project) as cluster:
            scope = cluster.serve_scope
            if given is not None:
                given = replace(given, off_head=scope.has_workers)
            named = cluster.spec.serve.config if cluster.spec.serve else None
            if given is not None and named != str(file):
                err_console.print(
                    f"[yellow]note: the cluster config names {named or 'no Serve config'}; `up` and the "
                    f"watch apply that one again. Set ray_cluster.serve.config: {escape(str(file))}[/]"
                )
            desired = given or serve_ops.desired_serve(scope)
            if desired is None:
                fail("no Serve config: pass FILE or set ray_cluster.serve.config", EXIT_BAD_INPUT)
            status = _ready_head(cluster)
            port = serve_ops.head_serve_port(status)
            if port is None:
                fail("the head has not started Ray Serve (see the head's log)")
            url = serve_ops.endpoint_for(scope, status)
            location = serve_ops.head_serve_location(status)
            decision = serve_ops.apply(scope, desired, port, location=location, force=force)
            err_console.print(
                f"applied {desired.source}: {decision.reason}"
                if decision.put
                else f"nothing to apply: {decision.reason}"
            )
            view = (
                serve_ops.wait_settled(scope, desired, timeout=timeout, on_view=_ViewProgress(), url=url)
                if wait
                else serve_ops.observe(scope, desired, url)
            )
        _print_view(view, json_out)
        _exit_for(view)

    run_command(_serve_errors(run))


@app.command("delete")
def delete(
    config: Path = ConfigOption,
    local: bool = LocalOption,
    project: str | None = ProjectOption,
    json_out: bool = JsonOption,
) -> None:
    """Remove every Serve application (Serve shuts down; the cluster keeps running)."""

    def run() -> None:
        with open_cluster(config, local, project) as cluster:
            cluster.observe(ray=False)  # one list call: the client learns the head's URL
            before = serve_ops.observe(cluster.serve_scope)
            serve_ops.api(cluster.serve_scope).delete()
            has_serve = cluster.spec.serve is not None
        removed = sorted(before.applications)
        if json_out:
            print_json({"removed": removed})
        else:
            out_console.print(f"removed {len(removed)} Serve application(s): {', '.join(removed) or '-'}")
        if has_serve:
            err_console.print(
                "[yellow]note: ray_cluster.serve.config is still set: the next `up` (or a watch) deploys it "
                "again; remove it from the cluster config to keep Serve off[/]"
            )

    run_command(_serve_errors(run))


def _serve_errors(fn: Any) -> Any:
    """Serve's API errors are failures (exit 1), with their message."""

    def wrapped() -> None:
        try:
            fn()
        except (ServeAPIError, WaitTimeout) as err:
            fail(str(err), EXIT_FAILED)

    return wrapped


__all__ = ["app", "print_serve", "serve_table"]
