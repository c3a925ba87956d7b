"""The one path that creates and deletes a node's application: `up`, the watch and Ray's autoscaler
(`ray_serve_cai.autoscale`) all go through it, so the fields, markers and the create-then-look rule
of a node app exist once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, TypeVar

from ray_serve_cai.cluster.applied import APPLIED_SPEC_VAR, AppliedRecord
from ray_serve_cai.cml import (
    Application,
    BadRequest,
    CMLClient,
    Conflict,
    NotFound,
    create_application_or_find,
)
from ray_serve_cai.config import NodeSpec
from ray_serve_cai.config.node_env import CLUSTER_VARIABLE

log = logging.getLogger("ray_serve_cai.cluster")

T = TypeVar("T")


def node_app_fields(node: NodeSpec, record: AppliedRecord | None = None) -> dict[str, Any]:
    """The application fields of a node (name = subdomain, markers, spec hash); the head also
    carries the applied-spec `record` when one is to be written."""
    fields = node.app_fields()
    if node.role == "head" and record is not None:
        fields["environment"][APPLIED_SPEC_VAR] = record.encode()
    return {"name": node.name, "subdomain": node.name, "description": node.description, **fields}


def create_node_app(
    client: CMLClient,
    project_id: str,
    cluster: str,
    node: NodeSpec,
    *,
    record: AppliedRecord | None = None,
    attempts: int = 4,
) -> Application:
    """Create one node's application; a create whose outcome is unknown is observed, not repeated
    (an app of that name without this cluster's marker is someone else's: CMLError)."""
    app = create_application_or_find(
        client,
        project_id,
        node_app_fields(node, record),
        owner=(CLUSTER_VARIABLE, cluster),
        attempts=attempts,
    )
    log.info("created %s", node.name)
    return app


def delete_app(client: CMLClient, project_id: str, app_id: str, name: str) -> None:
    """Delete an application; one already gone is the desired state. Official Cloudera code deletes
    running applications directly; should a workspace refuse to delete a running one, stop it first."""
    log.info("deleting %s", name)
    try:
        client.delete_application(project_id, app_id)
    except NotFound:
        return
    except (BadRequest, Conflict):
        with suppress(NotFound):
            client.stop_application(project_id, app_id)
            client.delete_application(project_id, app_id)


def run_parallel(fn: Callable[[T], object], items: Sequence[T], max_parallel: int) -> list[BaseException]:
    """Run `fn` on every item at once (at most `max_parallel` threads); the errors, in item order."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(items)))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        errors = [f.exception() for f in futures]
    return [e for e in errors if e is not None]


__all__ = ["create_node_app", "delete_app", "node_app_fields", "run_parallel"]
