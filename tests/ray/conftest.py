"""The real-Ray tier: real Ray clusters in the session's local workspace.

A real cluster is the expensive part of the suite (a minute or more to come up on 2 cores), so:

* **Take `ray_cluster`** when a test only *uses* a cluster — submit jobs, read status, connect a client,
  read logs, open the dashboard: a `support.cli.LocalCluster`, already `up` and ready, of 1 head + 1
  worker (1 CPU, 1 GiB each) named `SHARED_CLUSTER` in project `SHARED_PROJECT`; its nodes are
  `SHARED_HEAD` and `SHARED_WORKER` (all in `support.cli`). Drive it with `ray_cluster.cli(...)`,
  `.cli_json(...)`, `.popen(...)`, `.apps()`, `.app_url(SHARED_HEAD)`. Leave it as you found it: give
  jobs submission ids of your own, and never scale, stop, restart, kill, reconfigure or `down` it.
* **Bring up your own cluster** (module-scoped, one per module at most) only when the test changes or
  kills it — scale, heal, head restart, autoscaler, Serve on a head that is killed, `down`. Keep such
  modules few and rich.

The modules that take `ray_cluster` run first in this tier, and the shared cluster comes down right
after the last test that takes it. Under `pytest -n 3 --dist loadgroup` the tier is three xdist
groups, one a worker (tests/conftest.py): `ray` — every module that takes `ray_cluster` (a session
fixture is one per worker: its users must share a worker) and, by default, any other (node, run,
deploy) — and `ray-2`, `ray-3`, modules that bring up their own cluster and say so with
`pytestmark = pytest.mark.xdist_group("ray-2")`: `ray-2` the cluster, autoscaler, autostop and
guided-setup modules, `ray-3` head fault tolerance and network faults (one pods cluster) and Serve.
So three clusters may run at once, each in its worker's own workspace (names never collide). The
tier is CPU-bound on 2 cores (Ray's processes starting; more workers only made it slower, with Ray
nodes timing out during startup): balance the groups by the times the run's `tiers` section gives.

Every cluster runs in the session workspace, in pods where they can be made (its default, as on CML;
`RAY_CAI_TEST_PODS=0` runs the tier shared-host). In pods the head has fault tolerance, so a job's
driver runs on a worker by default (`--driver-on auto`): a test that follows a driver's log finds it
there (`ray-cai logs --file job-driver-<id>.log`), and a test that deletes a worker while a job runs
puts that job's driver on the head (`--driver-on head`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.cli import (
    SHARED_CLUSTER,
    SHARED_HEAD,
    SHARED_PROJECT,
    SHARED_WORKER,
    LocalCluster,
    ray_processes,
)
from support.fakes import SMALL_CLUSTER_YAML

from ray_serve_cai.workspace.testing import WorkspaceHandle

SHARED_FIXTURE = "ray_cluster"
_last_user = pytest.StashKey[pytest.Item]()


class _Shared:
    """The shared cluster and its teardown, run once: after the last test that takes it, or at the
    end of the session if that test was not selected."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        down = self.cluster.down()
        if self.cluster.project_id:
            for proc in ray_processes(self.cluster.project_dir, SHARED_CLUSTER, [SHARED_HEAD, SHARED_WORKER]):
                proc.kill()
            self.cluster.workspace.api("DELETE", f"/api/v2/projects/{self.cluster.project_id}", timeout=120)
        assert down.returncode == 0, f"down of the shared cluster failed:\n{down.stderr}\n{down.stdout}"


_shared: _Shared | None = None


@pytest.fixture(scope="session")
def ray_cluster(
    workspace: WorkspaceHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """A ready real Ray cluster of 1 head + 1 worker, shared by every test that does not change it."""
    global _shared
    config = tmp_path_factory.mktemp("shared-cluster") / "ray_cluster_config.yaml"
    config.write_text(SMALL_CLUSTER_YAML.format(name=SHARED_CLUSTER, workers=1))
    cluster = LocalCluster(workspace, SHARED_PROJECT, config=config, info_file=config.parent / "info.json")
    _shared = _Shared(cluster)
    try:
        result = cluster.up()
        assert result["status"]["state"] == "ready", result["status"]
        yield cluster
    finally:
        _shared.close()


def _uses_shared(item: pytest.Item) -> bool:
    return SHARED_FIXTURE in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Within this tier, the modules that take the shared cluster first (each module kept whole)."""
    ray_items = [i for i in items if i.get_closest_marker("ray") is not None]
    if not ray_items:
        return
    modules: dict[str, list[pytest.Item]] = {}
    for item in ray_items:
        modules.setdefault(str(item.path), []).append(item)
    ordered = sorted(modules.values(), key=lambda group: not any(_uses_shared(i) for i in group))
    start = items.index(ray_items[0])
    rest = [i for i in items[start:] if i.get_closest_marker("ray") is None]
    items[start:] = [i for group in ordered for i in group] + rest
    users = [i for i in items if _uses_shared(i)]
    if users:
        config.stash[_last_user] = users[-1]  # the item itself: xdist may rename node ids


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:  # after the test's own fixtures are gone
        if _shared is not None and item is item.config.stash.get(_last_user, None):
            _shared.close()
