"""`ray-cai dashboard`: the URL a person opens to see the cluster's Ray dashboard."""

from __future__ import annotations

import webbrowser
from pathlib import Path

import typer

from ray_serve_cai.access import dashboard_url, find_head_application
from ray_serve_cai.cli.common import (
    ConfigOption,
    JsonOption,
    LocalOption,
    ProjectOption,
    err_console,
    open_target,
    print_json,
    run_command,
)
from ray_serve_cai.config import load_cluster_spec

__all__ = ["dashboard_command"]


def dashboard_command(
    config: Path = ConfigOption,
    local: bool = LocalOption,
    project: str | None = ProjectOption,
    open_browser: bool = typer.Option(False, "--open", help="Also open it in the system's web browser."),
    json_out: bool = JsonOption,
) -> None:
    """Print the URL of the cluster's Ray dashboard (the last line of the output).

    On CML: the head application's URL (CML's login page does the rest).

    With --local: a one-time login link (once, within a minute; run the command again for another).

    --json prints {"url": ...}.
    """

    def run() -> None:
        spec = load_cluster_spec(config)  # validated before any API call
        with open_target(local, project) as target:
            head = find_head_application(target.client, target.project_id, spec.name)
            url = dashboard_url(target.client, head)
        if not head.is_running:
            status = (head.status or "unknown").removeprefix("APPLICATION_").lower()
            err_console.print(
                f"[yellow]note: the head application is {status}; the dashboard answers once it runs[/]"
            )
        if json_out:
            print_json({"url": url})
        else:
            if url != target.client.app_url(head) + "/":
                err_console.print("one-time login link (opens the dashboard once, within a minute):")
            typer.echo(url)
        if open_browser and not webbrowser.open(url):
            err_console.print("could not start a web browser here: open the URL above yourself")

    run_command(run)
