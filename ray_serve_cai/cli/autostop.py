"""`ray-cai autostop`: show or change when an idle cluster stops, on the running cluster."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from ray_serve_cai.cli.cluster import open_cluster
from ray_serve_cai.cli.common import (
    DEFAULT_CONFIG,
    EXIT_BAD_INPUT,
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
from ray_serve_cai.cluster.autostop import describe_view, set_autostop, setting_of
from ray_serve_cai.config import AutostopSpec

IdleOption = Annotated[
    float | None,
    typer.Option("--idle", "-i", help="Seconds the cluster may be idle before the action (turns it on)."),
]
DownFlag = Annotated[
    bool,
    typer.Option("--down", help="Delete the applications (as `ray-cai down` does) instead of stopping them."),
]
CancelFlag = Annotated[bool, typer.Option("--cancel", help="Turn autostop off.")]
IntervalOption = Annotated[
    float | None,
    typer.Option("--check-interval", help="Seconds between the head's checks (default: kept, else 30)."),
]


def _wanted(
    current: AutostopSpec | None, idle: float | None, down: bool, cancel: bool, interval: float | None
) -> AutostopSpec | None:
    """The new setting from the (checked) flags and the current one; --down or --check-interval
    alone keep the current idle timeout, which must then exist (exit 2 naming --idle)."""
    if cancel:
        return None
    timeout = idle if idle is not None else (current.idle_timeout if current else None)
    if timeout is None:
        fail("--idle: autostop is off on this cluster; give the idle timeout in seconds", EXIT_BAD_INPUT)
    fields: dict[str, object] = {"idle_timeout": timeout, "action": "down" if down else "stop"}
    if interval is not None:
        fields["check_interval"] = interval
    elif current is not None:
        fields["check_interval"] = current.check_interval
    return AutostopSpec.model_validate(fields)


def autostop_command(
    idle: IdleOption = None,
    down: DownFlag = False,
    cancel: CancelFlag = False,
    check_interval: IntervalOption = None,
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
) -> None:
    """Show or change autostop on a running cluster, without restarting anything.

    The head checks every check interval whether the cluster is idle (no job pending or running, no
    task, actor or placement group waiting for resources, no driver or Ray client connected, no
    request to a Serve application); once idle for IDLE seconds it stops every application (workers
    first; `ray-cai up` starts them again, Serve included) or, with --down, deletes them. The setting
    is recorded with the applied spec, so `status`, `plan` and the next `up` agree. Without options
    it shows the setting and what the head measures.
    """
    if idle is not None and idle <= 0:
        fail(f"--idle: must be more than 0 seconds, got {idle:g}", EXIT_BAD_INPUT)
    if check_interval is not None and check_interval <= 0:
        fail(f"--check-interval: must be more than 0 seconds, got {check_interval:g}", EXIT_BAD_INPUT)
    if cancel and (idle is not None or down or check_interval is not None):
        fail("--cancel: cannot be combined with --idle, --down or --check-interval", EXIT_BAD_INPUT)
    changing = cancel or idle is not None or down or check_interval is not None

    def run() -> None:
        with open_cluster(config, local, project) as cluster:
            name = cluster.spec.name
            if changing:
                current = setting_of(cluster.observe(ray=False).record)
                wanted = _wanted(current, idle, down, cancel, check_interval)
                set_autostop(cluster.client, cluster.project_id, name, wanted)
            status = cluster.status()
        view = status.autostop or {}
        if json_out:
            print_json({"cluster": name, "state": status.state, "autostop": view})
            return
        if changing:
            setting = view.get("idle_timeout")
            every = f"checked every {view.get('check_interval') or 0:g} s"
            what = "off" if setting is None else f"{view.get('action')} after {setting:g} s idle ({every})"
            out_console.print(f"autostop of cluster {name!r}: {escape(what)}")
            err_console.print("[dim]recorded on the head application; the head reads it at its next check[/]")
        out_console.print(escape(describe_view(view)))

    run_command(run)


__all__ = ["autostop_command"]
