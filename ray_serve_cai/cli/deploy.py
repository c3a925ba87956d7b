"""`ray-cai deploy`: the one-command deployment (project from git, chained jobs, Ray cluster)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ray_serve_cai.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    ConfigOption,
    JsonOption,
    LocalOption,
    env_flag,
    err_console,
    fail,
    out_console,
    print_json,
    run_command,
    settings_for,
)
from ray_serve_cai.cli.serve import check_serve_config
from ray_serve_cai.cluster import connect_info
from ray_serve_cai.cml import CMLClient
from ray_serve_cai.config import load_cluster_spec, load_deploy_spec
from ray_serve_cai.deploy.fingerprint import RepoError, current_branch, repo_root
from ray_serve_cai.deploy.orchestrator import DeployOptions, DeployResult, deploy, summary_markdown


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
    local: bool = LocalOption,
    project: str | None = typer.Option(
        None, "--project", "-p", help="Project name (default: jobs_config.yaml)."
    ),
    git_url: str | None = typer.Option(
        None,
        "--git-url",
        help="Repository CML clones (default: GITHUB_REPOSITORY, or this checkout with --local).",
    ),
    branch: str | None = typer.Option(
        None, "--branch", help="Branch to deploy (default: the checked-out one)."
    ),
    force: bool = typer.Option(False, "--force", help="Re-run every job (same as FORCE_REBUILD=true)."),
    jobs_file: Path = typer.Option(
        Path("cai_integration/jobs_config.yaml"), "--jobs", help="Jobs definition file.", show_default=True
    ),
    config: Path = ConfigOption,
    json_out: bool = JsonOption,
    timeout: float = typer.Option(3600, "--timeout", help="Seconds to wait for the whole job chain."),
    project_timeout: float = typer.Option(
        600, "--project-timeout", help="Seconds to wait for the git clone."
    ),
) -> None:
    """Deploy from git: find or create the project, create/update the chained jobs, run what changed,
    follow the chain to its end and report the Ray cluster. FORCE_REBUILD=true re-runs everything."""

    def run() -> None:
        env = dict(os.environ)
        if project:
            env["CML_PROJECT_NAME"] = project
        # Bad input first, before any API call.
        spec = load_deploy_spec(jobs_file, env=env)
        cluster = load_cluster_spec(config, env=env)
        check_serve_config(cluster)
        try:
            repo = repo_root(Path.cwd())
        except RepoError as err:
            fail(f"deploy must run inside the git checkout being deployed: {err}", EXIT_BAD_INPUT)
        url = git_url or (str(repo) if local else spec.project.git_url)
        chosen_branch = branch or env.get("GITHUB_REF_NAME") or current_branch(repo)
        options = DeployOptions(
            repo=repo,
            git_url=url,
            branch=chosen_branch,
            force=force or env_flag("FORCE_REBUILD"),
            gh_pat=env.get("GH_PAT") or None,
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
