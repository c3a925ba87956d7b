"""`ray-cai job submit / status / logs / stop / list` and `ray-cai logs`: Ray's Jobs API and a node's
Ray logs through the head's application URL, from anywhere that URL reaches (a laptop, a CI runner).

The cluster is found like the cluster commands find it (`--local`, `--project`, `--config`, or
`--cluster NAME`); requests carry the CML API key, the head adds the Ray token. Jobs run in the project
directory, so the code deployed from git is there; `--runtime-env` with a local `working_dir` ships
uncommitted code (Ray's package upload, so it needs Ray installed here).

Every job submitted through the tool has a record in the project (`.ray-cai/<cluster>/jobs/<id>/`,
kept by the head as the job runs): `job list/status/logs` and `logs NODE` read the project (CML's
project-file API) when the cluster, its head or the node is gone, and say so.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape

from ray_serve_cai.access.head import AccessError, AppEndpoint, head_endpoint
from ray_serve_cai.access.jobs import (
    SUCCEEDED,
    JobInfo,
    JobInputError,
    JobNotFound,
    JobPolicy,
    JobsClient,
    JobSubmission,
    ManagedJob,
    Outcome,
    check_local_packages,
    load_runtime_env,
    upload_local_packages,
)
from ray_serve_cai.access.logs import (
    DEFAULT_FILE,
    LoggedNode,
    NodeLogs,
    NodeLogsError,
    check_log_options,
    driver_log_job,
)
from ray_serve_cai.access.records import ProjectHistory, records_from_ray
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
    open_target,
    out_console,
    print_json,
    run_command,
)
from ray_serve_cai.cml import CMLClient
from ray_serve_cai.config import load_cluster_spec
from ray_serve_cai.config.history import JobRecord
from ray_serve_cai.errors import RayCaiError, WaitTimeout

app = typer.Typer(
    no_args_is_help=True,
    help="Ray jobs on the cluster through the head's application URL (Ray's Jobs REST API); their "
    "records in the project outlive the cluster.",
)

JobIdArgument = typer.Argument(..., metavar="ID", help="The job's submission id (as `job submit` printed).")
FollowTimeoutOption = typer.Option(
    None, "--timeout", help="Stop following after this many seconds (default: until the job ends)."
)
ClusterName = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        help="The cluster's name (default: the name in --config). Needs no config file: the jobs and logs "
        "of a cluster that is gone are read from the project.",
    ),
]
NAME_RULE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def cluster_name(config: Path, cluster: str | None) -> str:
    """`--cluster` as given (checked), else the name in the config file (validated, env overrides on)."""
    if cluster is not None:
        if not NAME_RULE.match(cluster) or len(cluster) > 50:
            raise JobInputError(
                f"--cluster: {cluster!r} must be lowercase letters, digits and '-' (at most 50 characters)"
            )
        return cluster
    return load_cluster_spec(config).name


@dataclass
class ClusterTarget:
    """A cluster by name in a project, with the client open: its head (when up) and its history."""

    client: CMLClient
    project_id: str
    cluster: str

    def head(self) -> AppEndpoint:
        """The head's app URL; `AccessError` when there is no running head."""
        return head_endpoint(self.client, self.project_id, self.cluster)

    def history(self) -> ProjectHistory:
        return ProjectHistory(self.client, self.project_id, self.cluster)


@contextmanager
def cluster_target(
    config: Path, local: bool, project: str | None, cluster: str | None
) -> Iterator[ClusterTarget]:
    name = cluster_name(config, cluster)  # bad input fails here, before any API call
    with open_target(local, project) as target:
        yield ClusterTarget(target.client, target.project_id, name)


def _from_history_note(cluster: str, why: str) -> None:
    err_console.print(f"[yellow]{escape(why)}: from the history kept in the project (.ray-cai/{cluster}/)[/]")


