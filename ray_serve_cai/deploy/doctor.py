"""First contact with a workspace: the facts no API spec gives, established with the least footprint.

`run_doctor` validates the API key, then creates one probe project (from git, exactly as a deploy
creates one, when a git URL is known), uploads two stdlib-only probe scripts into it through CML's
file API (`probes/`), runs one short probe job and one probe application side by side, reads what
they found, and removes all three — nothing else in the workspace is touched. Each `Check` is named
after the fact it establishes and says what the tool does about it. `ok` is False only when a check
`fail`s (the tool cannot work there); a `warn` is a fact the tool works around.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ray_serve_cai.cluster.runtimes import choose_runtime
from ray_serve_cai.cml import (
    APPLICATION_RUNNING,
    Application,
    CMLClient,
    CMLError,
    Job,
    JobRun,
    Project,
    ssl_context,
)
from ray_serve_cai.deploy.project import wait_for_project, with_token
from ray_serve_cai.errors import OperationFailed
from ray_serve_cai.waiting import poll_until

Status = Literal["ok", "warn", "fail"]
PROBE_DIR = ".ray-cai-doctor"
# Ray's ports the tool's nodes use between pods: GCS, dashboard, Ray Client, a worker port.
RAY_PORTS = (6379, 8265, 10001, 20000)
# An fsync slower than this makes rendezvous and the GCS's on-disk state sluggish.
FSYNC_SLOW_MS = 100.0
FSYNC_SLOW_P99_MS = 250.0
APP_START_TIMEOUT = 300.0
JOB_TIMEOUT = 300.0
# Check names: each states the fact it establishes.
KEY_VALID = "api-key-is-valid"
GIT_TEMPLATE = "git-project-takes-the-tools-template"
APP_ENV = "apps-get-cdsw-app-port-and-ip-address"
POD_TCP = "pods-reach-each-other-on-ray-ports"
WEBSOCKET = "app-urls-pass-websocket-upgrades"
FSYNC = "project-fs-fsync-is-fast"
FLOCK = "project-fs-flock-holds-across-pods"
RENAME = "project-fs-rename-is-atomic-across-pods"
APP_KEY = "app-api-key-can-manage-applications"
ALL_CHECKS = (KEY_VALID, GIT_TEMPLATE, APP_ENV, POD_TCP, WEBSOCKET, FSYNC, FLOCK, RENAME, APP_KEY)


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    action: str = ""  # what the tool does about it

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "action": self.action}


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing blocks the tool (warnings are worked around)."""
        return all(check.status != "fail" for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"checks": [check.as_dict() for check in self.checks], "ok": self.ok}


@dataclass
class _Probe:
    """The objects the doctor made (removed at the end, whatever happened)."""

    project: Project | None = None
    job: Job | None = None
    app: Application | None = None


ProgressFn = Callable[[str], None]


def default_git_source(cwd: Path | None = None, *, local: bool) -> tuple[str | None, str | None]:
    """The git URL and branch a deploy would create the project from: the checkout itself for the
    local workspace, else its `origin` remote when that is an https URL (None when unknown)."""
    where = str(cwd or Path.cwd())

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None

    root = git("rev-parse", "--show-toplevel")
    if root is None:
        return None, None
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    branch = None if branch == "HEAD" else branch
    if local:
        return root, branch
    origin = git("remote", "get-url", "origin")
    return (origin, branch) if origin and origin.startswith("https://") else (None, branch)


def run_doctor(
    client: CMLClient,
    *,
    local: bool,
    git_url: str | None,
    git_ref: str | None = None,
    gh_pat: str | None = None,
    progress: ProgressFn | None = None,
) -> DoctorReport:
    """Establish each fact of `ALL_CHECKS` on the workspace `client` talks to (see the module doc)."""
    say = progress or (lambda _message: None)
    report = DoctorReport()
    say("validating the API key")
    try:
        answer = client.validate_api_key()
    except CMLError as err:
        report.checks.append(Check(KEY_VALID, "fail", str(err), "nothing works without a valid key"))
        return report
    if not answer.get("valid"):
        message = answer.get("message") or "the workspace says the key is not valid"
        report.checks.append(
            Check(KEY_VALID, "fail", str(message), "create a new API v2 key (User Settings)")
        )
        return report
    report.checks.append(
        Check(KEY_VALID, "ok", f"valid, user {answer.get('username') or '?'}", "uses it for every call")
    )
    probe = _Probe()
    suffix = secrets.token_hex(3)
    try:
        _probe_everything(client, report, probe, suffix, local, git_url, git_ref, gh_pat, say)
    except (CMLError, OperationFailed) as err:
        done = {check.name for check in report.checks}
        for name in ALL_CHECKS:
            if name not in done:
                report.checks.append(
                    Check(name, "fail", f"not established: {err}", "run `ray-cai doctor` again")
                )
    finally:
        _remove(client, probe, say)
    return report


