"""Autostop's cluster side with fake nodes (the head's decision itself is tested with real Ray):

- `set_autostop` (what `ray-cai autostop` does) records the setting with the applied spec: no
  application is touched, `plan` stays empty, a later `up` from the unchanged file keeps it;
- `run_action(stop)` (what the head does once idle) stops the workers first and the head last;
  `status` says `stopped` with how to start it; the watch's later passes leave it stopped;
  `up` clears the mark and starts every application again;
- `run_action(down)` deletes every application; a watch in the project does not re-create it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from support.fakes import (
    cli_env,
    client_for,
    fake_cluster_spec,
    fake_cluster_yaml,
    fake_project,
    list_apps,
    run_cli,
)

from ray_serve_cai.cluster import RayCluster
from ray_serve_cai.cluster.applied import ClusterRequest, read_record
from ray_serve_cai.cluster.autostop import event_path, run_action, set_autostop, stopped_mark
from ray_serve_cai.config import AutostopSpec
from ray_serve_cai.workspace.testing import WorkspaceHandle

CLUSTER = "astop"
HEAD = f"ray-{CLUSTER}-head"


def statuses(workspace: WorkspaceHandle, project_id: str) -> dict[str, str]:
    return {
        a["subdomain"]: a["status"]
        for a in list_apps(workspace, project_id)
        if a["subdomain"].startswith(f"ray-{CLUSTER}-") and not a["subdomain"].endswith("-lock")
    }


def test_setting_stop_status_watch_and_up(
    controls: WorkspaceHandle, project_files: Path, tmp_path: Path
) -> None:
    with fake_project(controls, "autostop-state", project_files) as project, client_for(controls) as client:
        pid = project["id"]
        spec = fake_cluster_spec(CLUSTER, 2)
        project_dir = controls.project_dir(pid)
        cluster = RayCluster(client, pid, spec, poll_interval=0.2, project_dir=project_dir)
        _, status = cluster.up(timeout=60)
        assert status.ready and status.autostop is not None and status.autostop["idle_timeout"] is None

        # `ray-cai autostop --idle 1800`: recorded, nothing restarted, plan empty, the next up keeps it
        controls.reset_counters()
        set_autostop(client, pid, CLUSTER, AutostopSpec(idle_timeout=1800, check_interval=5))
        record = read_record(client.list_applications(pid), CLUSTER)
        assert record is not None and record.spec["autostop"]["idle_timeout"] == 1800
        assert record.origin.source == "autostop"
        counts = controls.counters()["counts"]
        assert not [route for route in counts if route.endswith((":restart", ":stop"))], counts
        assert cluster.plan().is_noop
        status = cluster.status()
        assert (
            status.ready and status.autostop["idle_timeout"] == 1800 and status.autostop["action"] == "stop"
        )
        cluster.up(timeout=60)
        record = read_record(client.list_applications(pid), CLUSTER)
        assert record is not None and record.spec["autostop"]["idle_timeout"] == 1800  # kept

        # The head's action, then the watch: its later passes leave the stopped cluster alone; nor
        # does CML's automatic restart (of *failed* applications), here on with a 1 s delay.
        controls.set_restart_policy(enabled=True, delay_seconds=1)
        stopped_by_watch_test: list[str] = []
        passes: list[int] = []

        def on_pass(plan: Any, _status: Any) -> None:
            passes.append(len(plan.actions))
            if len(passes) == 1:  # after the watch's first pass (which starts a cluster): the head acts
                stopped_by_watch_test.append(
                    run_action(client, pid, CLUSTER, "stop", idle_seconds=1801.0, project_dir=project_dir)
                )

        watcher = RayCluster(client, pid, spec, poll_interval=0.2, project_dir=project_dir)
        thread = threading.Thread(target=lambda: watcher.watch(interval=0.5, on_pass=on_pass, max_passes=4))
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert stopped_by_watch_test == ["stopped 3 application(s)"]
        assert passes[1:] == [0, 0, 0], passes  # no restart, no create
        time.sleep(3)  # more than the automatic restart's delay
        apps = {a["subdomain"]: a for a in list_apps(controls, pid)}
        assert {statuses(controls, pid)[n] for n in statuses(controls, pid)} == {"APPLICATION_STOPPED"}
        # workers first, the head last
        head_stopped = apps[HEAD]["stopped_at"]
        assert all(apps[n]["stopped_at"] <= head_stopped for n in statuses(controls, pid) if n != HEAD)

        status = cluster.status()
        assert status.state == "stopped" and not status.ready
        stopped = next(c for c in status.conditions if c.type == "Stopped")
        assert stopped.status and "ray-cai up" in stopped.message
        assert status.autostop["stopped"]["by"] == "autostop"
        mark = stopped_mark(client.list_applications(pid), CLUSTER)
        assert mark is not None and mark.idle_seconds == 1801.0
        # the commands: `status` exit 1 saying how to start it; `autostop` refuses bad flags (exit 2)
        config = tmp_path / "ray_cluster_config.yaml"
        config.write_text(fake_cluster_yaml(CLUSTER, 2))
        env = cli_env(controls)
        human = run_cli(["status", "--project", pid], cwd=tmp_path, env=env)
        print(human.stdout, human.stderr)
        assert human.returncode == 1, human.stderr
        assert "Ray cluster 'astop': stopped" in human.stdout and "start it with `ray-cai up`" in human.stdout
        for bad, field in ((["--idle", "0"], "--idle"), (["--cancel", "--down"], "--cancel")):
            refused = run_cli(["autostop", *bad, "--project", pid], cwd=tmp_path, env=env)
            assert refused.returncode == 2 and field in refused.stderr, refused.stderr
        shown = run_cli(["autostop", "--project", pid, "--json"], cwd=tmp_path, env=env)
        assert shown.returncode == 0 and '"state": "stopped"' in shown.stdout, shown.stderr

        # `up` is a deliberate start: the mark goes, every application runs again, and the GCS state
        # stored before the stop (head fault tolerance) is not resumed: the cluster starts fresh.
        stored = project_dir / ".ray-cai" / CLUSTER / "gcs" / "c0ffee" / "CURRENT"
        stored.parent.mkdir(parents=True)
        stored.write_text("MANIFEST-000001\n")
        plan, status = RayCluster(client, pid, ClusterRequest(spec), poll_interval=0.2).up(timeout=60)
        assert status.ready, status.progress_line()
        assert not stored.parent.parent.exists()  # .ray-cai/<cluster>/gcs
        assert len(plan.actions) == 3 and {a.kind.value for a in plan.actions} == {"restart"}
        assert stopped_mark(client.list_applications(pid), CLUSTER) is None
        assert status.autostop["stopped"] is None and status.autostop["idle_timeout"] == 1800

        # `down` (by the head, while a watch runs): every application deleted, and the watch's later
        # passes in the project do not re-create the cluster.
        downs: list[str] = []
        passes.clear()

        def down_on_first_pass(plan: Any, _status: Any) -> None:
            passes.append(len(plan.actions))
            if len(passes) == 1:
                downs.append(
                    run_action(client, pid, CLUSTER, "down", idle_seconds=1900.0, project_dir=project_dir)
                )

        watcher = RayCluster(client, pid, spec, poll_interval=0.2, project_dir=project_dir)
        thread = threading.Thread(
            target=lambda: watcher.watch(interval=0.5, on_pass=down_on_first_pass, max_passes=3)
        )
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert downs == ["deleted 3 application(s)"] and passes == [0, 0, 0], (downs, passes)
        assert statuses(controls, pid) == {}
        assert '"down"' in event_path(project_dir, CLUSTER).read_text()
