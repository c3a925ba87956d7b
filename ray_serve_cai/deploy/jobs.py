"""The chained CML jobs: create or update them by exact name, decide which must run, run and follow.

Only the top-most stale job of a chain is started; CML starts each child by itself when its
parent's run succeeds (CML's job dependencies), so the orchestrator finds each child's new run and follows
it until the last job ends. A job that already has an active run is followed, never started twice.
A run CML skipped (`ENGINE_SKIPPED`, e.g. a child whose job already had a run going) has ended: it is
reported as skipped, never waited for; `ENGINE_UNKNOWN` gets `UNKNOWN_GRACE` seconds to turn into
a real status.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ray_serve_cai.cml import (
    ENGINE_SKIPPED,
    ENGINE_UNKNOWN,
    AmbiguousName,
    CMLClient,
    Job,
    JobRun,
    create_or_find,
    parse_timestamp,
)
from ray_serve_cai.config import DeploySpec, JobSpec
from ray_serve_cai.errors import OperationFailed
from ray_serve_cai.waiting import poll_until

FINGERPRINT_VAR = "RAY_CAI_FINGERPRINT"
JOB_KEY_VAR = "RAY_CAI_JOB_KEY"

# Outcome status of a job whose work is done while its run stays to supervise the cluster.
SUPERVISING = "SUPERVISING"

# How long a child may take to appear after its parent succeeded before we call it missing.
CHILD_APPEAR_TIMEOUT = 120.0
# How long a run may stay `ENGINE_UNKNOWN` before it is reported as such instead of waited for.
UNKNOWN_GRACE = 120.0
# The outcome action of a run CML skipped.
SKIPPED_BY_CML = "skipped by CML"


class JobChainError(OperationFailed):
    """A job of the chain failed or could not be followed; the message names it and its log."""


@dataclass
class DesiredJob:
    """A job as it must exist in CML, with the fingerprint of its inputs."""

    spec: JobSpec
    fields: dict[str, Any]  # create/patch fields except the parent
    fingerprint: str


@dataclass
class JobOutcome:
    key: str
    name: str
    job_id: str
    action: str = "skipped"  # skipped (up to date) | ran | skipped by CML | not run
    status: str = ""
    run_id: str | None = None
    duration: float | None = None
    log_hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "job_id": self.job_id,
            "action": self.action,
            "status": self.status,
            "run_id": self.run_id,
            "duration_seconds": None if self.duration is None else round(self.duration, 1),
            "log": self.log_hint,
        }


@dataclass
class ChainState:
    jobs: dict[str, Job] = field(default_factory=dict)  # key → CML job
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    stale: set[str] = field(default_factory=set)  # must run: changed, or its latest run did not succeed
    changed: set[str] = field(default_factory=set)  # inputs changed (or forced): a running run is outdated


def _timestamp(value: Any) -> datetime | None:
    """A CML timestamp (any RFC 3339 form, on every supported Python) as a datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return parse_timestamp(str(value))


def _drifted(job: Job, fields: Mapping[str, Any], parent_id: str | None) -> dict[str, Any]:
    """The fields (and parent) whose CML value differs from the desired one."""
    patch: dict[str, Any] = {}
    for name, want in fields.items():
        have = getattr(job, name, None)
        if name in {"cpu", "memory"} and have is not None and want is not None:
            same = abs(float(have) - float(want)) < 1e-9
        elif name == "arguments":
            same = (have or "") == (want or "")
        else:
            same = have == want
        if not same:
            patch[name] = want
    if (job.parent_id or None) != parent_id:
        patch["parent_id"] = parent_id or ""
    return patch


def ensure_jobs(
    client: CMLClient, project_id: str, spec: DeploySpec, desired: Mapping[str, DesiredJob], *, force: bool
) -> ChainState:
    """Create missing jobs and update drifted ones (parents first); mark the jobs that must run."""
    state = ChainState()
    existing: dict[str, list[Job]] = {}
    for job in client.list_jobs(project_id):
        existing.setdefault(job.name, []).append(job)
    for job_spec in spec.chain_order():
        want = desired[job_spec.key]
        parent_id = state.jobs[job_spec.parent_job_key].id if job_spec.parent_job_key else None
        matches = existing.get(job_spec.name, [])
        if len(matches) > 1:
            ids = ", ".join(j.id for j in matches)
            raise AmbiguousName(f"several jobs are named {job_spec.name!r} ({ids}); delete the extra ones")
        if not matches:
            job = create_or_find(
                lambda want=want, parent_id=parent_id: client.create_job(
                    project_id, parent_id=parent_id, **want.fields
                ),
                lambda name=job_spec.name: client.find_job_by_name(project_id, name),
                what=f"job {job_spec.name!r}",
            )
            state.created.append(job_spec.key)
            state.stale.add(job_spec.key)
            state.changed.add(job_spec.key)
        else:
            job = matches[0]
            old_fingerprint = job.environment.get(FINGERPRINT_VAR)
            patch = _drifted(job, want.fields, parent_id)
            if patch:
                job = client.update_job(project_id, job.id, **patch)
                state.updated.append(job_spec.key)
            if (
                force
                or old_fingerprint != want.fingerprint
                or not _latest_run_current(client, project_id, job)
            ):
                state.stale.add(job_spec.key)
        state.jobs[job_spec.key] = job
    return state


