"""The deployment's CML project: find it by id or exact name, or create it from git and wait.

`resolve_project` is what every command that acts on a project uses (the cluster commands and
`deploy`): the project named on the command line, else the one CML runs us in (`CDSW_PROJECT_ID`),
else the one `CML_PROJECT_NAME` or the jobs file names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from ray_serve_cai.cml import CMLClient, CMLError, NotFound, Project, create_or_find
from ray_serve_cai.config import DEFAULT_JOBS_FILE, load_deploy_spec
from ray_serve_cai.deploy.fingerprint import RepoError, repo_root
from ray_serve_cai.errors import BadInput, OperationFailed
from ray_serve_cai.waiting import poll_until

# `creation_status` (the spec: "Creation status of the project (e.g. creating, success, failure)"):
# `success` is done, `failure` (and the `error`/`failed` spellings seen elsewhere) failed, anything
# else is "still creating" until the deadline.
CREATION_DONE = frozenset({"success", "succeeded", "ready", "running", "created"})
CREATION_FAILED = frozenset({"failure", "error", "failed"})

#: The project `--local` uses when neither the command line nor the jobs file names one.
LOCAL_PROJECT_NAME = "ray-serve-cai"
LOCAL_PROJECT_TIMEOUT = 300.0


class ProjectError(OperationFailed):
    """The project could not be found, created or cloned; the message says what to do."""


class ProjectNotGiven(BadInput):
    """No project is named anywhere (flag, CDSW_PROJECT_ID, CML_PROJECT_NAME, jobs file): exit 2."""


@dataclass(frozen=True)
class ProjectRef:
    """The project a command acts on."""

    id: str
    name: str


def with_token(git_url: str, token: str | None) -> str:
    """The clone URL CML needs for a private https repository (the token is used for the clone only)."""
    if not token or not git_url.startswith("https://"):
        return git_url
    parts = urlsplit(git_url)
    netloc = f"x-access-token:{quote(token, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _creation_failed(project: Project, status: str) -> ProjectError:
    detail = getattr(project, "error_message", None) or (project.model_extra or {}).get("error_message")
    return ProjectError(
        f"creating project {project.name!r} failed (creation_status {status!r})"
        + (f": {detail}" if detail else "")
        + "; check the git URL and, for a private repository, GH_PAT"
    )


def wait_for_project(
    client: CMLClient,
    project_id: str,
    *,
    timeout: float = 600,
    poll_interval: float = 2.0,
    on_wait: Callable[[str, float], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> Project:
    """Poll `creation_status` until the project is ready; ProjectError when the clone failed,
    WaitTimeout (naming the last status) when the deadline passes."""
    now = clock or time.monotonic
    started = now()
    last: list[Project] = []

    def ready() -> Project | None:
        project = client.get_project(project_id)
        last[:] = [project]
        status = (project.creation_status or "").lower()
        if status in CREATION_DONE or (not status and project.id):
            return project
        if status in CREATION_FAILED:
            raise _creation_failed(project, status)
        if on_wait:
            on_wait(status, now() - started)
        return None

    def describe() -> str:
        name, status = (last[0].name, last[0].creation_status) if last else (project_id, None)
        return (
            f"project {name!r} still has creation_status {status!r}; the git clone may be slow or "
            "stuck: look at the project in the CML UI"
        )

    return poll_until(
        ready,
        timeout=timeout,
        interval=poll_interval,
        what=f"project {project_id} to finish creating (git clone)",
        describe_last=describe,
        clock=now,
    )


def ensure_project(
    client: CMLClient,
    name: str,
    *,
    git_url: str | None,
    git_ref: str | None = None,
    description: str = "",
    gh_pat: str | None = None,
    timeout: float = 600,
    on_wait: Callable[[str, float], None] | None = None,
) -> tuple[Project, bool]:
    """The project named exactly `name`; created from `git_url` (at `git_ref`, the branch) when missing.
    Returns (project, created)."""
    existing = client.find_project_by_name(name)
    if existing is not None:
        return wait_for_project(client, existing.id, timeout=timeout, on_wait=on_wait), False
    if not git_url:
        raise ProjectError(
            f"project {name!r} does not exist and no git repository is known to create it from: "
            "set GITHUB_REPOSITORY=owner/repo or pass --git-url"
        )
    try:
        created = create_or_find(
            lambda: client.create_project(
                name, git_url=with_token(git_url, gh_pat), git_ref=git_ref or None, description=description
            ),
            lambda: client.find_project_by_name(name),
            what=f"project {name!r}",
        )
    except CMLError as err:
        # The server may echo the clone URL: never let the token travel on in an error.
        message = str(err).replace(gh_pat, "***") if gh_pat else str(err)
        raise ProjectError(f"creating project {name!r} from {git_url} failed: {message}") from None
    return wait_for_project(client, created.id, timeout=timeout, on_wait=on_wait), True


def default_project_name(
    env: Mapping[str, str] | None = None, jobs_file: str | Path = DEFAULT_JOBS_FILE
) -> str | None:
    """The project the deployment uses (CML_PROJECT_NAME, else the jobs file's), when there is one."""
    env = os.environ if env is None else env
    if env.get("CML_PROJECT_NAME"):
        return env["CML_PROJECT_NAME"]
    if not Path(jobs_file).exists():
        return None
    return load_deploy_spec(jobs_file, env=env).project.name


def resolve_project(
    client: CMLClient,
    project: str | None,
    *,
    local: bool,
    create: bool = False,
    checkout: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    on_create: Callable[[str], None] | None = None,
) -> ProjectRef:
    """The project to act on: `project` (an exact name or an id), else CDSW_PROJECT_ID (inside CML,
    not with `local`), else `default_project_name()` (`LOCAL_PROJECT_NAME` with `local`).

    With `local` and `create`, a missing project is created from the git checkout at `checkout`
    (default: the working directory), as CML would clone it. Raises ProjectNotGiven (bad input)
    when no project is named anywhere, ProjectError when it cannot be found or created.
    """
    settings = client.settings
    if project is None and settings.project_id and not local:
        return ProjectRef(settings.project_id, settings.project_id)
    name = project or default_project_name(env) or (LOCAL_PROJECT_NAME if local else None)
    if name is None:
        raise ProjectNotGiven(
            "no project given: pass --project NAME|ID, set CDSW_PROJECT_ID, or run where "
            f"{DEFAULT_JOBS_FILE} names the project"
        )
    found = client.find_project_by_name(name)
    if found is not None:
        return ProjectRef(found.id, found.name)
    try:
        by_id = client.get_project(name)
        return ProjectRef(by_id.id, by_id.name)
    except NotFound:
        pass
    if not (local and create):
        hint = " (`ray-cai up --local` creates it from this checkout)" if local else ""
        raise ProjectError(f"project {name!r} not found in {settings.host} (as a name or an id){hint}")
    return ProjectRef(create_local_project(client, name, checkout=checkout, on_create=on_create), name)


def create_local_project(
    client: CMLClient,
    name: str,
    *,
    checkout: str | Path | None = None,
    on_create: Callable[[str], None] | None = None,
) -> str:
    """Create project `name` in the local workspace by cloning the git checkout; returns its id."""
    try:
        repo = repo_root(Path.cwd() if checkout is None else Path(checkout))
    except RepoError:
        raise ProjectError(
            "--local needs to run inside a git checkout of the project (it is cloned into the workspace)"
        ) from None
    if on_create:
        on_create(f"creating local project {name!r} from {repo}")
    created = client.create_project(name, git_url=str(repo))
    wait_for_project(client, created.id, timeout=LOCAL_PROJECT_TIMEOUT)
    return created.id