def _hint(local: bool, project: str | None, config: Path, cluster: str | None = None) -> str:
    """The target flags a follow-up command needs, as the user gave them."""
    parts = [" --local"] if local else []
    if project:
        parts.append(f" -p {project}")
    if cluster:
        parts.append(f" --cluster {cluster}")
    elif config != Path("ray_cluster_config.yaml"):
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
        if key.strip().startswith("ray_cai_"):
            raise JobInputError(
                f"--metadata: {key.strip()!r}: keys starting with ray_cai_ are the tool's own"
            )
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


class StatusPrinter:
    """Prints the job's status on stderr when it changes while its logs are followed (a job can be
    PENDING for minutes, waiting for resources or installing its runtime env, printing nothing)."""

    def __init__(self, jobs: JobsClient, current: Callable[[], str], interval: float = 5.0) -> None:
        self.jobs, self.current, self.interval = jobs, current, interval
        self.stop = threading.Event()
        self.last = ""
        self.thread = threading.Thread(target=self._loop, name="job-status", daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            submission_id = self.current()
            try:
                status = self.jobs.get(submission_id).status
            except RayCaiError:
                continue
            line = f"job {submission_id}: {status}"
            if line != self.last and not self.stop.is_set():
                if self.last:
                    err_console.print(f"[dim]{escape(line)}[/]")
                self.last = line

    def __enter__(self) -> StatusPrinter:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()


def writer(json_out: bool) -> Callable[[str], None]:
    """Where the job's output goes: stdout, or stderr when stdout carries JSON."""
    out = sys.stderr if json_out else sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write


def notice(text: str) -> None:
    err_console.print(f"[yellow]note: {escape(text)}[/]")


def follow_managed(managed: ManagedJob, json_out: bool) -> Outcome:
    """Follow a job through its retries until it ends (KeyboardInterrupt passes through)."""
    with StatusPrinter(managed.jobs, lambda: managed.current):
        return managed.follow(writer(json_out), on_notice=notice)


def print_outcome(outcome: Outcome, json_out: bool) -> None:
    if json_out:
        print_json(outcome.as_dict())
    style = "green" if outcome.succeeded else "red"
    err_console.print(f"[{style}]{escape(outcome.summary())}[/]")


def _follow_and_exit(
    jobs: JobsClient,
    submission_id: str,
    *,
    timeout: float | None,
    json_out: bool,
    hint: str,
) -> None:
    """Follow the logs until the job ends; exit 0 SUCCEEDED, 1 FAILED/STOPPED, 130 on Ctrl-C."""
    err_console.print(
        f"following the logs of job {submission_id} (Ctrl-C stops following; the job keeps running)"
    )
    try:
        with StatusPrinter(jobs, lambda: submission_id):
            final = jobs.follow(submission_id, writer(json_out), timeout=timeout, on_notice=notice)
    except KeyboardInterrupt:
        _stopped_following(submission_id, hint)
    except WaitTimeout:
        fail(
            f"stopped following job {submission_id} after {timeout:g}s; it keeps running "
            f"(`ray-cai job status {submission_id}{hint}`)"
        )
    _print_final(final, json_out)
    raise typer.Exit(EXIT_OK if final.status == SUCCEEDED else EXIT_FAILED)


def _stopped_following(submission_id: str, hint: str) -> NoReturn:
    err_console.print(
        f"\nstopped following: job {submission_id} keeps running on the cluster "
        f"(`ray-cai job logs {submission_id} --follow{hint}` follows it again, "
        f"`ray-cai job stop {submission_id}{hint}` stops it)"
    )
    raise typer.Exit(EXIT_INTERRUPTED)


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


MaxRetriesOption = typer.Option(
    0, "--max-retries", help="Retry a FAILED job up to N times, each a new attempt (its own id) under "
    "the same record; a job stopped by the user is never retried."
)  # fmt: skip
DeadlineOption = typer.Option(
    None,
    "--timeout",
    help="Deadline in seconds from submission, over every attempt: the job is then stopped and marked "
    "FAILED with the deadline as the reason (the head enforces it even when this client is gone).",
)

DriverOnOption = typer.Option(
    "auto",
    "--driver-on",
    help="Where the entrypoint (the job's driver) runs: auto (a worker when the head has fault tolerance "
    "on, the cluster has a worker and no --entrypoint-* resources are given: the job outlives a head "
    "restart, not the loss of that worker), workers, or head.",
)


def build_submission(
    entrypoint: list[str],
    *,
    submission_id: str | None = None,
    runtime_env: Path | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    memory: int | None = None,
    resources: str | None = None,
    metadata: list[str] | None = None,
    driver_on: str = "auto",
) -> tuple[JobSubmission, dict[str, Any] | None]:
    """The submission (validated: `JobInputError` names the flag) and its runtime env."""
    env = load_runtime_env(runtime_env) if runtime_env is not None else None
    request = JobSubmission(
        entrypoint=entrypoint_command(entrypoint),
        submission_id=submission_id,
        runtime_env=env,
        metadata=_parse_metadata(metadata or []),
        entrypoint_num_cpus=num_cpus,
        entrypoint_num_gpus=num_gpus,
        entrypoint_memory=memory,
        entrypoint_resources=_parse_resources(resources),
        driver=driver_on,
    )
    request.validate()
    check_local_packages(env or {})  # a missing working_dir, or no Ray to package it: before any call
    return request, env


def with_packages(endpoint: AppEndpoint, request: JobSubmission, env: dict[str, Any] | None) -> JobSubmission:
    """Upload a local working_dir / py_modules (Ray's packaging) and point the runtime env at them."""
    packages = check_local_packages(env or {})
    if not packages:
        return request
    err_console.print(f"uploading {', '.join(packages)} (Ray's package upload, through {endpoint.url})")
    return replace(request, runtime_env=upload_local_packages(endpoint, env or {}))


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
    driver_on: str = DriverOnOption,
    max_retries: int = MaxRetriesOption,
    timeout: float | None = DeadlineOption,
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    cluster: ClusterName = None,
    json_out: bool = typer.Option(
        False, "--json", help="Final job state as JSON on stdout (the logs then go to stderr)."
    ),
) -> None:
    """Submit a job and follow its logs. Exit 0 when it SUCCEEDED, 1 when it FAILED (after its retries,
    or at its deadline) or was STOPPED; Ctrl-C stops following (130), not the job."""
    hint = _hint(local, project, config, cluster)

    def run() -> None:
        policy = JobPolicy(max_retries=max_retries, timeout=timeout)
        policy.validate()
        if max_retries and not wait:
            raise JobInputError("--max-retries: retries need a follower; drop --no-wait")
        request, env = build_submission(
            entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            memory=memory,
            resources=resources,
            metadata=metadata,
            driver_on=driver_on,
        )
        with cluster_target(config, local, project, cluster) as target:
            endpoint = target.head()
            request = with_packages(endpoint, request, env)
            with JobsClient(endpoint) as jobs:
                managed = ManagedJob(jobs, request, policy)
                job_id = managed.submit()
                err_console.print(f"submitted job {job_id} to cluster {target.cluster!r} ({endpoint.url})")
                if not wait:
                    if json_out:
                        print_json({"submission_id": job_id, "status": jobs.get(job_id).status})
                    else:
                        sys.stdout.write(job_id + "\n")
                        err_console.print(f"follow it: ray-cai job logs {job_id} --follow{hint}")
                    return
                err_console.print(
                    f"following the logs of job {job_id} (Ctrl-C stops following; the job keeps running)"
                )
                try:
                    outcome = follow_managed(managed, json_out)
                except KeyboardInterrupt:
                    _stopped_following(managed.current, hint)
        print_outcome(outcome, json_out)
        raise typer.Exit(EXIT_OK if outcome.succeeded else EXIT_FAILED)

    run_command(run)


