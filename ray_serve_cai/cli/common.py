"""What every `ray-cai` command shares: the workspace to talk to, exit codes, error reporting, output.

Options are declared one way: `Annotated[T, typer.Option(...)]` aliases with the default after `=`
(`local: LocalFlag = False`). Which project, git URL or branch a command acts on is decided by the
deploy layer (`ray_serve_cai.deploy.project`, `ray_serve_cai.deploy.source`), not here, so Python
callers get the same answers.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ray_serve_cai.cml import CMLClient, CMLSettings
from ray_serve_cai.config import DEFAULT_CLUSTER_FILE
from ray_serve_cai.deploy.project import resolve_project
from ray_serve_cai.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, RayCaiError

__all__ = [
    "DEFAULT_CONFIG",
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "ConfigOption",
    "ConfigPath",
    "JsonFlag",
    "JsonOption",
    "LocalFlag",
    "LocalOption",
    "ProjectName",
    "ProjectOption",
    "Target",
    "err_console",
    "errors_to_exit_codes",
    "fail",
    "local_settings",
    "open_target",
    "out_console",
    "print_json",
    "run_command",
    "settings_for",
]

EXIT_INTERRUPTED = 130  # the shell's code for SIGINT

# soft_wrap: long lines (paths, URLs, export lines) stay whole when the output is not a terminal.
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)

T = TypeVar("T")

_LOCAL_HELP = "Use the local workspace (started if needed) instead of CML_HOST/CML_API_KEY."
_PROJECT_HELP = (
    "CML project name or id (default: CDSW_PROJECT_ID inside CML, else the project of "
    "cai_integration/jobs_config.yaml)."
)
_CONFIG_HELP = "Cluster config file."
_JSON_HELP = "Print machine-readable JSON on stdout."

# Options shared by the commands that talk to a workspace.
LocalFlag = Annotated[bool, typer.Option("--local", help=_LOCAL_HELP)]
ProjectName = Annotated[str | None, typer.Option("--project", "-p", help=_PROJECT_HELP)]
ConfigPath = Annotated[Path, typer.Option("--config", "-c", help=_CONFIG_HELP, show_default=True)]
JsonFlag = Annotated[bool, typer.Option("--json", help=_JSON_HELP)]
DEFAULT_CONFIG = Path(DEFAULT_CLUSTER_FILE)

# The same options as argument defaults, for cli/cluster.py until it moves to the aliases above.
LocalOption = typer.Option(False, "--local", help=_LOCAL_HELP)
ProjectOption = typer.Option(None, "--project", "-p", help=_PROJECT_HELP)
ConfigOption = typer.Option(DEFAULT_CONFIG, "--config", "-c", help=_CONFIG_HELP, show_default=True)
JsonOption = typer.Option(False, "--json", help=_JSON_HELP)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one clear line (or a few) on stderr and exit with `code`; never a traceback."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def errors_to_exit_codes() -> Iterator[None]:
    """Map the library's two error roots onto the CLI's exit codes: `BadInput` 2, `OperationFailed` 1
    (each error carries its `exit_code`)."""
    try:
        yield
    except RayCaiError as err:
        fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)


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


@contextmanager
def open_target(local: bool, project: str | None, *, create: bool = False) -> Iterator[Target]:
    """A client for the workspace and the project the command acts on (`resolve_project`)."""
    settings = settings_for(local)
    with CMLClient(settings) as client:
        found = resolve_project(client, project, local=local, create=create, on_create=err_console.print)
        yield Target(client=client, project_id=found.id, project_name=found.name, local=local)


def run_command(fn: Callable[[], T]) -> T:
    with errors_to_exit_codes():
        return fn()
