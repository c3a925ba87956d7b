"""What outlives this node, kept in the project as it happens: its Ray logs and (head) the job records.

A thread of the launcher, the part of a node that always runs:

* **Node logs** (every node): every `LOG_INTERVAL_SECONDS` the new bytes of each file of the current
  Ray session's `logs/` are appended to `.ray-cai/<cluster>/logs/<node>/` (format and bounds in
  `ray_serve_cai.config.history`: a file passing its cap is rotated once into `<file>.1`; over the
  node's cap the rotated files go first, then the oldest). A node that fails, is replaced or is
  autoscaled away leaves its logs up to its last few seconds; at a stop the launcher copies the rest.
* **Job records** (head): every `JOBS_INTERVAL_SECONDS` one `GET /api/jobs/` on the head's own
  dashboard; each submitted job's row goes into its record (`record.json`, written atomically when it
  changed) and, every `DRIVER_LOG_INTERVAL_SECONDS` and once more when it ends, the driver's log of
  every job still running into `<attempt id>.log`. The head also
  stops an attempt whose deadline (`ray_cai_deadline` in the job's metadata) has passed, so a
  `--timeout` holds even when the submitting laptop is gone; the record then says FAILED (deadline).

Why the head writes the records: it runs inside the project (CML mounts it at `/home/cdsw`) and lives
as long as the jobs do, while the submitting machine may be a laptop that cannot write to the project
and may be closed. What only the client knows travels in the job's Ray metadata.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx

from ray_serve_cai.config.history import (
    NODE_LOG_CAP_BYTES,
    NODE_LOG_FILE_CAP_BYTES,
    RECORD_FILE,
    JobRecord,
    cap_log,
    jobs_dir,
    lost,
    merge_job,
    node_logs_path,
    tracked,
)

logger = logging.getLogger("ray_serve_cai.node.history")

JOBS_INTERVAL_SECONDS = 2.0
LOG_INTERVAL_SECONDS = 5.0
# A running job's driver log is read again at most this often (Ray answers with the whole log).
DRIVER_LOG_INTERVAL_SECONDS = 5.0
# Bytes copied from one file in one pass: a burst is caught up over a few passes, not in one.
MAX_COPY_PER_PASS = 4 * 1024 * 1024
SKIPPED_SUFFIXES = (".sock", ".socket", ".lock")


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `path` through a temp file in its directory and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class JobRecords:
    """The head's job records, kept from its own dashboard's Jobs API (one list call per pass)."""

    def __init__(
        self,
        project_dir: Path,
        cluster: str,
        dashboard_port: Callable[[], int | None],
        token: Callable[[], str | None],
    ) -> None:
        self.project_dir = project_dir
        self.cluster = cluster
        self.dashboard_port = dashboard_port
        self.token = token
        self.root = project_dir / jobs_dir(cluster)
        self._written: dict[str, JobRecord] = {}
        self._log_sizes: dict[str, int] = {}  # submission id → length of the log text written
        self._final_logs: set[str] = set()  # attempts whose log was read after they ended
        self._log_read_at: dict[str, float] = {}  # submission id → when its log was last read
        self._stop_asked: set[str] = set()
        self._checked_lost = False
        # Short: a stop makes one last pass inside the grace period CML gives a stopping application.
        self._http = httpx.Client(timeout=2.0, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def _headers(self) -> dict[str, str]:
        token = self.token()
        return {"X-Ray-Authorization": f"Bearer {token}"} if token else {}

    def _base(self) -> str | None:
        port = self.dashboard_port()
        return f"http://127.0.0.1:{port}" if port else None

    def _load(self, record_id: str) -> JobRecord | None:
        if record_id in self._written:
            return self._written[record_id]
        try:
            return JobRecord.from_json((self.root / record_id / RECORD_FILE).read_bytes())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def sync(self) -> bool:
        """One pass; False when the dashboard did not answer (Ray not up yet, or going away)."""
        base = self._base()
        if base is None:
            return False
        try:
            response = self._http.get(f"{base}/api/jobs/", headers=self._headers())
            rows = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return False
        if not isinstance(rows, list):
            return False
        secrets = [t for t in [self.token()] if t]
        seen: set[str] = set()
        for row in rows:
            where = tracked(row) if isinstance(row, dict) else None
            if where is None:
                continue
            seen.add(where.submission_id)
            record = merge_job(self._load(where.record_id), self.cluster, row, secrets)
            attempt = next(a for a in record.attempts if a.attempt == where.attempt)
            self._enforce_deadline(base, record, attempt.submission_id, attempt.is_terminal)
            self._keep_log(base, where.record_id, attempt.submission_id, attempt.is_terminal, secrets)
            self._write(record)
        if not self._checked_lost:
            self._checked_lost = True
            self._mark_lost(seen)
        return True

    def _enforce_deadline(self, base: str, record: JobRecord, submission_id: str, ended: bool) -> None:
        if ended or record.deadline is None or time.time() < record.deadline:
            return
        if submission_id in self._stop_asked:
            return
        self._stop_asked.add(submission_id)
        logger.info("job %s: its deadline passed; stopping it", submission_id)
        with contextlib.suppress(httpx.HTTPError):
            self._http.post(f"{base}/api/jobs/{quote(submission_id, safe='')}/stop", headers=self._headers())

    def _keep_log(
        self, base: str, record_id: str, submission_id: str, ended: bool, secrets: list[str]
    ) -> None:
        if submission_id in self._final_logs:
            return
        now = time.monotonic()
        if not ended and now - self._log_read_at.get(submission_id, -math.inf) < DRIVER_LOG_INTERVAL_SECONDS:
            return
        self._log_read_at[submission_id] = now
        try:
            response = self._http.get(
                f"{base}/api/jobs/{quote(submission_id, safe='')}/logs", headers=self._headers()
            )
            text = str(response.json().get("logs") or "") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return
        if text is None:
            return
        if len(text) != self._log_sizes.get(submission_id):
            for secret in secrets:
                text = text.replace(secret, "[redacted]")
            write_atomically(self.root / record_id / f"{submission_id}.log", cap_log(text))
            self._log_sizes[submission_id] = len(text)
        if ended:
            self._final_logs.add(submission_id)

    def _write(self, record: JobRecord) -> None:
        if self._written.get(record.submission_id) == record:
            return
        stamped = JobRecord.from_dict({**record.to_dict(), "updated_at": time.time()})
        write_atomically(self.root / record.submission_id / RECORD_FILE, stamped.to_json())
        self._written[record.submission_id] = record

    def _mark_lost(self, seen: set[str]) -> None:
        """Records left unfinished by an earlier head whose job this Ray does not know: FAILED (lost)."""
        if not self.root.is_dir():
            return
        now_ms = int(time.time() * 1000)
        for path in self.root.glob(f"*/{RECORD_FILE}"):
            try:
                record = JobRecord.from_json(path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError):
                continue
            latest = record.latest
            if latest is not None and not latest.is_terminal and latest.submission_id not in seen:
                self._write(lost(record, now_ms))


class LogKeeper:
    """Appends what a node's Ray logs gained since the last pass to the node's folder in the project."""

    def __init__(
        self,
        source: Callable[[], Path | None],
        destination: Path,
        *,
        node_cap: int = NODE_LOG_CAP_BYTES,
        file_cap: int = NODE_LOG_FILE_CAP_BYTES,
    ) -> None:
        self.source = source
        self.destination = destination
        self.node_cap = node_cap
        self.file_cap = min(file_cap, max(1, node_cap // 4))
        self._session: Path | None = None
        self._offsets: dict[str, tuple[int, int]] = {}  # relative path → (inode, bytes copied)

    def sync(self) -> int:
        """One pass; the number of bytes copied."""
        session = self.source()
        if session is None or not (session / "logs").is_dir():
            return 0
        if session != self._session:
            self._session, self._offsets = session, {}
            self.destination.mkdir(parents=True, exist_ok=True)
            (self.destination / "SESSION").write_text(f"{session.name}\n")
        copied = 0
        logs = session / "logs"
        for folder, _dirs, names in os.walk(logs):
            for name in names:
                if name.endswith(SKIPPED_SUFFIXES):
                    continue
                path = Path(folder) / name
                copied += self._copy_new(path, path.relative_to(logs).as_posix())
        if copied:
            self._enforce_cap()
        return copied

    def _copy_new(self, path: Path, relative: str) -> int:
        try:
            info = path.lstat()
        except OSError:
            return 0
        if not stat.S_ISREG(info.st_mode):
            return 0
        target = self.destination / relative
        inode, done = self._offsets.get(relative, (info.st_ino, -1))
        if done < 0 or inode != info.st_ino or info.st_size < done:
            # First sight in this session, or the file was replaced/truncated: start a new copy, the
            # earlier one (another session's file of the same name) kept as `<file>.1`.
            self._rotate(target)
            done = 0
        if info.st_size == done:
            self._offsets[relative] = (info.st_ino, done)
            return 0
        try:
            with path.open("rb") as source:
                source.seek(done)
                chunk = source.read(min(info.st_size - done, MAX_COPY_PER_PASS))
        except OSError:
            return 0
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("ab") as sink:
            sink.write(chunk)
        self._offsets[relative] = (info.st_ino, done + len(chunk))
        with contextlib.suppress(OSError):
            if target.stat().st_size > self.file_cap:
                self._rotate(target)
        return len(chunk)

    @staticmethod
    def _rotate(target: Path) -> None:
        with contextlib.suppress(OSError):
            if target.exists() and target.stat().st_size > 0:
                os.replace(target, target.with_name(target.name + ".1"))

    def _enforce_cap(self) -> None:
        """Over the node's cap: remove rotated files, then the oldest ones, until under it."""
        files: list[tuple[float, int, Path, bool]] = []
        for folder, _dirs, names in os.walk(self.destination):
            for name in names:
                path = Path(folder) / name
                with contextlib.suppress(OSError):
                    info = path.stat()
                    files.append((info.st_mtime, info.st_size, path, name.endswith(".1")))
        total = sum(size for _, size, _, _ in files)
        for _mtime, size, path, _rotated in sorted(files, key=lambda f: (not f[3], f[0])):
            if total <= self.node_cap:
                return
            if path.name == "SESSION":
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size