def _probe_everything(
    client: CMLClient,
    report: DoctorReport,
    probe: _Probe,
    suffix: str,
    local: bool,
    git_url: str | None,
    git_ref: str | None,
    gh_pat: str | None,
    say: ProgressFn,
) -> None:
    emulated = " (local workspace: a folder per project, cloned with git)" if local else ""
    name = f"ray-cai-doctor-{suffix}"
    say(f"creating probe project {name}" + (f" from {git_url}" if git_url else ""))
    if git_url:
        probe.project = client.create_project(
            name, git_url=with_token(git_url, gh_pat), git_ref=git_ref, description="ray-cai doctor probe"
        )
    else:
        probe.project = client.create_project(name, description="ray-cai doctor probe")
    project = wait_for_project(client, probe.project.id, timeout=600, poll_interval=1.0)
    if git_url:
        files = client.list_project_files(project.id)
        if files:
            detail = f"cloned {git_url}{f' at {git_ref}' if git_ref else ''} with git_url and no template"
            report.checks.append(
                Check(GIT_TEMPLATE, "ok", detail + emulated, "deploy creates projects this way")
            )
        else:
            report.checks.append(
                Check(GIT_TEMPLATE, "fail", "the project was created but holds no files", "check the git URL")
            )
    else:
        report.checks.append(
            Check(
                GIT_TEMPLATE,
                "warn",
                "no git URL known (not in a checkout with an https origin): not tried",
                "pass --git-url (or set it in the jobs file) before the first deploy",
            )
        )
    for script in ("probe_app.py", "probe_job.py"):
        content = resources.files("ray_serve_cai.deploy.probes").joinpath(script).read_bytes()
        client.upload_project_file(project.id, f"{PROBE_DIR}/{script}", content)
    runtime = choose_runtime(client.list_runtimes(), gpu=False)
    subdomain = name
    say(f"starting probe application {subdomain} and probe job")
    probe.app = client.create_application(
        project.id,
        name=subdomain,
        subdomain=subdomain,
        script=f"{PROBE_DIR}/probe_app.py",
        cpu=0.5,
        memory=0.5,
        runtime_identifier=runtime,
        description="ray-cai doctor probe",
        environment={
            "RAY_CAI_DOCTOR_PORTS": ",".join(map(str, RAY_PORTS)),
            "RAY_CAI_DOCTOR_SUBDOMAIN": subdomain,
        },
    )
    probe.job = client.create_job(
        project.id,
        name=name,
        script=f"{PROBE_DIR}/probe_job.py",
        cpu=0.5,
        memory=0.5,
        runtime_identifier=runtime,
        timeout=int(JOB_TIMEOUT),
    )
    app = _wait_running(client, project.id, probe.app)
    run = client.create_job_run(project.id, probe.job.id)
    _check_app_env(client, report, app, local)
    _check_websocket(client, report, app, local)
    _check_app_key(client, report, app, local)
    run = _wait_ended(client, project.id, probe.job, run, say)
    if not run.succeeded:
        raise OperationFailed(f"the probe job ended {run.status}; see its run in project {name}")
    result = json.loads(client.download_project_file(project.id, f"{PROBE_DIR}/job-result.json"))
    _check_job_findings(report, result, local)


def _wait_running(client: CMLClient, project_id: str, app: Application) -> Application:
    def running() -> Application | None:
        current = client.get_application(project_id, app.id)
        if current.is_failed:
            raise OperationFailed(f"the probe application {app.name} failed to start ({current.status})")
        return current if current.status == APPLICATION_RUNNING else None

    return poll_until(running, timeout=APP_START_TIMEOUT, interval=1.0, what=f"probe application {app.name}")


def _wait_ended(client: CMLClient, project_id: str, job: Job, run: JobRun, say: ProgressFn) -> JobRun:
    say(f"waiting for probe job run {run.id}")

    def ended() -> JobRun | None:
        current = client.get_job_run(project_id, job.id, run.id)
        return current if current.is_terminal else None

    return poll_until(ended, timeout=JOB_TIMEOUT, interval=1.0, what=f"probe job run {run.id}")


