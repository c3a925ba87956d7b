"""Autostop's pure parts as tables: what is busy, the idle clock, when it fires, the stopped state,
the status view and its one-line description, and the setting's validation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ray_serve_cai.cluster.autostop import (
    StoppedMark,
    autostop_view,
    deleted_by_autostop,
    describe_view,
    event_path,
    stopped_state,
)
from ray_serve_cai.cml import Application
from ray_serve_cai.config import AutostopSpec, ConfigError
from ray_serve_cai.config.cluster import (
    cluster_json_schema,
    head_spec_hash,
    parse_cluster_spec,
    worker_spec_hash,
)
from ray_serve_cai.node.autostop import (
    AutostopMonitor,
    IdleClock,
    Recorded,
    ServeTraffic,
    demand_reasons,
    fires_in,
    job_reasons,
    serve_deploy_reasons,
    serve_reasons,
)

RUNNING, STOPPED, STOPPING, FAILED = (
    "APPLICATION_RUNNING",
    "APPLICATION_STOPPED",
    "APPLICATION_STOPPING",
    "APPLICATION_FAILED",
)


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        ([], []),
        (
            [{"type": "SUBMISSION", "submission_id": "raysubmit_1", "status": "RUNNING"}],
            ["job raysubmit_1 running"],
        ),
        (
            [{"type": "SUBMISSION", "submission_id": "raysubmit_2", "status": "PENDING"}],
            ["job raysubmit_2 pending"],
        ),
    ]
    + [
        ([{"type": "SUBMISSION", "submission_id": "s", "status": s}], [])
        for s in ("SUCCEEDED", "FAILED", "STOPPED")
    ]
    + [
        (
            [{"type": "DRIVER", "job_id": "03000000", "status": "RUNNING", "entrypoint": "python train.py"}],
            ["driver 03000000 connected (python train.py)"],
        ),
        (
            [
                {
                    "type": "DRIVER",
                    "job_id": "03000000",
                    "status": "SUCCEEDED",
                    "entrypoint": "python train.py",
                }
            ],
            [],
        ),
        (
            [
                {
                    "type": "DRIVER",
                    "job_id": "05000000",
                    "status": "RUNNING",
                    "entrypoint": "python -m ray.util.client.server --address=x",
                }
            ],
            ["a Ray client is connected (job 05000000)"],
        ),
    ],
)
def test_job_reasons(jobs: list[dict[str, Any]], expected: list[str]) -> None:
    assert job_reasons(jobs) == expected


@pytest.mark.parametrize(
    ("tasks", "groups", "expected"),
    [
        ([], [], []),
        ([({"CPU": 2.0}, 3)], [], ["3 task(s)/actor(s) wait for resources ({CPU: 2})"]),
        (
            [({"CPU": 1.0}, 1), ({"GPU": 1.0, "CPU": 4.0}, 2)],
            [],
            ["3 task(s)/actor(s) wait for resources ({CPU: 1}, {CPU: 4, GPU: 1})"],
        ),
        ([], [{"CPU": 4.0}], ["1 placement group(s) wait for resources"]),
    ],
)
def test_demand_reasons(
    tasks: list[tuple[dict[str, float], int]], groups: list[dict[str, float]], expected: list[str]
) -> None:
    assert demand_reasons(tasks, groups) == expected


def test_serve_deploy_reasons_from_serves_own_status() -> None:
    applications = {
        "iris": {"status": "RUNNING", "route_prefix": "/iris"},
        "llm": {"status": "DEPLOYING", "route_prefix": "/llm"},
        "old": {"status": "DELETING", "route_prefix": None},
        "broken": {"status": "DEPLOY_FAILED", "route_prefix": "/b"},
    }
    assert serve_deploy_reasons(applications) == [
        "Serve application llm is deploying",
        "Serve application old is deleting",
    ]


def test_serve_reasons_in_flight_first_then_recent_answers() -> None:
    assert serve_reasons({}, {}, 100.0) == []
    assert serve_reasons({"iris": 0}, {"iris": 97.0}, 100.0) == [
        "Serve application iris answered a request 3 s ago"
    ]
    assert serve_reasons({"iris": 2}, {"iris": 97.0}, 100.0) == [
        "Serve application iris has 2 request(s) in flight"
    ]


@pytest.mark.parametrize(
    ("events", "expected_idle"),
    [
        # (now, busy, last_request) per check, from a start at 0; idle seconds after the last one
        ([(10, False, None)], 10),
        ([(10, True, None), (40, False, None)], 30),
        ([(10, True, None), (20, False, None), (25, True, None), (30, False, None)], 5),
        ([(10, False, 8.0)], 2),  # a Serve request is a busy moment
        ([(10, False, 8.0), (50, False, 8.0)], 42),  # ... the same one counts once
        ([(10, False, 12.0)], 0),  # clocks never give a negative idle time
        # an autoscaler scale event is no busy moment: nothing in a check says it, so idle goes on
        ([(30, False, None), (60, False, None)], 60),
    ],
)
def test_idle_clock(events: list[tuple[float, bool, float | None]], expected_idle: float) -> None:
    clock = IdleClock(0.0)
    idle = 0.0
    for now, busy, last_request in events:
        idle = clock.observe(now, busy, last_request)
    assert idle == expected_idle


SETTING = AutostopSpec(idle_timeout=60, action="stop", check_interval=5)


@pytest.mark.parametrize(
    ("setting", "idle", "busy", "expected"),
    [
        (None, 100.0, [], None),
        (SETTING, 10.0, [], 50.0),
        (SETTING, 60.0, [], 0.0),
        (SETTING, 75.0, [], 0.0),
        (SETTING, 75.0, ["job x running"], None),
    ],
)
def test_fires_in(setting: AutostopSpec | None, idle: float, busy: list[str], expected: float | None) -> None:
    assert fires_in(setting, idle, busy) == expected


class ScriptedProbe:
    """Busy reasons by check (the Ray side is tested in tests/ray/test_autostop_ray.py)."""

    def __init__(self, script: list[list[str]]) -> None:
        self.script = script

    def busy(self, serve: ServeTraffic, now: float, since: float) -> list[str]:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_monitor_acts_once_idle_past_the_timeout_and_confirms_first() -> None:
    clock = Clock()
    acted: list[tuple[str, float]] = []
    recorded = [Recorded(SETTING)]
    monitor = AutostopMonitor(
        ScriptedProbe([["job a running"], [], ["job b pending"], []]),  # type: ignore[arg-type]
        ServeTraffic(clock=clock),
        setting=None,
        read_recorded=lambda: recorded[0],
        act=lambda action, idle: acted.append((action, idle)) or f"{action} done",
        clock=clock,
    )
    clock.now = 30
    assert monitor.check_once() is None  # busy (a job)
    assert monitor.report()["busy"] == ["job a running"] and monitor.report()["fires_in_seconds"] is None
    clock.now = 95  # idle 65 s: due, but the confirming check sees a job submitted a moment ago
    assert monitor.check_once() is None and acted == []
    clock.now = 150
    assert monitor.check_once() is None  # idle for 55 s only
    assert monitor.report()["fires_in_seconds"] == 5.0
    recorded[0] = Recorded(None)  # `ray-cai autostop --cancel`: off, Ray is not even asked
    clock.now = 500
    assert monitor.check_once() is None and acted == []
    assert monitor.report()["idle_seconds"] is None and monitor.report()["busy"] == []
    recorded[0] = Recorded(SETTING)  # on again: the idle count starts anew
    clock.now = 501
    assert monitor.check_once() is None and monitor.report()["fires_in_seconds"] == 60.0
    clock.now = 561
    assert monitor.check_once() == "stop done"
    assert acted == [("stop", 60.0)]
    recorded[0] = Recorded(SETTING, stopped=True)
    assert monitor.check_once() is None and len(acted) == 1


def test_monitor_keeps_the_last_setting_when_it_cannot_read_it() -> None:
    def unreadable() -> Recorded:
        raise OSError("connection refused")

    monitor = AutostopMonitor(
        ScriptedProbe([[]]),  # type: ignore[arg-type]
        ServeTraffic(),
        setting=SETTING,
        read_recorded=unreadable,
        act=None,
    )
    monitor.check_once()
    report = monitor.report()
    assert report["idle_timeout"] == 60 and "cannot read the autostop setting" in report["error"]


def test_serve_traffic_counts_per_application_by_route_prefix() -> None:
    traffic = ServeTraffic(clock=lambda: 7.0)
    traffic.routes = {"/iris": "iris", "/": "root"}
    assert traffic.application_of("/iris/predict") == "iris"
    assert traffic.application_of("/irisx") == "root"
    assert ServeTraffic().application_of("/llm/v1/chat") == "/llm"
    seen: list[dict[str, int]] = []

    async def upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(dict(traffic.in_flight))

    asyncio.run(traffic.wrap("/serve", upstream)({"type": "http", "path": "/serve/iris/predict"}, None, None))  # type: ignore[arg-type]
    assert seen == [{"iris": 1}]
    assert traffic.snapshot() == ({"iris": 0}, {"iris": 7.0})


def test_serve_traffic_counts_what_the_gateway_relays(tmp_path: Path) -> None:
    """In pods Serve's endpoint is the gateway: its note (wall clock, another pod) counts as requests
    answered (on this clock) and, while fresh, as requests in flight."""
    note = tmp_path / "serve-gateway-traffic.json"
    traffic = ServeTraffic(clock=lambda: 100.0, gateway=note, wall=lambda: 5000.0)
    traffic.routes = {"/iris": "iris"}
    assert traffic.snapshot() == ({}, {})  # no gateway (yet)
    note.write_text(
        json.dumps({"at": 4995.0, "last_request": {"/iris": 4990.0, "/llm": 4999.0}, "open": {"/iris": 2}})
    )
    assert traffic.snapshot() == ({"iris": 2}, {"iris": 90.0, "/llm": 99.0})
    assert serve_reasons(*traffic.snapshot(), now=100.0) == [
        "Serve application iris has 2 request(s) in flight",
        "Serve application /llm answered a request 1 s ago",
    ]
    # A note not rewritten for longer than its heartbeat allows: its gateway is gone, its open
    # requests with it; when they came still counts.
    note.write_text(json.dumps({"at": 4900.0, "last_request": {"/iris": 4899.0}, "open": {"/iris": 1}}))
    assert traffic.snapshot() == ({}, {"iris": -1.0})
    note.write_text("{not json")  # being replaced: as if absent
    assert traffic.snapshot() == ({}, {})


# ------------------------------------------------------------------------------------ cluster side

MARK = StoppedMark(at="2026-12-06T08:00:00+00:00", action="stop", idle_seconds=1830, reason="idle for 31 min")


@pytest.mark.parametrize(
    ("mark", "statuses", "expected"),
    [
        (None, [STOPPED, STOPPED], None),
        (MARK, [STOPPED, STOPPED], "stopped"),
        (MARK, [STOPPED, FAILED], "stopped"),
        (MARK, [RUNNING, STOPPING], "stopping"),
        (MARK.model_copy(update={"action": "down"}), [RUNNING], None),
    ],
)
def test_stopped_state(mark: StoppedMark | None, statuses: list[str], expected: str | None) -> None:
    assert stopped_state(mark, statuses) == expected


@pytest.mark.parametrize(
    ("setting", "report", "mark", "fires", "line"),
    [
        (None, None, None, None, "autostop: off"),
        (None, {"idle_seconds": 125, "busy": []}, None, None, "autostop: off (idle for 2 min)"),
        (
            AutostopSpec(idle_timeout=1800),
            {"idle_seconds": 720, "busy": []},
            None,
            1080.0,
            "autostop: idle for 12 min, stops in 18 min (idle_timeout 30 min, action stop)",
        ),
        (
            AutostopSpec(idle_timeout=1800, action="down"),
            {"idle_seconds": 1800, "busy": []},
            None,
            0.0,
            "autostop: idle for 30 min, deleted at the next check (idle_timeout 30 min, action down)",
        ),
        (
            AutostopSpec(idle_timeout=1800),
            {"idle_seconds": 0, "busy": ["job raysubmit_1 running"]},
            None,
            None,
            "autostop: busy — job raysubmit_1 running (idle_timeout 30 min, action stop)",
        ),
        (
            AutostopSpec(idle_timeout=1800),
            None,
            MARK,
            None,
            "autostop: stopped by autostop at 2026-12-06T08:00:00+00:00 after 30 min idle; "
            "start it with `ray-cai up`",
        ),
    ],
)
def test_autostop_view_and_line(
    setting: AutostopSpec | None,
    report: dict[str, Any] | None,
    mark: StoppedMark | None,
    fires: float | None,
    line: str,
) -> None:
    view = autostop_view(setting, report, mark)
    assert set(view) >= {"idle_timeout", "action", "idle_seconds", "fires_in_seconds", "busy"}
    assert view["fires_in_seconds"] == fires
    assert describe_view(view) == line


def _app(name: str, cluster: str = "c", **env: str) -> Application:
    return Application(
        id=name, name=name, subdomain=name, status=STOPPED, environment={"RAY_CAI_CLUSTER": cluster, **env}
    )


def test_deleted_by_autostop_needs_no_app_left_and_a_down_event(tmp_path: Path) -> None:
    assert not deleted_by_autostop([], "c", tmp_path)
    path = event_path(tmp_path, "c")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"action": "stop"}))
    assert not deleted_by_autostop([], "c", tmp_path)
    path.write_text(json.dumps({"action": "down"}))
    assert deleted_by_autostop([], "c", tmp_path)
    assert deleted_by_autostop([_app("ray-other-head", "other")], "c", tmp_path)
    assert not deleted_by_autostop([_app("ray-c-head")], "c", tmp_path)
    assert not deleted_by_autostop([], "c", None)


# ------------------------------------------------------------------------------------ the setting


def test_autostop_setting_validates_with_field_paths_and_restarts_nothing() -> None:
    base = {"ray_cluster": {"name": "c", "num_workers": 1}}
    off = parse_cluster_spec(base, env={})
    on = parse_cluster_spec(
        {"ray_cluster": {**base["ray_cluster"], "autostop": {"idle_timeout": 1800}}}, env={}
    )
    assert off.autostop is None
    assert on.autostop == AutostopSpec(idle_timeout=1800, action="stop", check_interval=30)
    # not part of any node's hash: turning it on or off restarts no application
    assert head_spec_hash(on) == head_spec_hash(off)
    assert worker_spec_hash(on, "worker") == worker_spec_hash(off, "worker")
    bad = {"idle_timeout": 0, "action": "halt", "check_interval": -1, "idle": 5}
    with pytest.raises(ConfigError) as caught:
        parse_cluster_spec({"ray_cluster": {**base["ray_cluster"], "autostop": bad}}, env={})
    fields = {p.field for p in caught.value.problems}
    assert fields == {
        "ray_cluster.autostop.idle_timeout",
        "ray_cluster.autostop.action",
        "ray_cluster.autostop.check_interval",
        "ray_cluster.autostop.idle",
    }
    schema = cluster_json_schema()
    section = schema["$defs"]["RayClusterFile"]["properties"]["autostop"]
    assert "AutostopFile" in json.dumps(section)
    assert schema["$defs"]["AutostopFile"]["properties"]["action"]["enum"] == ["stop", "down"]
