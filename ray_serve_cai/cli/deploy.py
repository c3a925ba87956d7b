"""`ray-cai deploy`: the one-command deployment (project from git, chained jobs, Ray cluster)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ray_serve_cai.cli.cluster_open import check_serve_config
from ray_serve_cai.cli.common import (
    DEFAULT_CONFIG,
    EXIT_FAILED,
    ConfigPath,
    JsonFlag,
    LocalFlag,
    err_console,
    fail,
    out_console,
    print_json,
    run_command,
    settings_for,
)
from ray_serve_cai.cluster import connect_info
from ray_serve_cai.cml import CMLClient
from ray_serve_cai.config import DEFAULT_JOBS_FILE
from ray_serve_cai.deploy.orchestrator import DeployResult, deploy, summary_markdown
from ray_serve_cai.deploy.source import load_deployment, resolve_options


def _results_table(result: DeployResult) -> Table:
    table = Table(title=f"Deployment to project {result.project_name!r} ({result.project_id})")
    for col in ("job", "action", "status", "duration"):
        table.add_column(col)
    for job in result.jobs:
        status = job.status.removeprefix("ENGINE_").lower()
        style = "green" if job.status in ("ENGINE_SUCCEEDED", "up to date") else "red"
        duration = "-" if job.duration is None else f"{job.duration:.0f}s"
        table.add_row(job.name, job.action, f"[{style}]{status}[/]", duration)
    return table


def deploy_command(
    local: LocalFlag = False,
    project: Annotated[
        str | None, typer.Option("--project", "-p", help="Project name (default: jobs_config.yaml).")
    ] = None,
    git_url: Annotated[
        str | None,
        typer.Option(
            "--git-url",
            help="Repository CML clones (default: GITHUB_REPOSITORY, or this checkout with --local).",
        ),
    ] = None,
    branch: Annotated[
        str | None,
        typer.Option(
            "--branch",
            help="Branch to deploy (default: project.branch of the jobs file, else GITHUB_REF_NAME, "
            "else the checked-out one).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Re-run every job (same as FORCE_REBUILD=true).")
    ] = False,
    jobs_file: Annotated[
        Path, typer.Option("--jobs", help="Jobs definition file.", show_default=True)
    ] = Path(DEFAULT_JOBS_FILE),
    config: ConfigPath = DEFAULT_CONFIG,
    json_out: JsonFlag = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the whole job chain.")
    ] = 3600,
    project_timeout: Annotated[
        float, typer.Option("--project-timeout", help="Seconds to wait for the git clone.")
    ] = 600,
) -> None:
    """Deploy from git: find or create the project, create/update the chained jobs, run what changed,
    follow the chain to its end and report the Ray cluster. FORCE_REBUILD=true re-runs everything."""

    def run() -> None:
        # Bad input first, before any API call: both files, then the checkout.
        spec, cluster = load_deployment(jobs_file, config, project=project)
        check_serve_config(cluster.spec)
        options = resolve_options(
            spec,
            local=local,
            git_url=git_url,
            branch=branch,
            force=force,
            project_timeout=project_timeout,
            chain_timeout=timeout,
        )
        settings = settings_for(local)
        started = time.monotonic()

        def progress(message: str) -> None:
            if not json_out or err_console.is_terminal:
                err_console.print(f"[dim]{time.monotonic() - started:6.1f}s[/] {escape(message)}")

        with CMLClient(settings) as client:
            result = deploy(client, spec, cluster, options, progress=progress)
        _write_step_summary(result)
        if json_out:
            print_json({**result.as_dict(), "seconds": round(time.monotonic() - started, 1)})
        else:
            out_console.print(_results_table(result))
        failed = result.failed_job
        if failed is not None:
            fail(
                f"job {failed.name!r} ended {failed.status}; {failed.log_hint}. "
                "The jobs after it did not run.",
                EXIT_FAILED,
            )
        if not json_out:
            _print_next_steps(result, time.monotonic() - started, " --local" if local else "")
        if result.cluster is not None and not result.cluster.ready:
            fail(f"the job chain succeeded but cluster {result.cluster.cluster!r} is {result.cluster.state}")

    run_command(run)


def _write_step_summary(result: DeployResult) -> None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(summary_markdown(result))


def _print_next_steps(result: DeployResult, seconds: float, where: str) -> None:
    out_console.print(
        f"deployed commit {result.commit[:12]} in {seconds:.0f}s ({result.runs_started} job runs)"
    )
    if result.cluster is None:
        return
    info = connect_info(result.cluster)
    out_console.print(f"Ray cluster {result.cluster.cluster!r}: {result.cluster.state}")
    out_console.print(f"dashboard: {info['dashboard_url']}")
    if info["address"]:
        out_console.print(f"connect from the project: ray.init(address={info['address']!r}) after")
        for key, value in info["env"].items():
            out_console.print(f"  export {key}={value}")
    out_console.print(
        f"status: ray-cai status{where}  |  scale: ray-cai scale N{where}  |  tear down: ray-cai down{where}"
    )


__all__ = ["deploy_command"]
