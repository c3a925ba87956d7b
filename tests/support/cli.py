"""`ray-cai` driven as a person drives it, against a local workspace: the one CLI helper of the suite.

`LocalCluster(workspace, project, config=...)` runs `ray-cai <command> ... --local --project P
[--config C]` in a subprocess, with an environment that holds nothing of the caller's CML or Ray
settings, and reads the project's applications and the workspace's request counters beside it:

    cluster = LocalCluster(workspace, "ray-cai-e2e", config=path, info_file=tmp / "info.json")
    result = cluster.up()                       # `up --json`, exit 0 asserted, project id kept
    cluster.cli_json("status", code=1)          # `status --json`, exit 1 asserted
    proc = cluster.popen("job", "submit", "--", "python", "x.py")  # target flags before the `--`
    cluster.apps()["ray-e2e-head"]["id"]
    cluster.down()

`tests/ray/conftest.py` keeps one such cluster up for the real-Ray tier (fixture `ray_cluster`: project
`SHARED_PROJECT`, cluster `SHARED_CLUSTER`, nodes `SHARED_HEAD` and `SHARED_WORKER`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil

from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.node.ray_node import node_tag, node_temp_dir
from ray_serve_cai.workspace.testing import WorkspaceHandle
from support.fakes import RAY_CAI, REPO_ROOT, run_cli

# The routes that create, delete, stop, restart or change an application: a pass that changes
# nothing calls none of them.
APP_CHANGING_ROUTES = (
    "POST /api/v2/projects/{project_id}/applications",
    "DELETE /api/v2/projects/{project_id}/applications/{application_id}",
    "POST /api/v2/projects/{project_id}/applications/{application_id}:stop",
    "POST /api/v2/projects/{project_id}/applications/{application_id}:restart",
    "PATCH /api/v2/projects/{project_id}/applications/{application_id}",
)
APP_CREATE_DELETE_ROUTES = APP_CHANGING_ROUTES[:2]

# The real-Ray tier's shared cluster (tests/ray/conftest.py): 1 head + 1 worker, 1 CPU and 1 GiB each.
SHARED_CLUSTER = "shared"
SHARED_PROJECT = "ray-cai-shared"
SHARED_HEAD = f"ray-{SHARED_CLUSTER}-head"
SHARED_WORKER = f"ray-{SHARED_CLUSTER}-worker-0"


def local_env(workspace: WorkspaceHandle, **extra: str) -> dict[str, str]:
    """The environment of a person's shell using `--local`: none of the caller's CML, CDSW, Ray or
    GitHub settings, the workspace's home, wide plain output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_", "GITHUB_"))}
    env.pop("GH_PAT", None)
    env.update(RAY_CAI_WORKSPACE_HOME=str(workspace.home), COLUMNS="200", NO_COLOR="1")
    env.update(extra)
    return env