def _when(millis: int | None, *, short: bool = False) -> str:
    if not millis:
        return "-"
    moment = datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
    return moment.strftime("%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S UTC")


def _took(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    finish = end or datetime.now(timezone.utc).timestamp() * 1000
    return f"{max(0.0, (finish - start) / 1000):.0f}s"


def find_record(target: ClusterTarget, job_id: str) -> tuple[JobRecord, str]:
    """The record `job_id` names (a record id or an attempt's id) and where it came from: the live
    cluster ("ray") when its head answers and Ray knows the job, else the project ("history")."""
    try:
        endpoint = target.head()
    except AccessError as err:
        _from_history_note(target.cluster, str(err))
        return target.history().find(job_id), "history"
    try:
        with JobsClient(endpoint) as jobs:
            live = records_from_ray(jobs.list(), target.cluster)
    except RayCaiError as err:
        _from_history_note(target.cluster, f"the head did not answer ({err})")
        return target.history().find(job_id), "history"
    for record in live:
        if record.submission_id == job_id or any(a.submission_id == job_id for a in record.attempts):
            return record, "ray"
    _from_history_note(target.cluster, f"the cluster's Ray does not know job {job_id!r}")
    return target.history().find(job_id), "history"


@app.command("status")
def status(
    submission_id: str = JobIdArgument,
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    cluster: ClusterName = None,
    json_out: JsonFlag = False,
) -> None:
    """A job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) with Ray's message, entrypoint,
    submitter, times and attempts — from the cluster, or from its record once the cluster is gone."""

    def run() -> None:
        with cluster_target(config, local, project, cluster) as target:
            record, source = find_record(target, submission_id)
        if json_out:
            print_json({**record.to_dict(), "source": source})
            return
        out_console.print(f"job {escape(record.submission_id)}: {record.status}")
        out_console.print(f"  entrypoint: {escape(record.entrypoint)}")
        if record.submitter:
            out_console.print(f"  submitter:  {escape(record.submitter)}")
        out_console.print(f"  started:    {_when(record.start_time)}")
        if record.end_time:
            out_console.print(f"  ended:      {_when(record.end_time)}")
            out_console.print(f"  duration:   {_took(record.start_time, record.end_time)}")
        if record.message:
            out_console.print(f"  message:    {escape(record.message.strip().splitlines()[0])}")
        if len(record.attempts) > 1 or record.max_retries:
            out_console.print(f"  attempts:   {len(record.attempts)} (max retries {record.max_retries})")
            for attempt in record.attempts:
                out_console.print(
                    f"    {attempt.attempt}. {escape(attempt.submission_id)} {attempt.status} "
                    f"{escape(attempt.message.strip().splitlines()[0] if attempt.message else '')}"
                )

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
    cluster: ClusterName = None,
) -> None:
    """What the job printed (stdout and stderr of its entrypoint; every attempt of a retried job).
    From the cluster while Ray knows the job, else from its record in the project."""
    _positive_timeout(timeout)
    hint = _hint(local, project, config, cluster)

    def run() -> None:
        with cluster_target(config, local, project, cluster) as target:
            if follow:
                with JobsClient(target.head()) as jobs:
                    jobs.get(submission_id)  # an unknown id fails here, with one line
                    _follow_and_exit(jobs, submission_id, timeout=timeout, json_out=False, hint=hint)
            text = _live_logs(target, submission_id)
            if text is None:
                text = _history_logs(target, submission_id)
        sys.stdout.write(text)
        sys.stdout.flush()

    run_command(run)


