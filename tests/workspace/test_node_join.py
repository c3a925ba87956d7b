"""A node whose application runs but that never joins Ray: `up` replaces it once, then fails naming
it and the last error its health page reports; the watch replaces it until it joins.

Fake nodes (tests/support/apps/fake_ray_node.py): a node started while its never-join marker file exists
answers HTTP, writes no heartbeat, and reports a `ray start` error, as a real node whose Ray keeps
failing does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from support.fakes import client_for, fake_cluster_spec, fake_project, list_apps

from ray_serve_cai.cluster import ClusterError, RayCluster
from ray_serve_cai.workspace.testing import WorkspaceHandle

RESTART_ROUTE = "POST /api/v2/projects/{project_id}/applications/{application_id}:restart"
# `up` replaces a node that runs outside Ray for half its wait, so within the wait the apps must start,
# the stuck node stay outside Ray for half of it, and its replacement start again (a new pod, a node
# process importing our config models): seen at 2-4 s each on a loaded 2-core machine. With 6 s the
# replacement had under a second left and was still STARTING at the deadline; 16 s leaves it ~5 s.
STARTUP_TIMEOUT = 16.0


def test_a_node_that_never_joins_fails_up_by_name_and_the_watch_replaces_it(
    controls: WorkspaceHandle, project_files: Path
) -> None:
    with fake_project(controls, "never-join", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        spec = fake_cluster_spec("nvj", 2, startup_timeout=STARTUP_TIMEOUT)
        stuck, fine = "ray-nvj-worker-1", "ray-nvj-worker-0"
        marker = controls.project_dir(pid) / ".ray-cai" / "nvj" / "fake-never-join" / stuck
        marker.parent.mkdir(parents=True)
        marker.write_text("")
        controls.reset_counters()

        with pytest.raises(ClusterError) as failure:
            RayCluster(client, pid, spec, poll_interval=0.2).up()
        message = str(failure.value)
        assert f"{stuck}: running but not in Ray" in message, message
        assert "Address already in use" in message, message
        assert f"{fine}:" not in message, "a node that joined is not named as a problem"
        # Half-way through its wait, `up` replaced the node once (it then failed the same way).
        assert controls.counters()["counts"].get(RESTART_ROUTE, 0) == 1
        apps = {a["subdomain"]: a for a in list_apps(controls, pid)}
        assert apps[stuck]["status"] == "APPLICATION_RUNNING"

        # The cause goes away; only a restart of the app lets the node join: the watch does it.
        marker.unlink()
        actions: list[str] = []
        stop = threading.Event()
        watcher_client = client_for(controls)
        rc = RayCluster(watcher_client, pid, spec, poll_interval=0.2)

        def on_pass(plan: object, status: object) -> None:
            actions.extend(a.describe() for a in plan.actions)  # type: ignore[attr-defined]
            if status.ready:  # type: ignore[attr-defined]
                stop.set()

        thread = threading.Thread(
            target=rc.watch, kwargs={"interval": 0.5, "on_pass": on_pass, "should_stop": stop.is_set}
        )
        thread.start()
        try:
            assert stop.wait(STARTUP_TIMEOUT + 20), f"the watch did not heal the cluster: {actions}"
        finally:
            stop.set()
            thread.join(timeout=30)
            watcher_client.close()
        replaced = [a for a in actions if stuck in a and "running but not in Ray" in a]
        assert replaced and "Address already in use" in replaced[0], actions
        assert not [a for a in actions if fine in a], actions
        assert RayCluster(client, pid, spec).status().ready
