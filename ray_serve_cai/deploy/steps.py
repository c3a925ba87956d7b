"""The bodies of the three deployment jobs, run inside the CML project (cwd = the project directory).

`git_sync` and `setup_environment` run on the runtime's own Python, before this package's
dependencies exist, so this module imports only the standard library at the top.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from ray_serve_cai import RAY_MINOR
from ray_serve_cai.errors import EXIT_BAD_INPUT, EXIT_OK, OperationFailed

if TYPE_CHECKING:  # only for annotations: the first two steps run before any dependency exists
    from ray_serve_cai.cluster import ClusterStatus, Plan, RayCluster

VENV_DIR = ".venv"
DEPS_MARKER = ".ray-cai-deps"
# What the project's own code needs on the nodes (Serve applications, job scripts): one pip
# requirements file at the project root, installed into the same `.venv` after the `ray` extra.
PROJECT_REQUIREMENTS = "requirements.txt"


class StepError(OperationFailed):
    """A job step failed; the message is the one line the job log ends with."""


def _project_dir() -> Path:
    return Path(os.environ.get("RAY_CAI_PROJECT_DIR") or os.getcwd())


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    printable = " ".join(cmd)
    print(f"$ {printable}", flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.stdout.strip():
        print(proc.stdout.rstrip(), flush=True)
    if proc.returncode != 0:
        if proc.stderr.strip():
            print(proc.stderr.rstrip(), file=sys.stderr, flush=True)
        raise StepError(f"`{printable}` exited with {proc.returncode}")
    return proc.stdout.strip()


def strip_credentials(url: str) -> str:
    """The URL without user:password@ (what may be stored in .git/config)."""
    parts = urlsplit(url)
    if not parts.username and not parts.password:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _git_env(token: str | None) -> dict[str, str]:
    """Environment for git: a token, when given, travels as an HTTP header set through the
    environment — never in argv, never in a URL stored on disk."""
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"
    if token:
        import base64

        basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
        env["GIT_CONFIG_COUNT"] = "1"
        env["GIT_CONFIG_KEY_0"] = "http.extraHeader"
        env["GIT_CONFIG_VALUE_0"] = f"Authorization: Basic {basic}"
    return env


def git_sync() -> str:
    """Bring the project to the deployed ref: fetch + hard reset. Idempotent. Returns the commit."""
    project = _project_dir()
    url = os.environ.get("RAY_CAI_GIT_URL", "").strip()
    branch = os.environ.get("RAY_CAI_GIT_BRANCH", "").strip()
    env = _git_env(os.environ.get("GH_PAT") or None)
    if not (project / ".git").exists():
        if not url:
            raise StepError("the project is not a git checkout and RAY_CAI_GIT_URL is not set")
        _run(["git", "init", "-q"], cwd=project, env=env)
        _run(["git", "remote", "add", "origin", strip_credentials(url)], cwd=project, env=env)
    else:
        current = _run(["git", "remote", "get-url", "origin"], cwd=project, env=env)
        clean = strip_credentials(url or current)
        if current != clean:
            # The clone CML made may carry a token in its remote URL: keep only the clean URL on disk.
            _run(["git", "remote", "set-url", "origin", clean], cwd=project, env=env)
    _run(["git", "fetch", "--quiet", "origin", branch or "HEAD"], cwd=project, env=env)
    _run(["git", "reset", "--hard", "--quiet", "FETCH_HEAD"], cwd=project, env=env)
    commit = _run(["git", "rev-parse", "HEAD"], cwd=project, env=env)
    print(f"project is at {commit}", flush=True)
    return commit


def _venv_python(project: Path) -> Path:
    return project / VENV_DIR / "bin" / "python"


def _install_editable(pip: list[str], project: Path) -> None:
    """`pip install -e .[ray]`, first without build isolation: when the runtime already has the
    project's build backend (the local workspace's has hatchling), pip builds in place instead of
    installing the backend into a throwaway environment first (4 s instead of 9 on 2 cores). When it
    has not (pip refuses: a module is missing), the usual isolated build."""
    in_place = [*pip, "--no-build-isolation", "-e", ".[ray]"]
    if subprocess.run(in_place, cwd=project, capture_output=True, text=True).returncode == 0:
        print(f"$ {' '.join(in_place)} (built in place: the runtime has the build backend)", flush=True)
        return
    _run([*pip, "-e", ".[ray]"], cwd=project)


def setup_environment() -> bool:
    """Create `.venv` with this package and its `ray` extra, plus the project's own
    `requirements.txt` when there is one (what Serve applications and job scripts import); skip when
    the marker (the digest of both files, as deployed) matches.

    Returns True when something was installed, False when it was already up to date.
    """
    project = _project_dir()
    digest = os.environ.get("RAY_CAI_DEPS_DIGEST", "").strip() or "unversioned"
    python = _venv_python(project)
    marker = project / VENV_DIR / DEPS_MARKER
    check = f"import ray, ray_serve_cai; assert ray.__version__.startswith('{RAY_MINOR}.'), ray.__version__"
    if marker.exists() and marker.read_text().strip() == digest and python.exists():
        try:
            _run([str(python), "-c", check], cwd=project)
            print(f"environment up to date (dependency digest {digest}): nothing to install", flush=True)
            return False
        except StepError:
            print("marker matches but the environment is broken: reinstalling", flush=True)
    if not python.exists():
        # System site packages: a runtime that already ships Ray (or the local workspace) is reused.
        _run([sys.executable, "-m", "venv", "--system-site-packages", VENV_DIR], cwd=project)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _install_editable(pip, project)
    if (project / PROJECT_REQUIREMENTS).is_file():
        _run([*pip, "-r", PROJECT_REQUIREMENTS], cwd=project)
    version = _run([str(python), "-c", f"{check}; print(ray.__version__)"], cwd=project)
    marker.write_text(digest + "\n")
    print(f"Ray {version.splitlines()[-1]} installed in {project / VENV_DIR}", flush=True)
    return True


def watch_interval(args: list[str]) -> float | None:
    """`--watch [SECONDS]` among the job's arguments (default 30 s), else None."""
    if "--watch" not in args:
        return None
    following = args[args.index("--watch") + 1 :]
    try:
        return float(following[0]) if following else 30.0
    except ValueError:
        return 30.0