class ProjectKeeper:
    """The launcher's keeper thread: node logs on every node, job records on the head."""

    def __init__(
        self,
        project_dir: Path,
        cluster: str,
        node_name: str,
        session_dir: Callable[[], Path | None],
        *,
        dashboard_port: Callable[[], int | None] | None = None,
        token: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.logs = LogKeeper(session_dir, project_dir / node_logs_path(cluster, node_name))
        self.jobs = JobRecords(project_dir, cluster, dashboard_port, token) if dashboard_port else None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one pass at a time (the thread's, or a stop's last one)
        self._thread = threading.Thread(target=self._loop, name="ray-cai-keeper", daemon=True)

    def start(self) -> ProjectKeeper:
        self._thread.start()
        return self

    def _loop(self) -> None:
        next_logs = 0.0
        while not self._stop.wait(JOBS_INTERVAL_SECONDS if self.jobs else LOG_INTERVAL_SECONDS):
            try:
                if self.jobs is not None:
                    self.sync_jobs()
                if time.monotonic() >= next_logs:
                    self.sync_logs()
                    next_logs = time.monotonic() + LOG_INTERVAL_SECONDS
            except Exception:  # the keeper must never take the node down
                logger.exception("keeping history in the project failed; trying again")

    def sync_jobs(self) -> None:
        """One pass over the job records (head); skipped when a pass is already under way."""
        if self.jobs is not None and self._lock.acquire(timeout=2.0):
            try:
                self.jobs.sync()
            finally:
                self._lock.release()

    def sync_logs(self) -> None:
        if not self._lock.acquire(timeout=2.0):
            return
        try:
            copied = self.logs.sync()
        finally:
            self._lock.release()
        if copied:
            logger.debug("kept %d bytes of Ray logs in %s", copied, self.logs.destination)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=3)
        if self.jobs is not None:
            self.jobs.close()


__all__ = ["JobRecords", "LogKeeper", "ProjectKeeper", "write_atomically"]