def _check_app_env(client: CMLClient, report: DoctorReport, app: Application, local: bool) -> None:
    env = client.app_request(app, "GET", "/env").json()
    port, ip = env.get("app_port"), env.get("ip_address")
    if port and ip:
        where = ""
        if local:
            shared = str(ip).startswith("127.")
            where = (
                " (local workspace: a shared host, no pod IPs)"
                if shared
                else (" (local workspace: the workload's own network namespace)")
            )
        report.checks.append(
            Check(
                APP_ENV,
                "ok",
                f"CDSW_APP_PORT={port}, CDSW_IP_ADDRESS={ip}{where}",
                "nodes serve on 127.0.0.1:$CDSW_APP_PORT and give Ray $CDSW_IP_ADDRESS",
            )
        )
    else:
        report.checks.append(
            Check(
                APP_ENV,
                "fail",
                f"CDSW_APP_PORT={port!r}, CDSW_IP_ADDRESS={ip!r}",
                "the tool cannot place Ray nodes without both",
            )
        )


def _check_websocket(client: CMLClient, report: DoctorReport, app: Application, local: bool) -> None:
    try:
        with _websocket(client, app, "/ws") as connection:
            connection.send("ray-cai doctor")
            echoed = connection.recv(timeout=20)
    except Exception as err:  # the websockets package raises many kinds; each means "no upgrade"
        report.checks.append(
            Check(
                WEBSOCKET,
                "warn",
                f"the upgrade did not pass: {type(err).__name__}: {err}",
                "`ray-cai job` polls job logs over HTTP instead of following Ray's WebSocket tail; "
                "the dashboard's live views may not update",
            )
        )
        return
    emulated = " (local workspace: app URLs proxy WebSockets to the app)" if local else ""
    if echoed == "ray-cai doctor":
        report.checks.append(
            Check(
                WEBSOCKET,
                "ok",
                "an echo went through the application URL" + emulated,
                "`ray-cai job` follows logs over Ray's WebSocket tail",
            )
        )
    else:
        report.checks.append(
            Check(WEBSOCKET, "warn", f"unexpected echo {echoed!r}", "`ray-cai job` polls job logs instead")
        )


def _websocket(client: CMLClient, app: Application, path: str) -> Any:
    """A WebSocket to `path` of the application's URL with the API key in the handshake."""
    from websockets.sync.client import connect

    url = client.app_url(app)
    scheme, _, rest = url.partition("://")
    options: dict[str, Any] = {
        "additional_headers": {"Authorization": f"Bearer {client.settings.api_key.get_secret_value()}"},
        "open_timeout": 20,
        "compression": None,
    }
    if scheme == "https":
        options["ssl"] = ssl_context(client.settings.verify)
    if rest.startswith(("127.0.0.1", "localhost")):
        options["proxy"] = None
    return connect(f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}", **options)


def _check_app_key(client: CMLClient, report: DoctorReport, app: Application, local: bool) -> None:
    found = client.app_request(app, "GET", "/manage", timeout=60).json()
    if not found.get("key"):
        report.checks.append(
            Check(
                APP_KEY,
                "fail",
                "no CDSW_APIV2_KEY in the application's environment",
                "the head cannot scale or heal the cluster (autoscaler, watch)",
            )
        )
        return
    listed, updated = found.get("list"), found.get("update")
    if listed == 200 and updated == 200:
        emulated = " (local workspace: the workspace's own key)" if local else ""
        report.checks.append(
            Check(
                APP_KEY,
                "ok",
                "listed the project's applications and updated its own" + emulated,
                "the head's autoscaler creates and deletes worker applications itself",
            )
        )
    else:
        report.checks.append(
            Check(
                APP_KEY,
                "warn",
                f"with the application's key: list HTTP {listed}, update HTTP {updated}",
                "the head's autoscaler cannot act with this key: use fixed replica counts and "
                "`ray-cai scale` from outside",
            )
        )


