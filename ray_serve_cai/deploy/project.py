"""Find the deployment's project by exact name, or create it from the git repository and wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit, urlunsplit

from ray_serve_cai.cml import CMLClient, CMLError, Project, create_or_find

# `creation_status` values are not confirmed by any public source (reference §3, §12): treat the
# known terminal ones as such and anything else as "still creating" until the deadline.
CREATION_DONE = frozenset({"success", "succeeded", "ready", "running", "created"})
CREATION_FAILED = frozenset({"error", "failed", "failure"})


class ProjectError(RuntimeError):
    """The project could not be found, created or cloned; the message says what to do."""


def with_token(git_url: str, token: str | None) -> str:
    """The clone URL CML needs for a private https repository (the token is used for the clone only)."""
    if not token or not git_url.startswith("https://"):
        return git_url
    parts = urlsplit(git_url)
    netloc = f"x-access-token:{quote(token, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def wait_for_project(
    client: CMLClient,
    project_id: str,
    *,
    timeout: float = 600,
    poll_interval: float = 2.0,
    on_wait: Callable[[str, float], None] | None = None,
) -> Project:
    """Poll `creation_status` until the project is ready (or failed, or the deadline passes)."""
    started = time.monotonic()
    while True:
        project = client.get_project(project_id)
        status = (project.creation_status or "").lower()
        if status in CREATION_DONE or (not status and project.id):
            return project
        if status in CREATION_FAILED:
            detail = getattr(project, "error_message", None) or (project.model_extra or {}).get(
                "error_message"
            )
            raise ProjectError(
                f"creating project {project.name!r} failed (creation_status {status!r})"
                + (f": {detail}" if detail else "")
                + "; check the git URL and, for a private repository, GH_PAT"
            )
        elapsed = time.monotonic() - started
        if elapsed >= timeout:
            raise ProjectError(
                f"project {project.name!r} still has creation_status {status!r} after {timeout:.0f}s; "
                "the git clone may be slow or stuck: look at the project in the CML UI"
            )
        if on_wait:
            on_wait(status, elapsed)
        time.sleep(poll_interval)


def ensure_project(
    client: CMLClient,
    name: str,
    *,
    git_url: str | None,
    description: str = "",
    gh_pat: str | None = None,
    timeout: float = 600,
    on_wait: Callable[[str, float], None] | None = None,
) -> tuple[Project, bool]:
    """The project named exactly `name`; created from `git_url` when missing. Returns (project, created)."""
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
                name, template="git", git_url=with_token(git_url, gh_pat), description=description
            ),
            lambda: client.find_project_by_name(name),
            what=f"project {name!r}",
        )
    except CMLError as err:
        # The server may echo the clone URL: never let the token travel on in an error.
        message = str(err).replace(gh_pat, "***") if gh_pat else str(err)
        raise ProjectError(f"creating project {name!r} from {git_url} failed: {message}") from None
    return wait_for_project(client, created.id, timeout=timeout, on_wait=on_wait), True