def _live_logs(target: ClusterTarget, submission_id: str) -> str | None:
    """The job's logs from the running cluster; None when the head is gone or Ray does not know it."""
    try:
        endpoint = target.head()
    except AccessError as err:
        _from_history_note(target.cluster, str(err))
        return None
    try:
        with JobsClient(endpoint) as jobs:
            return jobs.logs(submission_id)
    except JobNotFound:
        _from_history_note(target.cluster, f"the cluster's Ray does not know job {submission_id!r}")
    except RayCaiError as err:
        _from_history_note(target.cluster, f"the head did not answer ({err})")
    return None


def _history_logs(target: ClusterTarget, job_id: str) -> str:
    """The record's logs: the attempt `job_id` names, or every attempt (a header on stderr each)."""
    history = target.history()
    record = history.find(job_id)
    # The record's id (its first attempt's too) means every attempt; a retry's id means that one.
    chosen = [a for a in record.attempts if a.submission_id == job_id and job_id != record.submission_id]
    chosen = chosen or list(record.attempts)
    if len(chosen) == 1:
        return history.attempt_log(record, chosen[0].submission_id)
    for attempt in chosen:
        header = f"--- attempt {attempt.attempt}: {attempt.submission_id} {attempt.status}"
        err_console.print(f"[dim]{escape(header)}[/]")
        sys.stdout.write(history.attempt_log(record, attempt.submission_id))
        sys.stdout.flush()
    return ""


