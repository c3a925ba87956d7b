"""`ray-cai config`: print the JSON Schema of the config files, validate them (exit 2 on bad input)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ray_serve_cai.config import (
    DEFAULT_CLUSTER_FILE,
    DEFAULT_JOBS_FILE,
    ClusterSpec,
    ConfigError,
    DeploySpec,
    cluster_json_schema,
    desired_nodes,
    jobs_json_schema,
    load_cluster_spec,
    load_deploy_spec,
)
from ray_serve_cai.errors import EXIT_BAD_INPUT

app = typer.Typer(help="Check the cluster and jobs config files.", no_args_is_help=True, add_completion=False)


@app.command("schema")
def schema(
    jobs: Annotated[bool, typer.Option("--jobs", help="Print the schema of jobs_config.yaml.")] = False,
) -> None:
    """Print the JSON Schema of ray_cluster_config.yaml (or of jobs_config.yaml with --jobs)."""
    typer.echo(json.dumps(jobs_json_schema() if jobs else cluster_json_schema(), indent=2))


@app.command("validate")
def validate(
    config: Annotated[Path, typer.Option("--config", "-c", help="Cluster config file.")] = Path(
        DEFAULT_CLUSTER_FILE
    ),
    jobs: Annotated[
        Path | None,
        typer.Option("--jobs", "-j", help=f"Jobs file (default: {DEFAULT_JOBS_FILE} when it exists)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Validate the config files with the current environment's overrides.

    Exit 0 and print the nodes (and jobs) they describe; exit 2 with one line per problem on stderr.
    """
    errors: list[ConfigError] = []
    cluster: ClusterSpec | None = None
    deploy: DeploySpec | None = None
    try:
        cluster = load_cluster_spec(config, env=os.environ)
    except ConfigError as exc:
        errors.append(exc)
    if cluster is not None and cluster.serve is not None:  # the Serve config file it names, too
        from ray_serve_cai.cli.cluster_open import project_dir
        from ray_serve_cai.config.serve import load_serve_config

        try:
            load_serve_config(cluster.serve.config, project_dir())
        except ConfigError as exc:
            errors.append(exc)
    jobs_path = jobs if jobs is not None else Path(DEFAULT_JOBS_FILE)
    if jobs is not None or jobs_path.exists():
        try:
            deploy = load_deploy_spec(jobs_path, env=os.environ)
        except ConfigError as exc:
            errors.append(exc)

    if errors:
        for error in errors:
            for line in error.lines():
                typer.echo(line, err=True)
        if as_json:
            problems = [
                {"source": e.source, "field": p.field, "message": p.message}
                for e in errors
                for p in e.problems
            ]
            typer.echo(json.dumps({"valid": False, "problems": problems}, indent=2))
        raise typer.Exit(EXIT_BAD_INPUT)

    assert cluster is not None
    if as_json:
        typer.echo(json.dumps(_summary(cluster, deploy), indent=2))
        return
    _print_summary(cluster, deploy, config, jobs_path)


def _summary(cluster: ClusterSpec, deploy: DeploySpec | None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "valid": True,
        "cluster": cluster.model_dump(mode="json"),
        "nodes": [node.model_dump(mode="json") for node in desired_nodes(cluster)],
    }
    if deploy is not None:
        result["deploy"] = {
            "project": deploy.project.model_dump(mode="json"),
            "jobs": [job.model_dump(mode="json") for job in deploy.chain_order()],
        }
    return result


def _print_summary(cluster: ClusterSpec, deploy: DeploySpec | None, config: Path, jobs_path: Path) -> None:
    nodes = desired_nodes(cluster)
    typer.echo(
        f"{config}: cluster {cluster.name!r}: 1 head + {cluster.total_workers} workers "
        f"in {len(cluster.worker_groups)} group(s), auth {'token' if cluster.auth_token else 'disabled'}"
    )
    rows = [("APP", "ROLE", "CPU", "MEM GiB", "GPU", "RUNTIME", "SPEC HASH")]
    for node in nodes:
        rows.append(
            (
                node.name,
                node.role,
                node.environment["RAY_CAI_NUM_CPUS"] if node.role == "head" else _num(node.cpu),
                _num(node.memory),
                str(node.gpus),
                node.runtime_identifier or "(project default)",
                node.spec_hash,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        typer.echo(("  " + "  ".join(cells)).rstrip())
    if deploy is not None:
        typer.echo(f"{jobs_path}: project {deploy.project.name!r}, git {deploy.project.git_url or '(none)'}")
        for job in deploy.chain_order():
            after = f" after {job.parent_job_key}" if job.parent_job_key else ""
            typer.echo(
                f"  {job.key}: {job.name!r} {job.script} ({_num(job.cpu)} CPU, {_num(job.memory)} GiB){after}"
            )
        for run in deploy.scheduled_runs.values():
            zone = run.timezone or "UTC"
            typer.echo(
                f"  {run.key}: {run.name!r} scheduled {run.schedule!r} ({zone}): ray-cai run -- {run.command}"
            )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