def launch_ray_cluster(args: list[str] | None = None) -> int:
    """Run the reconciler from inside the project and wait until Ray reports every node; with
    `--watch [SECONDS]` the job then stays, reconciling at that interval (dead or stuck apps are
    replaced) until the run is stopped."""
    from ray_serve_cai.cluster import ClusterError, RayCluster, write_cluster_info
    from ray_serve_cai.cluster.applied import load_cluster_request
    from ray_serve_cai.cml import CMLClient, CMLError, CMLSettings
    from ray_serve_cai.config import ConfigError
    from ray_serve_cai.deploy.orchestrator import CLUSTER_REQUEST_VAR, CLUSTER_SPEC_VAR, launch_request

    project = _project_dir()
    spec_json = os.environ.get(CLUSTER_SPEC_VAR, "").strip()
    try:
        spec = (
            launch_request(spec_json, os.environ.get(CLUSTER_REQUEST_VAR, "").strip())
            if spec_json
            else load_cluster_request(project / "ray_cluster_config.yaml", source="deploy")
        )
        if spec.spec.serve is not None:  # the Serve config file is checked before any API call too
            from ray_serve_cai.config.serve import load_serve_config

            load_serve_config(spec.spec.serve.config, project)
        settings = CMLSettings.from_env()
    except (ConfigError, CMLError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if not settings.project_id:
        print("error: CDSW_PROJECT_ID is not set: this job must run inside a CML project", file=sys.stderr)
        return 2
    last = [""]

    def progress(status: ClusterStatus) -> None:
        line = status.progress_line()
        if line != last[0]:
            print(line, flush=True)
            last[0] = line

    interval = watch_interval(sys.argv[1:] if args is None else args)
    info_file = project / "ray_cluster_info.json"
    try:
        with CMLClient(settings) as client:
            cluster = RayCluster(client, settings.project_id, spec, project_dir=project)
            if interval is not None:
                _supervise(cluster, interval, info_file)
                return 0
            plan, status = cluster.up(on_progress=progress)
    except (ClusterError, CMLError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except ConfigError as err:  # Serve refused the config (HTTP 400)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"plan: {plan.summary()}", flush=True)
    if not status.ready:  # the nodes are up but a Serve application failed: Serve's message says why
        print("error: " + "; ".join(status.problems or [status.state]), file=sys.stderr, flush=True)
        return 1
    _report_ready(status, write_cluster_info(status, info_file))
    return 0


def _report_ready(status: ClusterStatus, info: Path) -> None:
    alive = status.ray.get("alive_nodes")
    print(f"cluster {status.cluster!r} ready: {alive} nodes alive; info in {info}", flush=True)
    print(f"dashboard: {status.dashboard_url}", flush=True)
    if status.serve is not None:
        apps = ", ".join(f"{n} {a['status']}" for n, a in status.serve["applications"].items())
        print(f"serve: {status.serve['url']} ({apps or 'no applications'})", flush=True)


def _supervise(cluster: RayCluster, interval: float, info_file: Path) -> None:
    """Reconcile every `interval` seconds until the run is stopped (SIGTERM): the cluster is brought
    up and then kept up (dead or stuck apps replaced); the cluster info is written when it is ready."""
    import signal
    import threading

    from ray_serve_cai.cluster import write_cluster_info

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"supervising: reconciling every {interval:g}s until this run is stopped", flush=True)
    was_ready = [False]

    def on_pass(plan: Plan, status: ClusterStatus) -> None:
        if plan.actions:
            print(f"acted: {', '.join(a.describe().strip() for a in plan.actions)}", flush=True)
        if status.ready and not was_ready[0]:
            _report_ready(status, write_cluster_info(status, info_file))
        elif not status.ready and was_ready[0]:
            print(f"cluster {status.cluster!r} is {status.state}: healing", flush=True)
        was_ready[0] = status.ready

    cluster.watch(interval=interval, on_pass=on_pass, should_stop=stop.is_set)
    print("supervision stopped", flush=True)


def scheduled_run_argv(env: dict[str, str] | None = None) -> list[str]:
    """`ray-cai run ...` for the scheduled run this job's environment describes (`RAY_CAI_RUN_*`,
    set by `deploy`); `StepError` (exit 2) when the command is missing."""
    from ray_serve_cai.deploy.schedules import (
        RUN_CLUSTER_VAR,
        RUN_COMMAND_VAR,
        RUN_CONFIG_VAR,
        RUN_KEEP_VAR,
        RUN_MAX_RETRIES_VAR,
        RUN_RUNTIME_ENV_VAR,
        RUN_TIMEOUT_VAR,
    )

    env = dict(os.environ if env is None else env)
    command = env.get(RUN_COMMAND_VAR, "").strip()
    if not command:
        error = StepError(f"{RUN_COMMAND_VAR} is not set: this job must be created by `ray-cai deploy`")
        error.exit_code = EXIT_BAD_INPUT
        raise error
    argv = [sys.executable, "-m", "ray_serve_cai.cli.main", "run"]
    argv += ["--config", env.get(RUN_CONFIG_VAR) or "ray_cluster_config.yaml"]
    if env.get(RUN_CLUSTER_VAR):
        argv += ["--cluster", env[RUN_CLUSTER_VAR]]
    if (env.get(RUN_MAX_RETRIES_VAR) or "0") != "0":
        argv += ["--max-retries", env[RUN_MAX_RETRIES_VAR]]
    if (env.get(RUN_TIMEOUT_VAR) or "0") != "0":
        argv += ["--timeout", env[RUN_TIMEOUT_VAR]]
    if env.get(RUN_RUNTIME_ENV_VAR):
        argv += ["--runtime-env", env[RUN_RUNTIME_ENV_VAR]]
    if env.get(RUN_KEEP_VAR) == "1":
        argv.append("--keep")
    return [*argv, "--", command]


def scheduled_run() -> int:
    """The body of a scheduled run's CML job: become `ray-cai run` (one process, so CML's stop
    reaches it and the cluster is torn down), in the project directory."""
    argv = scheduled_run_argv()
    print("$ ray-cai " + " ".join(argv[3:]), flush=True)
    os.chdir(_project_dir())
    os.execv(argv[0], argv)
    return EXIT_OK  # not reached


def main(step: str) -> int:
    try:
        if step == "git_sync":
            git_sync()
        elif step == "setup_environment":
            setup_environment()
        elif step == "launch_ray_cluster":
            return launch_ray_cluster()
        elif step == "scheduled_run":
            return scheduled_run()
        else:
            print(f"error: unknown step {step!r}", file=sys.stderr)
            return EXIT_BAD_INPUT
    except StepError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    return EXIT_OK