@app.command("stop")
def stop(
    submission_id: str = JobIdArgument,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until Ray reports the job ended."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for the job to end."),
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    cluster: ClusterName = None,
    json_out: JsonFlag = False,
) -> None:
    """Stop a running job (Ray sends SIGTERM to its entrypoint, then SIGKILL). Never retried."""
    _positive_timeout(timeout)

    def run() -> None:
        with cluster_target(config, local, project, cluster) as target, JobsClient(target.head()) as jobs:
            # A retried job's record id stops its newest attempt.
            records = {r.submission_id: r for r in records_from_ray(jobs.list(), target.cluster)}
            latest = records[submission_id].latest if submission_id in records else None
            job_id = latest.submission_id if latest is not None else submission_id
            stopped = jobs.stop(job_id)
            info = jobs.wait(job_id, timeout=timeout) if wait and stopped else jobs.get(job_id)
        if json_out:
            print_json({"submission_id": job_id, "stopped": stopped, "status": info.status})
        elif stopped:
            out_console.print(f"job {escape(job_id)}: stop requested; now {info.status}")
        else:
            out_console.print(f"job {escape(job_id)} had already ended ({info.status})")

    run_command(run)


def _list_rows(target: ClusterTarget, history: bool) -> tuple[list[JobRecord], list[JobInfo], str]:
    """The records to list (and the drivers of `ray.init` clients), and where they came from."""
    if history:
        return target.history().records(), [], "history"
    try:
        endpoint = target.head()
        with JobsClient(endpoint) as jobs:
            found = jobs.list()
    except RayCaiError as err:
        _from_history_note(target.cluster, str(err))
        return target.history().records(), [], "history"
    drivers = [j for j in found if j.type != "SUBMISSION" or not j.submission_id]
    return records_from_ray(found, target.cluster), drivers, "ray"


@app.command("list")
def list_jobs(
    history: bool = typer.Option(
        False,
        "--history",
        help="Every job recorded in the project for this cluster name, also from "
        "earlier clusters of that name (default: the jobs of the running cluster).",
    ),
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    cluster: ClusterName = None,
    json_out: JsonFlag = False,
) -> None:
    """The cluster's jobs, oldest first (a retried job is one row); when the cluster or its head is
    gone, the jobs recorded in the project. `--json`: {"jobs": [{submission_id, status, entrypoint,
    attempts, cluster, start_time, end_time}]}."""

    def run() -> None:
        with cluster_target(config, local, project, cluster) as target:
            records, drivers, source = _list_rows(target, history)
        rows = [record.summary() for record in records]
        for driver in drivers:
            rows.append(
                {
                    "submission_id": driver.submission_id,
                    "status": driver.status,
                    "entrypoint": driver.entrypoint,
                    "attempts": 0,
                    "cluster": target.cluster,
                    "start_time": driver.start_time,
                    "end_time": driver.end_time,
                    "job_id": driver.job_id,
                    "type": driver.type,
                }
            )
        rows.sort(key=lambda r: r["start_time"] or 0)
        if json_out:
            print_json({"jobs": rows, "source": source})
            return
        _print_table(rows)
        if not rows:
            out_console.print("no jobs yet (`ray-cai job submit -- python -c 'print(1)'` runs one)")

    run_command(run)


