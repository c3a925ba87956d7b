"""A cluster's history as kept in the project, read from anywhere through CML's project-file API.

The head keeps job records and every node keeps its Ray logs under `.ray-cai/<cluster>/` in the
project (format: `ray_serve_cai.config.history`); `ListProjectFiles` and `DownloadProjectFile`
(`GET /api/v2/projects/{id}/files/{path}`, `POST …/files/{path}:download`) read them from a laptop
too, so `job list/status/logs` and `logs NODE` work after the cluster, its head or a node is gone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray_serve_cai.access.jobs import JobInfo
from ray_serve_cai.cml import CMLClient, CMLError, NotFound
from ray_serve_cai.config.history import (
    LOGS_DIR,
    JobRecord,
    attempt_log_path,
    cluster_dir,
    jobs_dir,
    merge_job,
    node_logs_path,
    record_path,
    tracked,
)
from ray_serve_cai.errors import OperationFailed

# Parallel downloads when listing many records (one small file each).
MAX_PARALLEL_DOWNLOADS = 8


class HistoryError(OperationFailed):
    """The history kept in the project could not be read (exit code 1)."""


class RecordNotFound(HistoryError):
    """No record with that id in the project."""


@dataclass(frozen=True)
class KeptFile:
    """A file of a node's kept logs: its path under the node's folder and its size."""

    name: str
    size: int | None


class ProjectHistory:
    """Job records and kept node logs of one cluster, through the project-file API."""

    def __init__(self, client: CMLClient, project_id: str, cluster: str) -> None:
        self.client = client
        self.project_id = project_id
        self.cluster = cluster

    def _list(self, path: str) -> list[tuple[str, bool, int | None]]:
        """(name, is_dir, size) of a project directory's entries; [] when it does not exist."""
        try:
            entries = self.client.list_project_files(self.project_id, path)
        except NotFound:
            return []
        except CMLError as err:
            raise HistoryError(f"cannot list {path} in the project: {err}") from None
        found = []
        for entry in entries:
            name = entry.path.rstrip("/").rsplit("/", 1)[-1]
            found.append((name, entry.is_dir, entry.file_size))
        return found

    def _download(self, path: str) -> bytes | None:
        try:
            return self.client.download_project_file(self.project_id, path)
        except NotFound:
            return None
        except CMLError as err:
            raise HistoryError(f"cannot read {path} in the project: {err}") from None

    # -- job records ---------------------------------------------------------------------------
    def record_ids(self) -> list[str]:
        return sorted(name for name, is_dir, _ in self._list(jobs_dir(self.cluster)) if is_dir)

    def read_record(self, record_id: str) -> JobRecord | None:
        data = self._download(record_path(self.cluster, record_id))
        if data is None:
            return None
        try:
            return JobRecord.from_json(data)
        except (ValueError, KeyError, TypeError):
            return None  # being replaced right now, or damaged: left out, not fatal

    def records(self) -> list[JobRecord]:
        """Every record of the cluster, oldest first."""
        ids = self.record_ids()
        with ThreadPoolExecutor(max_workers=MAX_PARALLEL_DOWNLOADS) as pool:
            found = [r for r in pool.map(self.read_record, ids) if r is not None]
        return sorted(found, key=lambda r: (r.start_time or 0, r.submission_id))

    def find(self, job_id: str) -> JobRecord:
        """The record `job_id` names: a record id, or the submission id of one of its attempts."""
        record = self.read_record(job_id)
        if record is not None:
            return record
        if "-retry" in job_id:
            record = self.read_record(job_id.rsplit("-retry", 1)[0])
            if record is not None:
                return record
        for record in self.records():
            if any(a.submission_id == job_id for a in record.attempts):
                return record
        raise RecordNotFound(
            f"no job {job_id!r} in the history of cluster {self.cluster!r} "
            f"(`ray-cai job list --history --cluster {self.cluster}` lists it)"
        )

    def attempt_log(self, record: JobRecord, submission_id: str) -> str:
        data = self._download(attempt_log_path(self.cluster, record.submission_id, submission_id))
        return "" if data is None else data.decode("utf-8", "replace")

    # -- node logs -----------------------------------------------------------------------------
    def nodes(self) -> list[str]:
        """Nodes with logs kept in the project."""
        base = f"{cluster_dir(self.cluster)}/{LOGS_DIR}"
        return sorted(name for name, is_dir, _ in self._list(base) if is_dir)

    def resolve_node(self, wanted: str | None) -> str:
        nodes = self.nodes()
        name = wanted or "head"
        candidates = [name, f"ray-{self.cluster}-{name}"]
        for candidate in candidates:
            if candidate in nodes:
                return candidate
        known = ", ".join(nodes) or "none"
        raise HistoryError(f"no logs of node {name!r} kept for cluster {self.cluster!r} (kept: {known})")

    def node_files(self, node: str) -> list[KeptFile]:
        """The node's kept log files (one level of folders, like Ray's `events/` and `old/`)."""
        base = node_logs_path(self.cluster, node)
        files: list[KeptFile] = []
        for name, is_dir, size in self._list(base):
            if is_dir:
                files += [
                    KeptFile(f"{name}/{inner}", inner_size)
                    for inner, inner_dir, inner_size in self._list(f"{base}/{name}")
                    if not inner_dir
                ]
            else:
                files.append(KeptFile(name, size))
        return sorted(files, key=lambda f: f.name)

    def node_log(self, node: str, filename: str, *, tail: int = -1) -> str:
        data = self._download(f"{node_logs_path(self.cluster, node)}/{filename}")
        if data is None:
            raise HistoryError(
                f"no kept log file {filename!r} of {node} (`ray-cai logs {node} --list` lists them)"
            )
        text = data.decode("utf-8", "replace")
        if tail > 0:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:])
        return text


def records_from_ray(jobs: list[JobInfo], cluster: str) -> list[JobRecord]:
    """Ray's job list grouped into records (a record's retries under it), as the head writes them."""
    records: dict[str, JobRecord] = {}
    for job in jobs:
        where = tracked(job.raw)
        if where is None:
            continue
        records[where.record_id] = merge_job(records.get(where.record_id), cluster, job.raw)
    return sorted(records.values(), key=lambda r: (r.start_time or 0, r.submission_id))


__all__ = ["HistoryError", "KeptFile", "ProjectHistory", "RecordNotFound", "records_from_ray"]