def _latest_run_current(client: CMLClient, project_id: str, job: Job) -> bool:
    """The job's newest run succeeded and started after the job's definition last changed."""
    run = client.latest_job_run(project_id, job.id)
    if run is None or not run.succeeded:
        return False
    run_at, updated_at = _timestamp(run.created_at), _timestamp(job.updated_at)
    return run_at is None or updated_at is None or run_at >= updated_at


def runs_to_start(spec: DeploySpec, stale: set[str]) -> list[JobSpec]:
    """The top-most stale jobs: their descendants run by themselves when they succeed."""
    return [j for j in spec.chain_order() if j.key in stale and j.parent_job_key not in stale]


ProgressFn = Callable[[str], None]


def _log_hint(run: JobRun | None, job: Job) -> str:
    local_log = (run.model_extra or {}).get("log_path") if run is not None else None
    if local_log:
        return f"log: {local_log}"
    return f"log: CML UI → Jobs → {job.name} → History → latest run"


@dataclass
class _Follower:
    """One job of the chain while it is followed: first waiting for its run to appear (a child that
    CML starts after its parent), then polling that run until it ends (or is done while running)."""

    job: Job
    outcome: JobOutcome
    run: JobRun | None = None
    started: float = 0.0  # monotonic time the run was first seen
    parent_created: datetime | None = None  # a child's run must be created after its parent's
    parent_ended: float = 0.0
    done_early: Callable[[], bool] | None = None
    unknown_since: float | None = None  # monotonic time the run was first seen ENGINE_UNKNOWN

    def poll(self, client: CMLClient, project_id: str, say: ProgressFn) -> bool:
        """One look at the job; True when it has ended (its outcome is filled in)."""
        if self.run is None:
            return self._look_for_run(client, project_id, say)
        run = self.run = client.get_job_run(project_id, self.job.id, self.run.id)
        if not run.is_terminal and self.done_early is not None and self.done_early():
            self._finish(run, SUPERVISING, time.monotonic() - self.started)
            say(f"{self.job.name}: its work is done; the run stays to supervise the cluster ({run.id})")
            return True
        if run.status == ENGINE_UNKNOWN:
            return self._still_unknown(run, say)
        self.unknown_since = None
        if not run.is_terminal:
            return False
        if run.status == ENGINE_SKIPPED:
            self._finish(run, run.status, 0.0)
            self.outcome.action = SKIPPED_BY_CML
            say(f"{self.job.name}: CML skipped run {run.id} (it did not run)")
            return True
        duration = _run_duration(run) or time.monotonic() - self.started
        self._finish(run, run.status, duration)
        say(f"{self.job.name}: {run.status.removeprefix('ENGINE_').lower()} after {duration:.0f}s")
        return True

    def _still_unknown(self, run: JobRun, say: ProgressFn) -> bool:
        """`ENGINE_UNKNOWN`: wait `UNKNOWN_GRACE` seconds for a real status, then report it as is."""
        now = time.monotonic()
        if self.unknown_since is None:
            self.unknown_since = now
            say(
                f"{self.job.name}: CML reports ENGINE_UNKNOWN for run {run.id}; "
                f"waiting up to {UNKNOWN_GRACE:.0f}s"
            )
        if now - self.unknown_since < UNKNOWN_GRACE:
            return False
        self._finish(run, run.status, now - self.started)
        say(
            f"{self.job.name}: run {run.id} stayed ENGINE_UNKNOWN for {UNKNOWN_GRACE:.0f}s; "
            "not waiting longer"
        )
        return True

    def _look_for_run(self, client: CMLClient, project_id: str, say: ProgressFn) -> bool:
        run = client.latest_job_run(project_id, self.job.id)
        created = _timestamp(run.created_at) if run else None
        if run is not None and (
            self.parent_created is None or created is None or created >= self.parent_created
        ):
            self.run, self.started = run, time.monotonic()
            say(f"{self.job.name}: started by CML after its parent ({run.id})")
            return False
        if time.monotonic() - self.parent_ended > CHILD_APPEAR_TIMEOUT:
            raise JobChainError(
                f"job {self.job.name!r} did not start within {CHILD_APPEAR_TIMEOUT:.0f}s after its parent "
                "succeeded; check that its parent is set in CML (Jobs → Settings → Dependency)"
            )
        return False

    def _finish(self, run: JobRun, status: str, duration: float) -> None:
        outcome = self.outcome
        outcome.action, outcome.status, outcome.run_id = "ran", status, run.id
        outcome.duration = duration
        outcome.log_hint = _log_hint(run, self.job)