def _print_table(rows: list[dict[str, Any]]) -> None:
    table = [("ID", "STATUS", "STARTED", "TOOK", "TRIES", "ENTRYPOINT")]
    for row in rows:
        entry = " ".join(str(row["entrypoint"] or "").split())
        if row.get("type"):
            entry = f"({str(row['type']).lower()}) {entry}"
        table.append(
            (
                str(row["submission_id"] or row.get("job_id") or "?"),
                str(row["status"]),
                _when(row["start_time"], short=True),
                _took(row["start_time"], row["end_time"]),
                str(row["attempts"] or "-"),
                entry,
            )
        )
    # Plain aligned columns (like kubectl): ids stay whole, the entrypoint is cut to the width.
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    room = max(20, out_console.width - sum(widths) - 10)
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row[:5], widths, strict=False)]
        entry = row[5] if len(row[5]) <= room else row[5][: room - 3] + "..."
        sys.stdout.write("  ".join([*cells, entry]).rstrip() + "\n")


def node_logs(
    node: str | None = typer.Argument(
        None,
        metavar="NODE",
        help="ray-<cluster>-head, ray-<cluster>-<group>-<i>, the short form (head, worker-0) or a Ray "
        "node id (default: the head; for a job's driver log, job-driver-<id>.log, the node its driver "
        "runs on).",
    ),
    file: str = typer.Option(
        DEFAULT_FILE,
        "--file",
        help="Log file, relative to the node's Ray log directory; job-driver-<id>.log is what job <id>'s "
        "driver printed, on the node it runs on.",
    ),
    list_files: bool = typer.Option(False, "--list", "-l", help="List the node's log files instead."),
    tail: int = typer.Option(1000, "--tail", "-n", help="Lines from the end of the file (-1: all)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines (until Ctrl-C)."),
    timeout: float | None = typer.Option(None, "--timeout", help="Stop following after this many seconds."),
    config: ConfigPath = DEFAULT_CONFIG,
    local: LocalFlag = False,
    project: ProjectName = None,
    cluster: ClusterName = None,
    json_out: JsonFlag = False,
) -> None:
    """A node's Ray logs (raylet.out by default; --list shows the files) through the head's app URL;
    for a node that failed, was replaced or autoscaled away (or a cluster that is gone), the copy the
    node kept in the project (.ray-cai/<cluster>/logs/<node>/). Without NODE, a job's driver log
    (--file job-driver-<id>.log) is read on the node Ray ran the driver on (a worker when the head has
    fault tolerance on); --follow of a job still PENDING waits for its driver to start."""
    _positive_timeout(timeout)
    if follow and (list_files or json_out):
        fail("--follow: cannot be combined with --list or --json", EXIT_BAD_INPUT)

    def run() -> None:
        check_log_options(file, tail)
        with cluster_target(config, local, project, cluster) as target:
            logs, found = _live_node(target, node, file, wait=(timeout or JOB_START_WAIT) if follow else 0)
            if logs is None or found is None:
                name = found.name if found is not None else node
                if follow:
                    fail(f"--follow: node {name or 'head'!r} is not running; its kept logs have no new lines")
                _kept_node_logs(target, name, file, tail, list_files, json_out)
                return
            with logs:
                try:
                    _live_node_logs(logs, found, file, tail, list_files, follow, timeout, json_out)
                    return
                except (NodeLogsError, AccessError) as err:
                    if follow:
                        raise
                    _from_history_note(target.cluster, f"{found.name} did not answer ({err})")
            _kept_node_logs(target, found.name, file, tail, list_files, json_out)

    run_command(run)


