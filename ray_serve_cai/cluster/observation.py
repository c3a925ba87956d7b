"""One observation of a cluster, read once per pass: the value every pure step works from.

`RayCluster.observe()` makes it with one list call (every application of the project), one
request to the head's status endpoint when the head runs (Ray's own view; not an API call) and,
only when a part of the spec has no runtime yet, one list of runtimes. Everything else — the
applied-spec record, the lock, the owned apps — is read from those answers, never fetched again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ray_serve_cai.cluster.applied import AppliedRecord, read_record
from ray_serve_cai.cluster.lock import LockInfo, lock_app_name, lock_info
from ray_serve_cai.cluster.plan import ObservedApp, owned_apps
from ray_serve_cai.cluster.status import observed_app
from ray_serve_cai.cml import Application, Runtime
from ray_serve_cai.config import head_app_name


@dataclass(frozen=True)
class Observation:
    """What one pass saw. `at` is the wall-clock time (ISO 8601) records written from it carry."""

    cluster: str
    project_id: str
    apps: tuple[Application, ...]
    at: str
    ray: dict[str, Any] = field(default_factory=dict)  # the head's Ray view ({} when not asked/none)
    ray_problem: str | None = None  # why the head did not answer with its view
    head_url: str | None = None  # the head application's URL, when it exists
    runtimes: tuple[Runtime, ...] | None = None  # the catalog: listed only when a part has no runtime

    @cached_property
    def by_key(self) -> dict[str, Application]:
        """Every application by its key (`Application.key`)."""
        return {app.key: app for app in self.apps}

    def app(self, key: str) -> Application | None:
        return self.by_key.get(key)

    @cached_property
    def observed(self) -> list[ObservedApp]:
        """Every application as the planner sees it."""
        return [observed_app(app) for app in self.apps]

    @cached_property
    def owned(self) -> list[ObservedApp]:
        """The applications carrying this cluster's marker: the only ones a pass may touch."""
        return owned_apps(self.cluster, self.observed)

    @property
    def head(self) -> Application | None:
        """The cluster's own head application (None when absent or not carrying the marker)."""
        app = self.app(head_app_name(self.cluster))
        return app if app is not None and observed_app(app).owned_by(self.cluster) else None

    @cached_property
    def record(self) -> AppliedRecord | None:
        """The applied spec recorded on the head application."""
        return read_record(self.apps, self.cluster)

    @cached_property
    def lock(self) -> LockInfo | None:
        """The cluster's lock application, when one is listed."""
        app = self.app(lock_app_name(self.cluster))
        return lock_info(app) if app is not None else None


__all__ = ["Observation"]
