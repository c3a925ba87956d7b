"""`ray-cai workspace`: start, inspect and stop the local CML workspace daemon.

`env` is the one command that prints the API key, on purpose, for `eval "$(ray-cai workspace env)"`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from ray_serve_cai.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK
from ray_serve_cai.workspace.controls import DEFAULT_RESTART_ATTEMPTS, DEFAULT_RESTART_DELAY_SECONDS
from ray_serve_cai.workspace.daemon import (
    SessionError,
    WorkspaceError,
    WorkspaceInfo,
    reset_workspace,
    run_in_session,
    start_workspace,
    stop_workspace,
    workspace_info,
)
from ray_serve_cai.workspace.processes import DEFAULT_STOP_GRACE_SECONDS
from ray_serve_cai.workspace.statefile import resolve_home

EXIT_NOT_RUNNING = EXIT_FAILED

app = typer.Typer(
    help="The local CML workspace: CML API v2 on loopback, jobs and applications as local processes.",
    no_args_is_help=True,
    add_completion=False,
)

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home", help="Workspace home (default: $RAY_CAI_WORKSPACE_HOME or the user data directory)."
    ),
]


def _describe(info: WorkspaceInfo) -> dict[str, object]:
    return {
        "running": True,
        "url": info.url,
        "domain": info.domain,
        "pid": info.pid,
        "home": str(info.home),
        "network": info.network,
        "network_reason": info.network_reason,
        "pod_cidr": info.pod_cidr,
    }


def _network_line(info: WorkspaceInfo) -> str:
    if info.network == "pods":
        return f"network: pods on {info.pod_cidr}"
    return f"network: shared-host ({info.network_reason})"


@app.command("start")
def start(
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 (default: a free one).")] = 0,
    home: HomeOption = None,
    stop_grace_seconds: Annotated[
        float, typer.Option("--stop-grace-seconds", help="SIGTERM→SIGKILL grace when stopping workloads.")
    ] = DEFAULT_STOP_GRACE_SECONDS,
    app_restart: Annotated[
        bool,
        typer.Option(
            "--app-restart/--no-app-restart",
            help="Restart failed applications automatically, as CML does by default.",
        ),
    ] = True,
    app_restart_attempts: Annotated[
        int,
        typer.Option("--app-restart-attempts", min=0, help="Automatic restarts per failure streak (CML: 3)."),
    ] = DEFAULT_RESTART_ATTEMPTS,
    app_restart_delay: Annotated[
        float,
        typer.Option("--app-restart-delay", min=0, help="Seconds before each automatic restart (CML: 300)."),
    ] = DEFAULT_RESTART_DELAY_SECONDS,
    pods: Annotated[
        bool | None,
        typer.Option(
            "--pods/--no-pods",
            help="Run every job run and application in its own pod (network and process namespaces, "
            "its own IP), as CML does; needs root on Linux. Default: pods where they can be made, else "
            "shared-host (every workload on the host; `workspace status` says why).",
            show_default=False,
        ),
    ] = None,
    pod_cidr: Annotated[
        str | None,
        typer.Option("--pod-cidr", help="The pods' addresses (default: a free /16 inside 100.64.0.0/10)."),
    ] = None,
) -> None:
    """Start the workspace in the background (does nothing when it already runs) and wait until it answers.

    The state of an earlier run (projects, jobs, runs, applications) is kept: workloads a crashed
    server left running are re-adopted, the ones that died meanwhile are marked failed. Port 0 reuses
    the previous server's port."""
    if pod_cidr is not None:
        from ray_serve_cai.workspace.pods import parse_pod_cidr  # the server's module: only for this check

        try:
            parse_pod_cidr(pod_cidr)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
    running = workspace_info(home)
    if running is not None:
        typer.echo(f"workspace already running at {running.url} (pid {running.pid}, home {running.home})")
        typer.echo(_network_line(running))
        raise typer.Exit(EXIT_OK)
    try:
        info = start_workspace(
            home,
            port,
            stop_grace_seconds=stop_grace_seconds,
            app_restart=app_restart,
            app_restart_attempts=app_restart_attempts,
            app_restart_delay=app_restart_delay,
            pods=pods,
            pod_cidr=pod_cidr,
        )
    except WorkspaceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_NOT_RUNNING) from None
    typer.echo(f"workspace running at {info.url} (pid {info.pid}, home {info.home})")
    typer.echo(_network_line(info))
    typer.echo('use it with: eval "$(ray-cai workspace env)"')


@app.command("env")
def env(home: HomeOption = None) -> None:
    """Print `export CML_HOST=...` and `export CML_API_KEY=...` for the running workspace (for eval)."""
    info = workspace_info(home)
    if info is None:
        typer.echo("error: the workspace is not running (ray-cai workspace start)", err=True)
        raise typer.Exit(EXIT_NOT_RUNNING)
    typer.echo(f"export CML_HOST={shlex.quote(info.url)}")
    typer.echo(f"export CML_API_KEY={shlex.quote(info.api_key)}")


@app.command("status")
def status(
    home: HomeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show whether the workspace runs, where, and its home; exit 1 when it does not run."""
    info = workspace_info(home)
    if info is None:
        if as_json:
            typer.echo(json.dumps({"running": False, "home": str(resolve_home(home))}))
        else:
            typer.echo(f"workspace not running (home {resolve_home(home)})")
        raise typer.Exit(EXIT_NOT_RUNNING)
    if as_json:
        typer.echo(json.dumps(_describe(info)))
    else:
        typer.echo(f"workspace running at {info.url} (pid {info.pid}, home {info.home})")
        typer.echo(_network_line(info))


@app.command(
    "exec",
    context_settings={"allow_interspersed_args": False},
)
def exec_command(
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    project: Annotated[
        str | None,
        typer.Option("--project", help="Project name or id (default: the only project of the workspace)."),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", help="K=V added to the session's environment (repeatable)."),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Run COMMAND in a fresh session pod of a project, as a CML session would: its own IP, the
    project folder as working directory, a session's CDSW_* variables. Output streams; the exit code
    is the command's; the pod is removed afterwards.

    Example: ray-cai workspace exec --project demo -- python -c "import ray; ray.init('ray://HEAD:10001')"
    """
    extra: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum():
            typer.echo(f"error: --env {item!r}: expected NAME=VALUE", err=True)
            raise typer.Exit(EXIT_BAD_INPUT)
        extra[key] = value
    if not command:
        typer.echo("error: COMMAND is missing (ray-cai workspace exec [OPTIONS] -- COMMAND...)", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    info = workspace_info(home)
    if info is None:
        typer.echo("error: the workspace is not running (ray-cai workspace start)", err=True)
        raise typer.Exit(EXIT_NOT_RUNNING)
    try:
        code = run_in_session(info, command, project=project, environment=extra)
    except SessionError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(code)


@app.command("stop")
def stop(home: HomeOption = None) -> None:
    """Stop every job run and application the workspace started, then the server. The state is kept:
    a later start shows them stopped."""
    if stop_workspace(home):
        typer.echo("workspace stopped")
    else:
        typer.echo("workspace was not running")


@app.command("reset")
def reset(
    home: HomeOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Stop the workspace and delete its state: every project (with its files), job, run, application
    and log. The API key and the port are kept."""
    resolved = resolve_home(home)
    if not yes:
        confirmed = typer.confirm(
            f"Delete every project, job, run and application of the workspace at {resolved}?", default=False
        )
        if not confirmed:
            typer.echo("nothing deleted")
            raise typer.Exit(EXIT_NOT_RUNNING)
    reset_workspace(resolved)
    typer.echo(f"workspace state deleted (home {resolved})")
