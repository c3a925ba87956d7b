"""What outlives a cluster's nodes, as files in the project: job records and node logs (the format).

The head writes both continuously (`ray_serve_cai.node.history`); clients read them, through the
project file system inside the project or CML's project-file API from outside it
(`ray_serve_cai.access.records`). Layout under the project directory:

    .ray-cai/<cluster>/jobs/<record id>/record.json         one job as submitted, with its attempts
    .ray-cai/<cluster>/jobs/<record id>/<attempt id>.log    what that attempt's driver printed
    .ray-cai/<cluster>/logs/<node name>/...                 the node's Ray logs, kept as they grow

A record's id is its first attempt's submission id; a retry is a new Ray job (its own submission id)
listed under the same record. What only the submitting client knows (who submitted, which run,
the retry budget, the deadline) travels with the job to the head in Ray's own job `metadata`
(`ray_cai_*` keys), so the client never needs write access to the project. No secret is ever written:
the runtime env and the user's own metadata are not copied, and the cluster token is scrubbed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

STATE_DIR = ".ray-cai"
JOBS_DIR = "jobs"
LOGS_DIR = "logs"
RECORD_FILE = "record.json"

# Ray job metadata keys the tool sets at submission (values are strings, as Ray requires).
META_RECORD = "ray_cai_record"
META_ATTEMPT = "ray_cai_attempt"
META_SUBMITTER = "ray_cai_submitter"
META_RUN = "ray_cai_run"
META_MAX_RETRIES = "ray_cai_max_retries"
META_DEADLINE = "ray_cai_deadline"  # epoch seconds: the record's deadline (all attempts)
META_TIMEOUT = "ray_cai_timeout"  # the --timeout it came from, seconds
META_KEYS = (
    META_RECORD,
    META_ATTEMPT,
    META_SUBMITTER,
    META_RUN,
    META_MAX_RETRIES,
    META_DEADLINE,
    META_TIMEOUT,
)

PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"
TERMINAL = frozenset({STOPPED, SUCCEEDED, FAILED})
# A record whose job Ray no longer knows (the head restarted without its state) ends as FAILED.
LOST_MESSAGE = "lost: Ray no longer knows this job (its head restarted without the job's state)"

# Bounds (documented in DEPLOYMENT_GUIDE "Where history and logs live").
DRIVER_LOG_CAP_BYTES = 8 * 1024 * 1024  # per attempt: the newest 8 MiB are kept
NODE_LOG_CAP_BYTES = 100 * 1024 * 1024  # per node, every kept file together
NODE_LOG_FILE_CAP_BYTES = 16 * 1024 * 1024  # per file, then rotated once into `<file>.1`
TRUNCATED_NOTE = "[ray-cai: earlier output dropped: the record keeps the newest {cap} MiB]\n"


def cluster_dir(cluster: str) -> str:
    """`.ray-cai/<cluster>`, relative to the project root."""
    return f"{STATE_DIR}/{cluster}"


def jobs_dir(cluster: str) -> str:
    return f"{cluster_dir(cluster)}/{JOBS_DIR}"


def record_dir(cluster: str, record_id: str) -> str:
    return f"{jobs_dir(cluster)}/{record_id}"


def record_path(cluster: str, record_id: str) -> str:
    return f"{record_dir(cluster, record_id)}/{RECORD_FILE}"


def attempt_log_path(cluster: str, record_id: str, submission_id: str) -> str:
    return f"{record_dir(cluster, record_id)}/{submission_id}.log"


def node_logs_path(cluster: str, node_name: str) -> str:
    """`.ray-cai/<cluster>/logs/<node name>`, relative to the project root."""
    return f"{cluster_dir(cluster)}/{LOGS_DIR}/{node_name}"


def retry_id(record_id: str, attempt: int) -> str:
    """The submission id of attempt `attempt` (1-based): the record id, then `<record>-retry<n>`."""
    return record_id if attempt <= 1 else f"{record_id}-retry{attempt - 1}"


def deadline_message(timeout: float | None) -> str:
    shown = f" of {timeout:g}s" if timeout else ""
    return f"deadline: the job's --timeout{shown} passed; ray-cai stopped it"


@dataclass(frozen=True)
class Attempt:
    """One Ray job of a record."""

    attempt: int
    submission_id: str
    status: str
    message: str = ""
    start_time: int | None = None  # ms since the epoch, as Ray reports it
    end_time: int | None = None
    driver_exit_code: int | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class JobRecord:
    """A job as submitted through the tool: its entrypoint, who submitted it and each attempt."""

    submission_id: str
    cluster: str
    entrypoint: str = ""
    submitter: str | None = None
    run_id: str | None = None
    max_retries: int = 0
    timeout_seconds: float | None = None
    deadline: float | None = None  # epoch seconds
    attempts: tuple[Attempt, ...] = field(default_factory=tuple)
    updated_at: float | None = None

    @property
    def latest(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def status(self) -> str:
        """The newest attempt's status; a stop at the deadline is FAILED (the deadline is the reason)."""
        latest = self.latest
        if latest is None:
            return PENDING
        if latest.status == STOPPED and self.stopped_by_deadline(latest):
            return FAILED
        return latest.status

    @property
    def message(self) -> str:
        latest = self.latest
        if latest is None:
            return ""
        if latest.status == STOPPED and self.stopped_by_deadline(latest):
            return deadline_message(self.timeout_seconds)
        return latest.message

    def stopped_by_deadline(self, attempt: Attempt) -> bool:
        if self.deadline is None:
            return False
        ended = attempt.end_time / 1000 if attempt.end_time else None
        # Ray's end time is when the driver was gone, a little after the stop was asked for.
        return ended is None or ended >= self.deadline - 1

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def start_time(self) -> int | None:
        return self.attempts[0].start_time if self.attempts else None

    @property
    def end_time(self) -> int | None:
        latest = self.latest
        return latest.end_time if latest is not None and latest.is_terminal else None

    def with_attempt(self, attempt: Attempt) -> JobRecord:
        """This record with `attempt` added or replaced (by attempt number), attempts in order."""
        others = [a for a in self.attempts if a.attempt != attempt.attempt]
        return replace(self, attempts=tuple(sorted([*others, attempt], key=lambda a: a.attempt)))

    def summary(self) -> dict[str, Any]:
        """The `job list --json` row."""
        return {
            "submission_id": self.submission_id,
            "status": self.status,
            "entrypoint": self.entrypoint,
            "attempts": len(self.attempts),
            "cluster": self.cluster,
            "start_time": self.start_time,
            "end_time": self.end_time,
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["attempts"] = [asdict(a) for a in self.attempts]
        data["status"] = self.status
        data["message"] = self.message
        data["start_time"] = self.start_time
        data["end_time"] = self.end_time
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobRecord:
        attempts = tuple(
            Attempt(
                attempt=int(a.get("attempt") or 1),
                submission_id=str(a["submission_id"]),
                status=str(a.get("status") or PENDING),
                message=str(a.get("message") or ""),
                start_time=_int_or_none(a.get("start_time")),
                end_time=_int_or_none(a.get("end_time")),
                driver_exit_code=_int_or_none(a.get("driver_exit_code")),
            )
            for a in data.get("attempts") or []
        )
        return cls(
            submission_id=str(data["submission_id"]),
            cluster=str(data.get("cluster") or ""),
            entrypoint=str(data.get("entrypoint") or ""),
            submitter=data.get("submitter"),
            run_id=data.get("run_id"),
            max_retries=int(data.get("max_retries") or 0),
            timeout_seconds=_float_or_none(data.get("timeout_seconds")),
            deadline=_float_or_none(data.get("deadline")),
            attempts=attempts,
            updated_at=_float_or_none(data.get("updated_at")),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        return cls.from_dict(json.loads(text))


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        number = None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None
    return number if number is not None and math.isfinite(number) else None


@dataclass(frozen=True)
class TrackedJob:
    """Where one Ray job (as `GET /api/jobs/` lists it) belongs: its record and attempt number."""

    record_id: str
    attempt: int
    submission_id: str


def tracked(job: Mapping[str, Any]) -> TrackedJob | None:
    """The record a Ray job row belongs to; None for drivers of `ray.init` clients (no submission)."""
    submission_id = job.get("submission_id")
    if not submission_id or str(job.get("type") or "SUBMISSION").upper() != "SUBMISSION":
        return None
    metadata = job.get("metadata") or {}
    record_id = str(metadata.get(META_RECORD) or submission_id)
    attempt = _int_or_none(metadata.get(META_ATTEMPT)) or 1
    return TrackedJob(record_id, max(1, attempt), str(submission_id))


def scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def merge_job(
    record: JobRecord | None, cluster: str, job: Mapping[str, Any], secrets: Sequence[str] = ()
) -> JobRecord:
    """`record` (None: a new one) updated with one row of Ray's job list. Pure; never copies the
    runtime env or metadata beyond the `ray_cai_*` keys."""
    where = tracked(job)
    assert where is not None
    metadata = job.get("metadata") or {}
    attempt = Attempt(
        attempt=where.attempt,
        submission_id=where.submission_id,
        status=str(job.get("status") or PENDING).upper(),
        message=scrub(str(job.get("message") or ""), secrets)[:4000],
        start_time=_int_or_none(job.get("start_time")),
        end_time=_int_or_none(job.get("end_time")),
        driver_exit_code=_int_or_none(job.get("driver_exit_code")),
    )
    if record is None:
        record = JobRecord(submission_id=where.record_id, cluster=cluster)
    if where.attempt == 1 or not record.entrypoint:
        record = replace(
            record,
            entrypoint=scrub(str(job.get("entrypoint") or ""), secrets),
            submitter=metadata.get(META_SUBMITTER) or record.submitter,
            run_id=metadata.get(META_RUN) or record.run_id,
            max_retries=_int_or_none(metadata.get(META_MAX_RETRIES)) or record.max_retries,
            timeout_seconds=_float_or_none(metadata.get(META_TIMEOUT)) or record.timeout_seconds,
            deadline=_float_or_none(metadata.get(META_DEADLINE)) or record.deadline,
        )
    return record.with_attempt(attempt)


def lost(record: JobRecord, now_ms: int) -> JobRecord:
    """A record whose newest attempt Ray no longer knows: that attempt ends FAILED (lost)."""
    latest = record.latest
    if latest is None or latest.is_terminal:
        return record
    return record.with_attempt(replace(latest, status=FAILED, message=LOST_MESSAGE, end_time=now_ms))


def cap_log(text: str, cap: int = DRIVER_LOG_CAP_BYTES) -> str:
    """The newest `cap` bytes of a driver log (cut at a line start), with a note when cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= cap:
        return text
    kept = data[-cap:]
    newline = kept.find(b"\n")
    if 0 <= newline < 4096:
        kept = kept[newline + 1 :]
    return TRUNCATED_NOTE.format(cap=cap // (1024 * 1024)) + kept.decode("utf-8", "replace")


__all__ = [
    "FAILED",
    "META_ATTEMPT",
    "META_DEADLINE",
    "META_KEYS",
    "META_MAX_RETRIES",
    "META_RECORD",
    "META_RUN",
    "META_SUBMITTER",
    "META_TIMEOUT",
    "NODE_LOG_CAP_BYTES",
    "NODE_LOG_FILE_CAP_BYTES",
    "PENDING",
    "RUNNING",
    "STOPPED",
    "SUCCEEDED",
    "TERMINAL",
    "Attempt",
    "JobRecord",
    "TrackedJob",
    "attempt_log_path",
    "cap_log",
    "deadline_message",
    "lost",
    "merge_job",
    "node_logs_path",
    "record_dir",
    "record_path",
    "retry_id",
    "tracked",
]
