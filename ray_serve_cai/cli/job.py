"""`ray-cai job submit / status / logs / stop / list` and `ray-cai logs`: Ray's Jobs API and a node's
Ray logs through the head's application URL, from anywhere that URL reaches (a laptop, a CI runner).

The cluster is found like the cluster commands find it (`--local`, `--project`, `--config`); requests
carry the CML API key, the head adds the Ray token. Jobs run in the project directory, so the code
deployed from git is there; `--runtime-env` with a local `working_dir` ships uncommitted code (Ray's
package upload, so it needs Ray installed here).
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from ray_serve_cai.access.head import AppEndpoint, head_endpoint
from ray_serve_cai.access.jobs import (
    SUCCEEDED,
    JobInfo,
    JobInputError,
    JobsClient,
    JobSubmission,
    check_local_packages,
    load_runtime_env,
    upload_local_packages,
)
from ray_serve_cai.access.logs import DEFAULT_FILE, NodeLogs, check_log_options
from ray_serve_cai.cli.cluster_open import open_cluster
from ray_serve_cai.cli.common import (
    DEFAULT_CONFIG,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
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
from ray_serve_cai.errors import RayCaiError, WaitTimeout

app = typer.Typer(
    no_args_is_help=True,
    help="Ray jobs on the cluster through the head's application URL (Ray's Jobs REST API).",
)

JobIdArgument = typer.Argument(..., metavar="ID", help="The job's submission id (as `job submit` printed).")
FollowTimeoutOption = typer.Option(
    None, "--timeout", help="Stop following after this many seconds (default: until the job ends)."
)


@contextmanager
def _head(config: Path, local: bool, project: str | None) -> Iterator[tuple[AppEndpoint, str]]:
    """The head's app URL with the API key (one list call), and the cluster name. The CML client is
    closed before the work starts: everything after goes to the app URL."""
    with open_cluster(config, local, project) as cluster:
        endpoint = head_endpoint(cluster.client, cluster.project_id, cluster.spec.name)
        name = cluster.spec.name
    yield endpoint, name


def _hint(local: bool, project: str | None, config: Path) -> str:
    """The target flags a follow-up command needs, as the user gave them."""
    parts = [" --local"] if local else []
    if project:
        parts.append(f" -p {project}")
    if config != Path("ray_cluster_config.yaml"):
        parts.append(f" -c {config}")
    return "".join(parts)


def _positive_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout <= 0:
        fail("--timeout: must be more than 0 seconds", EXIT_BAD_INPUT)


def _parse_metadata(items: list[str]) -> dict[str, str] | None:
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise JobInputError(f"--metadata: {item!r} must look like KEY=VALUE")
        metadata[key.strip()] = value
    return metadata or None


def _parse_resources(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        raise JobInputError(
            f"--entrypoint-resources: {text!r} is not JSON, e.g. '{{\"GPU_A100\": 1}}'"
        ) from None
    if not isinstance(data, dict):
        raise JobInputError("--entrypoint-resources: must be a JSON object of resource names to amounts")
    return data


class _StatusPrinter:
    """Prints the job's status on stderr when it changes while its logs are followed (a job can be
    PENDING for minutes, waiting for resources or installing its runtime env, printing nothing)."""

    def __init__(self, jobs: JobsClient, submission_id: str, interval: float = 5.0) -> None:
        self.jobs, self.submission_id, self.interval = jobs, submission_id, interval
        self.stop = threading.Event()
        self.last = ""
        self.thread = threading.Thread(target=self._loop, name="job-status", daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                status = self.jobs.get(self.submission_id).status
            except RayCaiError:
                continue
            if status != self.last and not self.stop.is_set():
                if self.last:
                    err_console.print(f"[dim]job {self.submission_id}: {status}[/]")
                self.last = status

    def __enter__(self) -> _StatusPrinter:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()


def _follow_and_exit(
    jobs: JobsClient,
    submission_id: str,
    *,
    timeout: float | None,
    json_out: bool,
    hint: str,
) -> None:
    """Follow the logs until the job ends; exit 0 SUCCEEDED, 1 FAILED/STOPPED, 130 on Ctrl-C."""
    out = sys.stderr if json_out else sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    err_console.print(
        f"following the logs of job {submission_id} (Ctrl-C stops following; the job keeps running)"
    )
    try:
        with _StatusPrinter(jobs, submission_id):
            final = jobs.follow(
                submission_id,
                write,
                timeout=timeout,
                on_notice=lambda text: err_console.print(f"[yellow]note: {escape(text)}[/]"),
            )
    except KeyboardInterrupt:
        err_console.print(
            f"\nstopped following: job {submission_id} keeps running on the cluster "
            f"(`ray-cai job logs {submission_id} --follow{hint}` follows it again, "
            f"`ray-cai job stop {submission_id}{hint}` stops it)"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except WaitTimeout:
        fail(
            f"stopped following job {submission_id} after {timeout:g}s; it keeps running "
            f"(`ray-cai job status {submission_id}{hint}`)"
        )
    _print_final(final, json_out)
    raise typer.Exit(EXIT_OK if final.status == SUCCEEDED else EXIT_FAILED)


def _print_final(final: JobInfo, json_out: bool) -> None:
    if json_out:
        print_json(final.as_dict())
    style = "green" if final.status == SUCCEEDED else "red"
    err_console.print(f"[{style}]{escape(final.summary())}[/]")


def entrypoint_command(args: list[str]) -> str:
    """The shell command Ray runs: several words are quoted as given (`-- python -c "print(1)"`, as
    `ray job submit` does); a single word is taken as a whole command line (`-- "make data && python
    train.py"`), so pipes and `&&` work."""
    return args[0] if len(args) == 1 else shlex.join(args)


@app.command("submit", context_settings={"allow_interspersed_args": False})
def submit(
    entrypoint: list[str] = typer.Argument(
        ...,
        metavar="ENTRYPOINT",
        help="The command to run, after `--` (e.g. -- python train.py --epochs 3; one quoted word is a "
        "whole shell command line). It runs in the project directory, where the code deployed from git is.",
    ),
    wait: bool = typer.Option(
        True, "--wait/--no-wait", help="Follow the logs until the job ends (default), or print its id."
    ),
    submission_id: str | None = typer.Option(
        None, "--submission-id", help="The job's id (default: a new raysubmit_... id)."
    ),
    runtime_env: Path | None = typer.Option(
        None,
        "--runtime-env",
        help="YAML or JSON file with Ray's runtime_env (pip, env_vars, working_dir, ...). A local "
        "working_dir/py_modules (uncommitted code) is uploaded with Ray's packaging: needs Ray here.",
    ),
    num_cpus: float | None = typer.Option(
        None, "--entrypoint-num-cpus", help="CPUs to reserve for the entrypoint itself."
    ),
    num_gpus: float | None = typer.Option(
        None, "--entrypoint-num-gpus", help="GPUs to reserve for the entrypoint itself."
    ),
    memory: int | None = typer.Option(
        None, "--entrypoint-memory", help="Memory (bytes) to reserve for the entrypoint itself."
    ),
    resources: str | None = typer.Option(
        None, "--entrypoint-resources", help="Other resources for the entrypoint, JSON: '{\"GPU_A100\": 1}'."
    ),
    metadata: list[str] = typer.Option([], "--metadata", help="KEY=VALUE to attach to the job (repeatable)."),
    timeout: float | None = FollowTimeoutOption,
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: bool = typer.Option(
        False, "--json", help="Final job state as JSON on stdout (the logs then go to stderr)."
    ),
) -> None:
    """Submit a job and follow its logs. Exit 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED."""
    _positive_timeout(timeout)
    hint = _hint(local, project, config)

    def run() -> None:
        env = load_runtime_env(runtime_env) if runtime_env is not None else None
        request = JobSubmission(
            entrypoint=entrypoint_command(entrypoint),
            submission_id=submission_id,
            runtime_env=env,
            metadata=_parse_metadata(metadata),
            entrypoint_num_cpus=num_cpus,
            entrypoint_num_gpus=num_gpus,
            entrypoint_memory=memory,
            entrypoint_resources=_parse_resources(resources),
        )
        request.validate()
        packages = check_local_packages(env or {})
        with _head(config, local, project) as (endpoint, cluster):
            if packages:
                err_console.print(
                    f"uploading {', '.join(packages)} (Ray's package upload, through {endpoint.url})"
                )
                request = replace(request, runtime_env=upload_local_packages(endpoint, env or {}))
            with JobsClient(endpoint) as jobs:
                job_id = jobs.submit(request)
                err_console.print(f"submitted job {job_id} to cluster {cluster!r} ({endpoint.url})")
                if not wait:
                    if json_out:
                        print_json({"submission_id": job_id, "status": jobs.get(job_id).status})
                    else:
                        sys.stdout.write(job_id + "\n")
                        err_console.print(f"follow it: ray-cai job logs {job_id} --follow{hint}")
                    return
                _follow_and_exit(jobs, job_id, timeout=timeout, json_out=json_out, hint=hint)

    run_command(run)


def _when(millis: int | None, *, short: bool = False) -> str:
    if not millis:
        return "-"
    moment = datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
    return moment.strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S UTC")


@app.command("status")
def status(
    submission_id: str = JobIdArgument,
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
) -> None:
    """A job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), entrypoint and times."""

    def run() -> None:
        with _head(config, local, project) as (endpoint, _), JobsClient(endpoint) as jobs:
            info = jobs.get(submission_id)
        if json_out:
            print_json(info.as_dict())
            return
        out_console.print(f"job {escape(info.id)}: {info.status}")
        out_console.print(f"  entrypoint: {escape(info.entrypoint)}")
        out_console.print(f"  started:    {_when(info.start_time)}")
        if info.end_time:
            out_console.print(f"  ended:      {_when(info.end_time)}")
        if info.duration is not None:
            out_console.print(f"  duration:   {info.duration:.1f}s")
        if info.message:
            out_console.print(f"  message:    {escape(info.message.strip().splitlines()[0])}")

    run_command(run)


@app.command("logs")
def job_logs(
    submission_id: str = JobIdArgument,
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing until the job ends; exit 0 SUCCEEDED, 1 otherwise."
    ),
    timeout: float | None = FollowTimeoutOption,
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
) -> None:
    """What the job printed (stdout and stderr of its entrypoint)."""
    _positive_timeout(timeout)
    hint = _hint(local, project, config)

    def run() -> None:
        with _head(config, local, project) as (endpoint, _), JobsClient(endpoint) as jobs:
            if follow:
                jobs.get(submission_id)  # an unknown id fails here, with one line
                _follow_and_exit(jobs, submission_id, timeout=timeout, json_out=False, hint=hint)
            sys.stdout.write(jobs.logs(submission_id))
            sys.stdout.flush()

    run_command(run)


@app.command("stop")
def stop(
    submission_id: str = JobIdArgument,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until Ray reports the job ended."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the job to end."),
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
) -> None:
    """Stop a running job (Ray sends SIGTERM to its entrypoint, then SIGKILL)."""
    _positive_timeout(timeout)

    def run() -> None:
        with _head(config, local, project) as (endpoint, _), JobsClient(endpoint) as jobs:
            stopped = jobs.stop(submission_id)
            info = jobs.wait(submission_id, timeout=timeout) if wait and stopped else jobs.get(submission_id)
        if json_out:
            print_json({"submission_id": submission_id, "stopped": stopped, "status": info.status})
        elif stopped:
            out_console.print(f"job {escape(submission_id)}: stop requested; now {info.status}")
        else:
            out_console.print(f"job {escape(submission_id)} had already ended ({info.status})")

    run_command(run)


@app.command("list")
def list_jobs(
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
) -> None:
    """Every job on the cluster: submitted jobs and the drivers of `ray.init` clients, oldest first."""

    def run() -> None:
        with _head(config, local, project) as (endpoint, _), JobsClient(endpoint) as jobs:
            found = sorted(jobs.list(), key=lambda j: j.start_time or 0)
        if json_out:
            print_json([job.as_dict() for job in found])
            return
        rows = [("ID", "STATUS", "STARTED", "TOOK", "ENTRYPOINT")]
        for job in found:
            entry = " ".join(job.entrypoint.split())
            if job.type != "SUBMISSION":
                entry = f"({job.type.lower()}) {entry}"
            took = f"{job.duration:.0f}s" if job.duration is not None else "-"
            rows.append((job.id, job.status, _when(job.start_time, short=True), took, entry))
        # Plain aligned columns (like kubectl): ids stay whole, the entrypoint is cut to the width.
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        room = max(20, out_console.width - sum(widths) - 8)
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=False)]
            entry = row[4] if len(row[4]) <= room else row[4][: room - 3] + "..."
            sys.stdout.write("  ".join([*cells, entry]).rstrip() + "\n")
        if not found:
            out_console.print("no jobs yet (`ray-cai job submit -- python -c 'print(1)'` runs one)")

    run_command(run)


def node_logs(
    node: str | None = typer.Argument(
        None,
        metavar="NODE",
        help="ray-<cluster>-head, ray-<cluster>-<group>-<i>, the short form (head, worker-0) or a Ray "
        "node id (default: the head).",
    ),
    file: str = typer.Option(
        DEFAULT_FILE, "--file", help="Log file, relative to the node's Ray log directory."
    ),
    list_files: bool = typer.Option(False, "--list", "-l", help="List the node's log files instead."),
    tail: int = typer.Option(1000, "--tail", "-n", help="Lines from the end of the file (-1: all)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines (until Ctrl-C)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Stop following after this many seconds."),
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    json_out: JsonFlag = False,
) -> None:
    """A node's Ray logs (raylet.out by default; --list shows the files) through the head's app URL."""
    _positive_timeout(timeout)
    if follow and (list_files or json_out):
        fail("--follow: cannot be combined with --list or --json", EXIT_BAD_INPUT)

    def run() -> None:
        check_log_options(file, tail)
        with _head(config, local, project) as (endpoint, cluster), NodeLogs(endpoint) as logs:
            found = logs.find_node(node, cluster)
            if list_files:
                files = logs.list_files(found)
                if json_out:
                    print_json({"node": found.name, "node_id": found.node_id, "files": files})
                else:
                    for kind, names in sorted(files.items()):
                        out_console.print(f"{escape(kind)}: {escape(' '.join(sorted(names)))}")
                return
            if follow:
                _follow_node(logs, found, file, tail, timeout)
                return
            text = logs.read(found, file, tail=tail)
            if json_out:
                print_json({"node": found.name, "node_id": found.node_id, "file": file, "text": text})
            else:
                sys.stdout.write(text)
                sys.stdout.flush()

    run_command(run)


def _follow_node(logs: NodeLogs, node: Any, file: str, tail: int, timeout: float | None) -> None:
    err_console.print(f"following {file} of {node.name} (Ctrl-C to stop)")
    try:
        for chunk in logs.follow(node, file, tail=tail, timeout=timeout):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        err_console.print("\nstopped following")
        return
    except WaitTimeout:
        err_console.print(f"stopped following after {timeout:g}s")
        return
    err_console.print(f"the log stream of {node.name} ended (the node went away?)")


def register(main_app: typer.Typer) -> None:
    main_app.add_typer(app, name="job", help="Ray jobs through the head's application URL.")
    main_app.command("logs")(node_logs)


__all__ = ["app", "node_logs", "register"]