def _check_job_findings(report: DoctorReport, result: dict[str, Any], local: bool) -> None:
    tcp: dict[str, str] = result.get("tcp", {})
    failed = {port: outcome for port, outcome in tcp.items() if outcome != "ok"}
    pods = f"job {result.get('job_ip')} → app {result.get('app_ip')}"
    if not failed:
        ports: dict[str, int] = result.get("ports", {})
        moved = [f"{wanted}→{got}" for wanted, got in sorted(ports.items()) if str(got) != wanted]
        emulated = ""
        if local:
            shared = result.get("job_ip") == result.get("app_ip")
            emulated = (
                " (local workspace: one shared host"
                if shared
                else " (local workspace: a network namespace per workload"
            )
            emulated += f"; taken there, so replaced: {', '.join(moved)})" if moved else ")"
        elif moved:
            emulated = f" (busy in the app's pod, so replaced: {', '.join(moved)})"
        report.checks.append(
            Check(
                POD_TCP,
                "ok",
                f"{pods}: ports {', '.join(sorted(tcp))} reached{emulated}",
                "workers join the head's GCS on its pod IP",
            )
        )
    else:
        detail = "; ".join(f"{port}: {outcome}" for port, outcome in sorted(failed.items()))
        report.checks.append(
            Check(
                POD_TCP,
                "fail",
                f"{pods}: {detail}",
                "Ray nodes in different applications cannot form a cluster",
            )
        )
    fsync = result.get("fsync", {})
    median, worst = float(fsync.get("median_ms", 0)), float(fsync.get("max_ms", 0))
    p99 = float(fsync.get("p99_ms", worst))
    fs_note = " (local workspace: the host's filesystem)" if local else ""
    filesystem = result.get("filesystem") or {}
    on = f" on {filesystem.get('type', '?')} at {filesystem.get('mount') or '?'}" if filesystem else ""
    # Head fault tolerance keeps the GCS in RocksDB on the project filesystem: one fsync per GCS write
    # (actor, job, placement group, KV). Upstream measured ~4 ms p50 on ext4.
    slow = median >= FSYNC_SLOW_MS or p99 >= FSYNC_SLOW_P99_MS
    report.checks.append(
        Check(
            FSYNC,
            "warn" if slow else "ok",
            f"fsync median {median:.1f} ms, p99 {p99:.1f} ms, max {worst:.1f} ms{on}{fs_note}",
            "expect slow GCS writes with head fault tolerance (RocksDB fsyncs each one); "
            "consider `head_fault_tolerance: false`"
            if slow
            else "rendezvous files and the head's GCS state (head fault tolerance, RocksDB) fsync each write",
        )
    )
    if result.get("flock_exclusive"):
        report.checks.append(
            Check(
                FLOCK,
                "ok",
                "a lock held in the app's pod kept the job's pod out" + fs_note,
                "RocksDB's LOCK file also holds across pods; one GCS per cluster is the head lease's job",
            )
        )
    else:
        report.checks.append(
            Check(
                FLOCK,
                "warn",
                "the job's pod took a lock the app's pod held",
                "RocksDB's own lock does not hold across pods: only the head lease (epochs claimed by "
                "exclusive create) keeps a second head's GCS off the stored state",
            )
        )
    rename = result.get("rename", {})
    if rename.get("torn") == 0 and rename.get("versions", 0) > 1:
        report.checks.append(
            Check(
                RENAME,
                "ok",
                f"{rename.get('reads')} reads of a file replaced by rename saw {rename.get('versions')} "
                f"whole versions, none torn{fs_note}",
                "head.json and other state are replaced by temp file + rename",
            )
        )
    else:
        report.checks.append(
            Check(
                RENAME,
                "warn",
                f"reads across pods: {rename}",
                "readers retry a file that does not parse (workers re-read head.json)",
            )
        )


def _remove(client: CMLClient, probe: _Probe, say: ProgressFn) -> None:
    """Delete what the doctor made (the project last: it holds the others)."""
    if probe.project is None:
        return
    say(f"removing probe project {probe.project.name}")
    for action in (
        (lambda: client.delete_application(probe.project.id, probe.app.id)) if probe.app else None,  # type: ignore[union-attr]
        (lambda: client.delete_job(probe.project.id, probe.job.id)) if probe.job else None,  # type: ignore[union-attr]
        lambda: client.delete_project(probe.project.id),  # type: ignore[union-attr]
    ):
        if action is None:
            continue
        try:
            action()
        except CMLError as err:
            say(f"could not remove a probe object: {err}; delete project {probe.project.name} by hand")


__all__ = ["ALL_CHECKS", "Check", "DoctorReport", "default_git_source", "run_doctor"]
