"""What every `ray-cai` command shares: target resolution, exit codes, error reporting, output."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ray_serve_cai.cluster import ClusterError
from ray_serve_cai.cluster.runtimes import RuntimeChoiceError
from ray_serve_cai.cml import CMLClient, CMLError, CMLSettings, CMLSettingsError, NotFound
from ray_serve_cai.config import ConfigError
from ray_serve_cai.deploy.fingerprint import RepoError, repo_root
from ray_serve_cai.deploy.jobs import JobChainError
from ray_serve_cai.deploy.project import ProjectError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

LOCAL_PROJECT_NAME = "ray-serve-cai"
JOBS_FILE = "cai_integration/jobs_config.yaml"

# soft_wrap: long lines (paths, URLs, export lines) stay whole when the output is not a terminal.
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)

T = TypeVar("T")

# Options shared by the commands that talk to a workspace.
LocalOption = typer.Option(
    False, "--local", help="Use the local workspace (started if needed) instead of CML_HOST/CML_API_KEY."
)
ProjectOption = typer.Option(
    None,
    "--project",
    "-p",
    help="CML project name or id (default: CDSW_PROJECT_ID inside CML, else the project of "
    "cai_integration/jobs_config.yaml).",
)
ConfigOption = typer.Option(
    Path("ray_cluster_config.yaml"), "--config", "-c", help="Cluster config file.", show_default=True
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one clear line (or a few) on stderr and exit with `code`; never a traceback."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def errors_to_exit_codes() -> Iterator[None]:
    """Map the library's exceptions onto the CLI's exit codes: 2 bad input, 1 failure."""
    try:
        yield
    except (ConfigError, CMLSettingsError) as err:
        fail(str(err), EXIT_BAD_INPUT)
    except (CMLError, ClusterError, ProjectError, JobChainError, RepoError, RuntimeChoiceError) as err:
        fail(str(err), EXIT_FAILED)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


@dataclass
class Target:
    """A client and the project it acts on."""

    client: CMLClient
    project_id: str
    project_name: str
    local: bool


def local_settings() -> CMLSettings:
    """Settings for the local workspace, starting it when it is not running."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        fail(
            f"--local needs the local workspace's server packages ({', '.join(missing)} missing): "
            "pip install 'ray-serve-cai[workspace]'",
            EXIT_BAD_INPUT,
        )
    from ray_serve_cai.workspace.daemon import WorkspaceError, ensure_workspace

    try:
        info = ensure_workspace()
    except WorkspaceError as err:
        fail(f"could not start the local workspace: {err}")
    return CMLSettings(host=info.url, api_key=info.api_key)


def settings_for(local: bool) -> CMLSettings:
    return local_settings() if local else CMLSettings.from_env()


def resolve_project(
    client: CMLClient, project: str | None, *, local: bool, create: bool = False
) -> tuple[str, str]:
    """Find the project by id or exact name; with --local and `create`, clone this git repo if missing."""
    settings = client.settings
    if project is None and settings.project_id and not local:
        return settings.project_id, settings.project_id
    name = project or default_project_name() or (LOCAL_PROJECT_NAME if local else None)
    if name is None:
        fail(
            "no project given: pass --project NAME|ID, set CDSW_PROJECT_ID, or run where "
            f"{JOBS_FILE} names the project",
            EXIT_BAD_INPUT,
        )
    found = client.find_project_by_name(name)
    if found is not None:
        return found.id, found.name
    try:
        by_id = client.get_project(name)
        return by_id.id, by_id.name
    except NotFound:
        pass
    if not (local and create):
        hint = " (`ray-cai up --local` creates it from this checkout)" if local else ""
        fail(f"project {name!r} not found in {settings.host} (as a name or an id){hint}", EXIT_FAILED)
    return _create_local_project(client, name), name


def default_project_name() -> str | None:
    """The project the deployment uses (CML_PROJECT_NAME or jobs_config.yaml), when there is one."""
    if os.environ.get("CML_PROJECT_NAME"):
        return os.environ["CML_PROJECT_NAME"]
    if not Path(JOBS_FILE).exists():
        return None
    from ray_serve_cai.config import load_deploy_spec

    return load_deploy_spec(JOBS_FILE).project.name


def _create_local_project(client: CMLClient, name: str) -> str:
    from ray_serve_cai.deploy.project import wait_for_project

    try:
        repo = repo_root(Path.cwd())
    except RepoError:
        fail("--local needs to run inside a git checkout of the project (it is cloned into the workspace)")
    err_console.print(f"creating local project {name!r} from {repo}")
    created = client.create_project(name, template="git", git_url=str(repo))
    wait_for_project(client, created.id, timeout=300)
    return created.id


@contextmanager
def open_target(local: bool, project: str | None, *, create: bool = False) -> Iterator[Target]:
    settings = settings_for(local)
    with CMLClient(settings) as client:
        project_id, project_name = resolve_project(client, project, local=local, create=create)
        yield Target(client=client, project_id=project_id, project_name=project_name, local=local)


def run_command(fn: Callable[[], T]) -> T:
    with errors_to_exit_codes():
        return fn()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}