class LocalCluster:
    """One cluster of one project in the local workspace, driven through `ray-cai`."""

    def __init__(
        self,
        workspace: WorkspaceHandle,
        project: str,
        *,
        config: Path | None = None,
        cwd: Path = REPO_ROOT,
        info_file: Path | None = None,
        timeout: float = 400,
    ) -> None:
        self.workspace = workspace
        self.timeout = timeout  # of one command, unless the call names its own
        self.project = project
        self.config = config
        self.cwd = cwd
        # `up` and `scale` write the cluster info file; the default place (the working directory)
        # is this checkout, so tests that run from it name another.
        self.info_file = info_file
        self.env = local_env(workspace)
        self.project_id = ""
        self.up_result: dict[str, Any] = {}  # what the last `up()` printed

    def target(self) -> list[str]:
        config = ["--config", str(self.config)] if self.config is not None else []
        return ["--local", "--project", self.project, *config]

    def args(self, *args: str) -> list[str]:
        """ARGS with the target flags before a `--` in ARGS (what follows is an entrypoint)."""
        split = args.index("--") if "--" in args else len(args)
        writes_info = self.info_file is not None and args and args[0] in ("up", "scale")
        info = ["--info-file", str(self.info_file)] if writes_info else []
        return [*args[:split], *info, *self.target(), *args[split:]]

    def argv(self, *args: str) -> list[str]:
        """`ray-cai ARGS` with the target flags (see `args`)."""
        return [*RAY_CAI, *self.args(*args)]

    def cli(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(self.args(*args), cwd=self.cwd, env=self.env, timeout=timeout or self.timeout)

    def cli_json(self, *args: str, code: int | None = 0, timeout: float | None = None) -> dict[str, Any]:
        """`ray-cai ARGS --json`, its exit code asserted (unless `code` is None), its output parsed."""
        proc = self.cli(*args, "--json", timeout=timeout)
        if code is not None:
            assert proc.returncode == code, f"{args}: exit {proc.returncode}\n{proc.stderr}\n{proc.stdout}"
        return dict(json.loads(proc.stdout))

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
        options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
        return subprocess.Popen(self.argv(*args), cwd=self.cwd, env=self.env, text=True, **options)

    def up(self, *args: str, timeout: float = 600) -> dict[str, Any]:
        """`ray-cai up --json ARGS`, exit 0 asserted; keeps the project id."""
        result = self.cli_json("up", *args, timeout=timeout)
        self.project_id = result["status"]["project_id"]
        self.up_result = result
        return result

    def down(self, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.cli("down", timeout=timeout)

    def apps(self) -> dict[str, dict[str, Any]]:
        """The project's applications by subdomain."""
        body = self.workspace.api_ok(
            "GET", f"/api/v2/projects/{self.project_id}/applications", params={"page_size": 1000}
        )
        return {a["subdomain"]: a for a in body["applications"]}

    def app_url(self, subdomain: str) -> str:
        """An application's URL as the CML client builds it (the local listener's URL)."""
        with CMLClient(CMLSettings(host=self.workspace.url, api_key=self.workspace.api_key)) as client:
            app = next(a for a in client.list_applications(self.project_id) if a.subdomain == subdomain)
            return client.app_url(app)

    def calls(self, routes: Iterable[str] = APP_CHANGING_ROUTES) -> int:
        """How many requests the workspace answered on these routes (since its counters were reset)."""
        counts = self.workspace.counters()["counts"]
        return sum(int(counts.get(route, 0)) for route in routes)

    @property
    def project_dir(self) -> Path:
        return self.workspace.project_dir(self.project_id)


# What a `PodsCluster.ray_client` script prints once `ray.init()` returned.
CLIENT_CONNECTED = "ray.init() done"


class PodsCluster(LocalCluster):
    """A `LocalCluster` in a pods workspace: each node's pod IP, readiness with every node alive in
    Ray, and commands run in a fresh session pod of the project (`ray-cai workspace exec`)."""

    def __init__(self, workspace: WorkspaceHandle, project: str, *, config: Path, nodes: int) -> None:
        super().__init__(workspace, project, config=config, timeout=900)
        self.nodes = nodes

    def pod_ip(self, subdomain: str) -> str:
        """The address of the pod the application runs in now (the workspace logs each new pod)."""
        log = Path(self.apps()[subdomain]["log_path"]).read_text().splitlines()
        return [line for line in log if line.startswith("[workspace] pod ")][-1].split()[2]

    def ready(self, timeout: float = 600) -> dict[str, Any]:
        """`status --json` once it says ready with every node alive in Ray: `status --wait` (one
        process observing every 2 s, not a process per poll)."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(1.0, deadline - time.monotonic())
            status = self.cli_json("status", "--wait", f"{left:.0f}", code=None, timeout=left + 120)
            if status["state"] == "ready" and status["ray"].get("alive_nodes") == self.nodes:
                return status
            assert time.monotonic() < deadline, (
                f"not ready with {self.nodes} nodes after {timeout} s: {status}"
            )
            time.sleep(2)

    def in_session(
        self, *command: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """COMMAND in a fresh session pod of the project, with these `--env` variables."""
        args = ["workspace", "exec", "--home", str(self.workspace.home), "--project", self.project]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        return run_cli([*args, "--", *command], cwd=self.cwd, env=self.env, timeout=600)

    def ray_client(self, script: str, *args: str, attempts: int = 3) -> subprocess.CompletedProcess[str]:
        """`python -c SCRIPT ray://<head>:10001 ARGS` in a fresh session pod with the variables `connect`
        gives. SCRIPT prints CLIENT_CONNECTED right after `ray.init()`: an attempt that failed before
        it (inside `ray.init()`: Ray Client's proxy could not start the connection's own server, seen
        on a loaded machine) ran nothing on the cluster, so it is made again, up to `attempts` times."""
        connect = self.cli_json("connect")
        env = {k: v for k, v in connect["env"].items() if k != "RAY_ADDRESS"}
        for attempt in range(1, attempts):
            proc = self.in_session("python", "-c", script, connect["address"], *args, env=env)
            if proc.returncode == 0 or CLIENT_CONNECTED in proc.stdout:
                return proc
            last = proc.stderr.strip().splitlines()[-1:]
            print(f"ray.init() failed in a session pod (attempt {attempt} of {attempts}): {last}")
        return self.in_session("python", "-c", script, connect["address"], *args, env=env)


def ray_processes(project_dir: Path, cluster: str, names: list[str]) -> list[psutil.Process]:
    """Processes of these Ray nodes: their temp dir in the command line, or their tag in the env."""
    temp_dirs = [str(node_temp_dir(project_dir, cluster, n)) for n in names]
    tags = {node_tag(project_dir, cluster, n) for n in names}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if any(t in cmdline for t in temp_dirs) or proc.environ().get("RAY_CAI_NODE_TAG") in tags:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


QUICK_START = REPO_ROOT / "cai_integration" / "quick_start.sh"


def quick_start_env(workspace: WorkspaceHandle) -> dict[str, str]:
    """What `quick_start.sh` runs with in the tests: no CML, Ray or GitHub settings of the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CML_", "CDSW_", "RAY_", "GITHUB_"))}
    env.update(
        RAY_CAI_WORKSPACE_HOME=str(workspace.home), CML_PROJECT_NAME="ray-cai-quick-start", COLUMNS="200"
    )
    return env


def run_quick_start(
    answers: list[str], env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`cai_integration/quick_start.sh` with these answers on stdin, one a line."""
    return subprocess.run(
        ["bash", str(QUICK_START)],
        input="\n".join(answers) + "\n",
        cwd=QUICK_START.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