# How long `logs --follow` of a PENDING job's driver log waits for the driver to start: Ray's own
# limit on a job's start (RAY_JOB_START_TIMEOUT_SECONDS, 15 minutes by default) and a minute more.
JOB_START_WAIT = 16 * 60.0


def _live_node(
    target: ClusterTarget, node: str | None, file: str, *, wait: float
) -> tuple[NodeLogs | None, LoggedNode | None]:
    """The node's live log API and the node; no API (with a note) when the head or the node is gone,
    and then the node when it was found (its logs kept in the project are read)."""
    try:
        endpoint = target.head()
    except AccessError as err:
        _from_history_note(target.cluster, str(err))
        return None, None
    logs = NodeLogs(endpoint)
    try:
        found = _log_node(logs, target.cluster, node, file, wait=wait)
    except (NodeLogsError, AccessError) as err:
        logs.__exit__()
        _from_history_note(target.cluster, str(err))
        return None, None
    if not found.alive:
        logs.__exit__()
        _from_history_note(target.cluster, f"node {found.name} is not alive in Ray")
        return None, found
    return logs, found


def _log_node(logs: NodeLogs, cluster: str, node: str | None, file: str, *, wait: float) -> LoggedNode:
    """NODE as given (the head by default); for a job's driver log without NODE, the node Ray ran the
    driver on (waiting up to `wait` seconds for a PENDING job to start). NODE given for a driver log
    that is elsewhere: that node, with a note naming the driver's."""
    job_id = driver_log_job(file)
    if job_id is None:
        return logs.find_node(node, cluster)
    if node is None:
        if wait > 0:  # a PENDING job is waited for: say what is happening meanwhile
            err_console.print(f"[dim]finding the node of job {escape(job_id)}'s driver (Ray's job info)[/]")
        driver = logs.driver_node(job_id, cluster, wait=wait)
        if driver is not None:
            err_console.print(f"job {escape(job_id)}'s driver runs on {escape(driver.name)}")
            return driver
        return logs.find_node(None, cluster)  # Ray does not know the job, or it never started
    found = logs.find_node(node, cluster)
    try:
        driver = logs.driver_node(job_id, cluster)
    except RayCaiError:
        return found  # the note is a hint: the node asked for is read without it
    if driver is not None and driver.node_id != found.node_id:
        notice(
            f"job {job_id}'s driver runs on {driver.name}, not on {found.name}: this node's {file} has only "
            f"what Ray wrote there before the driver started (`ray-cai logs --file {file}` reads the "
            f"driver's, `ray-cai job logs {job_id}` what it printed)"
        )
    return found


def _kept_node_logs(
    target: ClusterTarget, node: str | None, file: str, tail: int, list_files: bool, json_out: bool
) -> None:
    history = target.history()
    name = history.resolve_node(node)
    if list_files:
        files = history.node_files(name)
        if json_out:
            print_json({"node": name, "source": "history", "files": [f.name for f in files]})
        else:
            for kept in files:
                out_console.print(f"{escape(kept.name)}  {kept.size if kept.size is not None else '-'}")
        return
    text = history.node_log(name, file, tail=tail)
    if json_out:
        print_json({"node": name, "source": "history", "file": file, "text": text})
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def _live_node_logs(
    logs: NodeLogs,
    found: LoggedNode,
    file: str,
    tail: int,
    list_files: bool,
    follow: bool,
    timeout: float | None,
    json_out: bool,
) -> None:
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


def _follow_node(logs: NodeLogs, node: LoggedNode, file: str, tail: int, timeout: float | None) -> None:
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


__all__ = [
    "ClusterName",
    "ClusterTarget",
    "DeadlineOption",
    "DriverOnOption",
    "MaxRetriesOption",
    "app",
    "build_submission",
    "cluster_name",
    "cluster_target",
    "entrypoint_command",
    "follow_managed",
    "node_logs",
    "print_outcome",
    "register",
    "with_packages",
]