def run_and_follow(
    client: CMLClient,
    project_id: str,
    spec: DeploySpec,
    state: ChainState,
    *,
    timeout: float,
    poll_interval: float = 2.0,
    progress: ProgressFn | None = None,
    done_while_running: Mapping[str, Callable[[], bool]] | None = None,
) -> dict[str, JobOutcome]:
    """Start the top-most stale jobs and follow the chain to its end. Never raises for a failed job:
    the outcomes say what happened; `JobChainError` when following itself is impossible, WaitTimeout
    when the chain does not end within `timeout`.

    A run still in progress whose inputs changed is stopped first (CML allows one active run per job).
    `done_while_running[key]()` marks a job done while its run keeps going (a launch job that stays
    to supervise the cluster): its outcome is `SUPERVISING`."""
    say = progress or (lambda _msg: None)
    outcomes = {
        j.key: JobOutcome(key=j.key, name=j.name, job_id=state.jobs[j.key].id) for j in spec.chain_order()
    }
    deadline = time.monotonic() + timeout
    early = dict(done_while_running or {})

    def follower(key: str, **fields: Any) -> _Follower:
        return _Follower(state.jobs[key], outcomes[key], done_early=early.get(key), **fields)

    latest = _stop_outdated_runs(client, project_id, spec, state, deadline, say)
    active = [
        follower(
            key,
            run=_start_or_join(client, project_id, state.jobs[key], latest[key], say),
            started=time.monotonic(),
        )
        for key in (j.key for j in runs_to_start(spec, state.stale))
    ]

    def chain_ended() -> bool:
        for one in list(active):
            if one.poll(client, project_id, say):
                active.remove(one)
                if one.run is not None and one.run.succeeded:
                    parent_created = _timestamp(one.run.created_at)
                    active.extend(
                        follower(child.key, parent_created=parent_created, parent_ended=time.monotonic())
                        for child in spec.children(one.outcome.key)
                    )
        return not active

    if active:
        poll_until(
            chain_ended,
            timeout=max(0.0, deadline - time.monotonic()),
            interval=poll_interval,
            what="the job chain to end",
            describe_last=lambda: "still waiting for: " + ", ".join(one.job.name for one in active),
        )
    for key, outcome in outcomes.items():
        if outcome.action == "skipped" and not outcome.status:  # never followed
            outcome.action, outcome.status = (
                ("not run", "") if key in state.stale else ("skipped", "up to date")
            )
    return outcomes


def _stop_outdated_runs(
    client: CMLClient, project_id: str, spec: DeploySpec, state: ChainState, deadline: float, say: ProgressFn
) -> dict[str, JobRun | None]:
    """The latest run of every stale job, after stopping the active ones that are outdated: their
    inputs changed, or the chain will start them again from an ancestor."""
    top_most = {j.key for j in runs_to_start(spec, state.stale)}
    latest: dict[str, JobRun | None] = {}
    for job_spec in spec.chain_order():
        if job_spec.key not in state.stale:
            continue
        job = state.jobs[job_spec.key]
        previous = latest[job_spec.key] = client.latest_job_run(project_id, job.id)
        outdated = job_spec.key in state.changed or job_spec.key not in top_most
        if previous is not None and previous.is_active and outdated:
            say(f"{job_spec.name}: stopping run {previous.id} (outdated: the chain runs it again)")
            latest[job_spec.key] = _stop_and_wait(client, project_id, job, previous, deadline)
    return latest


def _start_or_join(
    client: CMLClient, project_id: str, job: Job, previous: JobRun | None, say: ProgressFn
) -> JobRun:
    """The run to follow for a top-most job: the one in progress, else a new one."""
    if previous is not None and previous.is_active:
        say(f"{job.name}: following the run already in progress ({previous.id})")
        return previous
    run = create_or_find(
        lambda: client.create_job_run(project_id, job.id),
        lambda: _newer_run(client, project_id, job.id, previous),
        what=f"run of job {job.name!r}",
    )
    say(f"{job.name}: started run {run.id}")
    return run


def _stop_and_wait(client: CMLClient, project_id: str, job: Job, run: JobRun, deadline: float) -> JobRun:
    """Stop a run and wait (until `deadline`) until it has ended."""
    client.stop_job_run(project_id, job.id, run.id)

    def ended() -> JobRun | None:
        current = client.get_job_run(project_id, job.id, run.id)
        return current if current.is_terminal else None

    return poll_until(
        ended,
        timeout=max(0.0, deadline - time.monotonic()),
        interval=1.0,
        what=f"run {run.id} of job {job.name!r} to stop",
        describe_last=lambda: "stop it in the CML UI and deploy again",
    )


def _newer_run(client: CMLClient, project_id: str, job_id: str, previous: JobRun | None) -> JobRun | None:
    """The job's latest run if it is not `previous` (a run our lost create started)."""
    latest = client.latest_job_run(project_id, job_id)
    if latest is None or (previous is not None and latest.id == previous.id):
        return None
    return latest


def _run_duration(run: JobRun) -> float | None:
    start = _timestamp(run.running_at) or _timestamp(run.starting_at) or _timestamp(run.created_at)
    end = _timestamp(run.finished_at)
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())
