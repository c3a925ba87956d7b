"""`ray-cai doctor`: first contact with a workspace — what no API spec says, checked before a deploy."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ray_serve_cai.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    JsonFlag,
    LocalFlag,
    err_console,
    out_console,
    print_json,
    run_command,
    settings_for,
)
from ray_serve_cai.cml import CMLClient
from ray_serve_cai.deploy.doctor import DoctorReport, default_git_source, run_doctor

__all__ = ["doctor_command"]

_STYLE = {"ok": "green", "warn": "yellow", "fail": "red"}


def doctor_command(
    local: LocalFlag = False,
    git_url: Annotated[
        str | None,
        typer.Option(
            "--git-url",
            help="Repository the probe project is cloned from, as a deploy would (default: the "
            "checkout's https origin; with --local the checkout itself). GH_PAT is used for a private one.",
        ),
    ] = None,
    branch: Annotated[
        str | None, typer.Option("--branch", help="Branch to clone (default: the checkout's branch).")
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Check a workspace before the first deploy: the facts CML's API spec does not give.

    Validates the API key, then makes one probe project (cloned from git, as a deploy does), one short
    probe job and one probe application, and removes them afterwards; nothing else is touched. It
    establishes: project creation from git with the tool's template; CDSW_APP_PORT and
    CDSW_IP_ADDRESS inside an application; TCP between two workloads on Ray's ports; WebSocket
    upgrades through an application URL; fsync latency, flock across pods and atomic rename on the
    project filesystem; whether an application's own API key can manage applications.

    Prints a table (check, result, detail, what the tool does about it). Exit 0 when nothing blocks
    the tool (warnings are worked around), 1 otherwise. --json prints
    {"checks": [{"name", "status": "ok|warn|fail", "detail", "action"}], "ok": bool}.
    """

    def run() -> DoctorReport:
        settings = settings_for(local)
        default_url, default_branch = default_git_source(local=local)
        with CMLClient(settings) as client:
            return run_doctor(
                client,
                local=local,
                git_url=git_url or default_url,
                git_ref=branch or (default_branch if not git_url else None),
                gh_pat=os.environ.get("GH_PAT") or None,
                progress=lambda message: err_console.print(f"[dim]{escape(message)}…[/]"),
            )

    report = run_command(run)
    if json_out:
        print_json(report.as_dict())
    else:
        table = Table(title="ray-cai doctor")
        for column in ("check", "result", "detail", "what the tool does"):
            table.add_column(column, overflow="fold")
        for check in report.checks:
            style = _STYLE[check.status]
            result = f"[{style}]{check.status}[/]"
            table.add_row(check.name, result, escape(check.detail), escape(check.action))
        out_console.print(table)
        verdict = "nothing blocks the tool" if report.ok else "something blocks the tool (see fail rows)"
        out_console.print(verdict)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_FAILED)
